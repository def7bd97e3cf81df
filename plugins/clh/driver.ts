/**
 * The Cloud Hypervisor driver: one `ClhVm` per sandbox, created (not started) by the plugin's
 * `createVm` tap.
 *
 * start(): spawn `cloud-hypervisor --api-socket path=<run dir>/clh-api.sock` in the run directory
 * (stdout, where a `Tty` console goes, and stderr kept as rings of lines and logged), wait for
 * `vmm.ping` to answer, refuse a TDX plan when the binary lacks the `tdx` feature, then `vm.create`
 * with the plan's VmConfig (the run directory substituted) and `vm.boot`. If the VMM exits first,
 * start fails with KATA_ERR_VM_START and its last words; an API refusal keeps its own code.
 *
 * Disks are hot-plugged with `vm.add-disk`; its `bdf` becomes the PCI path the agent looks for.
 *
 * stop(): `vm.shutdown`, `vm.delete`, `vmm.shutdown`, then SIGTERM, then SIGKILL, each after a
 * short wait; then the files the VMM and the driver created in the run directory are removed.
 * An exit nobody asked for is reported in `exited` with a KATA_ERR_VM_EXITED error.
 */
import { rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import {
  KataError,
  SupervisedProcess,
  inNetns,
  describeExit,
  fillSandboxDir,
  type BlockDeviceSpec,
  type HotpluggedBlock,
  type Logger,
  type VmContext,
  type VmExit,
  type StopStep,
  type VmHandle,
} from '../../core/plugin-api.js';
import { ClhApiClient, clhApiFailure, type VmmPing } from './api.js';
import { isClhSpec, renderClhNets, type ClhDiskConfig, type ClhLaunchSpec, type ClhVmConfig } from './vm-config.js';
import { PLUGIN_NAME } from './manifest.js';

export { PLUGIN_NAME };

/** Files of the driver and the VMM in the run directory. */
export const CLH_FILES = Object.freeze({
  apiSocket: 'clh-api.sock',
  pidFile: 'clh.pid',
});

/** The `vmm.ping` feature a TDX build of Cloud Hypervisor reports. */
export const TDX_FEATURE = 'tdx';

export const CLH_VM_DEFAULTS = Object.freeze({
  /** From spawn to an answered `vmm.ping`. */
  startTimeoutMs: 10_000,
  /** Each of vm.shutdown, vm.delete and vmm.shutdown while stopping. */
  stopCallTimeoutMs: 1_000,
  /** Wait for the VMM to exit after vmm.shutdown (or SIGTERM). */
  exitTimeoutMs: 2_000,
  /** Wait for the process to disappear after SIGKILL. */
  killTimeoutMs: 5_000,
  /** Output lines kept; the last {@link OUTPUT_TAIL} go into error messages and VmExit. */
  outputLines: 200,
});

/** stderr lines reported with a failure. */
export const OUTPUT_TAIL = 20;

export type ClhVmOptions = Partial<typeof CLH_VM_DEFAULTS>;

type State = 'created' | 'starting' | 'running' | 'stopping' | 'exited';

/**
 * Kata's PCI path of a device Cloud Hypervisor hot-plugged: its slot on the root bus. Cloud
 * Hypervisor puts every device on bus 0 of its segment, function 0 (Kata's `clhPciInfoToPath`
 * refuses anything else, and so does this).
 */
export function bdfToPciPath(bdf: string): string {
  const m = /^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$/i.exec(bdf);
  if (!m || m[1] !== '0000' || m[2] !== '00' || m[4] !== '0' || Number.parseInt(m[3] as string, 16) > 0x1f) {
    throw new KataError('KATA_ERR_HOTPLUG', `unexpected PCI address ${JSON.stringify(bdf)} from Cloud Hypervisor's hot-plug (expected 0000:00:<slot>.0)`, { plugin: PLUGIN_NAME });
  }
  return (m[3] as string).toLowerCase();
}

/** Replaces the {sandbox_dir} token in every string of the VmConfig. */
export function fillVmConfig(config: ClhVmConfig, runDir: string): ClhVmConfig {
  const fill = (v: unknown): unknown => {
    if (typeof v === 'string') return fillSandboxDir(v, runDir);
    if (Array.isArray(v)) return v.map(fill);
    if (v !== null && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, fill(x)]));
    return v;
  };
  return fill(config) as ClhVmConfig;
}

