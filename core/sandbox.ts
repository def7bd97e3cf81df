/**
 * The sandbox lifecycle: the API the shim and `kata-runtime run` use. A sandbox is one VM with its
 * guest agent; containers run inside it.
 *
 *   Sandbox.create: launchVm (daemons, createVm, start) → connect the agent → CreateSandbox
 *   createContainer: attachRootfs (hot-plug or share) → CreateContainer
 *   Container: start, wait, signal, stdio streams, exec, delete (RemoveContainer, detach rootfs)
 *   Sandbox.stop: delete containers → DestroySandbox → close the agent → stop the VM
 *
 * Every failure undoes what came before it. Rootfs delivery goes through the `attachRootfs` hook;
 * when no plugin answers, a directory rootfs is shared through the shared filesystem here.
 */
import { countHotplug } from './counters.js';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Readable, Writable } from 'node:stream';
import { promisify } from 'node:util';
import { connectAgent, type AgentClient } from './agent/client.js';
import { OomEventLoop } from './agent/oom-events.js';
import { KataError, toKataError } from './errors.js';
import { silentLogger, type Logger } from './logger.js';
import { GUEST_SHARED_DIR, SANDBOX_SHARED_DIR, fillSandboxDir } from './plan.js';
import type { ValidatedConfig } from './runtime.js';
import { mountsUnder, unmount } from './mounts.js';
import { SandboxResources, type ResourceDemand } from './resources.js';
import { interruptedError, launchVm, untilAborted, type LaunchOptions, type RunningVm } from './vm-lifecycle.js';
import type { ContainerContext, RootfsAttachment, RootfsMount, RootfsSource, SandboxNetwork, VmExit, VmHandle } from './vm.js';
import { IPFamily, type LinuxResources, type StatsContainerResponse } from '../wire/agent/proto.gen.js';
import type { MessageInit } from '../wire/ttrpc/codec.js';

/** A container's cgroup limits as the guest agent takes them (kata's LinuxResources; 0 = not set). */
export type ContainerResources = MessageInit<LinuxResources>;

const run = promisify(execFile);

/** How long a clone's agent gets to answer before the sandbox boots cold instead. */
const CLONE_AGENT_DIAL_MS = 15_000;
/** Host entropy handed to a clone's agent (kata-agent's ReseedRandomDev), bytes. */
const RESEED_BYTES = 512;

// As kata-agent checks it: at least two characters.
const CONTAINER_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{1,127}$/;

export interface ProcessSpec {
  readonly args: readonly string[];
  readonly env?: readonly string[];
  readonly cwd?: string;
  readonly uid?: number;
  readonly gid?: number;
  /**
   * Run on a pseudo-terminal in the guest of this initial size (0: the agent's default, 24x80):
   * its stdout is the terminal's output, stderr is empty, stdin is the terminal's input.
   */
  readonly terminal?: TerminalSize;
}

/** A terminal window's size in character cells. */
export interface TerminalSize {
  readonly rows: number;
  readonly cols: number;
}

/** An OCI mount of the container (destination in the container; source on the host for binds). */
export interface MountSpec {
  readonly destination: string;
  readonly type: string;
  readonly source: string;
  readonly options: readonly string[];
}

export interface ContainerSpec {
  readonly id: string;
  readonly rootfs: RootfsSource;
  readonly process: ProcessSpec;
  readonly hostname?: string;
  /**
   * The OCI spec's mounts, all of them (absent: the agent mounts containerd's defaults). Bind
   * mounts of host paths (volumes) are shared with the guest through the shared filesystem.
   */
  readonly mounts?: readonly MountSpec[];
  /** The OCI spec's `linux.resources`: the guest agent applies them to the container's cgroup. */
  readonly resources?: ContainerResources;
  /** The container's CPU and memory limits (OCI `linux.resources`), which size the VM (core/resources.ts). */
  readonly demand?: ResourceDemand;
}

