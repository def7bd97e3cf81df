/**
 * Starting and stopping a sandbox VM through the hooks: the core's half of the VM contract
 * (core/vm.ts). The sandbox lifecycle (containers, agent) builds on this.
 *
 *   run dir → beforeVmStart (daemons) → createVm (the hypervisor plugin) → start → vmStarted
 *   stop → vmStopped (daemons) → run dir removed
 *
 * A failure at any step undoes the steps before it, so a failed start leaves no process, socket or
 * directory behind.
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { countHotplug } from './counters.js';
import { KataError, toKataError } from './errors.js';
import { silentLogger, type Logger } from './logger.js';
import { removeRunDir, writeOwner } from './run-dirs.js';
import type { ValidatedConfig } from './runtime.js';
import type { BlockDeviceSpec, HotpluggedBlock, UnplugOptions, VmContext, VmExit, VmHandle, VmTemplateRole } from './vm.js';
import { templateLayout, templateStatus } from './template-files.js';

/** Default root of per-sandbox run directories (Kata uses /run/vc and /run/kata-containers). */
export const DEFAULT_RUN_ROOT = '/run/kata-ts';
/** A unix socket path, NUL included, fits in this many bytes (sun_path). */
const UNIX_PATH_MAX = 108;
/** The longest socket name plugins put in a run directory ("virtiofsd.sock", with room to spare). */
const RUN_DIR_SOCKET_NAME_MAX = 16;

const SANDBOX_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

export interface LaunchOptions {
  readonly sandboxId: string;
  /** Parent of the run directory; tests use a temp dir. */
  readonly runRoot?: string;
  readonly log?: Logger;
  /**
   * Aborts the launch (Ctrl-C while the VM boots): what was started is stopped and the run
   * directory removed, and the launch rejects with KATA_ERR_INTERRUPTED.
   */
  readonly signal?: AbortSignal;
  /** The pod's network namespace path (see VmContext.netns). */
  readonly netns?: string;
  /**
   * VM templating: a role the caller chose (`factory init` boots the template with `save`), or
   * `none` for a cold boot whatever the configuration says. Absent: a clone of the template under
   * `[factory] template_path` when templating is enabled and the template is usable, else a cold
   * boot (the log says why).
   */
  readonly template?: VmTemplateRole | 'none';
}

export interface RunningVm {
  readonly ctx: VmContext;
  readonly vm: VmHandle;
  hotplugBlock(dev: BlockDeviceSpec): Promise<HotpluggedBlock>;
  unplugBlock(id: string, opts?: UnplugOptions): Promise<void>;
  /**
   * Settles when the VM ends. An end nobody asked for (`expected: false`) is logged as an error
   * with the hypervisor's last words; the sandbox lifecycle turns it into a sandbox failure.
   */
  readonly exited: Promise<VmExit>;
  /** Stops the VM and the daemons and removes the run directory. Safe to call twice. */
  stop(): Promise<VmExit>;
}

export async function launchVm(validated: ValidatedConfig, opts: LaunchOptions): Promise<RunningVm> {
  if (!SANDBOX_ID.test(opts.sandboxId)) {
    throw new KataError('KATA_ERR_USAGE', `invalid sandbox id "${opts.sandboxId}"`, { fix: 'use letters, digits, ".", "_" and "-", at most 128 characters' });
  }
  const log = (opts.log ?? silentLogger()).child({ sandbox: opts.sandboxId });
  const runDir = path.join(opts.runRoot ?? DEFAULT_RUN_ROOT, opts.sandboxId);
  const longest = UNIX_PATH_MAX - 1 - RUN_DIR_SOCKET_NAME_MAX;
  if (Buffer.byteLength(runDir) > longest) {
    throw new KataError('KATA_ERR_SANDBOX', `the sandbox run directory ${runDir} is ${Buffer.byteLength(runDir)} bytes long: the unix sockets in it (QMP, the agent, virtiofsd) would exceed the kernel's ${UNIX_PATH_MAX}-byte limit; at most ${longest} bytes fit`, {
      fix: 'use a shorter run root (KATA_TS_RUN_ROOT); the default /run/kata-ts fits a CRI sandbox id (64 characters) in namespace k8s.io',
    });
  }
  await mkdir(runDir, { recursive: true, mode: 0o700 }).catch((e: NodeJS.ErrnoException) => {
    throw runRootError(runDir, e);
  });
  const network = { devices: [], interfaces: [], routes: [], neighbors: [], timings: { host: 0, guest: 0 } };
  const coldCtx: VmContext = Object.freeze({ sandboxId: opts.sandboxId, runDir, plan: validated.plan, config: validated.config, log, network, ...(opts.netns ? { netns: opts.netns } : {}) });
  const { hooks } = validated;
  let ctx = coldCtx;

  let vm: VmHandle | undefined;
  const interrupted = () => {
    if (opts.signal?.aborted) throw interruptedError(opts.sandboxId);
  };
  try {
    // First, so that a run killed from here on leaves a directory `kata-runtime cleanup` can judge.
    await writeOwner(runDir);
    interrupted();
    await hooks.beforeVmStart.promise(ctx);
    interrupted();
    const template = await chooseTemplate(validated, opts, log);
    if (template) ctx = Object.freeze({ ...coldCtx, template });
    vm = await createVm(validated, ctx);
    interrupted();
    log.info({ hypervisor: vm.hypervisor, template: template?.role }, template?.role === 'clone' ? 'starting VM as a clone of the template' : 'starting VM');
    try {
      await untilAborted(vm.start(), opts.signal, opts.sandboxId);
    } catch (e) {
      if (template?.role !== 'clone' || opts.signal?.aborted) throw e;
      // A template that cannot be restored must not cost the sandbox: boot it cold instead.
      log.warn({ err: e, template: template.files.dir }, 'restoring the VM from the template failed: cold boot');
      await vm.stop().catch(() => undefined);
      ctx = coldCtx;
      vm = await createVm(validated, ctx);
      await untilAborted(vm.start(), opts.signal, opts.sandboxId);
    }
    await hooks.vmStarted.promise(ctx, vm);
    interrupted();
  } catch (e) {
    const failure = toKataError(e);
    const exit = vm ? await vm.stop().catch(() => undefined) : undefined;
    await cleanup(ctx, hooks, exit, log);
    throw failure;
  }

  const started = vm;
  let stopping: Promise<VmExit> | undefined;
  return {
    ctx,
    vm: started,
    hotplugBlock: async (dev) => {
      const block = await started.hotplugBlock(dev);
      countHotplug('block');
      return block;
    },
    unplugBlock: async (id, o) => {
      await started.unplugBlock(id, o);
      countHotplug('block_unplug');
    },
    exited: started.exited.then((exit) => {
      if (!exit.expected) log.error({ code: exit.code, signal: exit.signal, stderr: exit.stderrTail, err: exit.error }, 'the VM ended unexpectedly');
      return exit;
    }),
    stop() {
      stopping ??= (async () => {
        const exit = await started.stop();
        await cleanup(ctx, hooks, exit, log);
        return exit;
      })();
      return stopping;
    },
  };
}

