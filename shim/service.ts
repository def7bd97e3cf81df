/**
 * `containerd.task.v2.Task`: containerd's view of containers, served on top of the core's sandbox
 * API. One shim serves one sandbox (one VM): the first container it creates starts the sandbox;
 * containers of the same pod (CRI's sandbox-id annotation) join it.
 *
 * Process states follow containerd's: CREATED after Create/Exec, RUNNING after Start, STOPPED once
 * the process has exited and its output is drained (then Wait answers and TaskExit goes out). Calls
 * that a state does not allow fail with FAILED_PRECONDITION, unknown ids with NOT_FOUND, features
 * not built with UNIMPLEMENTED; every message carries the runtime's error code and fix.
 */
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { AgentError } from '../core/agent/errors.js';
import { KataError, toKataError, type ErrorCode } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import { CONFIG_PATH_ANNOTATION, configFromAnnotation, locateConfig, type LocatedConfig } from '../core/config/locate.js';
import { loadValidatedConfig } from '../core/runtime.js';
import { Sandbox, type ContainerResources, type ContainerSpec, type GuestProcess, type ProcessSpec, type TerminalSize } from '../core/sandbox.js';
import type { RootfsMount, RootfsSource, VmExit, VmHandle } from '../core/vm.js';
import { GrpcCode, TtrpcError, type ServiceImpl } from '../wire/ttrpc/index.js';
import { runtimeVersion } from '../core/version.js';
import { TOPICS, type EventPublisher } from './events.js';
import { metricsAny } from './task-metrics.js';
import { parseExecSpec, parseUpdate, readBundleSpec } from './oci.js';
import { prepareRootfs, type PreparedRootfs } from './rootfs.js';
import { TaskIo } from './stdio.js';
import type { MonitorSource } from './monitor.js';
import { podLabelsFrom, type SandboxFigures } from './metrics-labels.js';
import { timestamp } from './time.js';
import {
  Options,
  Status,
  Task,
  TaskCreate,
  TaskDelete,
  TaskExecAdded,
  TaskExecStarted,
  TaskExit,
  TaskOOM,
  TaskPaused,
  TaskResumed,
  TaskStart,
  type CreateTaskRequest,
  type ExecProcessRequest,
  type UpdateTaskRequest,
} from '../wire/containerd/proto.gen.js';
import type { StatsContainerResponse } from '../wire/agent/proto.gen.js';
import { sandboxSizingAnnotations, type ResourceDemand } from '../core/resources.js';

type StatusValue = (typeof Status)[keyof typeof Status];

/** Exit status reported when a process's end could not be observed (the VM or agent died). */
export const LOST_EXIT_STATUS = 255;
/** What a pending Wait on an exec whose Start failed answers (the exec never ran). */
export const FAILED_START_STATUS = 255;
/**
 * Calls that last as long as a process runs: containerd keeps a Wait open for every container and
 * exec it waits on, on its one connection to the shim. Served parked (wire/ttrpc/server.ts,
 * RegisterOptions), so that however many there are, Kill, Exec and Delete still get through.
 */
export const PARKED_TASK_METHODS = ['Wait'] as const;
/** How long a process's output may still drain after it exited before its exit is reported anyway. */
const OUTPUT_DRAIN_MS = 60_000;
/** After CloseIO, how long the client's FIFO gets to deliver what it holds. */
const STDIN_CLOSE_GRACE_MS = 2_000;

/** The part of a guest process the service uses (core/sandbox.ts GuestProcess). */
export type ShimProcess = Pick<GuestProcess, 'stdout' | 'stderr' | 'stdin' | 'wait' | 'signal'> & Partial<Pick<GuestProcess, 'resize'>>;

/** The part of a container the service uses (core/sandbox.ts Container). */
export interface ShimContainer extends ShimProcess {
  start(): Promise<void>;
  exec(process: ProcessSpec, execId: string): Promise<ShimProcess>;
  delete(): Promise<void>;
  /** New cgroup limits (absent: the sandbox cannot change them). */
  update?(resources: ContainerResources): Promise<void>;
  /** The container cgroup's figures (absent: the sandbox reports none). */
  stats?(): Promise<StatsContainerResponse>;
}

/** The part of a sandbox the service uses (core/sandbox.ts Sandbox); tests give a fake. */
export interface ShimSandbox {
  readonly id: string;
  readonly failure: KataError | undefined;
  readonly running: { readonly vm: Pick<VmHandle, 'pid' | 'pause' | 'resume'>; readonly exited: Promise<VmExit> };
  createContainer(spec: ContainerSpec): Promise<ShimContainer>;
  /** Whether a plugin takes a rootfs's mounts as they are (a block device); see Sandbox.classifyRootfs. */
  classifyRootfs(mounts: readonly RootfsMount[]): RootfsSource | undefined;
  stop(): Promise<unknown>;
  /** The host end of the guest debug console, when the sandbox has one (debug_console_enabled). */
  readonly debugConsoleSocket?: string | undefined;
  /** OOM kills in the guest, by container id (absent: the sandbox reports none). */
  onOOM?(listener: (containerId: string) => void): unknown;
  /** Seconds per start phase, for /metrics (absent: none recorded). */
  readonly startPhases?: Readonly<Record<string, number>>;
  /** The guest's metrics as Prometheus text, from the agent (absent: /metrics has none). */
  guestMetrics?(opts: { timeoutMs: number }): Promise<string>;
  /** Grows or shrinks the VM for a container's new limits; Update calls it before the agent's UpdateContainer (Sandbox.resizeFor). */
  resizeFor?(containerId: string, demand: ResourceDemand): Promise<void>;
}

