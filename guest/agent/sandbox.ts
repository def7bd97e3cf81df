/**
 * The agent's state and the operations behind each RPC: the sandbox (hostname, shared storages),
 * its containers, their processes. service.ts maps RPCs onto these methods.
 */
import { readdirSync, readlinkSync } from 'node:fs';
import { mkdir, readFile, readdir, readlink, realpath, stat, writeFile } from 'node:fs/promises';
import type {
  CloseStdinRequest,
  TtyWinResizeRequest,
  CreateContainerRequest,
  CreateSandboxRequest,
  ExecProcessRequest,
  GuestDetailsRequest,
  GuestDetailsResponse,
  Process,
  ReadStreamRequest,
  RemoveContainerRequest,
  SignalProcessRequest,
  StartContainerRequest,
  StatsContainerRequest,
  StatsContainerResponse,
  StringUser,
  UpdateContainerRequest,
  WaitProcessRequest,
  WriteStreamRequest,
} from '../../wire/agent/proto.gen.js';
import type { MessageInit } from '../../wire/ttrpc/codec.js';
import { GuestNetwork } from './network.js';
import { OomCounter, applyWrites, createContainerCgroup, joinCgroupArgv, readCgroupStats, removeCgroup, resourceWrites, setupCgroups, type CgroupSupport } from './cgroups.js';
import { alreadyExists, cancelled, deadlineExceeded, failedPrecondition, internal, invalidArgument, notFound } from './errors.js';
import { log } from './log.js';
import {
  READY_WORD,
  START_WORD,
  buildEnv,
  checkContainerId,
  checkHostname,
  checkSignal,
  execArgv,
  executableInRoot,
  initArgv,
  lookPath,
  mountTargets,
  openDirInRoot,
  readFileInRoot,
  resolveInRoot,
  secureJoin,
  resolveUser,
  type ProcessPlan,
  type UserFiles,
} from './oci.js';
import { OomEvents, OomWatcher, type OomKill } from './oom.js';
import { GuestProcess } from './process.js';
import { STORAGE_DRIVERS, StorageManager, checkGuestPath, checkOperand } from './storage.js';
import { busyboxOk, lstatOrUndefined, sleep } from './sys.js';
import { AGENT_VERSION } from './version.js';

type ContainerState = 'created' | 'running' | 'stopped';

interface Container {
  readonly id: string;
  readonly root: string;
  /** Mount points this container holds a reference on, in acquisition order. */
  readonly storages: string[];
  readonly init: GuestProcess;
  /** Every process by exec id, the init among them. */
  readonly processes: Map<string, GuestProcess>;
  /** The container's pid namespace (`pid:[inode]`), to tell which container an OOM victim was in. */
  readonly pidNamespace: string | undefined;
  /** The container's cgroup (cgroups.ts containerCgroupDir), when the guest has cgroups. */
  readonly cgroupDir: string | undefined;
  /** Counts the cgroup's OOM kills (memory.events); without it, the kernel log says. */
  readonly oom: OomCounter | undefined;
  state: ContainerState;
}

export interface SandboxOptions {
  /** How long a hot-plugged `blk` device may take to show up. */
  readonly hotplugTimeoutMs: number;
  /** How long a container's setup (namespaces, mounts) may take before CreateContainer fails. */
  readonly createTimeoutMs: number;
  /** An exec's record stays this long after it was waited for, unless both its streams reached EOF earlier. */
  readonly execRetentionMs: number;
}

export const DEFAULT_SANDBOX_OPTIONS: SandboxOptions = Object.freeze({
  hotplugTimeoutMs: 60_000,
  createTimeoutMs: 60_000,
  execRetentionMs: 5 * 60_000,
});

/** Longest single ReadStdout/ReadStderr answer (the ttrpc message limit is 4 MiB). */
export const MAX_READ = 1024 * 1024;

