/**
 * The hook table: every hook the core calls, declared once, each with its tapable kind. Plugins get
 * a tap-only view of it (see {@link createTapView}); the core wraps each tap so that whatever a
 * handler throws comes out as a KATA_ERR_PLUGIN_HOOK error naming the plugin and the hook.
 *
 * Order within a hook is set with the named {@link STAGE} constants, never bare numbers.
 */
import { AsyncParallelHook, AsyncSeriesBailHook, AsyncSeriesHook, SyncBailHook, SyncHook, SyncWaterfallHook } from 'tapable';
import type { CapabilityView, ReadonlyCapabilities } from './capabilities.js';
import { SCOPE_FOR_PLUGIN } from './capabilities.js';
import type { KataConfig, RawConfig } from './config/types.js';
import { KataError } from './errors.js';
import type { HostCheckContext } from './host-check.js';
import { silentLogger, type Logger } from './logger.js';
import type { SandboxPlan } from './plan.js';
import type { VerdictView } from './verdict.js';
import type { ContainerContext, RootfsAttachment, RootfsMount, RootfsSource, VmContext, VmExit, VmHandle } from './vm.js';

/** Named stages: hypervisor plugins first (they declare capabilities and describe the VM), confidential-computing plugins late (they remove and restrict), the hypervisor's rendering last. */
export const STAGE = Object.freeze({
  /** The hypervisor plugin: base capabilities (with the `render:*` ones), its VM description as intents. */
  HYPERVISOR: -100,
  /** Device and feature plugins (shared fs, block devices): the default; they add intents. */
  DEVICES: 0,
  /** Confidential-computing plugins: remove what a TEE cannot have, set the confidential intent. */
  CONFIDENTIAL: 100,
  /** The hypervisor plugin renders the finished intents into its own format and launch artefact (argv, request body). */
  FINALIZE: 1000,
});

export type Stage = (typeof STAGE)[keyof typeof STAGE];

/** What the container hooks (`containerCreated`, `containerStarted`, `containerExited`) receive. */
export interface ContainerEvent {
  /** The sandbox the container runs in. */
  readonly sandbox: VmContext;
  readonly containerId: string;
}

/**
 * Hooks that tell plugins of something that has already happened. A handler that throws cannot undo
 * it: its error is logged (KATA_ERR_PLUGIN_HOOK, or its own code, with `plugin` and `hook`) and the
 * other handlers and the operation go on.
 */
export const NOTICE_HOOKS: ReadonlySet<string> = new Set(['containerCreated', 'containerStarted', 'containerExited', 'sandboxStopped']);