/** What the service asks for when a container starts a new sandbox. */
export interface SandboxRequest {
  readonly sandboxId: string;
  /** The OCI annotations of the container that starts the sandbox. */
  readonly annotations: Readonly<Record<string, string>>;
  /** CreateTaskRequest.options: the runtime options (runtimeoptions.v1.Options) as bytes. */
  readonly options: Uint8Array | undefined;
  /** The pod's network namespace path from the OCI spec, when it has one. */
  readonly netns?: string;
  /** The hostname in the spec of the container that starts the sandbox (the guest's hostname). */
  readonly hostname?: string;
  readonly log: Logger;
}

export interface TaskServiceOptions {
  /** Starts a sandbox; default: configuration lookup, validated config phase, Sandbox.create. */
  readonly createSandbox?: (req: SandboxRequest) => Promise<ShimSandbox>;
  readonly namespace: string;
  readonly events: EventPublisher;
  readonly log: Logger;
  /** Where sandboxes keep their run directories (DEFAULT_RUN_ROOT unless testing). */
  readonly runRoot: string;
  /** The configuration used when the usual lookup finds none (the one the project ships). */
  readonly fallbackConfig?: string;
  /** Called once Shutdown has been answered and nothing is left to serve. */
  readonly onShutdown: () => void;
  /**
   * Opens the sandbox's management socket (shim/monitor.ts) once its sandbox exists; closed with
   * the sandbox. Absent: none (unit tests).
   */
  readonly startMonitor?: (sandboxId: string, source: MonitorSource) => Promise<{ close(): Promise<void> }>;
}

interface Stdio {
  readonly stdin: string;
  readonly stdout: string;
  readonly stderr: string;
  readonly terminal: boolean;
}

/** One process: a container's init (execId '') or an exec. */
class TaskProcess {
  status: StatusValue = Status.CREATED;
  exitStatus = 0;
  exitedAt: Date | undefined;
  guest: ShimProcess | undefined;
  /** Set while Start runs: Kill and Delete wait for it, so states and events stay in order. */
  starting: Promise<unknown> | undefined;
  /** The guest reported the end; output may still be draining (the process is not STOPPED yet). */
  guestExited = false;
  /** CloseIO came: stdin ends once what the client wrote has been passed on. */
  stdinClosed = false;
  /** A ResizePty that came before the process started: applied once it runs. */
  pendingSize: TerminalSize | undefined;
  readonly exited: Promise<void>;
  #resolveExited!: () => void;