export class Sandbox {
  private created = false;
  private sandboxId = '';
  private hostname = '';
  private readonly sandboxStorages: string[] = [];
  private readonly containers = new Map<string, Container>();
  private readonly storage: StorageManager;
  /** The guest's interfaces and routes (UpdateInterface, UpdateRoutes, ListInterfaces, ListRoutes). */
  readonly network = new GuestNetwork();
  /** OOM kills of container processes, for GetOOMEvent. */
  readonly oomEvents = new OomEvents();
  private oomWatcher: OomWatcher | undefined;
  /** The guest's cgroup v2 support once {@link enableCgroups} ran; undefined: containers get no cgroup. */
  private cgroups: CgroupSupport | undefined;
  /**
   * Which container each of its processes belonged to at the last poll of the kernel log, and at
   * the one before: a victim reaped while the last map was being taken is in the earlier one.
   */
  private pidOwners = new Map<number, string>();
  private pidOwnersBefore = new Map<number, string>();

  constructor(private readonly opts: SandboxOptions = DEFAULT_SANDBOX_OPTIONS) {
    this.storage = new StorageManager({ hotplugTimeoutMs: opts.hotplugTimeoutMs });
  }

  // -------------------------------------------------------------------------------------------
  // Sandbox

  /** Mounts cgroup2 and creates the sandbox cgroup (main.ts; unit tests run without cgroups). */
  async enableCgroups(): Promise<void> {
    this.cgroups = await setupCgroups();
  }

  async createSandbox(req: CreateSandboxRequest, signal?: AbortSignal): Promise<void> {
    if (this.created) throw alreadyExists(`the sandbox${this.sandboxId ? ` ${this.sandboxId}` : ''} is already created`);
    if (req.hostname) checkHostname(req.hostname, 'hostname');
    for (const m of req.kernelModules) {
      if (!/^[\w-]+$/.test(m.name) || m.name.startsWith('-')) throw invalidArgument(`kernel module name ${JSON.stringify(m.name)}`);
      for (const p of m.parameters) checkOperand(p, `kernel module ${m.name}: parameter`);
      await busyboxOk('modprobe', [m.name, ...m.parameters]).catch((e: Error) => {
        throw internal(`cannot load kernel module ${m.name}: ${e.message}`, e);
      });
    }
    // Every sandbox has loopback, with or without a pod network.
    await this.network.loopbackUp();
    if (req.hostname) {
      await busyboxOk('hostname', [req.hostname]).catch((e: Error) => {
        throw internal(`cannot set the hostname: ${e.message}`, e);
      });
    }
    const acquired: string[] = [];
    try {
      for (const s of req.storages) acquired.push(await this.storage.acquire(s, signal));
    } catch (e) {
      for (const mp of acquired.reverse()) await this.storage.release(mp).catch(() => undefined);
      throw e;
    }
    this.sandboxStorages.push(...acquired);
    this.hostname = req.hostname;
    this.sandboxId = req.sandboxId;
    this.created = true;
    log(`sandbox ${req.sandboxId || '(no id)'} created${req.hostname ? `, hostname ${req.hostname}` : ''}, ${acquired.length} storage(s)`);
  }

  /** Removes every container and unmounts every storage; the agent keeps serving (a new CreateSandbox may follow). */
  async destroySandbox(): Promise<void> {
    const problems: string[] = [];
    for (const [id, c] of [...this.containers]) {
      if (!c.init) continue; // still being created
      try {
        await this.removeContainer({ containerId: id, timeout: 0 });
      } catch (e) {
        problems.push((e as Error).message);
      }
    }
    for (const mp of this.sandboxStorages.splice(0).reverse()) {
      try {
        await this.storage.release(mp);
      } catch (e) {
        problems.push((e as Error).message);
      }
    }
    this.created = false;
    this.sandboxId = '';
    this.hostname = '';
    log(`sandbox destroyed${problems.length ? ` with ${problems.length} problem(s)` : ''}`);
    if (problems.length) throw internal(`DestroySandbox: ${problems.join('; ')}`);
  }

  async guestDetails(req: GuestDetailsRequest): Promise<MessageInit<GuestDetailsResponse>> {
    let memBlockSizeBytes = 0n;
    if (req.memBlockSize) {
      const text = await readFile('/sys/devices/system/memory/block_size_bytes', 'utf8').catch(() => '');
      if (/^[0-9a-fA-F]+\s*$/.test(text)) memBlockSizeBytes = BigInt(`0x${text.trim()}`);
    }
    const probe = req.memHotplugProbe ? (await lstatOrUndefined('/sys/devices/system/memory/probe')) !== undefined : false;
    return {
      memBlockSizeBytes,
      supportMemHotplugProbe: probe,
      agentDetails: {
        version: AGENT_VERSION,
        initDaemon: process.pid === 1,
        deviceHandlers: [],
        storageHandlers: [...STORAGE_DRIVERS],
        supportsSeccomp: false,
        extraFeatures: [],
      },
    };
  }

