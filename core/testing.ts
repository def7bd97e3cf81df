/**
 * The test kit for plugin authors (`kata-ts/testing`): what the runtime would say about a
 * configuration with your plugin, and what your plugin does to a sandbox's lifecycle, in process and
 * without a VM.
 *
 * - {@link judge}: the validated config phase with the given plugins; answers the very object
 *   `kata-runtime validate --json` prints (load errors included, in `problems[]`).
 * - {@link runLifecycle}: a sandbox's lifecycle hooks in the order the runtime calls them, against
 *   a recording hypervisor driver that answers `createVm` before the configuration's own driver
 *   does: it records the plan it got, its start and stop and every hot-plug. No guest agent runs:
 *   the kit calls the agent-side hooks (`agentReady`, the container hooks) where the sandbox would.
 *
 * Other plugins that apply to the configuration run their lifecycle handlers for real (virtiofs
 * would start virtiofsd): give the kit configurations with `shared_fs = "none"` unless that is
 * what you test.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { toKataError, type KataError } from './errors.js';
import type { Hooks } from './hooks.js';
import { createLogger } from './logger.js';
import type { SandboxPlan } from './plan.js';
import type { KataPlugin, PluginSource } from './plugin-api.js';
import { judgeConfig, loadValidatedConfig } from './runtime.js';
import { errorReport, toReport, type ValidateReport } from './validate-report.js';
import { launchVm, type RunningVm } from './vm-lifecycle.js';
import type { BlockDeviceSpec, ContainerContext, HotpluggedBlock, RootfsAttachment, RootfsSource, VmContext, VmExit, VmHandle } from './vm.js';

export type { ValidateReport } from './validate-report.js';

export interface KitOptions {
  /**
   * The plugins under test, applied after those the configuration lists in `[runtime] plugins`: a
   * module's default export, or a path or package name as `[runtime] plugins` takes it (use that
   * form when the manifest names its schema by a path relative to the module).
   */
  readonly plugins?: readonly (KataPlugin | string)[];
  /** The file the configuration stands for: `configPath` in the report, the base of relative plugin paths. */
  readonly file?: string;
  /** The built-in plugins offered; default: the runtime's own. */
  readonly builtins?: readonly PluginSource[];
}

/**
 * Judges a configuration's TOML text with `plugins`, as `kata-runtime validate --json` would:
 * answers the same object, never throws for a configuration or plugin error.
 */
export async function judge(text: string, opts: KitOptions = {}): Promise<ValidateReport> {
  let report: ValidateReport;
  try {
    report = toReport(await judgeConfig(judgeOptions(text, opts)));
  } catch (e) {
    report = errorReport(toKataError(e), opts.file ?? null);
  }
  // What a tool reading the printed document gets: plain JSON (bigints as strings, no frozen objects).
  return JSON.parse(JSON.stringify(report, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))) as ValidateReport;
}

/** A container the lifecycle run creates, starts and ends. */
export interface KitContainer {
  readonly id: string;
  /** Default: a directory (`/rootfs/<id>`), which the core would share; the kit mounts nothing. */
  readonly rootfs?: RootfsSource;
  /** The status its process ends with (exit code, or 128 + signal number); default 0. */
  readonly exitStatus?: number;
}

export interface LifecycleOptions extends KitOptions {
  /** Default `kit-sandbox`. */
  readonly sandboxId?: string;
  readonly containers?: readonly KitContainer[];
}

/** An error a notice hook's handler threw: logged by the runtime, the operation went on. */
export interface NoticeError {
  readonly plugin: string;
  readonly hook: string;
  readonly code: string;
  readonly message: string;
}

/** What a lifecycle run did. */
export interface LifecycleRecord {
  /**
   * In order: `hook:<name>` as each lifecycle hook is called (before any plugin's handler), and
   * `vm:<call>` for each call the recording driver got (`vm:create`, `vm:start`,
   * `vm:hotplug:<id>`, `vm:unplug:<id>`, `vm:stop`).
   */
  readonly events: string[];
  /** The plan the recording driver was asked to create a VM for; undefined when no VM was created. */
  plan: SandboxPlan | undefined;
  /** The VM context the hooks got; undefined when the configuration was refused. */
  ctx: VmContext | undefined;
  readonly hotplugged: BlockDeviceSpec[];
  readonly unplugged: string[];
  /** What each container's rootfs delivery answered (undefined: no plugin answered, the core would share it). */
  readonly attachments: Record<string, RootfsAttachment | undefined>;
  /** Errors thrown by handlers of notice hooks (`containerCreated` …): logged, not thrown. */
  readonly noticeErrors: NoticeError[];
  /** What stopped the run: a refused configuration, a failed start, a handler that threw; everything started was stopped. */
  error: KataError | undefined;
}

/** The name the kit's own taps use. */
const KIT = 'kata-ts-testing';
/** Before every plugin's handler, whatever its stage. */
const FIRST = Number.MIN_SAFE_INTEGER;
const LIFECYCLE_HOOKS = ['beforeVmStart', 'createVm', 'vmStarted', 'agentReady', 'attachRootfs', 'containerCreated', 'containerStarted', 'containerExited', 'vmStopped', 'sandboxStopped'] as const;