export interface SandboxOptions extends LaunchOptions {
  /** How long the agent gets to answer after the VM starts; default: [agent.kata] dial_timeout. */
  readonly agentDialTimeoutMs?: number;
  /**
   * The guest's hostname, which the pod's containers share: the sandbox container's `hostname`
   * (CRI puts PodSandboxConfig.hostname there), as Kata does; default: the sandbox id's first 63 characters.
   */
  readonly hostname?: string;
}

/** Exit status as runtimes report it: the exit code, or 128 + signal number. */
export type ExitStatus = number;

/** A process in the guest (a container's init or an exec), with its stdio as streams. */
export class GuestProcess {
  readonly stdout: Readable;
  readonly stderr: Readable;
  readonly stdin: Writable;

  constructor(
    private readonly agent: AgentClient,
    readonly containerId: string,
    readonly execId: string,
  ) {
    this.stdout = this.#pump('stdout');
    this.stderr = this.#pump('stderr');
    const ids = { containerId, execId };
    this.stdin = new Writable({
      write: (chunk: Buffer, _enc, cb) => {
        void (async () => {
          let off = 0;
          while (off < chunk.length) off += await agent.writeStdin({ ...ids, data: chunk.subarray(off) });
        })().then(() => cb(), cb);
      },
      final: (cb) => void agent.closeStdin(ids).then(() => cb(), cb),
    });
    // A stream error must not take the runtime down when nobody listens: the process's wait()
    // reports the failure (the agent or the VM gone) to whoever is waiting.
    for (const s of [this.stdout, this.stderr, this.stdin]) s.on('error', () => undefined);
  }

  /** Resolves with the exit status once the process ends. */
  wait(): Promise<ExitStatus> {
    return this.agent.waitProcess({ containerId: this.containerId, execId: this.execId });
  }

  signal(signal: number): Promise<void> {
    return this.agent.signalProcess({ containerId: this.containerId, execId: this.execId, signal });
  }

  /** Sets the window size of the process's terminal (the agent refuses a process without one). */
  resize(size: TerminalSize): Promise<void> {
    return this.agent.ttyWinResize({ containerId: this.containerId, execId: this.execId, row: size.rows, column: size.cols });
  }

  /**
   * A stream of the process's output, read from the agent only as fast as it is consumed: when the
   * reader stops (a full FIFO), the next ReadStdout waits for it, and the guest's pipe fills up
   * instead of this process's memory.
   */
  #pump(which: 'stdout' | 'stderr'): Readable {
    let reading = false;
    const stream: Readable = new Readable({
      read: () => {
        if (reading) return;
        reading = true;
        void (async () => {
          const req = { containerId: this.containerId, execId: this.execId, len: 64 * 1024 };
          for (;;) {
            const data = which === 'stdout' ? await this.agent.readStdout(req) : await this.agent.readStderr(req);
            if (data.length === 0) {
              stream.push(null);
              return;
            }
            if (!stream.push(Buffer.from(data))) break;
          }
          reading = false;
        })().catch((e: unknown) => stream.destroy(toKataError(e)));
      },
    });
    return stream;
  }
}

export class Container extends GuestProcess {
  #execs = 0;
  #deleted = false;
  #exitNoticed = false;

  constructor(
    private readonly sandbox: Sandbox,
    agent: AgentClient,
    readonly id: string,
    private readonly attachment: RootfsAttachment,
    private readonly volumes: SharedVolumes,
  ) {
    super(agent, id, id);
  }

  async start(): Promise<void> {
    await this.sandbox.agent.startContainer({ containerId: this.id });
    await this.sandbox.hooks.containerStarted.promise({ sandbox: this.sandbox.running.ctx, containerId: this.id });
  }

  /** Resolves with the exit status once the container's process ends; plugins hear of it once (`containerExited`). */
  override async wait(): Promise<ExitStatus> {
    const status = await super.wait();
    if (!this.#exitNoticed) {
      this.#exitNoticed = true;
      await this.sandbox.hooks.containerExited.promise({ sandbox: this.sandbox.running.ctx, containerId: this.id }, status);
    }
    return status;
  }

