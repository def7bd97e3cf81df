/**
 * A fake sandbox for the shim's task service (shim/service.ts ShimSandbox): no VM, no agent.
 * The test drives every process: it writes their output, ends them with a status, holds their
 * start, sees the signals and stdin they get, and can make the agent or the VM die.
 *
 * It behaves as core/sandbox.ts does where the service can tell:
 * - a process's stdout/stderr are Readables that end at the guest's EOF; wait() resolves with the
 *   exit status (code, or 128 + signal);
 * - SIGKILL/SIGTERM/SIGINT end a process with 128 + signal (unless `autoExitOnSignal` is off);
 * - Container.delete() (RemoveContainer) kills what still runs in the container;
 * - once the agent connection closes (stop, or the VM dies) every call rejects with
 *   KATA_ERR_AGENT_CLOSED, pending wait()s reject and output streams are destroyed with that error;
 * - stop() deletes the containers, closes the agent and resolves `running.exited` as expected;
 *   it is idempotent;
 * - oomKill() does what an OOM kill in the guest does: the OOM listeners hear of it first, then
 *   the process ends with 137 (core/sandbox.ts's onOOM, fed by the agent's GetOOMEvent).
 */
import { PassThrough, Writable } from 'node:stream';
import { KataError } from '../../core/errors.js';
import type { ContainerResources, ContainerSpec, ProcessSpec } from '../../core/sandbox.js';
import type { StatsContainerResponse } from '../../wire/agent/proto.gen.js';
import type { SandboxRequest, ShimContainer, ShimProcess, ShimSandbox } from '../../shim/service.js';
import type { VmExit } from '../../core/vm.js';

export interface Deferred<T> {
  readonly promise: Promise<T>;
  resolve(value: T): void;
  reject(err: unknown): void;
  readonly settled: boolean;
}

export function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  let settled = false;
  const promise = new Promise<T>((res, rej) => {
    resolve = (v) => {
      settled = true;
      res(v);
    };
    reject = (e) => {
      settled = true;
      rej(e);
    };
  });
  promise.catch(() => undefined);
  return {
    promise,
    resolve: (v) => resolve(v),
    reject: (e) => reject(e),
    get settled() {
      return settled;
    },
  };
}

const KILLING_SIGNALS = new Set([2, 9, 15]);

/** The connection to the (fake) guest agent, shared by a sandbox's processes. */
export class FakeAgent {
  #closed: KataError | undefined;
  readonly #processes = new Set<FakeProcess>();

  get closed(): KataError | undefined {
    return this.#closed;
  }