/** Creates the hook table of one runtime instance. */
export function createHooks() {
  return Object.freeze({
    /**
     * The parsed TOML, before the shape check. Return a (possibly new) raw object to normalise or
     * migrate keys. Runs after plugins are loaded, so it cannot change which plugins load.
     */
    configParsed: new SyncWaterfallHook<[RawConfig]>(['raw']),
    /**
     * Declare what this configuration's VM can do. The hypervisor plugin taps at STAGE.HYPERVISOR
     * and adds its capabilities; later plugins add (a shared-fs daemon's features) or remove (a TEE
     * removes CPU/memory hot-plug). Handlers receive a view that stamps changes with their name.
     */
    capabilities: new SyncHook<[CapabilityView, KataConfig]>(['capabilities', 'config']),
    /**
     * The validated config phase: record vetoes (`verdict.veto`), requirements
     * (`verdict.require(capability, why)`) and warnings. The core then checks requirements against
     * capabilities and throws one error listing every problem.
     */
    validate: new SyncHook<[KataConfig, VerdictView, ReadonlyCapabilities]>(['config', 'verdict', 'capabilities']),
    /**
     * Build the sandbox plan. `plan.vm` is hypervisor-neutral intents (core/plan.ts), started by
     * the core from the common keys: the hypervisor plugin may replace it at STAGE.HYPERVISOR,
     * device plugins add device intents, confidential plugins set `vm.confidential`, and the
     * hypervisor plugin renders the whole of it at STAGE.FINALIZE into `plan.vm.launch` (the
     * artefact `validate` shows) and `plan.vm.native` (its driver's form). Afterwards the core
     * refuses any intent the hypervisor plugin did not declare a `render:*` capability for. Runs
     * only for a valid configuration.
     */
    plan: new SyncWaterfallHook<[SandboxPlan, KataConfig, ReadonlyCapabilities]>(['plan', 'config', 'capabilities']),
    /**
     * The last word on the resolved plan, before any VM starts: `plan` is final and frozen (the
     * hypervisor plugin's resolved values, e.g. `plan.vm.memory.maxMiB`, and its launch artefact).
     * Veto through `verdict` as in `validate`: a veto is a problem of the validated config phase,
     * listed by `validate`, and nothing is started. Runs only when the plan was built without problems.
     */
    checkPlan: new SyncHook<[SandboxPlan, KataConfig, VerdictView]>(['plan', 'config', 'verdict']),
    /**
     * Before the VM is created: start host-side daemons the plan lists (virtiofsd …). A handler
     * that throws aborts the start; what already started is stopped through `vmStopped`.
     */
    beforeVmStart: new AsyncSeriesHook<[VmContext]>(['ctx']),
    /**
     * Create the VM. The hypervisor plugin that rendered `ctx.plan.vm` returns a VmHandle (not yet
     * started); the others return undefined. First answer wins.
     */
    createVm: new AsyncSeriesBailHook<[VmContext], VmHandle | undefined>(['ctx']),
    /** The VM is running and its control channel answers. */
    vmStarted: new AsyncSeriesHook<[VmContext, VmHandle]>(['ctx', 'vm']),
    /**
     * The guest agent answers and has set the sandbox up (CreateSandbox, the pod's network): the
     * sandbox is about to be reported ready. A handler that throws fails the sandbox start, and
     * everything started is stopped (`vmStopped` runs).
     */
    agentReady: new AsyncSeriesHook<[VmContext]>(['ctx']),
    /**
     * Deliver a container's rootfs into the guest. A plugin that can (devmapper, for a block-device
     * rootfs) hot-plugs or shares it and answers how the agent finds it; first answer wins. When
     * no plugin answers, the core shares a directory rootfs through the shared filesystem.
     */
    attachRootfs: new AsyncSeriesBailHook<[ContainerContext], RootfsAttachment | undefined>(['container']),
    /**
     * Before a front end mounts a container's rootfs on the host: a plugin that delivers such
     * mounts as they are (devmapper: one mount of a block device, hot-plugged unmounted) answers
     * with the source it will attach; first answer wins. When none answers, the mounts are
     * mounted on the host and shared as a directory. The one place the block-rootfs decision is made.
     */
    classifyRootfs: new SyncBailHook<[readonly RootfsMount[], SandboxPlan], RootfsSource | undefined>(['mounts', 'plan']),
    /**
     * The VM has stopped, or failed to start (then `exit` is undefined): stop daemons, clean up.
     * Handlers run in parallel, so one that fails does not keep the others from cleaning up.
     */
    vmStopped: new AsyncParallelHook<[VmContext, VmExit | undefined]>(['ctx', 'exit']),
    /** The container exists in the guest (CreateContainer answered), not yet started. A notice: a handler that throws is logged. */
    containerCreated: new AsyncSeriesHook<[ContainerEvent]>(['container']),
    /** The container's process runs (StartContainer answered). A notice: a handler that throws is logged. */
    containerStarted: new AsyncSeriesHook<[ContainerEvent]>(['container']),
    /**
     * The container's process ended with `status` (its exit code, or 128 + signal number), as the
     * runtime learns it (waiting on the process); once per container. A notice: a handler that throws is logged.
     */
    containerExited: new AsyncSeriesHook<[ContainerEvent, number]>(['container', 'status']),
    /**
     * The sandbox was stopped on request: its containers deleted, the VM stopped, the run directory
     * removed (after `vmStopped`). A notice: a handler that throws is logged.
     */
    sandboxStopped: new AsyncSeriesHook<[VmContext, VmExit]>(['ctx', 'exit']),
    /**
     * `kata-runtime check`: after the core's host checks, plugins add lines for what only they can
     * probe (the clh plugin asks the binary's `vmm.ping` for its version and features). Runs only
     * for a configuration that passed the shape check; a handler that throws fails the command.
     */
    hostChecks: new AsyncSeriesHook<[HostCheckContext]>(['check']),
  });
}

export type Hooks = ReturnType<typeof createHooks>;
export type HookName = keyof Hooks;

/** Argument types as a plugin sees them (scoped views instead of the core's objects). */
type TapArgs<H> = H extends { call(...args: infer A): unknown } ? A : H extends { promise(...args: infer A): unknown } ? A : never;
type TapResult<H> = H extends { call(...args: never[]): infer R } ? R | undefined : never;
type TapPromiseResult<H> = H extends { promise(...args: never[]): Promise<infer R> } ? Promise<R | undefined> : never;

export interface TapOptions {
  /** Must be the plugin's own name when given. */
  name?: string;
  stage?: Stage;
}

/** Synchronous hooks are tapped with `tap`, asynchronous ones with `tapPromise`. */
export type TapOnly<H> = H extends { call(...args: never[]): unknown }
  ? { tap(nameOrOptions: string | TapOptions, fn: (...args: TapArgs<H>) => TapResult<H>): void }
  : { tapPromise(nameOrOptions: string | TapOptions, fn: (...args: TapArgs<H>) => TapPromiseResult<H>): void };