async function createVm(validated: ValidatedConfig, ctx: VmContext): Promise<VmHandle> {
  const vm = await validated.hooks.createVm.promise(ctx);
  if (!vm) throw new KataError('KATA_ERR_INTERNAL', `no plugin created a VM for the "${validated.plan.vm.hypervisor}" launch spec`, { key: validated.config.hypervisorTable });
  return vm;
}

/** The template role of this launch: the caller's, a clone of a usable template, or none (a cold boot, logged with the reason). */
async function chooseTemplate(validated: ValidatedConfig, opts: LaunchOptions, log: Logger): Promise<VmTemplateRole | undefined> {
  if (opts.template === 'none') return undefined;
  if (opts.template) return opts.template;
  const { config, plan } = validated;
  if (!config.factory.enable_template) return undefined;
  const status = await templateStatus(config, plan);
  if (!status.usable) {
    log.warn({ template: status.path, why: status.reason }, `VM template not used, cold boot: ${status.reason}`);
    return undefined;
  }
  return { role: 'clone', files: templateLayout(status.path) };
}

async function cleanup(ctx: VmContext, hooks: ValidatedConfig['hooks'], exit: VmExit | undefined, log: Logger): Promise<void> {
  try {
    await hooks.vmStopped.promise(ctx, exit);
  } catch (e) {
    log.error({ err: e }, 'cleanup after the VM stopped failed');
  }
  // Never through a mount left behind (a shared rootfs or volume): that would delete host data.
  await removeRunDir(ctx.runDir).catch((e: unknown) => log.error({ err: e }, 'could not remove the run directory'));
}

/** The coded error of an interrupted launch or sandbox creation. */
export function interruptedError(sandboxId: string): KataError {
  return new KataError('KATA_ERR_INTERRUPTED', `sandbox ${sandboxId}: interrupted while starting; everything started so far was stopped`);
}

/** `p`, or KATA_ERR_INTERRUPTED as soon as `signal` aborts (the caller then stops what `p` was starting). */
export function untilAborted<T>(p: Promise<T>, signal: AbortSignal | undefined, sandboxId: string): Promise<T> {
  if (!signal) return p;
  if (signal.aborted) {
    p.catch(() => undefined);
    return Promise.reject(interruptedError(sandboxId));
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => {
      p.catch(() => undefined);
      reject(interruptedError(sandboxId));
    };
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

/** Creating the run directory failed: as a non-root user, /run/kata-ts is the usual reason. */
function runRootError(runDir: string, e: NodeJS.ErrnoException): KataError {
  if (e.code === 'EACCES' || e.code === 'EPERM' || e.code === 'EROFS') {
    return new KataError('KATA_ERR_RUN_DIR', `cannot create the sandbox run directory ${runDir}: ${e.code} (running as uid ${process.getuid?.() ?? '?'})`, {
      value: runDir,
      cause: e,
    });
  }
  return new KataError('KATA_ERR_RUN_DIR', `cannot create the sandbox run directory ${runDir}: ${e.code ?? e.message}`, { value: runDir, cause: e, fix: 'check that the run root (KATA_TS_RUN_ROOT, default /run/kata-ts) is a writable directory' });
}