  /** Throws as an agent call does once the connection is gone. */
  check(what: string): void {
    if (this.#closed) throw new KataError('KATA_ERR_AGENT_CLOSED', `${what}: ${this.#closed.message}`, { cause: this.#closed });
  }

  track(p: FakeProcess): void {
    this.#processes.add(p);
  }

  /** The connection closes: pending waits reject, output streams break. */
  close(reason = 'the agent connection closed'): void {
    if (this.#closed) return;
    this.#closed = new KataError('KATA_ERR_AGENT_CLOSED', reason);
    for (const p of this.#processes) p.lose(this.#closed);
  }
}

/** A guest process: a container's init or an exec. */
export class FakeProcess implements ShimProcess {
  readonly stdout = new PassThrough();
  readonly stderr = new PassThrough();
  readonly stdin: Writable;
  readonly stdinChunks: Buffer[] = [];
  /** Resolves when the process's stdin is closed (CloseStdin). */
  readonly stdinEnd = deferred<void>();
  readonly signals: number[] = [];
  /** resize() calls (TtyWinResize), in order. */
  readonly resizes: { rows: number; cols: number }[] = [];
  /** wait() calls the service made. */
  waitCalls = 0;
  /** SIGKILL/SIGTERM/SIGINT end the process with 128 + signal, as in the guest. */
  autoExitOnSignal = true;
  /** How long each stdin write takes (an agent WriteStdin round trip); 0: at once. */
  stdinDelayMs = 0;
  #status: number | undefined;
  readonly #exit = deferred<number>();

  constructor(
    protected readonly agent: FakeAgent,
    readonly containerId: string,
    readonly execId: string,
  ) {
    agent.track(this);
    this.stdin = new Writable({
      write: (chunk: Buffer, _enc, cb) => {
        try {
          this.agent.check('WriteStdin');
        } catch (e) {
          cb(e as Error);
          return;
        }
        this.stdinChunks.push(Buffer.from(chunk));
        if (this.stdinDelayMs > 0) setTimeout(cb, this.stdinDelayMs);
        else cb();
      },
      final: (cb) => {
        this.stdinEnd.resolve();
        cb();
      },
    });
    // As GuestProcess: a stream error never goes unhandled; wait() reports the failure.
    for (const s of [this.stdout, this.stderr, this.stdin]) s.on('error', () => undefined);
  }

  get stdinText(): string {
    return Buffer.concat(this.stdinChunks).toString();
  }

  get stdinEnded(): boolean {
    return this.stdinEnd.settled;
  }

  /** The exit status once the process has ended. */
  get status(): number | undefined {
    return this.#status;
  }

  out(data: string | Buffer): void {
    this.stdout.write(data);
  }

  err(data: string | Buffer): void {
    this.stderr.write(data);
  }

  /** The process ends: its output reaches EOF, then wait() resolves, all at once. */
  exit(status: number): void {
    if (this.#status !== undefined || this.#exit.settled) return;
    this.#status = status;
    if (!this.stdout.writableEnded) this.stdout.end();
    if (!this.stderr.writableEnded) this.stderr.end();
    this.#exit.resolve(status);
  }

  /** The agent is gone: wait() rejects and the output streams break, as GuestProcess's do. */
  lose(err: KataError): void {
    if (this.#exit.settled) return;
    this.stdout.destroy(err);
    this.stderr.destroy(err);
    this.#exit.reject(err);
  }

  wait(): Promise<number> {
    this.waitCalls++;
    try {
      this.agent.check('WaitProcess');
    } catch (e) {
      return Promise.reject(e);
    }
    return this.#exit.promise;
  }

  async resize(size: { rows: number; cols: number }): Promise<void> {
    this.agent.check('TtyWinResize');
    this.resizes.push({ rows: size.rows, cols: size.cols });
  }

  async signal(signal: number): Promise<void> {
    this.agent.check('SignalProcess');
    this.signals.push(signal);
    if (this.autoExitOnSignal && KILLING_SIGNALS.has(signal)) setImmediate(() => this.exit(128 + signal));
  }
}

export class FakeContainer extends FakeProcess implements ShimContainer {
  readonly execs = new Map<string, FakeProcess>();
  readonly execSpecs: ProcessSpec[] = [];
  startCalls = 0;
  started = false;
  deleteCalls = 0;
  deleted = false;
  /** What the next start() or exec() rejects with (an agent error), once; nothing starts. */
  startFailure: unknown;
  execFailure: unknown;
  #startGate: Deferred<void> | undefined;

  constructor(
    agent: FakeAgent,
    readonly spec: ContainerSpec,
  ) {
    super(agent, spec.id, spec.id);
  }

  get id(): string {
    return this.spec.id;
  }

  /** What update() received (the agent's UpdateContainer), in order. */
  readonly updates: ContainerResources[] = [];
  /** What stats() answers (the agent's StatsContainer). */
  statsAnswer: StatsContainerResponse = { cgroupStats: undefined, networkStats: [] } as unknown as StatsContainerResponse;

  async update(resources: ContainerResources): Promise<void> {
    this.agent.check('UpdateContainer');
    this.updates.push(resources);
  }

  async stats(): Promise<StatsContainerResponse> {
    this.agent.check('StatsContainer');
    return this.statsAnswer;
  }

  /** Makes start() wait until the returned deferred resolves (or rejects). */
  holdStart(): Deferred<void> {
    this.#startGate = deferred<void>();
    return this.#startGate;
  }

  async start(): Promise<void> {
    this.agent.check('StartContainer');
    this.startCalls++;
    if (this.startFailure !== undefined) {
      const e = this.startFailure;
      this.startFailure = undefined;
      throw e;
    }
    if (this.#startGate) await this.#startGate.promise;
    this.agent.check('StartContainer');
    this.started = true;
  }

  async exec(process: ProcessSpec, execId: string): Promise<FakeProcess> {
    this.agent.check('ExecProcess');
    if (this.execFailure !== undefined) {
      const e = this.execFailure;
      this.execFailure = undefined;
      throw e;
    }
    const p = new FakeProcess(this.agent, this.id, execId);
    this.execs.set(execId, p);
    this.execSpecs.push(process);
    return p;
  }

  /** RemoveContainer: kills what still runs in it. */
  async delete(): Promise<void> {
    this.deleteCalls++;
    if (this.deleted) return;
    this.agent.check('RemoveContainer');
    this.deleted = true;
    for (const e of this.execs.values()) e.exit(137);
    this.exit(137);
  }
}

export interface FakeSandboxOptions {
  /** The VM can pause/resume (vm.pause/vm.resume exist). Default true. */
  readonly pausable?: boolean;
  /** The hypervisor pid the service reports as the task pid. */
  readonly pid?: number;
}

export class FakeSandbox implements ShimSandbox {
  readonly agent = new FakeAgent();
  readonly containers = new Map<string, FakeContainer>();
  readonly vm: { pid: number; pause?: () => Promise<void>; resume?: () => Promise<void> };
  readonly running: { readonly vm: FakeSandbox['vm']; readonly exited: Promise<VmExit> };
  readonly vmCalls: string[] = [];
  stopCalls = 0;
  #failure: KataError | undefined;
  readonly #exited = deferred<VmExit>();
  readonly #oomListeners = new Set<(containerId: string) => void>();
  #stopping: Promise<VmExit> | undefined;

  constructor(
    readonly id: string,
    opts: FakeSandboxOptions = {},
  ) {
    this.vm = { pid: opts.pid ?? 4242 };
    if (opts.pausable ?? true) {
      this.vm.pause = async () => {
        this.agent.check('pause');
        this.vmCalls.push('pause');
      };
      this.vm.resume = async () => {
        this.agent.check('resume');
        this.vmCalls.push('resume');
      };
    }
    this.running = { vm: this.vm, exited: this.#exited.promise };
  }

  get failure(): KataError | undefined {
    return this.#failure;
  }

  get stopped(): boolean {
    return this.#exited.settled;
  }

  container(id: string): FakeContainer {
    const c = this.containers.get(id);
    if (!c) throw new Error(`the fake sandbox has no container "${id}" (has: ${[...this.containers.keys()].join(', ') || 'none'})`);
    return c;
  }

  async createContainer(spec: ContainerSpec): Promise<FakeContainer> {
    if (this.#failure) throw this.#failure;
    this.agent.check('CreateContainer');
    if (this.containers.has(spec.id)) throw new KataError('KATA_ERR_SANDBOX', `container "${spec.id}" already exists in sandbox ${this.id}`);
    const c = new FakeContainer(this.agent, spec);
    this.containers.set(spec.id, c);
    return c;
  }

  /** The fake takes no rootfs as it is: the shim mounts (or, with no mounts, passes) the directory. */
  classifyRootfs(): undefined {
    return undefined;
  }

  onOOM(listener: (containerId: string) => void): () => void {
    this.#oomListeners.add(listener);
    return () => this.#oomListeners.delete(listener);
  }

  /** The guest's OOM killer kills `process` (the container's init unless given): OOM event, then exit 137. */
  oomKill(containerId: string, process: FakeProcess = this.container(containerId)): void {
    this.reportOom(containerId);
    process.exit(137);
  }

  /** The OOM event alone, as the agent's GetOOMEvent answers it (any id). */
  reportOom(containerId: string): void {
    this.agent.check('GetOOMEvent');
    for (const l of this.#oomListeners) l(containerId);
  }

  stop(): Promise<VmExit> {
    this.stopCalls++;
    this.#stopping ??= (async () => {
      // As Sandbox.stop: the containers not deleted yet (deleted ones were forgotten) go first.
      if (!this.#failure) for (const c of this.containers.values()) if (!c.deleted) await c.delete().catch(() => undefined);
      this.agent.close('the sandbox was stopped');
      const exit: VmExit = { expected: true, code: 0, signal: null, stderrTail: [] };
      if (!this.#exited.settled) this.#exited.resolve(exit);
      return this.#exited.promise;
    })();
    return this.#stopping;
  }

  /**
   * The VM dies under the sandbox. With `agentCloses` (the default, as core/sandbox.ts does) the
   * agent connection goes too and pending waits reject; without it they simply never answer.
   */
  crash(opts: { agentCloses?: boolean } = {}): void {
    this.#failure = new KataError('KATA_ERR_VM_EXITED', 'the VM ended unexpectedly (fake crash)');
    if (opts.agentCloses ?? true) this.agent.close('the VM died');
    if (!this.#exited.settled) this.#exited.resolve({ expected: false, code: null, signal: 'SIGKILL', stderrTail: ['fake crash'], error: this.#failure });
  }
}

/** TaskServiceOptions.createSandbox backed by fake sandboxes; records the requests. */
export class FakeSandboxFactory {
  readonly sandboxes: FakeSandbox[] = [];
  readonly requests: SandboxRequest[] = [];
  /** Makes the next createSandbox reject with this error. */
  failNext: Error | undefined;

  constructor(private readonly opts: FakeSandboxOptions = {}) {}

  readonly createSandbox = async (req: SandboxRequest): Promise<FakeSandbox> => {
    this.requests.push(req);
    if (this.failNext) {
      const e = this.failNext;
      this.failNext = undefined;
      throw e;
    }
    const s = new FakeSandbox(req.sandboxId, this.opts);
    this.sandboxes.push(s);
    return s;
  };

  /** The only sandbox created so far. */
  get sandbox(): FakeSandbox {
    if (this.sandboxes.length !== 1) throw new Error(`expected exactly one sandbox, the service created ${this.sandboxes.length}`);
    return this.sandboxes[0]!;
  }
}