  // -------------------------------------------------------------------------------------------
  // Containers

  async createContainer(req: CreateContainerRequest, signal?: AbortSignal): Promise<void> {
    const id = req.containerId;
    checkContainerId(id);
    if (this.containers.has(id)) throw alreadyExists(`container ${id} already exists`);
    const spec = req.OCI;
    if (!spec) throw invalidArgument(`container ${id}: the request has no OCI spec`);
    const proc = spec.Process;
    if (!proc) throw invalidArgument(`container ${id}: the OCI spec has no process`);
    if (!spec.Root?.Path) throw invalidArgument(`container ${id}: the OCI spec has no root.path`);
    const root = checkGuestPath(spec.Root.Path, 'root.path');
    checkProcess(proc, `container ${id}`);
    if (req.devices.length) log(`container ${id}: ${req.devices.length} device(s) ignored (not supported by this agent)`);

    // Reserve the id while the storages mount (a concurrent create with the same id fails).
    const storages: string[] = [];
    const placeholder = { id } as Container;
    this.containers.set(id, placeholder);
    let init: GuestProcess | undefined;
    let cgroupDir: string | undefined;
    try {
      // Limits are checked before anything is mounted; the cgroup exists before its first process.
      if (this.cgroups) cgroupDir = await createContainerCgroup(id, spec.Linux?.Resources, this.cgroups);
      for (const s of req.storages) storages.push(await this.storage.acquire(s, signal));
      const st = await stat(root).catch(() => undefined);
      if (!st?.isDirectory()) throw invalidArgument(`container ${id}: root.path ${root} is not a directory in the guest`);
      // Mount targets are compared with their real paths in the setup: start from the root's.
      const realRoot = await realpath(root);
      const cwdTarget = await secureJoin(realRoot, checkGuestPath(proc.Cwd || '/', 'process cwd'));
      if (!spec.Root.Readonly) await mkdir(cwdTarget, { recursive: true }).catch(() => undefined);
      const plan = await this.plan(proc, req.stringUser, root, root, spec.Root.Readonly);
      const devices = spec.Linux?.Devices ?? [];
      const argv = initArgv(plan, {
        root: realRoot,
        cwdTarget,
        readonly: spec.Root.Readonly,
        hostname: spec.Hostname || this.hostname,
        mounts: spec.Mounts,
        devices,
        targets: await mountTargets(realRoot, spec.Mounts, devices),
        cgroupDir,
      });
      init = await GuestProcess.spawn(id, req.execId || id, cgroupDir ? joinCgroupArgv(cgroupDir, argv) : argv, { control: true, terminal: terminalOf(proc) });
      await this.waitReady(init, id);
      await this.setOomScore(init, proc);
    } catch (e) {
      this.containers.delete(id);
      if (init) {
        init.control?.destroy();
        await init.signal(9);
        await init.exited;
        init.dispose();
      }
      if (cgroupDir) removeCgroup(cgroupDir);
      for (const mp of storages.reverse()) await this.storage.release(mp).catch(() => undefined);
      throw e;
    }
    const initPid = await init.pid();
    const pidNamespace = initPid === undefined ? undefined : readlinkOrUndefined(`/proc/${initPid}/ns/pid`);
    const oom = cgroupDir
      ? new OomCounter(cgroupDir, (n) => {
          log(`the OOM killer killed ${n} process(es) of container ${id} (memory.events oom_kill)`);
          for (let i = 0; i < n; i++) this.oomEvents.push(id);
        })
      : undefined;
    const container: Container = { id, root, storages, init, processes: new Map([[init.execId, init]]), pidNamespace, cgroupDir, oom, state: 'created' };
    this.containers.set(id, container);
    void init.exited.then((status) => {
      this.sawExit();
      container.state = 'stopped';
      log(`container ${id} exited with status ${status}`);
    });
    log(`container ${id} created (root ${root}, pid ${initPid})`);
  }