/**
 * Runs a sandbox's lifecycle for `text` with `plugins`: the validated config phase, the VM start
 * (`beforeVmStart`, `createVm` answered by the recording driver, `vmStarted`), `agentReady`, for
 * each container `attachRootfs`, `containerCreated`, `containerStarted`, `containerExited`, then
 * the stop (rootfs detached, `vmStopped`, `sandboxStopped`). Never throws for what a plugin does:
 * the record's `error` says what stopped the run.
 */
export async function runLifecycle(text: string, opts: LifecycleOptions = {}): Promise<LifecycleRecord> {
  const record: LifecycleRecord = { events: [], plan: undefined, ctx: undefined, hotplugged: [], unplugged: [], attachments: {}, noticeErrors: [], error: undefined };
  const log = createLogger({
    level: 'error',
    stream: {
      write(line: string) {
        const r = JSON.parse(line) as { plugin?: string; hook?: string; code?: string; msg?: string };
        if (r.plugin && r.hook && r.code) record.noticeErrors.push({ plugin: r.plugin, hook: r.hook, code: r.code, message: r.msg ?? '' });
      },
    },
  });
  const runRoot = await mkdtemp(path.join(os.tmpdir(), 'kata-kit-'));
  let running: RunningVm | undefined;
  try {
    const validated = await loadValidatedConfig({ ...judgeOptions(text, opts), log });
    recordHooks(validated.hooks, record);
    running = await launchVm(validated, { sandboxId: opts.sandboxId ?? 'kit-sandbox', runRoot, log });
    record.ctx = running.ctx;
    const { hooks } = validated;
    await hooks.agentReady.promise(running.ctx);
    const attached: RootfsAttachment[] = [];
    for (const c of opts.containers ?? []) {
      const ctx: ContainerContext = Object.freeze({ sandbox: running.ctx, vm: running.vm, containerId: c.id, rootfs: c.rootfs ?? { kind: 'dir' as const, path: `/rootfs/${c.id}` } });
      const attachment = await hooks.attachRootfs.promise(ctx);
      record.attachments[c.id] = attachment;
      if (attachment) attached.push(attachment);
      const event = { sandbox: running.ctx, containerId: c.id };
      await hooks.containerCreated.promise(event);
      await hooks.containerStarted.promise(event);
      await hooks.containerExited.promise(event, c.exitStatus ?? 0);
    }
    // As the sandbox stops: containers deleted (their rootfs taken back), then the VM.
    for (const a of attached.reverse()) await a.detach();
    const vm = running;
    running = undefined;
    await hooks.sandboxStopped.promise(vm.ctx, await vm.stop());
  } catch (e) {
    record.error = toKataError(e);
  } finally {
    await running?.stop().catch(() => undefined);
    await rm(runRoot, { recursive: true, force: true });
  }
  return record;
}

function judgeOptions(text: string, opts: KitOptions) {
  return { text, ...(opts.file ? { file: opts.file } : {}), ...(opts.plugins ? { plugins: opts.plugins } : {}), ...(opts.builtins ? { builtins: opts.builtins } : {}) };
}

/** Taps every lifecycle hook first to record its call, and `createVm` to answer with the recording driver. */
function recordHooks(hooks: Hooks, record: LifecycleRecord): void {
  type Raw = { tapPromise(o: { name: string; stage: number }, fn: (...a: unknown[]) => Promise<unknown>): void };
  for (const name of LIFECYCLE_HOOKS) {
    if (name === 'createVm') continue;
    (hooks[name] as unknown as Raw).tapPromise({ name: KIT, stage: FIRST }, async () => {
      record.events.push(`hook:${name}`);
    });
  }
  hooks.createVm.tapPromise({ name: KIT, stage: FIRST }, async (ctx) => {
    record.events.push('hook:createVm', 'vm:create');
    record.plan = ctx.plan;
    return recordingVm(ctx, record);
  });
}

/** A VM that only records what is asked of it. */
function recordingVm(ctx: VmContext, record: LifecycleRecord): VmHandle {
  let ended: (exit: VmExit) => void = () => undefined;
  const exited = new Promise<VmExit>((resolve) => (ended = resolve));
  let started = false;
  let plugged = 0;
  const scsi = ctx.plan.blockDriver === 'virtio-scsi';
  return {
    hypervisor: ctx.plan.hypervisor,
    get pid() {
      return started ? process.pid : undefined;
    },
    exited,
    async start() {
      record.events.push('vm:start');
      started = true;
    },
    async hotplugBlock(dev: BlockDeviceSpec): Promise<HotpluggedBlock> {
      record.events.push(`vm:hotplug:${dev.id}`);
      record.hotplugged.push(dev);
      const n = ++plugged;
      return scsi ? { id: dev.id, scsiAddr: `0:${n}` } : { id: dev.id, pciPath: `02/${n.toString(16).padStart(2, '0')}` };
    },
    async unplugBlock(id: string) {
      record.events.push(`vm:unplug:${id}`);
      record.unplugged.push(id);
    },
    async stop() {
      record.events.push('vm:stop');
      const exit: VmExit = { expected: true, code: 0, signal: null, stderrTail: [] };
      ended(exit);
      return exit;
    },
  };
}