/** What a plugin's apply() receives as `hooks`: tap, and nothing else. */
export type TapOnlyHooks = { readonly [K in HookName]: TapOnly<Hooks[K]> };

/** Objects the core passes to hooks that hand out per-plugin views. */
interface Scopable {
  [SCOPE_FOR_PLUGIN](plugin: string, hook: string): unknown;
}

function scope(arg: unknown, plugin: string, hook: string): unknown {
  if (arg !== null && typeof arg === 'object' && SCOPE_FOR_PLUGIN in arg) return (arg as Scopable)[SCOPE_FOR_PLUGIN](plugin, hook);
  return arg;
}

/**
 * Builds the tap-only view of `hooks` for one plugin. Every handler is wrapped: its arguments are
 * replaced by views stamped with the plugin's name, and anything it throws becomes a
 * KATA_ERR_PLUGIN_HOOK error carrying `plugin` and `hook` (a KataError thrown on purpose keeps its
 * own code but gains the plugin and hook).
 */
export function createTapView(hooks: Hooks, plugin: string, log: Logger = silentLogger()): TapOnlyHooks {
  type Fn = (...args: unknown[]) => unknown;
  type RawHook = {
    call?: unknown;
    tap(opts: { name: string; stage?: number }, fn: Fn): void;
    tapPromise(opts: { name: string; stage?: number }, fn: Fn): void;
  };
  const view: Record<string, Record<string, (nameOrOptions: string | TapOptions, fn: Fn) => void>> = {};
  for (const hookName of Object.keys(hooks) as HookName[]) {
    const hook = hooks[hookName] as unknown as RawHook;
    const tapOptions = (nameOrOptions: string | TapOptions, fn: Fn) => {
      const opts = typeof nameOrOptions === 'string' ? { name: nameOrOptions } : (nameOrOptions ?? {});
      if (opts.name !== undefined && opts.name !== plugin) {
        throw new KataError('KATA_ERR_PLUGIN_TAP', `tapped hook "${hookName}" as "${opts.name}"; a plugin taps under its own name`, { plugin, hook: hookName });
      }
      if (typeof fn !== 'function') {
        throw new KataError('KATA_ERR_PLUGIN_TAP', `tapped hook "${hookName}" without a handler function`, { plugin, hook: hookName });
      }
      return { name: plugin, ...(opts.stage === undefined ? {} : { stage: opts.stage }) };
    };
    const entry: Record<string, (nameOrOptions: string | TapOptions, fn: Fn) => void> =
      typeof hook.call === 'function'
        ? {
            tap(nameOrOptions: string | TapOptions, fn: Fn) {
              hook.tap(tapOptions(nameOrOptions, fn), (...args: unknown[]) => {
                try {
                  return fn(...args.map((a) => scope(a, plugin, hookName)));
                } catch (e) {
                  throw stampHookError(e, plugin, hookName);
                }
              });
            },
          }
        : {
            tapPromise(nameOrOptions: string | TapOptions, fn: Fn) {
              hook.tapPromise(tapOptions(nameOrOptions, fn), async (...args: unknown[]) => {
                try {
                  return await fn(...args.map((a) => scope(a, plugin, hookName)));
                } catch (e) {
                  const err = stampHookError(e, plugin, hookName);
                  if (!NOTICE_HOOKS.has(hookName)) throw err;
                  log.error({ err, plugin, hook: hookName, code: err.code }, `[plugin ${plugin}] ${hookName} handler failed: ${err.text}`);
                  return undefined;
                }
              });
            },
          };
    view[hookName] = Object.freeze(entry);
  }
  return new Proxy(Object.freeze(view), {
    get(target, prop) {
      if (typeof prop === 'string' && !(prop in target)) {
        throw new KataError('KATA_ERR_PLUGIN_TAP', `there is no hook "${prop}"; hooks are: ${Object.keys(target).join(', ')}`, { plugin, hook: prop });
      }
      return Reflect.get(target, prop);
    },
  }) as unknown as TapOnlyHooks;
}

function stampHookError(e: unknown, plugin: string, hook: string): KataError {
  if (e instanceof KataError) {
    if (e.plugin === plugin && e.hook === hook) return e;
    const stamped = new KataError(e.code, e.text, {
      plugin, hook, key: e.key, value: e.value, fix: e.fix, cause: e.cause,
    });
    return stamped;
  }
  const msg = e instanceof Error ? e.message : String(e);
  return new KataError('KATA_ERR_PLUGIN_HOOK', `${hook} handler threw: ${msg}`, { plugin, hook, cause: e });
}