  async startContainer(req: StartContainerRequest): Promise<void> {
    const c = this.container(req.containerId);
    if (c.state !== 'created') throw failedPrecondition(`container ${c.id} is ${c.state === 'running' ? 'already running' : 'stopped'}`);
    const control = c.init.control;
    if (!control || c.init.hasExited) throw failedPrecondition(`container ${c.id} is stopped`);
    c.state = 'running';
    await new Promise<void>((resolve, reject) => control.write(`${START_WORD}\n`, (err) => (err ? reject(internal(`cannot start container ${c.id}: ${err.message}`)) : resolve())));
    // Answer once the process is in its root, so that an ExecProcess right after joins the right one.
    const pid = await c.init.pid();
    const want = await stat(c.root);
    const deadline = Date.now() + this.opts.createTimeoutMs;
    while (pid !== undefined && !c.init.hasExited) {
      const have = await stat(`/proc/${pid}/root/`).catch(() => undefined);
      if (have && have.dev === want.dev && have.ino === want.ino) break;
      if (Date.now() > deadline) throw deadlineExceeded(`container ${c.id} did not enter its root within ${this.opts.createTimeoutMs} ms`);
      await sleep(5);
    }
    control.destroy();
    log(`container ${c.id} started`);
  }

  async removeContainer(req: RemoveContainerRequest): Promise<void> {
    const c = this.container(req.containerId);
    const limitMs = (req.timeout > 0 ? req.timeout : 30) * 1000;
    // SIGKILL to the init ends its pid namespace, hence every exec too; kill those explicitly all the same.
    c.init.control?.destroy();
    for (const p of c.processes.values()) await p.signal(9);
    const all = Promise.all([...c.processes.values()].map((p) => p.exited));
    const timedOut = await Promise.race([all.then(() => false), sleep(limitMs).then(() => true)]);
    if (timedOut) throw deadlineExceeded(`the processes of container ${c.id} did not exit within ${limitMs / 1000} s of SIGKILL`);
    for (const p of c.processes.values()) p.dispose();
    this.sawExit();
    this.containers.delete(c.id);
    c.oom?.close();
    if (c.cgroupDir) await removeCgroupSoon(c.cgroupDir);
    const problems: string[] = [];
    for (const mp of [...c.storages].reverse()) {
      try {
        await this.storage.release(mp);
      } catch (e) {
        problems.push((e as Error).message);
      }
    }
    log(`container ${c.id} removed`);
    if (problems.length) throw internal(`container ${c.id} removed, but: ${problems.join('; ')}`);
  }

  // -------------------------------------------------------------------------------------------
  // Processes

  async execProcess(req: ExecProcessRequest): Promise<void> {
    const c = this.container(req.containerId);
    if (!req.execId) throw invalidArgument(`ExecProcess into ${c.id}: exec_id is empty`);
    if (c.processes.has(req.execId)) throw alreadyExists(`exec id ${req.execId} already exists in container ${c.id}`);
    if (!req.process) throw invalidArgument(`exec ${req.execId}: the request has no process`);
    checkProcess(req.process, `exec ${req.execId}`);
    if (c.state !== 'running' || c.init.hasExited) throw failedPrecondition(`container ${c.id} is not running`);
    const pid = await c.init.pid();
    if (pid === undefined) throw failedPrecondition(`container ${c.id} is not running`);
    const plan = await this.plan(req.process, req.stringUser, `/proc/${pid}/root`, c.root, true);
    // Held open until the process ends: nsenter takes it as the working directory by its
    // /proc/<agent>/fd path (see ExecTarget in oci.ts).
    const cwd = await openDirInRoot(`/proc/${pid}/root`, plan.cwd);
    let p: GuestProcess;
    try {
      const argv = execArgv(plan, pid, `/proc/${process.pid}/fd/${cwd.fd}`);
      p = await GuestProcess.spawn(c.id, req.execId, c.cgroupDir ? joinCgroupArgv(c.cgroupDir, argv) : argv, { terminal: terminalOf(req.process) });
    } catch (e) {
      await cwd.close();
      throw e;
    }
    c.processes.set(req.execId, p);
    const release = () => void cwd.close().catch(() => undefined);
    void p.exited.then(release, release);
    void p.exited.then((status) => {
      this.sawExit();
      log(`exec ${req.execId} in container ${c.id} exited with status ${status}`);
    });
    // Its pid is known from now on, for telling OOM victims apart even after they are reaped.
    void p.pid();
  }