  /** Runs another process in the container's namespaces. */
  async exec(process: ProcessSpec, execId = `exec-${++this.#execs}`): Promise<GuestProcess> {
    await this.sandbox.agent.execProcess({ containerId: this.id, execId, process: ociProcess(process) });
    return new GuestProcess(this.sandbox.agent, this.id, execId);
  }

  /** New cgroup limits for the running container (the fields that are set; 0 leaves one as it is). */
  async update(resources: ContainerResources): Promise<void> {
    await this.sandbox.agent.updateContainer({ containerId: this.id, resources });
  }

  /** The container cgroup's figures, as the guest agent reads them. */
  stats(): Promise<StatsContainerResponse> {
    return this.sandbox.agent.statsContainer(this.id);
  }

  /** Removes the container from the guest and takes its rootfs back. Idempotent. */
  async delete(): Promise<void> {
    if (this.#deleted) return;
    this.#deleted = true;
    this.sandbox.forget(this.id);
    const errors: unknown[] = [];
    await this.sandbox.agent.removeContainer({ containerId: this.id, timeout: 10 }).catch((e: unknown) => errors.push(e));
    await this.sandbox.releaseResources(this.id);
    // Volumes first: they live inside the directory the rootfs share removes.
    await this.volumes.detach().catch((e: unknown) => errors.push(e));
    await this.attachment.detach().catch((e: unknown) => errors.push(e));
    if (errors.length > 0) throw toKataError(errors[0]);
  }
}

/**
 * Gives the guest the pod's interfaces, routes and permanent neighbours (kata-agent's
 * UpdateInterface, then UpdateRoutes once every interface exists, then AddARPNeighbors, as Kata does).
 */
async function configureNetwork(agent: AgentClient, network: SandboxNetwork): Promise<void> {
  const t0 = performance.now();
  try {
    await updateNetwork(agent, network);
  } finally {
    network.timings.guest = performance.now() - t0;
  }
}

async function updateNetwork(agent: AgentClient, network: SandboxNetwork): Promise<void> {
  const family = (f: 'v4' | 'v6') => (f === 'v6' ? IPFamily.v6 : IPFamily.v4);
  for (const i of network.interfaces) {
    await agent.updateInterface({
      name: i.name,
      device: i.name,
      hwAddr: i.mac,
      mtu: BigInt(i.mtu),
      IPAddresses: i.addresses.map((a) => ({ family: family(a.family), address: a.address, mask: String(a.prefixLength) })),
    }).catch((e: unknown) => {
      throw new KataError('KATA_ERR_NETWORK', `the guest could not configure interface ${i.name} (${i.mac}): ${e instanceof Error ? e.message : String(e)}`, { value: i.name, cause: e });
    });
  }
  if (network.routes.length > 0) {
    await agent.updateRoutes(network.routes.map((r) => ({ family: family(r.family), dest: r.dest, gateway: r.gateway, device: r.device, source: r.source, scope: r.scope }))).catch((e: unknown) => {
      throw new KataError('KATA_ERR_NETWORK', `the guest could not install the pod's routes: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
    });
  }
  if (network.neighbors.length === 0) return;
  // NUD_PERMANENT (0x80), and NTF_ROUTER (0x80) for a router: what Kata passes.
  const neighbors = network.neighbors.map((n) => ({ toIPAddress: { family: family(n.family), address: n.address, mask: '' }, device: n.device, lladdr: n.mac, state: 0x80, flags: n.router ? 0x80 : 0 }));
  await agent.addARPNeighbors(neighbors).catch((e: unknown) => {
    throw new KataError('KATA_ERR_NETWORK', `the guest could not add the pod's permanent neighbours: ${e instanceof Error ? e.message : String(e)}`, { value: network.neighbors.map((n) => n.address).join(','), cause: e });
  });
}

/** Called with the container's id when the guest's OOM killer has killed one of its processes. */
export type OomListener = (containerId: string) => void;

export class Sandbox {
  readonly #containers = new Map<string, Container>();
  readonly #oomListeners = new Set<OomListener>();
  readonly #oomEvents: OomEventLoop;
  /** The containers' limits and the VM size they led to (hot-plug). */
  readonly resources: SandboxResources;
  #failure: KataError | undefined;
  #stopping: Promise<VmExit> | undefined;
  /** How long each phase of the start took, in seconds (vm_start includes host_network). */
  startPhases: Readonly<Record<string, number>> = {};

  private constructor(
    readonly running: RunningVm,
    readonly agent: AgentClient,
    private readonly validated: ValidatedConfig,
    private readonly log: Logger,
  ) {
    this.#oomEvents = new OomEventLoop(agent, { log, onOom: (id) => this.#oomListeners.forEach((l) => l(id)) });
    this.resources = sandboxResources(running.vm, agent, validated, log);
    void running.exited.then((exit) => {
      if (!exit.expected) {
        this.#failure = exit.error ?? new KataError('KATA_ERR_VM_EXITED', 'the VM ended unexpectedly');
        agent.close();
      }
    });
  }

  get id(): string {
    return this.running.ctx.sandboxId;
  }

  /**
   * The host end of the guest debug console (a unix socket carrying the shell's terminal bytes),
   * or undefined when the plan has none (`debug_console_enabled` off).
   */
  get debugConsoleSocket(): string | undefined {
    const d = this.validated.plan.vm.devices.find((x) => x.kind === 'debug-console');
    return d && d.kind === 'debug-console' ? fillSandboxDir(d.socket, this.running.ctx.runDir) : undefined;
  }

  /** Set when the VM ended without being asked to: the sandbox is then unusable. */
  get failure(): KataError | undefined {
    return this.#failure;
  }

  /** Creates and starts the VM, connects to its agent and sets the sandbox up in the guest. */
  static async create(validated: ValidatedConfig, opts: SandboxOptions): Promise<Sandbox> {
    const log = (opts.log ?? silentLogger()).child({ sandbox: opts.sandboxId });
    const { plan, config } = validated;
    if (!plan.agent) throw new KataError('KATA_ERR_INTERNAL', `the "${plan.hypervisor}" plugin planned no agent address`);
    // Seconds per start phase, for the shim's metrics (kata_shim_sandbox_start_phase_seconds).
    const phases: Record<string, number> = {};
    let t = performance.now();
    const phase = (name: string) => {
      const now = performance.now();
      phases[name] = (now - t) / 1000;
      t = now;
    };
    const running = await launchVm(validated, opts);
    phase('vm_start');
    const clone = running.ctx.template?.role === 'clone';
    try {
      const address = fillSandboxDir(plan.agent.address, running.ctx.runDir);
      // A clone's agent is already running: it answers at once or not at all.
      const dialMs = opts.agentDialTimeoutMs ?? config.agent.dial_timeout * 1000;
      const deadlineMs = clone ? Math.min(dialMs, CLONE_AGENT_DIAL_MS) : dialMs;
      // A VM that dies while we wait makes the dial fail at once instead of at the deadline.
      const abort = new AbortController();
      void running.exited.then(() => abort.abort());
      opts.signal?.addEventListener('abort', () => abort.abort(), { once: true });
      const agent = await connectAgent(address, { deadlineMs, signal: abort.signal }).catch((e: unknown) => {
        if (opts.signal?.aborted) throw interruptedError(opts.sandboxId);
        throw new KataError('KATA_ERR_AGENT_UNREACHABLE', `the guest agent of sandbox ${opts.sandboxId} did not answer: ${e instanceof Error ? e.message : String(e)}`, { cause: e, ...(clone ? { value: 'clone' } : {}) });
      });
      phase('agent_connect');
      if (clone) {
        // Every clone starts from the template's entropy and clock: give it the host's before anything runs.
        const now = Date.now();
        const identity = Promise.all([agent.reseedRandomDev({ data: randomBytes(RESEED_BYTES) }), agent.setGuestDateTime({ Sec: BigInt(Math.floor(now / 1000)), Usec: BigInt((now % 1000) * 1000) })]);
        await untilAborted(identity, opts.signal, opts.sandboxId).catch((e: unknown) => {
          agent.close();
          throw e;
        });
      }
      const storages = plan.sharedFsMount ? [{ ...plan.sharedFsMount, mountPoint: GUEST_SHARED_DIR }] : [];
      try {
        await untilAborted(agent.createSandbox({ sandboxId: opts.sandboxId, hostname: opts.hostname || opts.sandboxId.slice(0, 63), storages }), opts.signal, opts.sandboxId);
        phase('agent_create_sandbox');
      } catch (e) {
        agent.close();
        throw e;
      }
      try {
        await untilAborted(configureNetwork(agent, running.ctx.network), opts.signal, opts.sandboxId);
      } catch (e) {
        agent.close();
        throw e;
      }
      phase('guest_network');
      phases.host_network = running.ctx.network.timings.host / 1000;
      await validated.hooks.agentReady.promise(running.ctx).catch((e: unknown) => (agent.close(), Promise.reject(e)));
      log.info({ agent: address, clone }, 'sandbox ready');
      const sandbox = new Sandbox(running, agent, validated, log);
      sandbox.startPhases = Object.freeze(phases);
      return sandbox;
    } catch (e) {
      await running.stop().catch(() => undefined);
      const err = toKataError(e);
      if (clone && err.code === 'KATA_ERR_AGENT_UNREACHABLE' && !opts.signal?.aborted) {
        log.warn({ err }, 'the clone\'s agent did not answer: cold boot');
        return Sandbox.create(validated, { ...opts, template: 'none' });
      }
      throw err;
    }
  }

  /** The guest's and the agent's figures as Prometheus text (the agent's GetMetrics). */
  guestMetrics(opts: { timeoutMs?: number } = {}): Promise<string> {
    return this.agent.getMetrics(opts);
  }

  container(id: string): Container | undefined {
    return this.#containers.get(id);
  }

  /**
   * Calls `listener` with the container's id each time the guest's OOM killer kills a process of
   * a container of this sandbox (the agent's GetOOMEvent, polled from the sandbox's start to its
   * stop). Returns the function that removes the listener.
   */
  onOOM(listener: OomListener): () => void {
    this.#oomListeners.add(listener);
    return () => this.#oomListeners.delete(listener);
  }

  /** @internal Containers tell plugins of their start and end through it. */
  get hooks(): ValidatedConfig['hooks'] {
    return this.validated.hooks;
  }

  /** @internal A deleted container's limits: give back what they took, unless the whole VM is going anyway. */
  async releaseResources(id: string): Promise<void> {
    if (this.#stopping) return;
    await this.resources.release(id);
  }

  /** @internal Containers drop themselves on delete. */
  forget(id: string): void {
    this.#containers.delete(id);
  }

  /**
   * Whether a plugin takes these rootfs mounts as they are (devmapper: a block device to hot-plug),
   * and as what; undefined means the front end mounts them and hands over the directory.
   */
  classifyRootfs(mounts: readonly RootfsMount[]): RootfsSource | undefined {
    return this.validated.hooks.classifyRootfs.call(mounts, this.validated.plan) ?? undefined;
  }

  /**
   * Grows (or shrinks) the VM for a container's new limits, before the agent applies them: the
   * shim's Update calls this before UpdateContainer. Fails with KATA_ERR_RESIZE or
   * KATA_ERR_RESIZE_UNAVAILABLE, the VM unchanged, when it cannot.
   */
  async resizeFor(containerId: string, demand: ResourceDemand): Promise<void> {
    if (this.#failure) throw this.#failure;
    await this.resources.set(containerId, demand);
  }

  /** Delivers the rootfs and creates the container in the guest (not started). */
  async createContainer(spec: ContainerSpec): Promise<Container> {
    if (this.#failure) throw this.#failure;
    if (!CONTAINER_ID.test(spec.id)) throw new KataError('KATA_ERR_SANDBOX', `invalid container id "${spec.id}"`);
    if (this.#containers.has(spec.id)) throw new KataError('KATA_ERR_SANDBOX', `container "${spec.id}" already exists in sandbox ${this.id}`);
    const ctx: ContainerContext = Object.freeze({ sandbox: this.running.ctx, vm: this.running.vm, containerId: spec.id, rootfs: spec.rootfs });
    // The VM first (Kata's order): a container whose limits cannot be met is refused before anything is attached.
    if (spec.demand) await this.resources.set(spec.id, spec.demand);
    let attachment: RootfsAttachment;
    try {
      attachment = (await this.validated.hooks.attachRootfs.promise(ctx)) ?? (await this.#shareRootfs(ctx));
    } catch (e) {
      await this.resources.release(spec.id);
      throw e;
    }
    let volumes: SharedVolumes = NO_VOLUMES;
    try {
      volumes = await this.#shareVolumes(ctx, spec.mounts);
      await this.agent.createContainer({
        containerId: spec.id,
        execId: spec.id,
        storages: attachment.storages.map((s) => ({ ...s, options: [...s.options] })),
        OCI: {
          Version: '1.0.2',
          Hostname: spec.hostname ?? '',
          Root: { Path: attachment.guestPath, Readonly: false },
          Process: ociProcess(spec.process),
          Mounts: volumes.mounts.map((m) => ({ ...m, options: [...m.options] })),
          Linux: { Namespaces: [{ Type: 'mount' }, { Type: 'pid' }, { Type: 'uts' }], ...(spec.resources ? { Resources: spec.resources } : {}) },
        },
      });
    } catch (e) {
      await volumes.detach().catch((err: unknown) => this.log.error({ err }, 'could not take back the volumes of a container that failed'));
      await attachment.detach().catch((err: unknown) => this.log.error({ err }, 'could not take back the rootfs of a container that failed'));
      await this.resources.release(spec.id);
      throw toKataError(e);
    }
    const c = new Container(this, this.agent, spec.id, attachment, volumes);
    this.#containers.set(spec.id, c);
    await this.validated.hooks.containerCreated.promise({ sandbox: this.running.ctx, containerId: spec.id });
    return c;
  }

  /** Deletes every container, destroys the sandbox in the guest and stops the VM. Idempotent. */
  stop(): Promise<VmExit> {
    this.#stopping ??= (async () => {
      if (!this.#failure) {
        for (const c of [...this.#containers.values()]) await c.delete().catch((err: unknown) => this.log.warn({ err, container: c.id }, 'container cleanup failed'));
        await this.agent.destroySandbox({ timeoutMs: 5_000 }).catch((err: unknown) => this.log.warn({ err }, 'DestroySandbox failed'));
      }
      this.agent.close();
      this.#oomEvents.stop();
      const exit = await this.running.stop();
      await this.validated.hooks.sandboxStopped.promise(this.running.ctx, exit);
      return exit;
    })();
    return this.#stopping;
  }

  /**
   * Volumes: each bind mount of a host path is bind-mounted into the shared directory
   * (`<shared>/<container>/volumes/<n>`, read-only on the host too when the mount is `ro`) and the
   * guest mounts it from there; every other mount goes to the agent as it is.
   */
  async #shareVolumes(ctx: ContainerContext, mounts: readonly MountSpec[] | undefined): Promise<SharedVolumes> {
    if (!mounts) return NO_VOLUMES;
    const binds = mounts.filter(isBindMount);
    if (binds.length === 0) return { mounts, detach: async () => undefined };
    const { plan } = this.validated;
    if (!plan.sharedFsMount) {
      throw new KataError('KATA_ERR_VOLUME', `container ${ctx.containerId} has bind mounts (${binds.map((m) => m.destination).join(', ')}) but the sandbox has no shared filesystem (shared_fs is "${plan.sharedFs}")`, {
        fix: plan.confidential ? 'a confidential sandbox shares nothing with the host: put the data in the image' : 'enable a shared filesystem (shared_fs), or drop the bind mounts',
      });
    }
    const hostDir = path.join(fillSandboxDir(SANDBOX_SHARED_DIR, ctx.sandbox.runDir), ctx.containerId, 'volumes');
    const mounted: string[] = [];
    const detach = async () => {
      const errors: unknown[] = [];
      for (const t of mounted.reverse()) await unmount(t).catch((e: unknown) => errors.push(e));
      if (errors.length > 0) throw toKataError(errors[0], 'KATA_ERR_VOLUME');
      await removeUnlessMounted(hostDir);
    };
    const out: MountSpec[] = [];
    try {
      for (const m of mounts) {
        if (!isBindMount(m)) {
          out.push(m);
          continue;
        }
        const st = await stat(m.source).catch(() => undefined);
        if (!st) throw new KataError('KATA_ERR_VOLUME', `the source ${m.source} of the bind mount on ${m.destination} does not exist on the host`);
        const target = path.join(hostDir, String(out.length));
        await mkdir(hostDir, { recursive: true });
        if (st.isDirectory()) await mkdir(target);
        else await writeFile(target, '');
        const recursive = m.options.includes('rbind');
        await run('mount', [recursive ? '--rbind' : '--bind', m.source, target]).catch((e: { stderr?: string }) => {
          throw new KataError('KATA_ERR_VOLUME', `cannot share ${m.source} (bind mount on ${m.destination}) with the guest: ${e.stderr?.trim() ?? String(e)}`);
        });
        mounted.push(target);
        if (m.options.includes('ro')) await run('mount', ['-o', 'remount,bind,ro', target]);
        out.push({ ...m, source: `${GUEST_SHARED_DIR}/${ctx.containerId}/volumes/${path.basename(target)}` });
      }
    } catch (e) {
      await detach().catch((err: unknown) => this.log.error({ err }, 'could not take back the volumes shared so far'));
      throw e;
    }
    this.log.info({ container: ctx.containerId, volumes: binds.map((m) => `${m.source}:${m.destination}`) }, 'volumes shared with the guest');
    return { mounts: out, detach };
  }

  /**
   * The core's own rootfs delivery: bind-mount a directory rootfs into the shared directory the
   * guest mounts. A confidential sandbox has no shared filesystem by design.
   */
  async #shareRootfs(ctx: ContainerContext): Promise<RootfsAttachment> {
    const { plan } = this.validated;
    const fix = plan.confidential
      ? 'a confidential sandbox has no shared filesystem: use the devmapper snapshotter (a block-device rootfs)'
      : 'enable a shared filesystem (shared_fs), or give the container a block-device rootfs';
    if (ctx.rootfs.kind !== 'dir') {
      throw new KataError('KATA_ERR_ROOTFS', `no plugin could deliver the block-device rootfs ${ctx.rootfs.path} (block devices are disabled: disable_block_device_use = true)`, {
        fix: 'set disable_block_device_use = false and block_device_driver = "virtio-scsi" or "virtio-blk", or use a directory rootfs',
      });
    }
    if (!plan.sharedFsMount) {
      throw new KataError('KATA_ERR_ROOTFS', `the directory rootfs ${ctx.rootfs.path} cannot reach the guest: shared_fs is "${plan.sharedFs}"`, { fix });
    }
    const hostDir = path.join(fillSandboxDir(SANDBOX_SHARED_DIR, ctx.sandbox.runDir), ctx.containerId, 'rootfs');
    await mkdir(hostDir, { recursive: true });
    try {
      await run('mount', ['--bind', ctx.rootfs.path, hostDir]);
    } catch (e) {
      await rm(path.dirname(hostDir), { recursive: true, force: true });
      throw new KataError('KATA_ERR_ROOTFS', `cannot share ${ctx.rootfs.path} with the guest: bind mount failed: ${(e as { stderr?: string }).stderr?.trim() || String(e)}`, {
        fix: 'run as root (bind mounts need CAP_SYS_ADMIN), and check the rootfs directory exists',
        cause: e,
      });
    }
    return {
      storages: [],
      guestPath: `${GUEST_SHARED_DIR}/${ctx.containerId}/rootfs`,
      detach: async () => {
        await unmount(hostDir);
        await removeUnlessMounted(path.dirname(hostDir));
      },
    };
  }
}

/**
 * The sandbox's sizing bookkeeping: hot-plug within the plan's ceilings; none with
 * static_sandbox_resource_mgmt (the VM was sized at boot); and a refusal for a VM that cannot be
 * resized at all (a confidential guest).
 */
export function sandboxResources(
  vm: Pick<VmHandle, 'resizeVcpus' | 'resizeMemory'>,
  agent: Pick<AgentClient, 'onlineCpuMem' | 'getGuestDetails'>,
  validated: Pick<ValidatedConfig, 'plan' | 'config'>,
  log: Logger,
): SandboxResources {
  const { plan, config } = validated;
  const { cpus, memory } = plan.vm;
  // A TD first: it is sized statically too (the tdx plugin requires it), but a container it cannot fit is refused.
  const mode = plan.vm.confidential
    ? ({ kind: 'fixed', why: `a ${plan.vm.confidential.tee.toUpperCase()} trust domain has a fixed vCPU count and memory size (no hot-plug)` } as const)
    : config.runtime.static_sandbox_resource_mgmt
      ? ({ kind: 'static' } as const)
      : ({ kind: 'hotplug' } as const);
  const hotplug = mode.kind === 'hotplug';
  // What static sizing added for the pod is not part of the defaults Kata's rule starts from.
  const pod = plan.staticSizing ?? { vcpus: 0, memoryMiB: 0 };
  // kata_shim_hotplug_total counts each resize that changed the VM, by direction.
  let vcpusNow = cpus.boot;
  let memoryNowMiB = memory.bootMiB;
  const counted = (kind: 'cpu' | 'memory', before: number, after: number): void => {
    if (after > before) countHotplug(kind);
    else if (after < before) countHotplug(`${kind}_unplug`);
  };
  return new SandboxResources(
    {
      resizeVcpus: cpus.hotplug && vm.resizeVcpus ? async (n) => {
        const got = await vm.resizeVcpus!(n);
        counted('cpu', vcpusNow, got);
        return (vcpusNow = got);
      } : undefined,
      resizeMemory: memory.hotplug && vm.resizeMemory ? async (mib) => {
        const got = await vm.resizeMemory!(mib);
        counted('memory', memoryNowMiB, got);
        return (memoryNowMiB = got);
      } : undefined,
      memoryBlockMiB: async () => Number((await agent.getGuestDetails({ memBlockSize: true })).memBlockSizeBytes / 1048576n),
      online: (nbCpus, cpuOnly) => agent.onlineCpuMem({ nbCpus, cpuOnly }),
    },
    {
      limits: {
        bootVcpus: cpus.boot - pod.vcpus,
        maxVcpus: hotplug && cpus.hotplug ? cpus.max : cpus.boot,
        bootMiB: memory.bootMiB - pod.memoryMiB,
        maxMiB: hotplug && memory.hotplug ? memory.maxMiB : memory.bootMiB,
      },
      initial: { vcpus: cpus.boot, memoryMiB: memory.bootMiB },
      mode,
      keyPrefix: config.hypervisorTable,
      log,
    },
  );
}

interface SharedVolumes {
  /** The mounts as the guest sees them (bind sources inside the shared directory); absent: the agent's defaults. */
  readonly mounts: readonly MountSpec[];
  detach(): Promise<void>;
}

const NO_VOLUMES: SharedVolumes = Object.freeze({ mounts: [], detach: async () => undefined });

function isBindMount(m: MountSpec): boolean {
  return m.type === 'bind' || m.options.includes('bind') || m.options.includes('rbind');
}

/** Removes a directory of shares, but never through a mount that is still there (that would delete host data). */
async function removeUnlessMounted(dir: string): Promise<void> {
  const left = await mountsUnder(dir);
  if (left.length > 0) throw new KataError('KATA_ERR_VOLUME', `not removing ${dir}: still mounted there: ${left.join(', ')}`);
  await rm(dir, { recursive: true, force: true });
}

function ociProcess(p: ProcessSpec) {
  return {
    Terminal: p.terminal !== undefined,
    ...(p.terminal ? { ConsoleSize: { Height: p.terminal.rows, Width: p.terminal.cols } } : {}),
    Args: [...p.args],
    Env: [...(p.env ?? ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'])],
    Cwd: p.cwd ?? '/',
    User: { UID: p.uid ?? 0, GID: p.gid ?? 0, AdditionalGids: [], Username: '' },
  };
}