  constructor(
    readonly containerId: string,
    readonly execId: string,
    readonly stdio: Stdio,
    readonly io: TaskIo,
    readonly spec: ProcessSpec | undefined,
  ) {
    this.exited = new Promise((resolve) => (this.#resolveExited = resolve));
  }

  /** The id events use: the exec id, or the container id for the init process. */
  get eventId(): string {
    return this.execId || this.containerId;
  }

  markExited(status: number): void {
    if (this.status === Status.STOPPED) return;
    this.status = Status.STOPPED;
    this.exitStatus = status;
    this.exitedAt = new Date();
    this.io.close();
    this.#resolveExited();
  }
}

/** A container this shim runs: its rootfs, its init process and its execs. */
class ShimTask {
  readonly execs = new Map<string, TaskProcess>();
  constructor(
    readonly id: string,
    readonly bundle: string,
    readonly container: ShimContainer,
    readonly rootfs: PreparedRootfs,
    readonly init: TaskProcess,
  ) {}
}

/** The process as the guest runs it: with a terminal (of the spec's consoleSize, or the agent's default) when asked for. */
function withTerminal(process: ProcessSpec, terminal: boolean): ProcessSpec {
  const { terminal: size, ...rest } = process;
  return terminal ? { ...rest, terminal: size ?? { rows: 0, cols: 0 } } : rest;
}

function fail(code: ErrorCode, message: string, fix?: string): KataError {
  return new KataError(code, message, fix ? { fix } : {});
}

const GRPC_FOR: Partial<Record<ErrorCode, number>> = {
  KATA_ERR_TASK_NOT_FOUND: GrpcCode.NOT_FOUND,
  KATA_ERR_TASK_STATE: GrpcCode.FAILED_PRECONDITION,
  KATA_ERR_NOT_IMPLEMENTED: GrpcCode.UNIMPLEMENTED,
  KATA_ERR_OCI_SPEC: GrpcCode.INVALID_ARGUMENT,
  KATA_ERR_ANNOTATION: GrpcCode.INVALID_ARGUMENT,
  KATA_ERR_UNTRUSTED_PATH: GrpcCode.PERMISSION_DENIED,
};

/** A coded error as containerd receives it: the gRPC code it maps to errdefs, the code and fix in the text. */
export function toTtrpcError(e: unknown): TtrpcError {
  if (e instanceof TtrpcError) return e;
  const k = toKataError(e);
  // The agent's own status (INVALID_ARGUMENT for a missing binary, NOT_FOUND, …) reaches containerd as it is.
  const fromAgent = k instanceof AgentError && k.kind === 'call' ? k.grpcCode : undefined;
  const code = fromAgent ?? GRPC_FOR[k.code as ErrorCode] ?? (k.code === 'KATA_ERR_SANDBOX' ? GrpcCode.FAILED_PRECONDITION : GrpcCode.UNKNOWN);
  return new TtrpcError(code, `${k.message} [${k.code}] (fix: ${k.fix})`, { cause: k });
}

export class TaskService {
  readonly #tasks = new Map<string, ShimTask>();
  #sandbox: ShimSandbox | undefined;
  #sandboxId: string | undefined;
  #creating: Promise<unknown> = Promise.resolve();
  #shutdown = false;
  #monitor: { close(): Promise<void> } | undefined;

  constructor(private readonly opts: TaskServiceOptions) {}

  get sandbox(): ShimSandbox | undefined {
    return this.#sandbox;
  }

  /** The handlers, each turning thrown errors into ttrpc statuses and logging them. */
  impl(): ServiceImpl<typeof Task> {
    const wrap =
      <Req, Res>(name: string, fn: (req: Req) => Promise<Res>) =>
      async (req: Req): Promise<Res> => {
        try {
          return await fn.call(this, req);
        } catch (e) {
          const err = toTtrpcError(e);
          this.opts.log[err.code === GrpcCode.NOT_FOUND ? 'info' : 'error']({ err: err.message, call: name, req: summarize(req) }, 'task call failed');
          throw err;
        }
      };
    return {
      Create: wrap('Create', this.create),
      Start: wrap('Start', this.start),
      State: wrap('State', this.state),
      Wait: wrap('Wait', this.wait),
      Kill: wrap('Kill', this.kill),
      Delete: wrap('Delete', this.delete),
      Exec: wrap('Exec', this.exec),
      CloseIO: wrap('CloseIO', this.closeIO),
      Pids: wrap('Pids', this.pids),
      Pause: wrap('Pause', this.pause),
      Resume: wrap('Resume', this.resume),
      Connect: wrap('Connect', this.connect),
      Shutdown: wrap('Shutdown', this.shutdown),
      ResizePty: wrap('ResizePty', this.resizePty),
      Update: wrap('Update', this.update),
      Stats: wrap('Stats', this.stats),
      Checkpoint: wrap('Checkpoint', async () => {
        throw fail('KATA_ERR_NOT_IMPLEMENTED', 'checkpoints are not built (Kata has none either)');
      }),
    };
  }

  #task(id: string): ShimTask {
    const t = this.#tasks.get(id);
    if (!t) throw fail('KATA_ERR_TASK_NOT_FOUND', `container "${id}" does not exist in this shim`);
    return t;
  }

  #process(id: string, execId: string): TaskProcess {
    const t = this.#task(id);
    if (!execId) return t.init;
    const p = t.execs.get(execId);
    if (!p) throw fail('KATA_ERR_TASK_NOT_FOUND', `exec "${execId}" does not exist in container "${id}"`);
    return p;
  }