  async signalProcess(req: SignalProcessRequest): Promise<void> {
    const c = this.container(req.containerId);
    const sig = checkSignal(req.signal);
    if (req.execId === '') {
      // Every process of the container: the init first, then whatever else shares its pid namespace.
      await c.init.signal(sig);
      for (const pid of await pidsInNamespaceOf(await c.init.pid())) {
        try {
          process.kill(pid, sig);
        } catch {
          // gone
        }
      }
      return;
    }
    await this.process(c, req.execId).signal(sig);
  }

  async waitProcess(req: WaitProcessRequest, signal?: AbortSignal): Promise<number> {
    const c = this.container(req.containerId);
    const p = this.process(c, req.execId);
    const status = await abortable(p.exited, signal);
    if (p !== c.init) this.retire(c, p);
    return status;
  }

  async readStream(req: ReadStreamRequest, which: 'stdout' | 'stderr', signal?: AbortSignal): Promise<Buffer> {
    const c = this.container(req.containerId);
    const p = this.process(c, req.execId);
    if (req.len === 0) throw invalidArgument('ReadStreamRequest.len must be above 0');
    return p[which].read(Math.min(req.len, MAX_READ), signal);
  }

  async writeStdin(req: WriteStreamRequest): Promise<number> {
    const c = this.container(req.containerId);
    return this.process(c, req.execId).writeStdin(req.data);
  }

  closeStdin(req: CloseStdinRequest): void {
    const c = this.container(req.containerId);
    this.process(c, req.execId).closeStdin();
  }

  /** kata-agent's TtyWinResize: the window size of a process's terminal. */
  ttyWinResize(req: TtyWinResizeRequest): void {
    const c = this.container(req.containerId);
    const p = this.process(c, req.execId);
    if (p.hasExited) return;
    p.resize(req.row, req.column);
  }

  // -------------------------------------------------------------------------------------------
  // Resources

  /** kata-agent's UpdateContainer: writes the resources that are set into the container's cgroup. */
  async updateContainer(req: UpdateContainerRequest): Promise<void> {
    const c = this.container(req.containerId);
    if (!c.cgroupDir || !this.cgroups) throw failedPrecondition(`container ${c.id} has no cgroup: the guest kernel has no cgroup2`);
    await applyWrites(c.cgroupDir, resourceWrites(req.resources, this.cgroups));
    log(`container ${c.id}: resources updated`);
  }

  /** kata-agent's StatsContainer: the container cgroup's figures (no per-container network figures: the pod shares one interface set). */
  statsContainer(req: StatsContainerRequest): MessageInit<StatsContainerResponse> {
    const c = this.container(req.containerId);
    if (!c.cgroupDir) throw failedPrecondition(`container ${c.id} has no cgroup: the guest kernel has no cgroup2`);
    return { cgroupStats: readCgroupStats(c.cgroupDir), networkStats: [] };
  }

  // -------------------------------------------------------------------------------------------
  // OOM events

  /** Starts reading the kernel log for OOM kills (main.ts; unit tests call {@link oomKilled} instead). */
  watchOomKills(kmsgPath?: string): void {
    this.oomWatcher ??= new OomWatcher((kill) => this.oomKilled(kill), kmsgPath, () => this.notePidOwners());
    this.oomWatcher.start();
  }

  /**
   * The OOM killer killed `kill.pid`: queues an event for the container it belonged to and returns
   * that container's id (undefined for a process of no container: the agent, a helper). A victim
   * is usually gone from /proc by the time its kill line is read (its parent reaps it), so it is
   * looked for in this order: the pid namespace /proc still shows (zombies included); the pid →
   * container maps of the last two polls, which hold any process that lived a poll interval, as
   * one that grew until the guest ran out of memory has; the processes the agent started (a
   * container's init, an exec), known by pid even once reaped.
   */
  oomKilled(kill: OomKill): string | undefined {
    const owner = this.ownerOf(kill.pid);
    if (owner === undefined) {
      log(`the OOM killer killed pid ${kill.pid} (${kill.comm}), which belongs to no container`);
      return undefined;
    }
    const counter = this.containers.get(owner)?.oom;
    if (counter) {
      // Its cgroup's memory.events counts the kill: the event comes from there, once.
      counter.check();
      return owner;
    }
    log(`the OOM killer killed pid ${kill.pid} (${kill.comm}) in container ${owner}`);
    this.oomEvents.push(owner);
    return owner;
  }

