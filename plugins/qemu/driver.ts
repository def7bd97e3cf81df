/**
 * The QEMU driver: one `QemuVm` per sandbox, created (not started) by the plugin's `createVm` tap.
 *
 * start(): resolve the accelerator (auto → KVM or TCG, logged once with the reason), substitute
 * the run directory into the launch spec the plugin rendered from the plan (`plan.vm.native`),
 * render the argv, spawn QEMU in the run directory (stdin closed, stderr kept as a ring of lines
 * and logged), record the pid, and connect to QMP.
 * If QEMU exits first, start fails with KATA_ERR_VM_START and QEMU's own last words.
 *
 * stop(): ACPI power-down (when the guest is running), then `quit`, then SIGKILL, each after a
 * short wait; then the files QEMU and the driver created in the run directory are removed (the
 * core removes the directory). An exit nobody asked for is logged as an error and reported in
 * `exited` with `expected: false` and a KATA_ERR_VM_EXITED error carrying the stderr tail.
 */
import { mkdir, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as delay } from 'node:timers/promises';
import {
  KataError,
  SupervisedProcess,
  describeExit,
  type StopStep,
  chooseAccelerator,
  detectHost,
  inNetns,
  errorText,
  type Accelerator,
  type BlockDeviceSpec,
  type HostInfo,
  type HotpluggedBlock,
  type Logger,
  type VmContext,
  type VmExit,
  type VmHandle,
} from '../../core/plugin-api.js';
import { renderQemuArgv, substituteTokens } from './argv.js';
import { IMAGE_SIZE, PLUGIN_NAME, QEMU_IDS, qemuSection } from './config.js';
import { BlockHotplug, HOTPLUG_DEFAULTS } from './hotplug.js';
import { isQemuSpec, renderNetDevices, type QemuLaunchSpec } from './launch-spec.js';
import { QmpClient } from './qmp.js';
import { applyTemplateRole, checkTemplateAccelerator, hotplugNetDevices, recordTemplateAccelerator, reserveNicPorts, restoreDeviceState, saveDeviceState } from './template.js';
import { CpuMemoryHotplug } from './resize.js';

/** The pid file the driver writes in the run directory. */
export const PID_FILE = 'qemu.pid';

export const QEMU_VM_DEFAULTS = Object.freeze({
  /** From spawn to a negotiated QMP connection. */
  startTimeoutMs: 10_000,
  commandTimeoutMs: 10_000,
  /** Wait for the guest to power off after system_powerdown. */
  powerdownTimeoutMs: 1_000,
  /** Wait for QEMU to exit after `quit` (or SIGTERM when QMP is not up). */
  quitTimeoutMs: 2_000,
  /** Wait for the process to disappear after SIGKILL. */
  killTimeoutMs: 5_000,
  unplugTimeoutMs: HOTPLUG_DEFAULTS.unplugTimeoutMs,
  /** stderr lines kept; the last {@link STDERR_TAIL} go into error messages and VmExit. */
  stderrLines: 200,
});

/** stderr lines reported with a failure. */
export const STDERR_TAIL = 20;

export interface QemuVmOptions {
  readonly startTimeoutMs?: number;
  readonly commandTimeoutMs?: number;
  readonly powerdownTimeoutMs?: number;
  readonly quitTimeoutMs?: number;
  readonly killTimeoutMs?: number;
  readonly unplugTimeoutMs?: number;
  readonly stderrLines?: number;
  /** Host facts for the accelerator choice; detected at start when absent. */
  readonly host?: Pick<HostInfo, 'kvm' | 'kvmCanRunStandardGuest'>;
}

/** Kept as a name for the driver's exits; VmExit carries the explaining error itself. */
export type QemuVmExit = VmExit;

/** performance.now() marks of one start, for the benchmark and the debug log. */
export interface QemuVmTimeline {
  startCalled?: number;
  spawned?: number;
  qmpReady?: number;
  /** A clone's device state loaded and its vCPUs running. */
  restored?: number;
  exited?: number;
}

type State = 'created' | 'starting' | 'running' | 'stopping' | 'exited';