  #vmPid(): number {
    return this.#sandbox?.running.vm.pid ?? process.pid;
  }

  // Creates are serialised: the first one of a pod starts the sandbox the others join.
  async create(req: CreateTaskRequest): Promise<{ pid: number }> {
    const turn = this.#creating.then(() => this.#create(req));
    this.#creating = turn.catch(() => undefined);
    return turn;
  }

  async #create(req: CreateTaskRequest): Promise<{ pid: number }> {
    if (this.#shutdown) throw fail('KATA_ERR_TASK_STATE', 'the shim is shutting down');
    if (this.#tasks.has(req.id)) throw new TtrpcError(GrpcCode.ALREADY_EXISTS, `container "${req.id}" already exists [KATA_ERR_SANDBOX]`);
    if (req.checkpoint) throw fail('KATA_ERR_NOT_IMPLEMENTED', 'restoring from a checkpoint is not built');
    // "" would read config.json from the shim's working directory and boot a VM before failing.
    if (!path.isAbsolute(req.bundle)) throw fail('KATA_ERR_OCI_SPEC', `container "${req.id}": the bundle ${JSON.stringify(req.bundle)} is not an absolute path`, 'give the absolute path of the bundle directory (containerd always does)');
    const spec = await readBundleSpec(req.bundle, req.id);
    const terminal = req.terminal || spec.terminal;
    const log = this.opts.log.child({ container: req.id });

    let startedSandbox = false;
    if (!this.#sandbox) {
      if (spec.joinsSandbox && spec.sandboxId !== req.id) {
        throw fail('KATA_ERR_SANDBOX', `container "${req.id}" belongs to pod sandbox "${spec.sandboxId}", which this shim does not run`);
      }
      const request = { sandboxId: spec.sandboxId, annotations: sandboxSizingAnnotations(spec.annotations, spec.demand), options: req.options?.value, log, ...(spec.netns ? { netns: spec.netns } : {}), ...(spec.hostname ? { hostname: spec.hostname } : {}) };
      const sandbox = await (this.opts.createSandbox ?? ((r: SandboxRequest) => this.#startSandbox(r)))(request);
      this.#watchSandbox(sandbox, log);
      this.#sandbox = sandbox;
      this.#sandboxId = spec.sandboxId;
      startedSandbox = true;
      if (this.opts.startMonitor) {
        // Without its management socket the sandbox still runs; only kata-runtime exec cannot reach it.
        this.#monitor = await this.opts.startMonitor(spec.sandboxId, { debugConsoleSocket: () => this.#sandbox?.debugConsoleSocket, figures: this.#figures(spec.annotations) }).catch((err: unknown) => {
          log.warn({ err }, 'cannot open the management socket (shim-monitor.sock)');
          return undefined;
        });
      }
    } else if (!spec.joinsSandbox || spec.sandboxId !== this.#sandboxId) {
      throw fail('KATA_ERR_SANDBOX', `this shim runs sandbox "${this.#sandboxId}"; container "${req.id}" does not belong to it (annotation io.kubernetes.cri.sandbox-id)`);
    }
    const sandbox = this.#sandbox;

    const undo: (() => Promise<unknown>)[] = [];
    try {
      const rootfs = await prepareRootfs(req.rootfs, path.join(req.bundle, 'rootfs'), spec.rootPath, (m) => sandbox.classifyRootfs(m));
      undo.push(() => rootfs.release());
      const container = await sandbox.createContainer({
        id: req.id,
        rootfs: rootfs.source,
        process: withTerminal(spec.process, terminal),
        ...(spec.mounts.length > 0 ? { mounts: spec.mounts } : {}),
        ...(spec.hostname ? { hostname: spec.hostname } : {}),
        ...(spec.resources ? { resources: spec.resources } : {}),
        demand: spec.demand,
      });
      undo.push(() => container.delete());
      const stdio = { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal };
      const io = await TaskIo.open(stdio);
      const task = new ShimTask(req.id, req.bundle, container, rootfs, new TaskProcess(req.id, '', stdio, io, undefined));
      this.#tasks.set(req.id, task);
      log.info({ rootfs: rootfs.source.kind, sandbox: sandbox.id }, 'container created');
      this.opts.events.publish(TOPICS.create, TaskCreate, {
        containerId: req.id,
        bundle: req.bundle,
        rootfs: req.rootfs,
        io: { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal },
        checkpoint: req.checkpoint,
        pid: this.#vmPid(),
      });
      return { pid: this.#vmPid() };
    } catch (e) {
      for (const u of undo.reverse()) await u().catch((err: unknown) => log.warn({ err }, 'cleanup after a failed create'));
      if (startedSandbox) await this.#stopSandbox();
      throw e;
    }
  }

  async #startSandbox({ sandboxId, annotations, options, netns, hostname, log }: SandboxRequest): Promise<ShimSandbox> {
    let shimConfigPath: string | undefined;
    if (options && options.length > 0) {
      try {
        shimConfigPath = Options.decode(options).configPath || undefined;
      } catch {
        log.warn('runtime options are not runtimeoptions.v1.Options; ignored');
      }
    }
    // The administrator's configuration first, without the pod's say; it decides whether the pod's
    // config_path annotation may choose another (core/config/locate.ts).
    let admin: LocatedConfig;
    try {
      admin = locateConfig({ shimConfigPath });
    } catch (e) {
      if (!(e instanceof KataError && e.code === 'KATA_ERR_CONFIG_NOT_FOUND' && this.opts.fallbackConfig && !shimConfigPath && !process.env.KATA_CONF_FILE)) throw e;
      admin = { path: this.opts.fallbackConfig, source: 'default', tried: [{ path: this.opts.fallbackConfig, source: 'default', used: true }] };
      log.info({ path: admin.path }, 'no configuration installed; using the one the project ships for QEMU');
    }
    const file = configFromAnnotation(admin, annotations).path;
    if (file !== admin.path) log.info({ path: file, admin: admin.path }, `configuration chosen by annotation ${CONFIG_PATH_ANNOTATION}, as ${admin.path} allows`);
    // Pod annotations may override the configuration only as far as it allows (enable_annotations, valid_*_paths).
    const validated = await loadValidatedConfig({ file, log, annotations, annotationOptions: { pathExists: existsSync, hostCpus: availableParallelism() } });
    log.info({ config: file, hypervisor: validated.plan.hypervisor }, 'starting sandbox');
    return Sandbox.create(validated, { sandboxId, runRoot: this.opts.runRoot, log, ...(netns ? { netns } : {}), ...(hostname ? { hostname } : {}) });
  }

  /** What the sandbox's /metrics reports of it (shim/metrics.ts). */
  #figures(annotations: Readonly<Record<string, string>>): SandboxFigures {
    const pod = podLabelsFrom(annotations);
    // Once the VM has ended its pid may be another process's: no hypervisor figures then.
    let ended = false;
    void this.#sandbox?.running.exited.then(() => (ended = true));
    return {
      hypervisorPid: () => (ended ? undefined : this.#sandbox?.running.vm.pid),
      startPhases: () => this.#sandbox?.startPhases ?? {},
      guestMetrics: async (opts) => {
        const sandbox = this.#sandbox;
        if (!sandbox?.guestMetrics) throw new Error('the sandbox has no agent to ask');
        return sandbox.guestMetrics(opts);
      },
      podLabels: () => pod,
    };
  }

  #watchSandbox(sandbox: ShimSandbox, log: Logger): void {
    // As Kata: TaskOOM goes out as the guest reports the kill; the agent reports it before the
    // victim's exit, so it precedes that process's TaskExit.
    sandbox.onOOM?.((id) => {
      if (!this.#tasks.has(id)) return;
      this.opts.log.info({ container: id }, 'a process of the container was killed by the guest OOM killer');
      this.opts.events.publish(TOPICS.oom, TaskOOM, { containerId: id });
    });
    void sandbox.running.exited.then((exit) => {
      if (exit.expected) return;
      log.error({ err: sandbox.failure?.message }, 'the VM ended unexpectedly; every task of the sandbox is reported as exited');
      for (const t of this.#tasks.values()) for (const p of [t.init, ...t.execs.values()]) if (p.status !== Status.STOPPED) this.#exited(t, p, LOST_EXIT_STATUS);
    });
  }

  async #stopSandbox(): Promise<void> {
    const monitor = this.#monitor;
    this.#monitor = undefined;
    await monitor?.close().catch((err: unknown) => this.opts.log.warn({ err }, 'cannot close the management socket'));
    const sandbox = this.#sandbox;
    if (!sandbox) return;
    this.#sandbox = undefined;
    await sandbox.stop().catch((err: unknown) => this.opts.log.error({ err }, 'stopping the sandbox failed'));
  }

  async start(req: { id: string; execId: string }): Promise<{ pid: number }> {
    const task = this.#task(req.id);
    const proc = this.#process(req.id, req.execId);
    if (proc.status !== Status.CREATED || proc.starting) throw fail('KATA_ERR_TASK_STATE', `${describe(proc)} cannot start: it is ${proc.starting ? 'starting' : statusName(proc.status)}`);
    if (req.execId && task.init.status !== Status.RUNNING) throw fail('KATA_ERR_TASK_STATE', `cannot start exec "${req.execId}": container "${req.id}" is ${statusName(task.init.status)}`);
    const starting = (async () => {
      try {
        return req.execId ? await task.container.exec(proc.spec!, req.execId) : await task.container.start().then(() => task.container);
      } catch (e) {
        this.#startFailed(task, proc, e);
        throw e;
      }
    })();
    // Kill and Delete wait for this, which settles only once a failure has been cleaned up.
    proc.starting = starting.catch(() => undefined);
    try {
      proc.guest = await starting;
    } finally {
      proc.starting = undefined;
    }
    proc.status = Status.RUNNING;
    this.#watch(task, proc);
    if (req.execId) this.opts.events.publish(TOPICS.execStarted, TaskExecStarted, { containerId: req.id, execId: req.execId, pid: this.#vmPid() });
    else this.opts.events.publish(TOPICS.start, TaskStart, { containerId: req.id, pid: this.#vmPid() });
    return { pid: this.#vmPid() };
  }

  /**
   * A process whose Start failed: nothing runs in the guest. Its FIFOs close at once, since
   * containerd's client waits for their EOF before it reports the error (and removes its FIFO
   * directory). An exec is forgotten, as runc forgets one whose exec failed: a pending Wait
   * answers with {@link FAILED_START_STATUS}, no TaskExit goes out (it never started) and the exec
   * id is free again. A container's init stays CREATED until its Delete, as with runc.
   */
  #startFailed(task: ShimTask, proc: TaskProcess, err: unknown): void {
    this.opts.log.info({ container: task.id, exec: proc.execId || undefined, err: toKataError(err).message }, 'the process could not start');
    proc.io.close();
    if (!proc.execId) return;
    task.execs.delete(proc.execId);
    proc.markExited(FAILED_START_STATUS);
  }

  /** Connects the process's stdio and waits for its end in the background. */
  #watch(task: ShimTask, proc: TaskProcess): void {
    const guest = proc.guest!;
    const out = TaskIo.copy(guest.stdout, proc.io.stdout);
    const err = TaskIo.copy(guest.stderr, proc.io.stderr);
    // The stdin FIFO's EOF ends the process's stdin; it comes only after CloseIO (the shim holds a
    // write end until then), once the client has closed its end too and what it wrote is passed on.
    if (proc.io.stdin) proc.io.stdin.pipe(guest.stdin);
    else guest.stdin.end();
    if (proc.stdinClosed) this.#closeStdin(proc);
    if (proc.pendingSize && guest.resize) {
      const size = proc.pendingSize;
      proc.pendingSize = undefined;
      guest.resize(size).catch((e: unknown) => this.opts.log.warn({ err: toKataError(e).message, container: task.id, exec: proc.execId || undefined }, 'resizing the terminal failed'));
    }
    void guest.wait().then(
      async (status) => {
        proc.guestExited = true;
        // Output the process wrote before it ended reaches the client before the exit does.
        const drained = await Promise.race([Promise.all([out, err]).then(() => true), new Promise<false>((r) => setTimeout(() => r(false), OUTPUT_DRAIN_MS).unref())]);
        if (!drained) this.opts.log.warn({ container: task.id, exec: proc.execId || undefined }, `output not drained ${OUTPUT_DRAIN_MS / 1000} s after the process exited (is the client reading?); closing it`);
        this.#exited(task, proc, status);
      },
      (e: unknown) => {
        if (proc.status === Status.STOPPED) return;
        this.opts.log.error({ err: toKataError(e).message, container: proc.containerId, exec: proc.execId }, 'lost the process; reporting it as exited');
        this.#exited(task, proc, LOST_EXIT_STATUS);
      },
    );
  }

  #exited(task: ShimTask, proc: TaskProcess, status: number): void {
    if (proc.status === Status.STOPPED) return;
    proc.markExited(status);
    this.opts.log.info({ container: task.id, exec: proc.execId || undefined, status }, 'process exited');
    this.opts.events.publish(TOPICS.exit, TaskExit, {
      containerId: task.id,
      id: proc.eventId,
      pid: this.#vmPid(),
      exitStatus: status,
      exitedAt: timestamp(proc.exitedAt!),
    });
  }

  async state(req: { id: string; execId: string }) {
    const task = this.#task(req.id);
    const p = this.#process(req.id, req.execId);
    return {
      id: req.id,
      bundle: task.bundle,
      pid: this.#vmPid(),
      status: p.status,
      stdin: p.stdio.stdin,
      stdout: p.stdio.stdout,
      stderr: p.stdio.stderr,
      terminal: p.stdio.terminal,
      exitStatus: p.exitStatus,
      ...(p.exitedAt ? { exitedAt: timestamp(p.exitedAt) } : {}),
      execId: req.execId,
    };
  }

  async wait(req: { id: string; execId: string }) {
    const p = this.#process(req.id, req.execId);
    await p.exited;
    return { exitStatus: p.exitStatus, exitedAt: timestamp(p.exitedAt!) };
  }

  async kill(req: { id: string; execId: string; signal: number; all: boolean }): Promise<object> {
    const task = this.#task(req.id);
    const p = this.#process(req.id, req.execId);
    await p.starting;
    // As runc answers: a process that has ended (even if its output is still draining) is not found.
    if (p.status === Status.STOPPED || p.guestExited) throw fail('KATA_ERR_TASK_NOT_FOUND', `${describe(p)} has already exited`);
    if (p.status === Status.PAUSED) throw fail('KATA_ERR_TASK_STATE', `${describe(p)} is paused (the whole VM is)`, 'resume it first (ctr task resume)');
    if (p.status === Status.CREATED) {
      // Never started: nothing runs in the guest yet. SIGKILL and SIGTERM end it as if it had run.
      if (req.signal !== 9 && req.signal !== 15) throw fail('KATA_ERR_TASK_STATE', `${describe(p)} has not started; only SIGKILL or SIGTERM can end it`);
      this.#exited(task, p, 128 + req.signal);
      return {};
    }
    try {
      await p.guest!.signal(req.signal);
    } catch (e) {
      // It may have ended while the signal was on its way.
      if (p.guestExited || (p.status as StatusValue) === Status.STOPPED) throw fail('KATA_ERR_TASK_NOT_FOUND', `${describe(p)} has already exited`);
      throw e;
    }
    if (req.all && !req.execId) for (const e of task.execs.values()) if (e.status === Status.RUNNING && !e.guestExited) await e.guest!.signal(req.signal).catch(() => undefined);
    return {};
  }

  async delete(req: { id: string; execId: string }) {
    const task = this.#task(req.id);
    const p = this.#process(req.id, req.execId);
    await p.starting;
    if (p.status === Status.RUNNING || p.status === Status.PAUSED) throw fail('KATA_ERR_TASK_STATE', `${describe(p)} is still running`, 'kill it first (ctr task kill)');
    // A process deleted before it ran ends now, so a pending Wait answers and TaskExit precedes TaskDelete.
    if (p.status === Status.CREATED) this.#exited(task, p, 128 + 9);
    const exitedAt = p.exitedAt ?? new Date();
    if (req.execId) {
      task.execs.delete(req.execId);
    } else {
      // The container's other processes end with it (its pid namespace goes).
      for (const e of task.execs.values()) this.#exited(task, e, 128 + 9);
      this.#tasks.delete(req.id);
      const errors: unknown[] = [];
      await task.container.delete().catch((e: unknown) => errors.push(e));
      await task.rootfs.release().catch((e: unknown) => errors.push(e));
      // The pod's own container goes last: the sandbox (the VM) goes with it, and so does every
      // container of the pod still there (reported as killed, so nothing waits forever).
      if (req.id === this.#sandboxId || this.#tasks.size === 0) {
        await this.#stopSandbox();
        for (const t of this.#tasks.values()) for (const q of [t.init, ...t.execs.values()]) this.#exited(t, q, 128 + 9);
      }
      if (errors.length > 0) this.opts.log.warn({ errors: errors.map((e) => toKataError(e).message), container: req.id }, 'container cleanup was incomplete');
    }
    // As containerd's own shims do: TaskDelete is the container's, not an exec's.
    if (!req.execId) this.opts.events.publish(TOPICS.delete, TaskDelete, { containerId: req.id, id: p.eventId, pid: this.#vmPid(), exitStatus: p.exitStatus, exitedAt: timestamp(exitedAt) });
    return { pid: this.#vmPid(), exitStatus: p.exitStatus, exitedAt: timestamp(exitedAt) };
  }

  async exec(req: ExecProcessRequest): Promise<object> {
    const task = this.#task(req.id);
    if (!req.execId) throw fail('KATA_ERR_OCI_SPEC', 'an exec needs an exec id');
    if (task.execs.has(req.execId)) throw new TtrpcError(GrpcCode.ALREADY_EXISTS, `exec "${req.execId}" already exists in container "${req.id}"`);
    if (task.init.status !== Status.RUNNING || task.init.guestExited) throw fail('KATA_ERR_TASK_STATE', `cannot exec in container "${req.id}": it is ${task.init.guestExited ? 'exiting' : statusName(task.init.status)}`);
    const parsed = parseExecSpec(req.spec?.value, req.execId);
    const terminal = req.terminal || parsed.terminal;
    const stdio = { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal };
    const io = await TaskIo.open(stdio);
    task.execs.set(req.execId, new TaskProcess(req.id, req.execId, stdio, io, withTerminal(parsed.process, terminal)));
    this.opts.events.publish(TOPICS.execAdded, TaskExecAdded, { containerId: req.id, execId: req.execId });
    return {};
  }

  /**
   * The window size of a process's terminal (ctr and CRI send it at start and on every change).
   * Before the process runs it is kept for its start; after it has exited it is ignored, as
   * runc's shim does, since a resize racing the exit is no error.
   */
  async resizePty(req: { id: string; execId: string; width: number; height: number }): Promise<object> {
    const p = this.#process(req.id, req.execId);
    if (!p.stdio.terminal) throw fail('KATA_ERR_TASK_STATE', `${describe(p)} has no terminal to resize`, 'ResizePty applies to processes created with a terminal (ctr -t, tty: true)');
    const size = { rows: Math.min(req.height, 0xffff), cols: Math.min(req.width, 0xffff) };
    if (p.status === Status.STOPPED || p.guestExited) return {};
    if (!p.guest?.resize) {
      p.pendingSize = size;
      return {};
    }
    await p.guest.resize(size);
    return {};
  }

  async closeIO(req: { id: string; execId: string; stdin: boolean }): Promise<object> {
    const p = this.#process(req.id, req.execId);
    if (!req.stdin) return {};
    p.io.releaseStdin();
    p.stdinClosed = true;
    if (p.guest) this.#closeStdin(p);
    return {};
  }

  /**
   * Ends a process's stdin after CloseIO. The client closes its FIFO writer once its copy is done,
   * and, the shim's own write end being closed by now, that EOF ends stdin through the pipe with
   * nothing lost; if it does not come, stdin is ended anyway after a grace period.
   */
  #closeStdin(p: TaskProcess): void {
    const guest = p.guest!;
    const stdin = p.io.stdin;
    if (!stdin || stdin.readableEnded || stdin.destroyed) {
      guest.stdin.end();
      return;
    }
    const timer = setTimeout(() => {
      stdin.unpipe(guest.stdin);
      guest.stdin.end();
    }, STDIN_CLOSE_GRACE_MS);
    timer.unref();
    stdin.once('end', () => clearTimeout(timer));
  }

  /** containerd's Update: runtime-spec LinuxResources (JSON in an Any) → the guest agent's UpdateContainer. */
  async update(req: UpdateTaskRequest): Promise<object> {
    const task = this.#task(req.id);
    const { resources, demand } = parseUpdate(req.resources, req.id);
    if (task.init.status === Status.STOPPED) throw fail('KATA_ERR_TASK_STATE', `container "${req.id}" has stopped`);
    await this.#applyResources(req.id, task, resources, demand);
    this.opts.log.info({ container: req.id }, 'resources updated');
    return {};
  }

  /** The one place a container's new limits go to the guest (a hot-plug step goes right before it). */
  async #applyResources(id: string, task: ShimTask, resources: ContainerResources, demand: ResourceDemand): Promise<void> {
    if (!task.container.update) throw fail('KATA_ERR_NOT_IMPLEMENTED', 'this sandbox cannot update a container\'s resources');
    // The VM grows first, so the new limits never ask the guest for CPUs or memory it does not have.
    await this.#sandbox?.resizeFor?.(id, demand);
    await task.container.update(resources);
  }

  /** containerd's Stats: the agent's StatsContainer as containerd's cgroup v2 Metrics in a typeurl Any. */
  async stats(req: { id: string }) {
    const task = this.#task(req.id);
    if (!task.container.stats) throw fail('KATA_ERR_NOT_IMPLEMENTED', 'this sandbox reports no container statistics');
    return { stats: metricsAny(await task.container.stats()) };
  }

  async pids(req: { id: string }) {
    this.#task(req.id);
    // Guest processes have no host pid; like Kata, report the VM's.
    return { processes: [{ pid: this.#vmPid() }] };
  }

  async pause(req: { id: string }): Promise<object> {
    const task = this.#task(req.id);
    const vm = this.#sandbox?.running.vm;
    if (!vm?.pause) throw fail('KATA_ERR_NOT_IMPLEMENTED', 'this hypervisor driver cannot pause a VM');
    if (task.init.status !== Status.RUNNING) throw fail('KATA_ERR_TASK_STATE', `container "${req.id}" is ${statusName(task.init.status)}, not running`);
    await vm.pause();
    // The whole VM stops: every running process of the sandbox is paused with it.
    for (const t of this.#tasks.values()) for (const p of [t.init, ...t.execs.values()]) if (p.status === Status.RUNNING) p.status = Status.PAUSED;
    this.opts.events.publish(TOPICS.paused, TaskPaused, { containerId: req.id });
    return {};
  }

  async resume(req: { id: string }): Promise<object> {
    const task = this.#task(req.id);
    const vm = this.#sandbox?.running.vm;
    if (!vm?.resume) throw fail('KATA_ERR_NOT_IMPLEMENTED', 'this hypervisor driver cannot resume a VM');
    if (task.init.status !== Status.PAUSED) throw fail('KATA_ERR_TASK_STATE', `container "${req.id}" is ${statusName(task.init.status)}, not paused`);
    await vm.resume();
    for (const t of this.#tasks.values()) for (const p of [t.init, ...t.execs.values()]) if (p.status === Status.PAUSED) p.status = Status.RUNNING;
    this.opts.events.publish(TOPICS.resumed, TaskResumed, { containerId: req.id });
    return {};
  }

  async connect(_req: { id: string }) {
    return { shimPid: process.pid, taskPid: this.#vmPid(), version: runtimeVersion() };
  }

  async shutdown(req: { id: string; now: boolean }): Promise<object> {
    // containerd sends Shutdown after each task's Delete; the shim stays while its pod has tasks.
    if (this.#tasks.size > 0 && !req.now) return {};
    this.#shutdown = true;
    await this.close();
    setImmediate(this.opts.onShutdown);
    return {};
  }

  /** Ends every task and stops the sandbox (shutdown, signals). */
  async close(): Promise<void> {
    // A sandbox still being created is stopped too, once it exists.
    await Promise.race([this.#creating, new Promise((r) => setTimeout(r, 60_000).unref())]);
    for (const t of this.#tasks.values()) {
      for (const p of [t.init, ...t.execs.values()]) p.io.close();
      await t.rootfs.release().catch((err: unknown) => this.opts.log.warn({ err, container: t.id }, 'cannot release the rootfs'));
    }
    this.#tasks.clear();
    await this.#stopSandbox();
  }
}

function statusName(s: StatusValue): string {
  return (Object.entries(Status).find(([, v]) => v === s)?.[0] ?? String(s)).toLowerCase();
}

function describe(p: TaskProcess): string {
  return p.execId ? `exec "${p.execId}" of container "${p.containerId}"` : `container "${p.containerId}"`;
}

function summarize(req: unknown): unknown {
  if (req === null || typeof req !== 'object') return req;
  const r = req as Record<string, unknown>;
  return { id: r.id, execId: r.execId || undefined };
}