  private ownerOf(pid: number): string | undefined {
    const live = [...this.containers.values()].filter((c) => c.init);
    const ns = readlinkOrUndefined(`/proc/${pid}/ns/pid`);
    // Only a running init's: namespace inode numbers are reused once a namespace is gone.
    const byNs = ns === undefined ? undefined : live.find((c) => c.pidNamespace === ns && !c.init.hasExited);
    if (byNs) return byNs.id;
    const noted = this.pidOwners.get(pid) ?? this.pidOwnersBefore.get(pid);
    if (noted !== undefined && this.containers.has(noted)) return noted;
    // Last, as a pid the agent started may have been reused since that process ended.
    return live.find((c) => [...c.processes.values()].some((p) => p.knownPid === pid || p.helperPid === pid))?.id;
  }

  /** Notes which container each guest process belongs to, by pid namespace (while containers run). */
  private notePidOwners(): void {
    for (const c of this.containers.values()) c.oom?.check();
    this.pidOwnersBefore = this.pidOwners;
    this.pidOwners = new Map();
    const byNs = new Map<string, string>();
    for (const c of this.containers.values()) if (c.init && c.pidNamespace && !c.init.hasExited) byNs.set(c.pidNamespace, c.id);
    if (byNs.size === 0) return;
    let names: string[];
    try {
      names = readdirSync('/proc');
    } catch {
      return;
    }
    for (const name of names) {
      if (!/^\d+$/.test(name)) continue;
      const owner = byNs.get(readlinkOrUndefined(`/proc/${name}/ns/pid`) ?? '');
      if (owner !== undefined) this.pidOwners.set(Number(name), owner);
    }
  }

  /**
   * A process of a container ended: read the kernel log now. The OOM killer logs a kill before its
   * victim can die, so an OOM kill that ended this process (or a child it waited for) is queued
   * before WaitProcess reports the exit and before RemoveContainer can forget the container.
   */
  private sawExit(): void {
    for (const c of this.containers.values()) c.oom?.check();
    this.oomWatcher?.drain();
  }

  // -------------------------------------------------------------------------------------------

  private container(id: string): Container {
    const c = this.containers.get(id);
    if (!c || !c.init) throw notFound(`container ${id} not found`);
    return c;
  }

  /** "" and the init's exec id (kata uses the container id) name the init. */
  private process(c: Container, execId: string): GuestProcess {
    if (execId === '') return c.init;
    const p = c.processes.get(execId);
    if (!p) throw notFound(`process ${execId} not found in container ${c.id}`);
    return p;
  }

  /** Forgets a waited-for exec once its output has been read to the end, or after the retention time. */
  private retire(c: Container, p: GuestProcess): void {
    const start = Date.now();
    const check = (): void => {
      if (c.processes.get(p.execId) !== p) return;
      if ((p.stdout.drained && (p.stderr.drained || p.pty !== undefined)) || Date.now() - start > this.opts.execRetentionMs) {
        c.processes.delete(p.execId);
        p.dispose();
        return;
      }
      setTimeout(check, 1000).unref();
    };
    check();
  }

  /** The process as the agent will run it; `checkCwd`: the working directory must already exist (the agent makes an init's when the root is writable). */
  private async plan(proc: Process, stringUser: StringUser | undefined, rootInAgent: string, rootForFiles: string, checkCwd: boolean): Promise<ProcessPlan> {
    const files: UserFiles = { passwd: await readFileInRoot(rootInAgent, '/etc/passwd'), group: await readFileInRoot(rootInAgent, '/etc/group') };
    const user = resolveUser(proc.User, stringUser, files);
    const env = buildEnv(proc.Env, user.home, proc.Terminal);
    const cwd = checkGuestPath(proc.Cwd || '/', 'process cwd');
    if (checkCwd) {
      const dir = await resolveInRoot(rootInAgent, cwd);
      const st = dir === undefined ? undefined : await stat(dir).catch(() => undefined);
      if (!st?.isDirectory()) throw invalidArgument(`chdir to cwd ${JSON.stringify(cwd)}: no such directory in the container`);
    }
    const found = await lookPath(proc.Args[0] as string, env, cwd, (p) => executableInRoot(rootInAgent, p));
    if (!found) throw invalidArgument(`exec: ${JSON.stringify(proc.Args[0])}: executable file not found in the container (root ${rootForFiles}, PATH ${env.find((e) => e.startsWith('PATH='))?.slice(5) ?? '(unset)'})`);
    const args = [found, ...proc.Args.slice(1)];
    return { args, env, cwd, uid: user.uid, gid: user.gid, noNewPrivileges: proc.NoNewPrivileges, rlimits: proc.Rlimits };
  }