export class QemuVm implements VmHandle {
  readonly hypervisor = 'qemu';
  /** Settles when QEMU ends (or, if it never ran, when start fails or stop is called). Never rejects. */
  readonly exited: Promise<QemuVmExit>;
  readonly timeline: QemuVmTimeline = {};

  readonly #ctx: VmContext;
  readonly #log: Logger;
  readonly #opts: Required<Omit<QemuVmOptions, 'host'>> & Pick<QemuVmOptions, 'host'>;
  #resolveExited!: (exit: QemuVmExit) => void;
  #state: State = 'created';
  #proc: SupervisedProcess | undefined;
  #exit: QemuVmExit | undefined;
  #stopRequested = false;
  #qmp: QmpClient | undefined;
  #hotplug: BlockHotplug | undefined;
  #resize: CpuMemoryHotplug | undefined;
  #accelerator: { accelerator: Accelerator; reason: string } | undefined;
  /** Files QEMU or the driver create in the run directory, removed by stop(). */
  #created: string[] = [];
  /** Directories the driver created (9p shares), removed by stop() when empty. */
  #createdDirs: string[] = [];
  #starting: Promise<void> | undefined;
  #stopping: Promise<QemuVmExit> | undefined;

  constructor(ctx: VmContext, opts: QemuVmOptions = {}) {
    if (!isQemuSpec(ctx.plan.vm.native)) throw new KataError('KATA_ERR_INTERNAL', `QemuVm needs a plan rendered by the qemu plugin, got one for "${ctx.plan.vm.hypervisor}"`, { plugin: PLUGIN_NAME });
    this.#ctx = ctx;
    this.#log = ctx.log.child({ plugin: PLUGIN_NAME });
    this.#opts = { ...QEMU_VM_DEFAULTS, ...dropUndefined(opts) };
    this.exited = new Promise((resolve) => (this.#resolveExited = resolve));
  }

  get pid(): number | undefined {
    return this.#proc?.pid;
  }

  /** The QMP connection while the VM runs (tests and diagnostics query QEMU through it). */
  get qmp(): QmpClient | undefined {
    return this.#qmp;
  }

  /** The accelerator chosen at start, with the reason. */
  get accelerator(): { accelerator: Accelerator; reason: string } | undefined {
    return this.#accelerator;
  }

  /** The disks hot-plugged and not (fully) unplugged, in slot order (root port, or SCSI address). */
  get disks(): readonly HotpluggedBlock[] {
    return this.#hotplug?.disks ?? [];
  }

  /** The last stderr lines QEMU wrote. */
  get stderrTail(): readonly string[] {
    return this.#proc?.tail(STDERR_TAIL) ?? [];
  }

  start(): Promise<void> {
    this.#starting ??= this.#start();
    return this.#starting;
  }

  /** Hot-plugs a disk: virtio-blk-pci into a root port (`{ id, pciPath }`), or scsi-hd onto the virtio-scsi controller (`{ id, scsiAddr }`). */
  async hotplugBlock(dev: BlockDeviceSpec): Promise<HotpluggedBlock> {
    return this.#running('hot-plug a disk').plug(dev);
  }

  /** Detaches a disk; `timeoutMs` bounds the wait for the guest to release it. */
  async unplugBlock(id: string, opts: { timeoutMs?: number } = {}): Promise<void> {
    return this.#running('unplug a disk').unplug(id, opts);
  }

  /** Hot-plugs vCPUs up to `n` (device_add of the CPUs query-hotpluggable-cpus offers), or unplugs hot-plugged ones down to it. */
  async resizeVcpus(n: number): Promise<number> {
    return this.#resizer('resize the vCPUs').resizeVcpus(n);
  }

  /** Hot-plugs a pc-dimm so that the VM has at least `mib` MiB; memory is never taken back. */
  async resizeMemory(mib: number): Promise<number> {
    return this.#resizer('resize the memory').resizeMemory(mib);
  }

  /** Freezes the guest's vCPUs (QMP `stop`); the QEMU process and its devices stay. */
  async pause(): Promise<void> {
    await this.#qmpWhileRunning('pause the VM').execute('stop');
  }

  /** Template role `save`: pauses the guest and writes its device state into the template (template.ts). */
  async saveTemplate(): Promise<void> {
    const template = this.#ctx.template;
    if (template?.role !== 'save') throw new KataError('KATA_ERR_INTERNAL', 'saveTemplate() on a VM that was not started as a template', { plugin: PLUGIN_NAME });
    await saveDeviceState(this.#qmpWhileRunning('save the VM template'), template.files);
    if (this.#accelerator) await recordTemplateAccelerator(template.files, this.#accelerator.accelerator);
    this.#log.info({ template: template.files.dir }, 'template VM state saved');
  }

  /** QEMU's version (from the QMP greeting), once started. */
  get version(): string | undefined {
    return this.#qmp?.version;
  }

  /** Lets a paused guest run again (QMP `cont`). */
  async resume(): Promise<void> {
    await this.#qmpWhileRunning('resume the VM').execute('cont');
  }

  stop(): Promise<QemuVmExit> {
    this.#stopping ??= this.#stop();
    return this.#stopping;
  }

  // -------------------------------------------------------------------------------------------

  async #start(): Promise<void> {
    this.timeline.startCalled = performance.now();
    if (this.#stopRequested) throw new KataError('KATA_ERR_VM_START', 'cannot start QEMU: the VM was stopped before it started', { plugin: PLUGIN_NAME });
    this.#state = 'starting';
    const planned = this.#ctx.plan.vm.native as QemuLaunchSpec;
    try {
      this.#accelerator = chooseAccelerator(this.#opts.host ?? detectHost(), planned.accelerator);
      this.#log.info({ accelerator: this.#accelerator.accelerator, requested: planned.accelerator, reason: this.#accelerator.reason }, `QEMU accelerator: ${this.#accelerator.accelerator}`);
      const spec = substituteTokens(planned, { sandboxDir: this.#ctx.runDir, imageSizeBytes: await this.#imageSize(planned) });
      const template = this.#ctx.template;
      if (template?.role === 'clone') await checkTemplateAccelerator(template.files, this.#accelerator.accelerator);
      // Interfaces found in the pod's namespace at sandbox start.
      const nets = this.#ctx.network?.devices ?? [];
      // A clone's devices must be the template's: its NICs are hot-plugged after the restore.
      const nicPorts = template?.role === 'clone' ? reserveNicPorts(spec, nets.length) : [];
      if (template?.role !== 'clone') renderNetDevices(spec, nets);
      if (template) applyTemplateRole(spec, template);
      await this.#prepareRunDir(spec);
      const argv = renderQemuArgv(spec, { accelerator: this.#accelerator.accelerator });
      const qmpSocket = chardevPath(spec, QEMU_IDS.qmpChardev);
      if (!qmpSocket) throw new KataError('KATA_ERR_INTERNAL', `the QEMU launch spec has no "${QEMU_IDS.qmpChardev}" chardev`, { plugin: PLUGIN_NAME });

      await this.#spawn(argv);
      const qmp = await this.#connectQmp(qmpSocket);
      this.#qmp = qmp;
      this.timeline.qmpReady = performance.now();
      qmp.onEvent((e) => {
        if (e.event === 'SHUTDOWN' || e.event === 'POWERDOWN' || e.event === 'RESET') this.#log.info({ event: e.event, data: e.data }, `QEMU event ${e.event}`);
        else if (e.event === 'GUEST_PANICKED') this.#log.error({ event: e.event, data: e.data }, 'the guest kernel panicked');
      });
      const diskPorts = nicPorts.length > 0 ? { ...spec, hotplugPorts: spec.hotplugPorts.slice(0, -nicPorts.length) } : spec;
      this.#hotplug = new BlockHotplug(qmp, diskPorts, this.#log, { unplugTimeoutMs: this.#opts.unplugTimeoutMs });
      this.#resize = new CpuMemoryHotplug(qmp, spec, this.#log, {
        maxMiB: this.#ctx.plan.vm.memory.maxMiB,
        slotsTaken: spec.devices.filter((d) => d.type === 'nvdimm').length,
        cpuUnplugTimeoutMs: this.#opts.unplugTimeoutMs,
        cpuUnplug: this.#accelerator.accelerator === 'kvm',
      });
      if (template?.role === 'clone') {
        await restoreDeviceState(qmp, template.files);
        await hotplugNetDevices(qmp, spec, nets, nicPorts);
        this.timeline.restored = performance.now();
        this.#log.info({ template: template.files.dir, restoreMs: round(this.timeline.restored - (this.timeline.qmpReady ?? 0)) }, 'VM restored from the template');
      }
      if (this.#exit || this.#stopRequested) throw new Error('QEMU exited or was stopped while starting');
      this.#state = 'running';
      this.#log.info(
        { pid: this.pid, qemu: qmp.version, spawnToQmpMs: round(this.timeline.qmpReady - (this.timeline.spawned ?? 0)) },
        'QEMU started, QMP connected',
      );
    } catch (e) {
      // Built after the process is gone, so that the message has all of QEMU's last words.
      await this.#kill();
      throw this.#startFailure(e);
    }
  }

  async #spawn(argv: string[]): Promise<void> {
    const [qemu, ...qemuArgs] = argv as [string, ...string[]];
    // In the pod's network namespace, so that QEMU opens the taps there by name.
    const { binary, args } = inNetns(this.#ctx.netns, qemu, qemuArgs);
    this.#log.debug({ argv, netns: this.#ctx.netns }, 'spawning QEMU');
    // Tied to this process: a runtime that dies takes its VM with it.
    const proc = SupervisedProcess.start({ name: 'QEMU', binary, args, cwd: this.#ctx.runDir, log: this.#log, what: 'the hypervisor binary', tailLines: this.#opts.stderrLines });
    this.#proc = proc;
    this.timeline.spawned = performance.now();
    void proc.exited.then((e) => this.#onExit(e.code, e.signal));
    if (proc.pid !== undefined) {
      const pidFile = path.join(this.#ctx.runDir, PID_FILE);
      this.#created.push(pidFile);
      await writeFile(pidFile, `${proc.pid}\n`).catch((err) => this.#log.warn({ err, pidFile }, 'cannot write the QEMU pid file'));
    }
  }

  /** Retries connecting until QEMU has created its QMP socket; gives up when QEMU exits or the deadline passes. */
  async #connectQmp(socketPath: string): Promise<QmpClient> {
    const deadline = performance.now() + this.#opts.startTimeoutMs;
    let pause = 2;
    for (;;) {
      if (this.#exit || this.#proc?.spawnError) throw new Error('QEMU exited before its QMP socket answered');
      if (this.#stopRequested) throw new Error('the VM was stopped while starting');
      const socket = await connectOnce(socketPath);
      if (socket) {
        const exited = this.exited.then(() => {
          throw new Error('QEMU exited during the QMP handshake');
        });
        exited.catch(() => undefined);
        return Promise.race([
          QmpClient.handshake(
            socket,
            { log: this.#log, commandTimeoutMs: this.#opts.commandTimeoutMs, handshakeTimeoutMs: Math.max(1, deadline - performance.now()) },
            socketPath,
          ),
          exited,
        ]);
      }
      if (performance.now() > deadline) {
        throw new Error(`QEMU did not create its QMP socket ${socketPath} within ${this.#opts.startTimeoutMs} ms`);
      }
      await Promise.race([delay(pause), this.exited]);
      pause = Math.min(pause * 2, 50);
    }
  }

  /** KATA_ERR_VM_START for a failed start: why, in QEMU's own words when it exited by itself. */
  #startFailure(cause: unknown): KataError {
    if (cause instanceof KataError && (cause.code === 'KATA_ERR_VM_START' || cause.code === 'KATA_ERR_INTERNAL' || cause.code === 'KATA_ERR_UNTRUSTED_PATH')) return cause;
    const binary = (this.#ctx.plan.vm.native as QemuLaunchSpec).binary;
    const spawnError = this.#proc?.spawnError;
    const tail = (this.#proc?.tail(STDERR_TAIL) ?? []).filter((l) => !spawnError || !l.startsWith(`${binary}: `));
    let what: string;
    if (spawnError) {
      const code = (spawnError as NodeJS.ErrnoException).code;
      what = code === 'ENOENT' ? `${binary} does not exist (spawn ENOENT)` : `cannot run ${binary}: ${spawnError.message}`;
    } else if (this.#exit && this.#exit.signal === null) {
      // No signal: QEMU ended itself (bad option, kernel not found …), whatever the caller saw first.
      what = `QEMU exited during start (${describeExit(this.#exit)})`;
    } else {
      what = errorText(cause);
    }
    const stderr = tail.length > 0 ? `; QEMU stderr:\n  ${tail.join('\n  ')}` : '';
    return new KataError('KATA_ERR_VM_START', `cannot start QEMU: ${what}${stderr}`, {
      plugin: PLUGIN_NAME,
      key: `${this.#ctx.config.hypervisorTable}.path`,
      cause: spawnError ?? cause,
    });
  }

  #onExit(code: number | null, signal: NodeJS.Signals | null): void {
    if (this.#exit) return;
    this.timeline.exited = performance.now();
    const expected = this.#stopRequested;
    const stderrTail = this.#proc?.tail(STDERR_TAIL) ?? [];
    const wasRunning = this.#state === 'running';
    const base: VmExit = { expected, code, signal, stderrTail };
    let error: KataError | undefined;
    if (!expected && wasRunning) {
      error = new KataError('KATA_ERR_VM_EXITED', `QEMU (pid ${this.pid}) exited while the sandbox was running (${describeExit(base)})${stderrTail.length ? `; QEMU stderr:\n  ${stderrTail.join('\n  ')}` : ''}`, {
        plugin: PLUGIN_NAME,
      });
      this.#log.error({ err: error, pid: this.pid, exitCode: code, signal }, 'QEMU exited unexpectedly');
    }
    this.#exit = Object.freeze(error ? { ...base, error } : base);
    this.#state = 'exited';
    this.#hotplug?.dispose();
    // Pending commands reject with KATA_ERR_QMP_CLOSED (the socket is going away with QEMU anyway).
    this.#qmp?.close();
    this.#resolveExited(this.#exit);
  }

  async #stop(): Promise<QemuVmExit> {
    this.#stopRequested = true;
    if (this.#state === 'running') this.#state = 'stopping';
    // A start in progress notices the request and fails; wait for it to settle first.
    await this.#starting?.catch(() => undefined);
    let forced = false;
    if (this.#proc && !this.#exit && this.#proc.pid !== undefined) {
      forced = !(await this.#proc.stop(() => this.#stopSteps(), this.#opts.killTimeoutMs));
    }
    if (!this.#exit) {
      // Never spawned (or spawn failed): there is no process to wait for.
      this.#exit = Object.freeze({ expected: true, code: null, signal: null, stderrTail: this.#proc?.tail(STDERR_TAIL) ?? [] });
      this.#state = 'exited';
      this.#resolveExited(this.#exit);
    }
    this.#qmp?.close();
    await this.#removeCreated();
    let exit = this.#exit;
    if (forced) {
      const error = new KataError('KATA_ERR_VM_STOP', `QEMU (pid ${this.pid}) did not exit after system_powerdown and quit and was killed`, { plugin: PLUGIN_NAME });
      this.#log.warn({ err: error, pid: this.pid }, 'QEMU had to be killed');
      exit = Object.freeze({ ...exit, error: exit.error ?? error });
    }
    this.#log.info({ pid: this.pid, expected: exit.expected, code: exit.code, signal: exit.signal }, 'QEMU stopped');
    return exit;
  }

  /** power-down (a running guest only: a paused one cannot react) → quit, or SIGTERM without QMP; SIGKILL follows. */
  #stopSteps(): StopStep[] {
    const qmp = this.#qmp && !this.#qmp.closed ? this.#qmp : undefined;
    const proc = this.#proc;
    if (!qmp) return [{ name: 'SIGTERM', action: () => proc?.signal('SIGTERM'), waitMs: this.#opts.quitTimeoutMs }];
    const t = this.#opts.powerdownTimeoutMs;
    return [
      {
        name: 'system_powerdown',
        action: async () => {
          const status = await qmp.execute<{ running?: boolean }>('query-status', undefined, { timeoutMs: t }).catch(() => undefined);
          if (!status?.running) return false;
          await qmp.execute('system_powerdown', undefined, { timeoutMs: t });
          return true;
        },
        waitMs: t,
      },
      // QEMU may exit before its reply to quit is read: a closed connection is success too.
      { name: 'quit', action: () => qmp.execute('quit', undefined, { timeoutMs: this.#opts.quitTimeoutMs }), waitMs: this.#opts.quitTimeoutMs },
    ];
  }

  /** SIGKILL and wait for the exit (bounded). */
  async #kill(): Promise<void> {
    if (!this.#proc || this.#proc.exit || this.#proc.pid === undefined) return;
    this.#stopRequested = true;
    await this.#proc.kill(this.#opts.killTimeoutMs);
  }

  #qmpWhileRunning(what: string): QmpClient {
    if (this.#state !== 'running' || !this.#qmp) throw new KataError('KATA_ERR_TASK_STATE', `cannot ${what}: the VM is ${this.#state}`, { plugin: PLUGIN_NAME });
    return this.#qmp;
  }

  #running(what: string): BlockHotplug {
    if (this.#state !== 'running' || !this.#hotplug) {
      throw new KataError('KATA_ERR_HOTPLUG', `cannot ${what}: the VM is ${this.#state === 'exited' ? 'no longer running' : this.#state === 'stopping' ? 'stopping' : 'not started'}`, { plugin: PLUGIN_NAME });
    }
    return this.#hotplug;
  }

  #resizer(what: string): CpuMemoryHotplug {
    if (this.#state !== 'running' || !this.#resize) throw new KataError('KATA_ERR_HOTPLUG', `cannot ${what}: the VM is ${this.#state}`, { plugin: PLUGIN_NAME });
    return this.#resize;
  }

  async #imageSize(spec: QemuLaunchSpec): Promise<number | undefined> {
    if (!JSON.stringify(spec).includes(IMAGE_SIZE)) return undefined;
    const image = qemuSection(this.#ctx.config).image;
    if (!image) return undefined;
    try {
      return (await stat(image)).size;
    } catch (e) {
      throw new KataError('KATA_ERR_VM_START', `cannot read the guest image ${image}: ${(e as Error).message}`, { plugin: PLUGIN_NAME, key: `${this.#ctx.config.hypervisorTable}.image`, cause: e });
    }
  }

  /** Records the files QEMU will create in the run directory, and creates the share directories it serves. */
  async #prepareRunDir(spec: QemuLaunchSpec): Promise<void> {
    const inRunDir = (p: unknown): p is string => typeof p === 'string' && path.resolve(p).startsWith(path.resolve(this.#ctx.runDir) + path.sep);
    for (const c of spec.chardevs) {
      if (c.type === 'socket' && c.props.server === true && inRunDir(c.props.path)) this.#created.push(c.props.path);
      if (inRunDir(c.props.logfile)) this.#created.push(c.props.logfile);
    }
    for (const f of spec.fsdevs) {
      const dir = f.props.path;
      if (!inRunDir(dir)) continue;
      const made = await mkdir(dir, { recursive: true });
      if (made !== undefined) this.#createdDirs.push(dir);
    }
  }

  async #removeCreated(): Promise<void> {
    await Promise.all(this.#created.map((f) => rm(f, { force: true }).catch((err) => this.#log.warn({ err, file: f }, 'cannot remove a QEMU file'))));
    for (const d of this.#createdDirs) await rmdir(d).catch(() => undefined);
  }
}

/** One connect attempt: the socket, or undefined when QEMU has not created it yet. */
function connectOnce(socketPath: string): Promise<net.Socket | undefined> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    const fail = () => {
      s.destroy();
      resolve(undefined);
    };
    s.once('error', fail);
    s.once('connect', () => {
      s.off('error', fail);
      resolve(s);
    });
  });
}

function chardevPath(spec: QemuLaunchSpec, id: string): string | undefined {
  const p = spec.chardevs.find((c) => c.id === id)?.props.path;
  return typeof p === 'string' ? p : undefined;
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}

function dropUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