export class ClhVm implements VmHandle {
  readonly hypervisor = 'clh';
  /** Settles when the VMM ends (or, if it never ran, when start fails or stop is called). Never rejects. */
  readonly exited: Promise<VmExit>;

  readonly #ctx: VmContext;
  readonly #spec: ClhLaunchSpec;
  readonly #log: Logger;
  readonly #opts: typeof CLH_VM_DEFAULTS;
  readonly #api: ClhApiClient;
  readonly #vmConfig: ClhVmConfig;
  readonly #disks = new Map<string, HotpluggedBlock>();
  #resolveExited!: (exit: VmExit) => void;
  #state: State = 'created';
  #proc: SupervisedProcess | undefined;
  #exit: VmExit | undefined;
  #stopRequested = false;
  /** The VMM answered vmm.ping: stop goes through the API first. */
  #apiUp = false;
  #vmCreated = false;
  #ping: VmmPing | undefined;
  #starting: Promise<void> | undefined;
  #stopping: Promise<VmExit> | undefined;
  /** What vm.resize last brought the VM to (vm.create's sizes until then). */
  #vcpus: number | undefined;
  #ramBytes: number | undefined;
  #resizing: Promise<unknown> = Promise.resolve();

  constructor(ctx: VmContext, opts: ClhVmOptions = {}) {
    if (!isClhSpec(ctx.plan.vm.native)) throw new KataError('KATA_ERR_INTERNAL', `ClhVm needs a plan rendered by the clh plugin, got one for "${ctx.plan.vm.hypervisor}"`, { plugin: PLUGIN_NAME });
    this.#ctx = ctx;
    this.#spec = ctx.plan.vm.native;
    this.#log = ctx.log.child({ plugin: PLUGIN_NAME });
    this.#opts = { ...CLH_VM_DEFAULTS, ...Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined)) };
    this.#api = new ClhApiClient({ socketPath: path.join(ctx.runDir, CLH_FILES.apiSocket), timeoutMs: this.#spec.apiTimeoutMs, plugin: PLUGIN_NAME });
    this.#vmConfig = fillVmConfig(this.#spec.vmConfig, ctx.runDir);
    // Interfaces found in the pod's namespace at sandbox start.
    const nets = renderClhNets(ctx.network?.devices ?? [], this.#vmConfig.iommu === true);
    if (nets.length > 0) this.#vmConfig = { ...this.#vmConfig, net: [...(this.#vmConfig.net ?? []), ...nets] };
    this.exited = new Promise((resolve) => (this.#resolveExited = resolve));
  }

  get pid(): number | undefined {
    return this.#proc?.pid;
  }

  /** The REST API client (tests and diagnostics query the VMM through it). */
  get api(): ClhApiClient {
    return this.#api;
  }

  /** What `vmm.ping` answered at start. */
  get vmm(): VmmPing | undefined {
    return this.#ping;
  }

  /** The vm.create body as sent. */
  get vmConfig(): ClhVmConfig {
    return this.#vmConfig;
  }

  /** The disks hot-plugged and not unplugged. */
  get disks(): readonly HotpluggedBlock[] {
    return [...this.#disks.values()];
  }

  start(): Promise<void> {
    this.#starting ??= this.#start();
    return this.#starting;
  }

  /**
   * `vm.resize` with `desired_vcpus`: Cloud Hypervisor adds vCPUs up to `max_vcpus`, or removes
   * them (the guest ejects them through ACPI); resolves with the count asked for once accepted.
   */
  resizeVcpus(n: number): Promise<number> {
    return this.#serialResize(async () => {
      this.#mustRun('resize the vCPUs');
      const cpus = this.#vmConfig.cpus ?? { boot_vcpus: 1, max_vcpus: 1 };
      if (!Number.isInteger(n) || n < 1 || n > cpus.max_vcpus) {
        throw hotplugError(`cannot resize to ${n} vCPUs: the VM was created with max_vcpus = ${cpus.max_vcpus} (default_maxvcpus)`, { fix: 'raise default_maxvcpus in [hypervisor.clh]' });
      }
      if (n === (this.#vcpus ?? cpus.boot_vcpus)) return n;
      await this.#api.resize({ desired_vcpus: n }).catch((e: unknown) => {
        throw hotplugError(`vm.resize to ${n} vCPUs: ${reason(e)}`, { cause: e });
      });
      this.#vcpus = n;
      this.#log.info({ vcpus: n }, 'vCPUs resized');
      return n;
    });
  }

  /**
   * `vm.resize` with `desired_ram` (bytes), up to `size + hotplug_size`; memory is only added
   * (ACPI memory hot-plug cannot take it back). Resolves with the MiB the VM has.
   */
  resizeMemory(mib: number): Promise<number> {
    return this.#serialResize(async () => {
      this.#mustRun('resize the memory');
      const memory = this.#vmConfig.memory ?? { size: 0 };
      const current = this.#ramBytes ?? memory.size;
      const want = mib * 1024 * 1024;
      if (want <= current) return Math.floor(current / (1024 * 1024));
      const max = memory.size + (memory.hotplug_size ?? 0);
      if (!Number.isInteger(mib) || want > max) {
        throw hotplugError(`cannot resize memory to ${mib} MiB: the VM was created with ${Math.floor(max / 1048576)} MiB at most (default_maxmemory)`, { fix: 'raise default_maxmemory in [hypervisor.clh]' });
      }
      await this.#api.resize({ desired_ram: want }).catch((e: unknown) => {
        throw hotplugError(`vm.resize to ${mib} MiB: ${reason(e)}`, { cause: e });
      });
      this.#ramBytes = want;
      this.#log.info({ memoryMiB: mib }, 'memory resized');
      return mib;
    });
  }

  #serialResize<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#resizing.then(fn, fn);
    this.#resizing = run.catch(() => undefined);
    return run;
  }

  async hotplugBlock(dev: BlockDeviceSpec): Promise<HotpluggedBlock> {
    this.#mustRun('hot-plug a disk');
    if (this.#disks.has(dev.id)) throw hotplugError(`a disk with id "${dev.id}" is already hot-plugged`, { fix: 'Give each disk of a sandbox its own id.' });
    const disk: ClhDiskConfig = { path: dev.path, readonly: dev.readonly === true, id: dev.id, image_type: 'Raw', ...(this.#vmConfig.iommu ? { iommu: true } : {}) };
    let info;
    try {
      info = await this.#api.addDisk(disk);
    } catch (e) {
      throw hotplugError(`disk "${dev.id}" (${dev.path}): ${reason(e)}`, { cause: e });
    }
    if (!info) {
      // 204 means "cold-added": the VMM does not think the VM is running. Take it back.
      await this.#api.removeDevice(dev.id).catch(() => undefined);
      throw hotplugError(`disk "${dev.id}" (${dev.path}): vm.add-disk answered 204 (cold-added) for a running VM; the disk was removed again`);
    }
    let pciPath: string;
    try {
      pciPath = bdfToPciPath(info.bdf);
    } catch (e) {
      await this.#api.removeDevice(info.id).catch(() => undefined);
      throw e;
    }
    const plugged = Object.freeze({ id: dev.id, pciPath });
    this.#disks.set(dev.id, plugged);
    this.#log.info({ id: dev.id, path: dev.path, bdf: info.bdf, pciPath, readonly: disk.readonly }, 'disk hot-plugged');
    return plugged;
  }

  /**
   * Asks Cloud Hypervisor to remove the disk. Its API reports no completion (removal is ACPI-based
   * and the 204 means "accepted"), so this resolves on the 204, as Kata's driver does.
   */
  async unplugBlock(id: string): Promise<void> {
    if (!this.#disks.has(id)) throw hotplugError(`no hot-plugged disk with id "${id}"`, { fix: 'Unplug only disks that hotplugBlock returned.' });
    this.#mustRun('unplug a disk');
    try {
      await this.#api.removeDevice(id);
    } catch (e) {
      // 404: the VMM has no such device (any more): nothing left to remove.
      if (clhApiFailure(e)?.status !== 404) throw hotplugError(`disk "${id}": ${reason(e)}`, { cause: e });
    }
    this.#disks.delete(id);
    this.#log.info({ id }, 'disk unplugged');
  }

  stop(): Promise<VmExit> {
    this.#stopping ??= this.#stop();
    return this.#stopping;
  }

  // -------------------------------------------------------------------------------------------

  async #start(): Promise<void> {
    if (this.#stopRequested) throw new KataError('KATA_ERR_VM_START', 'cannot start Cloud Hypervisor: the VM was stopped before it started', { plugin: PLUGIN_NAME });
    this.#state = 'starting';
    try {
      await this.#spawn();
      this.#ping = await this.#waitForApi();
      this.#apiUp = true;
      this.#log.info({ pid: this.pid, version: this.#ping.version, features: this.#ping.features }, 'Cloud Hypervisor API up');
      this.#checkFeatures(this.#ping);
      this.#abortIfStopped();
      await this.#api.createVm(this.#vmConfig);
      this.#vmCreated = true;
      this.#abortIfStopped();
      await this.#api.bootVm();
      this.#abortIfStopped();
      this.#state = 'running';
      this.#log.info({ pid: this.pid }, 'VM booted');
    } catch (e) {
      // Built after the process is gone, so that the message has all of the VMM's last words.
      await this.#kill();
      throw this.#startFailure(e);
    }
  }

  async #spawn(): Promise<void> {
    // In the pod's network namespace, so that it opens the taps there by name.
    const { binary, args } = inNetns(this.#ctx.netns, this.#spec.binary, [...this.#spec.args, '--api-socket', `path=${this.#api.socketPath}`]);
    this.#log.debug({ binary, args }, 'spawning Cloud Hypervisor');
    // Tied to this process: a runtime that dies takes its VMM with it. A `Tty` serial port or console writes the guest's output on stdout.
    const proc = SupervisedProcess.start({
      name: 'Cloud Hypervisor',
      binary,
      args,
      cwd: this.#ctx.runDir,
      log: this.#log,
      what: 'the hypervisor binary',
      tailLines: this.#opts.outputLines,
      stdout: { level: 'debug', message: 'guest console' },
    });
    this.#proc = proc;
    void proc.exited.then((e) => this.#onExit(e.code, e.signal));
    if (proc.pid !== undefined) {
      await writeFile(path.join(this.#ctx.runDir, CLH_FILES.pidFile), `${proc.pid}\n`).catch((err) => this.#log.warn({ err }, 'cannot write the pid file'));
    }
  }

  /** Pings until the API socket answers; gives up when the VMM exits or the deadline passes. */
  async #waitForApi(): Promise<VmmPing> {
    const deadline = Date.now() + this.#opts.startTimeoutMs;
    let pause = 5;
    for (;;) {
      if (this.#exit || this.#proc?.spawnError) throw new Error('Cloud Hypervisor exited before its API socket answered');
      this.#abortIfStopped();
      try {
        return await this.#api.ping({ timeoutMs: Math.max(1, Math.min(this.#spec.apiTimeoutMs, deadline - Date.now())) });
      } catch (e) {
        // No socket yet, or nobody accepting on it yet: try again. An HTTP error is an answer.
        if (clhApiFailure(e)?.status !== undefined) throw e;
        if (Date.now() > deadline) throw new Error(`Cloud Hypervisor's API socket ${this.#api.socketPath} did not answer vmm.ping within ${this.#opts.startTimeoutMs} ms (${reason(e)})`);
      }
      await Promise.race([delay(pause), this.exited]);
      pause = Math.min(pause * 2, 50);
    }
  }

  /** A TD needs a binary built with TDX: say so before vm.create, naming the binary and its features. */
  #checkFeatures(ping: VmmPing): void {
    if (this.#vmConfig.platform?.tdx !== true) return;
    const features = ping.features;
    if (features?.includes(TDX_FEATURE)) return;
    const listed = features === undefined ? 'reports no feature list (a release too old for TDX guests as configured here)' : `reports the features [${features.join(', ')}]`;
    throw new KataError('KATA_ERR_CLH_NO_TDX', `${this.#spec.binary} (Cloud Hypervisor ${ping.version}) cannot run a TDX guest: its vmm.ping ${listed}, without "${TDX_FEATURE}"`, {
      plugin: PLUGIN_NAME,
      key: `${this.#ctx.config.hypervisorTable}.path`,
      value: this.#spec.binary,
    });
  }

  #abortIfStopped(): void {
    if (this.#stopRequested) throw new Error('the VM was stopped while starting');
    if (this.#exit) throw new Error('Cloud Hypervisor exited while starting');
  }

  /** KATA_ERR_VM_START for a failed start, in the VMM's own words when it exited by itself; API refusals keep their code. */
  #startFailure(cause: unknown): KataError {
    if (cause instanceof KataError && cause.code !== 'KATA_ERR_INTERNAL') return cause;
    const spawnError = this.#proc?.spawnError;
    const tail = (this.#proc?.tail(OUTPUT_TAIL) ?? []).filter((l) => !spawnError || !l.startsWith(`${this.#spec.binary}: `));
    let what: string;
    if (spawnError) {
      const code = (spawnError as NodeJS.ErrnoException).code;
      what = code === 'ENOENT' ? `${this.#spec.binary} does not exist (spawn ENOENT)` : `cannot run ${this.#spec.binary}: ${spawnError.message}`;
    } else if (this.#exit && this.#exit.signal === null && !this.#exit.expected) {
      what = `Cloud Hypervisor exited during start (${describeExit(this.#exit)})`;
    } else {
      what = cause instanceof Error ? cause.message : String(cause);
    }
    const stderr = tail.length > 0 ? `; its stderr:\n  ${tail.join('\n  ')}` : '';
    return new KataError('KATA_ERR_VM_START', `cannot start Cloud Hypervisor: ${what}${stderr}`, {
      plugin: PLUGIN_NAME,
      key: `${this.#ctx.config.hypervisorTable}.path`,
      cause: spawnError ?? cause,
    });
  }

  #onExit(code: number | null, signal: NodeJS.Signals | null): void {
    if (this.#exit) return;
    const expected = this.#stopRequested;
    const stderrTail = this.#proc?.tail(OUTPUT_TAIL) ?? [];
    const base: VmExit = { expected, code, signal, stderrTail };
    let error: KataError | undefined;
    if (!expected && this.#state === 'running') {
      error = new KataError('KATA_ERR_VM_EXITED', `Cloud Hypervisor (pid ${this.pid}) exited while the sandbox was running (${describeExit(base)})${stderrTail.length ? `; its stderr:\n  ${stderrTail.join('\n  ')}` : ''}`, {
        plugin: PLUGIN_NAME,
      });
      this.#log.error({ err: error, pid: this.pid, exitCode: code, signal }, 'Cloud Hypervisor exited unexpectedly');
    }
    this.#exit = Object.freeze(error ? { ...base, error } : base);
    this.#state = 'exited';
    this.#resolveExited(this.#exit);
  }

  async #stop(): Promise<VmExit> {
    this.#stopRequested = true;
    if (this.#state === 'running') this.#state = 'stopping';
    await this.#starting?.catch(() => undefined);
    let forced = false;
    if (this.#proc && !this.#exit && this.#proc.pid !== undefined) forced = !(await this.#proc.stop(() => this.#stopSteps(), this.#opts.killTimeoutMs));
    if (!this.#exit) {
      // Never spawned (or spawn failed): there is no process to wait for.
      this.#exit = Object.freeze({ expected: true, code: null, signal: null, stderrTail: this.#proc?.tail(OUTPUT_TAIL) ?? [] });
      this.#state = 'exited';
      this.#resolveExited(this.#exit);
    }
    await this.#removeCreated();
    let exit = this.#exit;
    if (forced) {
      const error = new KataError('KATA_ERR_VM_STOP', `Cloud Hypervisor (pid ${this.pid}) did not exit after vmm.shutdown and SIGTERM and was killed`, { plugin: PLUGIN_NAME });
      this.#log.warn({ err: error, pid: this.pid }, 'Cloud Hypervisor had to be killed');
      exit = Object.freeze({ ...exit, error: exit.error ?? error });
    }
    this.#log.info({ pid: this.pid, expected: exit.expected, code: exit.code, signal: exit.signal }, 'Cloud Hypervisor stopped');
    return exit;
  }

  /** vm.shutdown → vm.delete → vmm.shutdown (when the API answered), then SIGTERM; SIGKILL follows. */
  #stopSteps(): StopStep[] {
    const proc = this.#proc;
    const sigterm: StopStep = { name: 'SIGTERM', action: () => proc?.signal('SIGTERM'), waitMs: this.#opts.exitTimeoutMs };
    if (!this.#apiUp) return [sigterm];
    const timeoutMs = Math.max(this.#opts.stopCallTimeoutMs, this.#spec.apiTimeoutMs);
    return [
      {
        name: 'vmm.shutdown',
        action: async () => {
          if (this.#vmCreated) {
            // Refusals are expected here (a VM that never booted cannot be shut down): go on regardless.
            await this.#api.shutdownVm({ timeoutMs }).catch((err) => this.#log.debug({ err }, 'vm.shutdown while stopping'));
            await this.#api.deleteVm({ timeoutMs }).catch((err) => this.#log.debug({ err }, 'vm.delete while stopping'));
          }
          await this.#api.shutdownVmm({ timeoutMs }).catch((err) => this.#log.debug({ err }, 'vmm.shutdown while stopping'));
        },
        waitMs: this.#opts.exitTimeoutMs,
      },
      sigterm,
    ];
  }

  /** SIGKILL and wait for the exit (bounded). */
  async #kill(): Promise<void> {
    if (!this.#proc || this.#proc.exit || this.#proc.pid === undefined) return;
    this.#stopRequested = true;
    await this.#proc.kill(this.#opts.killTimeoutMs);
  }

  #mustRun(what: string): void {
    if (this.#state !== 'running') {
      throw hotplugError(`cannot ${what}: the VM is ${this.#state === 'exited' ? 'no longer running' : this.#state === 'stopping' ? 'stopping' : 'not started'}`);
    }
  }

  /** The API socket (and the lock file newer releases keep beside it), the vsock socket and the pid file. */
  async #removeCreated(): Promise<void> {
    const files = [this.#api.socketPath, `${this.#api.socketPath}.lock`, path.join(this.#ctx.runDir, CLH_FILES.pidFile)];
    const vsock = this.#vmConfig.vsock?.socket;
    if (vsock && path.resolve(vsock).startsWith(path.resolve(this.#ctx.runDir) + path.sep)) files.push(vsock);
    await Promise.all(files.map((f) => rm(f, { force: true }).catch((err) => this.#log.warn({ err, file: f }, 'cannot remove a Cloud Hypervisor file'))));
  }
}

function hotplugError(message: string, opts: { cause?: unknown; fix?: string } = {}): KataError {
  return new KataError('KATA_ERR_HOTPLUG', message, { plugin: PLUGIN_NAME, ...opts });
}

function reason(e: unknown): string {
  if (e instanceof KataError) return `${e.text} [${e.code}]`;
  return e instanceof Error ? e.message : String(e);
}