  /** Resolves once the init script says `ready` on fd 3; fails with what it said instead, or its stderr. */
  private async waitReady(init: GuestProcess, id: string): Promise<void> {
    const control = init.control;
    if (!control) throw internal('no control channel');
    let text = '';
    const said = new Promise<string>((resolve) => {
      control.setEncoding('utf8');
      control.on('data', (d: string) => {
        text += d;
        if (text.includes('\n')) resolve(text.slice(0, text.indexOf('\n')));
      });
      control.once('end', () => resolve(text.trim()));
    });
    // The setup ending closes fd 3 (after the failure line, if any), so this settles either way.
    const outcome = await Promise.race([
      said.then((line) => ({ kind: 'line' as const, line })),
      sleep(this.opts.createTimeoutMs).then(() => ({ kind: 'timeout' as const })),
    ]);
    control.removeAllListeners('data');
    control.pause();
    if (outcome.kind === 'line' && outcome.line === READY_WORD) return;
    const stderr = init.stderr.buffered ? (await init.stderr.read(4096)).toString('utf8').trim() : '';
    if (outcome.kind === 'timeout') throw deadlineExceeded(`container ${id}: setup did not finish within ${this.opts.createTimeoutMs} ms`);
    const why = outcome.line || `setup exited with status ${await init.exited}`;
    throw internal(`container ${id}: ${why}${stderr ? ` (${stderr.replace(/\s+/g, ' ')})` : ''}`);
  }

  private async setOomScore(p: GuestProcess, proc: Process): Promise<void> {
    if (!proc.OOMScoreAdj) return;
    const pid = await p.pid();
    if (pid === undefined) return;
    await writeFile(`/proc/${pid}/oom_score_adj`, String(proc.OOMScoreAdj)).catch((e: Error) => log(`cannot set oom_score_adj of pid ${pid}: ${e.message}`));
  }
}

function checkProcess(p: Process, what: string): void {
  if (!p.Args.length || !p.Args[0]) throw invalidArgument(`${what}: the process has no args`);
  if (p.OOMScoreAdj < -1000n || p.OOMScoreAdj > 1000n) throw invalidArgument(`${what}: oom_score_adj ${p.OOMScoreAdj} is not from -1000 to 1000`);
}

/** The terminal a process asks for (process.terminal, of process.consoleSize), or none. */
function terminalOf(p: Process): { rows: number; cols: number } | undefined {
  return p.Terminal ? { rows: p.ConsoleSize?.Height ?? 0, cols: p.ConsoleSize?.Width ?? 0 } : undefined;
}

/** Every pid that shares the pid namespace of `pid` (not `pid` itself). */
async function pidsInNamespaceOf(pid: number | undefined): Promise<number[]> {
  if (pid === undefined) return [];
  const ns = await readlink(`/proc/${pid}/ns/pid`).catch(() => undefined);
  if (!ns) return [];
  const out: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === pid) continue;
    if ((await readlink(`/proc/${name}/ns/pid`).catch(() => undefined)) === ns) out.push(Number(name));
  }
  return out;
}

/** Removes a cgroup whose processes have just exited (the kernel may take a moment to empty it). */
async function removeCgroupSoon(dir: string): Promise<void> {
  for (let i = 0; i < 20; i++) {
    const populated = await readFile(`${dir}/cgroup.events`, 'utf8').then((t) => /^populated 1$/m.test(t), () => false);
    if (!populated) break;
    await sleep(50);
  }
  removeCgroup(dir);
}

function readlinkOrUndefined(p: string): string | undefined {
  try {
    return readlinkSync(p);
  } catch {
    return undefined;
  }
}

function abortable<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return p;
  return new Promise<T>((resolve, reject) => {
    if (signal.aborted) return reject(cancelled('the wait was cancelled'));
    const onAbort = (): void => reject(cancelled('the wait was cancelled'));
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e as Error);
      },
    );
  });
}
