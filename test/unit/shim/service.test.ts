/**
 * The shim's task service (containerd.task.v2.Task) as containerd drives it, on a fake sandbox
 * (test/helpers/fake-sandbox.ts) whose processes the tests control.
 *
 * Everything between containerd and the sandbox is real: the calls go over a ttrpc connection on a
 * unix socket (so replies are encoded as containerd decodes them, errors arrive as gRPC codes);
 * stdio are FIFOs made with mkfifo whose other ends the test holds as containerd's client does
 * (read ends opened O_RDONLY|O_NONBLOCK before Create, the stdin writer O_RDWR); events go through
 * the real EventPublisher to a ttrpc server serving containerd's Events service, so the tests see
 * the envelopes containerd would (topic, type_url, encoded payload) in the order it would.
 *
 * The behaviour asserted is containerd's contract (docs: shared reference notes §2–4), not what the
 * service happens to do today.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, readlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { silentLogger } from '../../../core/logger.js';
import { EventPublisher, TOPICS } from '../../../shim/events.js';
import {
  Events,
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
  type Envelope,
  type Timestamp,
} from '../../../wire/containerd/proto.gen.js';
import { FAILED_START_STATUS, PARKED_TASK_METHODS, TaskService } from '../../../shim/service.js';
import { AgentError } from '../../../core/agent/errors.js';
import { GrpcCode, TtrpcClient, TtrpcError, TtrpcServer, type MessageCodec, type MessageInit, type ServiceClient } from '../../../wire/ttrpc/index.js';
import { FakeSandboxFactory, type FakeContainer, type FakeSandbox, type FakeSandboxOptions } from '../../helpers/fake-sandbox.js';
import { TempDir } from '../../helpers/tmp.js';
import { until, within } from '../../helpers/wait.js';
import { FifoReader, FifoWriter } from '../../helpers/fifo.js';

const SIGKILL = 9;
const SIGTERM = 15;
const VM_PID = 4242;
const EXEC_SPEC_TYPE = 'types.containerd.io/opencontainers/runtime-spec/1/Process';
const POD_ANNOTATIONS = (type: 'sandbox' | 'container', pod: string) => ({ 'io.kubernetes.cri.container-type': type, 'io.kubernetes.cri.sandbox-id': pod });

// ---------------------------------------------------------------------------------------------
// Small waiting helpers: poll with a deadline, never sleep longer than needed.

/** Lets pending I/O callbacks and timers of the current moment run (for asserting that something did NOT happen). */
async function settle(ms = 30): Promise<void> {
  await new Promise((r) => setImmediate(r));
  await new Promise((r) => setTimeout(r, ms));
}

/** Asserts a ttrpc call failed with this gRPC code (and, optionally, text in the status message). */
async function rejectsWith(p: Promise<unknown>, code: number, text?: RegExp): Promise<TtrpcError> {
  let err: unknown;
  try {
    await within(p, 'the call');
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof TtrpcError, `expected the call to fail with gRPC code ${code}, got ${err === undefined ? 'success' : String(err)}`);
  assert.equal(err.code, code, `gRPC code (message: ${err.statusMessage})`);
  if (text) assert.match(err.statusMessage, text);
  return err;
}

function nonZero(ts: Timestamp | undefined, what: string): Timestamp {
  assert.ok(ts, `${what}: exited_at is missing`);
  assert.ok(ts.seconds > 0n, `${what}: exited_at is zero`);
  return ts;
}

// ---------------------------------------------------------------------------------------------
// The client's side of the stdio FIFOs.

interface ClientIo {
  readonly paths: { stdin: string; stdout: string; stderr: string };
  readonly stdout: FifoReader | undefined;
  readonly stderr: FifoReader | undefined;
  readonly stdin: FifoWriter | undefined;
}

// ---------------------------------------------------------------------------------------------
// Events as containerd receives them.

const CODECS: Record<string, MessageCodec<unknown>> = {
  [TOPICS.create]: TaskCreate,
  [TOPICS.start]: TaskStart,
  [TOPICS.exit]: TaskExit,
  [TOPICS.delete]: TaskDelete,
  [TOPICS.execAdded]: TaskExecAdded,
  [TOPICS.execStarted]: TaskExecStarted,
  [TOPICS.paused]: TaskPaused,
  [TOPICS.resumed]: TaskResumed,
  [TOPICS.oom]: TaskOOM,
};

type Msg = Record<string, any>;
interface Ev {
  readonly topic: string;
  readonly msg: Msg;
}

/** "exit:c1:c1=3"-style one-liners, for readable order assertions. */
function brief(e: Ev): string {
  const name = e.topic.replace('/tasks/', '');
  switch (e.topic) {
    case TOPICS.exit:
      return `exit:${e.msg.containerId}:${e.msg.id}=${e.msg.exitStatus}`;
    case TOPICS.delete:
      return `delete:${e.msg.containerId}:${e.msg.id}=${e.msg.exitStatus}`;
    case TOPICS.execAdded:
    case TOPICS.execStarted:
      return `${name}:${e.msg.containerId}:${e.msg.execId}`;
    default:
      return `${name}:${e.msg.containerId}`;
  }
}

// ---------------------------------------------------------------------------------------------
// The harness: a task service on a fake sandbox, served and called over ttrpc.

interface BundleOptions {
  readonly annotations?: Record<string, string>;
  readonly terminal?: boolean;
  readonly args?: readonly string[];
}

class Harness {
  readonly tmp = new TempDir('kata-ts-shim-svc-');
  readonly received: Envelope[] = [];
  readonly factory: FakeSandboxFactory;
  readonly service: TaskService;
  readonly publisher: EventPublisher;
  shutdowns = 0;
  #eventsServer = new TtrpcServer();
  #taskServer = new TtrpcServer();
  #client: TtrpcClient | undefined;
  #task: ServiceClient<typeof Task> | undefined;
  readonly #fds: { close(): void }[] = [];

  constructor(sandboxOpts: FakeSandboxOptions = {}) {
    this.factory = new FakeSandboxFactory(sandboxOpts);
    this.publisher = new EventPublisher({ address: path.join(this.tmp.path, 'containerd.sock.ttrpc'), namespace: 'default', log: silentLogger() });
    this.service = new TaskService({
      createSandbox: this.factory.createSandbox,
      namespace: 'default',
      events: this.publisher,
      log: silentLogger(),
      runRoot: path.join(this.tmp.path, 'run'),
      onShutdown: () => this.shutdowns++,
    });
  }

  async start(): Promise<this> {
    this.#eventsServer.register(Events, {
      Forward: (req) => {
        this.received.push(req.envelope!);
        return {};
      },
    });
    await this.#eventsServer.listen(path.join(this.tmp.path, 'containerd.sock.ttrpc'));
    this.#taskServer.register(Task, this.service.impl(), { parked: PARKED_TASK_METHODS });
    const sock = path.join(this.tmp.path, 'shim.sock');
    await this.#taskServer.listen(sock);
    const conn = net.connect(sock);
    await new Promise<void>((resolve, reject) => {
      conn.once('connect', resolve);
      conn.once('error', reject);
    });
    this.#client = new TtrpcClient(conn);
    this.#task = this.#client.service(Task);
    return this;
  }

  get task(): ServiceClient<typeof Task> {
    return this.#task!;
  }

  get sandbox(): FakeSandbox {
    return this.factory.sandbox;
  }

  container(id: string): FakeContainer {
    return this.sandbox.container(id);
  }

  /** A bundle directory with config.json and a rootfs directory (root.path), as `ctr run --rootfs`. */
  bundle(id: string, opts: BundleOptions = {}): string {
    const dir = path.join(this.tmp.path, 'bundles', id);
    mkdirSync(path.join(dir, 'rootfs'), { recursive: true });
    const spec = {
      ociVersion: '1.0.2',
      process: { args: [...(opts.args ?? ['/bin/sh', '-c', 'exit 3'])], cwd: '/', env: ['PATH=/bin'], terminal: opts.terminal ?? false },
      root: { path: path.join(dir, 'rootfs') },
      hostname: id,
      ...(opts.annotations ? { annotations: opts.annotations } : {}),
    };
    writeFileSync(path.join(dir, 'config.json'), JSON.stringify(spec));
    return dir;
  }

  /** FIFOs made as containerd's client makes them, with the client's ends open. */
  io(name: string, which: { stdin?: boolean; stdout?: boolean; stderr?: boolean } = { stdout: true, stderr: true }): ClientIo {
    const dir = path.join(this.tmp.path, 'fifo', name);
    mkdirSync(dir, { recursive: true });
    const make = (stream: string) => {
      const p = path.join(dir, `${name}-${stream}`);
      execFileSync('mkfifo', [p]);
      return p;
    };
    const paths = { stdin: which.stdin ? make('stdin') : '', stdout: which.stdout ? make('stdout') : '', stderr: which.stderr ? make('stderr') : '' };
    const stdout = paths.stdout ? this.#track(new FifoReader(paths.stdout)) : undefined;
    const stderr = paths.stderr ? this.#track(new FifoReader(paths.stderr)) : undefined;
    const stdin = paths.stdin ? this.#track(new FifoWriter(paths.stdin)) : undefined;
    return { paths, stdout, stderr, stdin };
  }

  #track<T extends { close(): void }>(x: T): T {
    this.#fds.push(x);
    return x;
  }

  create(id: string, opts: BundleOptions & { io?: ClientIo; req?: MessageInit<CreateTaskRequest> } = {}) {
    const io = opts.io?.paths ?? { stdin: '', stdout: '', stderr: '' };
    return this.task.Create({ id, bundle: this.bundle(id, opts), rootfs: [], ...io, ...opts.req });
  }

  exec(id: string, execId: string, opts: { io?: ClientIo; terminal?: boolean; specTerminal?: boolean; args?: string[] } = {}) {
    const io = opts.io?.paths ?? { stdin: '', stdout: '', stderr: '' };
    const spec = { args: opts.args ?? ['/bin/sh', '-c', 'exit 5'], cwd: '/', env: ['PATH=/bin'], terminal: opts.specTerminal ?? false };
    return this.task.Exec({ id, execId, terminal: opts.terminal ?? false, ...io, spec: { type_url: EXEC_SPEC_TYPE, value: new TextEncoder().encode(JSON.stringify(spec)) } });
  }

  async status(id: string, execId = ''): Promise<number> {
    return (await within(this.task.State({ id, execId }), `State(${id}${execId ? `/${execId}` : ''})`)).status;
  }

  /** The events received so far, decoded. */
  events(): Ev[] {
    return this.received.map((e) => {
      const codec = CODECS[e.topic];
      assert.ok(codec, `unexpected topic ${e.topic}`);
      assert.equal(e.event?.type_url, codec.typeName, `type_url of ${e.topic}`);
      assert.ok(e.timestamp && e.timestamp.seconds > 0n, `${e.topic}: the envelope timestamp must not be zero`);
      return { topic: e.topic, msg: codec.decode(e.event!.value) as Msg };
    });
  }

  briefs(): string[] {
    return this.events().map(brief);
  }

  async waitForEvent(what: string, pred: (e: Ev) => boolean, timeoutMs = 3_000): Promise<Ev> {
    return until(`event ${what} (got: ${this.briefs().join(', ') || 'none'})`, () => this.events().find(pred), timeoutMs);
  }

  /** Waits until every event published so far has been delivered (the publisher then takes no more). */
  async flushEvents(): Promise<Ev[]> {
    await this.publisher.close(3_000);
    assert.equal(this.publisher.dropped, 0, 'events dropped');
    return this.events();
  }

  async cleanup(): Promise<void> {
    await within(this.service.close(), 'service.close()').catch(() => undefined);
    this.#client?.close();
    await this.#taskServer.close();
    await this.publisher.close(200);
    await this.#eventsServer.close();
    for (const f of this.#fds) f.close();
    this.tmp.cleanup();
  }
}

function count(evs: readonly Ev[], topic: string, id?: string): number {
  return evs.filter((e) => e.topic === topic && (id === undefined || e.msg.id === id || e.msg.execId === id)).length;
}

/** Where the first event of this topic is (-1: none). */
function indexOf(evs: readonly Ev[], topic: string): number {
  return evs.findIndex((e) => e.topic === topic);
}

// ---------------------------------------------------------------------------------------------

describe('shim: task service (containerd.task.v2.Task) on a fake sandbox', function () {
  this.timeout(15_000);
  let h: Harness;
  let current: Harness | undefined;
  const harness = async (opts?: FakeSandboxOptions) => {
    current = new Harness(opts);
    h = await current.start();
  };
  afterEach(async () => {
    await current?.cleanup();
    current = undefined;
  });

  describe('the life of a container', () => {
    it('create → start → exit 3: Wait, State, Delete report 3; events create, start, exit, delete; output reaches the FIFOs, then EOF', async () => {
      await harness();
      const io = h.io('c1');
      const created = await h.create('c1', { io });
      assert.equal(created.pid, VM_PID, 'Create returns the VM pid');
      assert.equal(h.factory.requests.length, 1);
      assert.equal(h.factory.requests[0]!.sandboxId, 'c1');
      const fake = h.container('c1');
      assert.deepEqual(fake.spec.process.args, ['/bin/sh', '-c', 'exit 3']);
      assert.equal(fake.spec.rootfs.kind, 'dir');

      const s0 = await h.task.State({ id: 'c1' });
      assert.equal(s0.status, Status.CREATED);
      assert.equal(s0.stdout, io.paths.stdout);
      assert.equal(s0.bundle, path.join(h.tmp.path, 'bundles', 'c1'));

      const waiting = h.task.Wait({ id: 'c1' });
      assert.equal((await h.task.Start({ id: 'c1' })).pid, VM_PID);
      assert.equal(fake.startCalls, 1);
      assert.equal(await h.status('c1'), Status.RUNNING);

      fake.out('hello from the guest\n');
      fake.err('a warning\n');
      await io.stdout!.waitForText('hello from the guest\n');
      await io.stderr!.waitForText('a warning\n');
      assert.equal(io.stdout!.eof, false, 'stdout must stay open while the process runs');

      fake.exit(3);
      const w = await within(waiting, 'Wait');
      assert.equal(w.exitStatus, 3);
      nonZero(w.exitedAt, 'Wait');
      await io.stdout!.waitForEof();
      await io.stderr!.waitForEof();
      assert.equal(io.stdout!.text, 'hello from the guest\n');
      assert.equal(io.stderr!.text, 'a warning\n');

      const s1 = await h.task.State({ id: 'c1' });
      assert.equal(s1.status, Status.STOPPED);
      assert.equal(s1.exitStatus, 3);
      assert.deepEqual(s1.exitedAt, w.exitedAt);

      const d = await within(h.task.Delete({ id: 'c1' }), 'Delete');
      assert.equal(d.exitStatus, 3);
      assert.deepEqual(d.exitedAt, w.exitedAt, 'Delete reports the exit time Wait reported');
      assert.equal(fake.deleteCalls, 1);
      await rejectsWith(h.task.State({ id: 'c1' }), GrpcCode.NOT_FOUND);

      const evs = await h.flushEvents();
      assert.deepEqual(evs.map((e) => e.topic), [TOPICS.create, TOPICS.start, TOPICS.exit, TOPICS.delete]);
      const [create, start, exit, del] = evs.map((e) => e.msg) as [Msg, Msg, Msg, Msg];
      assert.equal(create.containerId, 'c1');
      assert.equal(create.bundle, path.join(h.tmp.path, 'bundles', 'c1'));
      assert.deepEqual([create.io?.stdout, create.io?.stderr, create.io?.stdin], [io.paths.stdout, io.paths.stderr, '']);
      assert.equal(create.pid, VM_PID);
      assert.deepEqual([start.containerId, start.pid], ['c1', VM_PID]);
      assert.deepEqual([exit.containerId, exit.id, exit.exitStatus, exit.pid], ['c1', 'c1', 3, VM_PID]);
      assert.deepEqual(exit.exitedAt, w.exitedAt);
      assert.deepEqual([del.containerId, del.id, del.exitStatus], ['c1', 'c1', 3]);
      nonZero(del.exitedAt, 'TaskDelete');
    });

    it('an OOM kill in the guest: TaskOOM names the container and goes out before its TaskExit (137); ids of other shims are not published', async () => {
      await harness();
      await h.create('c1', { io: h.io('c1') });
      const waiting = h.task.Wait({ id: 'c1' });
      await h.task.Start({ id: 'c1' });
      h.sandbox.reportOom('not-this-shims');
      h.sandbox.oomKill('c1');
      assert.equal((await within(waiting, 'Wait')).exitStatus, 137);
      await within(h.task.Delete({ id: 'c1' }), 'Delete');
      const evs = await h.flushEvents();
      assert.deepEqual(evs.map(brief), ['create:c1', 'start:c1', 'oom:c1', 'exit:c1:c1=137', 'delete:c1:c1=137']);
      assert.equal(evs[2]!.msg.containerId, 'c1');
    });

    it('loses no output written right before the exit (large, on both streams, ended and exited at once)', async () => {
      await harness();
      const io = h.io('c1');
      await h.create('c1', { io });
      await h.task.Start({ id: 'c1' });
      const fake = h.container('c1');
      // More than a pipe holds (64 KiB), so the shim must wait for the reader, not just flush a buffer.
      const big = Buffer.alloc(300 * 1024, 'o');
      const tail = 'the last line\n';
      fake.out(big);
      fake.out(tail);
      fake.err('last error\n');
      fake.exit(0);
      // The reader drains as containerd's copy loop would, until EOF.
      await until('stdout EOF', () => io.stdout!.poll().eof, 5_000);
      await io.stderr!.waitForEof();
      assert.equal(io.stdout!.bytes.length, big.length + tail.length, 'every stdout byte');
      assert.ok(io.stdout!.text.endsWith(tail));
      assert.equal(io.stderr!.text, 'last error\n');
      const w = await within(h.task.Wait({ id: 'c1' }), 'Wait');
      assert.equal(w.exitStatus, 0);
    });

    it('Kill: NOT_FOUND for an exited process and an unknown id; Delete of a running task: FAILED_PRECONDITION (KATA_ERR_TASK_STATE)', async () => {
      await harness();
      await h.create('c1');
      await h.task.Start({ id: 'c1' });
      await rejectsWith(h.task.Kill({ id: 'nope', signal: SIGKILL }), GrpcCode.NOT_FOUND);
      await rejectsWith(h.task.Kill({ id: 'c1', execId: 'nope', signal: SIGKILL }), GrpcCode.NOT_FOUND);
      await rejectsWith(h.task.Delete({ id: 'c1' }), GrpcCode.FAILED_PRECONDITION, /KATA_ERR_TASK_STATE/);
      assert.equal(await h.status('c1'), Status.RUNNING, 'a refused Delete changes nothing');
      assert.equal(h.container('c1').deleteCalls, 0);

      await h.task.Kill({ id: 'c1', signal: SIGTERM });
      assert.deepEqual(h.container('c1').signals, [SIGTERM]);
      const w = await within(h.task.Wait({ id: 'c1' }), 'Wait');
      assert.equal(w.exitStatus, 128 + SIGTERM);
      await rejectsWith(h.task.Kill({ id: 'c1', signal: SIGKILL }), GrpcCode.NOT_FOUND);
      assert.deepEqual(h.container('c1').signals, [SIGTERM], 'no signal reaches a process that has exited');
      await within(h.task.Delete({ id: 'c1' }), 'Delete');
      await rejectsWith(h.task.Kill({ id: 'c1', signal: SIGKILL }), GrpcCode.NOT_FOUND);
    });

    it('Kill while Start is pending: TaskStart (if any) before the only TaskExit, STOPPED at the end, Wait answers once', async () => {
      await harness();
      await h.create('c1');
      const fake = h.container('c1');
      const gate = fake.holdStart();
      const waits = [h.task.Wait({ id: 'c1' }), h.task.Wait({ id: 'c1' })] as const;
      const starting = h.task.Start({ id: 'c1' });
      await until('start() in the sandbox', () => fake.startCalls === 1);
      const killing = h.task.Kill({ id: 'c1', signal: SIGKILL });
      // Give the Kill time to reach the service before the guest answers StartContainer.
      await settle();
      gate.resolve();
      const [started, killed] = await within(Promise.allSettled([starting, killing]), 'Start and Kill');
      assert.equal(killed.status, 'fulfilled', `Kill: ${killed.status === 'rejected' ? String(killed.reason) : ''}`);

      const [w1, w2] = await within(Promise.all(waits), 'both Waits');
      assert.equal(w1.exitStatus, 128 + SIGKILL);
      assert.deepEqual(w2, w1, 'every Wait reports the same exit');
      await until('State STOPPED', async () => (await h.status('c1')) === Status.STOPPED);
      // The process may end late (the guest answering SIGKILL); the state must not change after.
      if (fake.status === undefined) fake.exit(137);
      await settle();
      const s = await h.task.State({ id: 'c1' });
      assert.equal(s.status, Status.STOPPED, 'the state stays STOPPED');
      assert.equal(s.exitStatus, w1.exitStatus);
      assert.deepEqual(s.exitedAt, w1.exitedAt);

      await within(h.task.Delete({ id: 'c1' }), 'Delete');
      const evs = await h.flushEvents();
      const briefs = evs.map(brief);
      assert.equal(count(evs, TOPICS.exit, 'c1'), 1, `exactly one TaskExit: ${briefs.join(', ')}`);
      const exit = evs.find((e) => e.topic === TOPICS.exit)!;
      assert.equal(exit.msg.exitStatus, w1.exitStatus, 'TaskExit and Wait agree');
      if (started.status === 'fulfilled') {
        assert.equal(count(evs, TOPICS.start), 1, briefs.join(', '));
        assert.ok(indexOf(evs, TOPICS.start) < indexOf(evs, TOPICS.exit), `TaskStart must come before TaskExit: ${briefs.join(', ')}`);
      } else {
        assert.equal(count(evs, TOPICS.start), 0, `a failed Start publishes no TaskStart: ${briefs.join(', ')}`);
      }
      assert.ok(indexOf(evs, TOPICS.exit) < indexOf(evs, TOPICS.delete), briefs.join(', '));
    });

    it('Delete of a created, never started task: a pending Wait answers, TaskExit goes out before TaskDelete', async () => {
      await harness();
      const io = h.io('c1');
      await h.create('c1', { io });
      const waiting = h.task.Wait({ id: 'c1' });
      const d = await within(h.task.Delete({ id: 'c1' }), 'Delete');
      const w = await within(waiting, 'the Wait pending across Delete');
      assert.ok(w.exitStatus > 0, `a task that never ran does not report success (got ${w.exitStatus})`);
      nonZero(w.exitedAt, 'Wait');
      assert.equal(d.exitStatus, w.exitStatus, 'Delete and Wait agree');
      assert.equal(h.container('c1').deleteCalls, 1);
      await io.stdout!.waitForEof();
      const evs = await h.flushEvents();
      const briefs = evs.map(brief);
      assert.equal(count(evs, TOPICS.exit, 'c1'), 1, `one TaskExit: ${briefs.join(', ')}`);
      assert.ok(indexOf(evs, TOPICS.exit) < indexOf(evs, TOPICS.delete), `TaskExit before TaskDelete: ${briefs.join(', ')}`);
      assert.equal(count(evs, TOPICS.start), 0);
    });
  });

  describe('pods', () => {
    it("the sandbox gets the pod sandbox container's hostname (the guest's, shared by the pod), not a later container's", async () => {
      await harness();
      await h.create('pod1', { annotations: POD_ANNOTATIONS('sandbox', 'pod1'), args: ['/pause'] });
      await h.create('app1', { annotations: POD_ANNOTATIONS('container', 'pod1'), args: ['app'] });
      assert.deepEqual(h.factory.requests.map((r) => r.hostname), ['pod1']);
    });

    it('deleting the pod sandbox container while another runs: the other ends (or Delete is refused), nothing hangs, Shutdown lets the shim exit', async () => {
      await harness();
      await h.create('pod1', { annotations: POD_ANNOTATIONS('sandbox', 'pod1'), args: ['/pause'] });
      await h.task.Start({ id: 'pod1' });
      const appIo = h.io('app1');
      await h.create('app1', { io: appIo, annotations: POD_ANNOTATIONS('container', 'pod1'), args: ['app'] });
      assert.equal(h.factory.sandboxes.length, 1, 'the pod container joins the sandbox');
      await h.task.Start({ id: 'app1' });
      const appWait = h.task.Wait({ id: 'app1' });

      await h.task.Kill({ id: 'pod1', signal: SIGKILL });
      await within(h.task.Wait({ id: 'pod1' }), 'Wait(pod1)');
      let refused = false;
      try {
        await within(h.task.Delete({ id: 'pod1' }), 'Delete(pod1)');
      } catch (e) {
        if (!(e instanceof TtrpcError && e.code === GrpcCode.FAILED_PRECONDITION)) throw e;
        refused = true;
      }
      if (refused) {
        // The pod's sandbox stays while a container of it runs.
        assert.equal(await h.status('app1'), Status.RUNNING);
        assert.equal(h.sandbox.stopCalls, 0);
        await h.task.Kill({ id: 'app1', signal: SIGKILL });
      }
      const w = await within(appWait, 'Wait(app1)');
      assert.ok(w.exitStatus > 0, `app1 ended with ${w.exitStatus}`);
      assert.equal(await h.status('app1'), Status.STOPPED);
      await appIo.stdout!.waitForEof();
      await h.waitForEvent('TaskExit for app1', (e) => e.topic === TOPICS.exit && e.msg.id === 'app1');

      await within(h.task.Delete({ id: 'app1' }), 'Delete(app1)');
      if (refused) await within(h.task.Delete({ id: 'pod1' }), 'Delete(pod1) once app1 is gone');
      await within(h.task.Shutdown({ id: 'pod1' }), 'Shutdown');
      await until('onShutdown', () => h.shutdowns === 1);
      assert.ok(h.sandbox.stopped, 'the sandbox is stopped');
      const evs = await h.flushEvents();
      assert.equal(count(evs, TOPICS.exit, 'app1'), 1, evs.map(brief).join(', '));
      assert.equal(count(evs, TOPICS.exit, 'pod1'), 1, evs.map(brief).join(', '));
    });
  });

  describe("containerd's one connection", () => {
    it('answers Exec, Kill and Delete with 200 Waits pending on it, one per running process', async () => {
      await harness();
      await h.create('c1', { args: ['/pause'] });
      await h.task.Start({ id: 'c1' });
      const execIds = Array.from({ length: 199 }, (_, i) => `e${i}`);
      for (const e of execIds) {
        await h.exec('c1', e);
        await h.task.Start({ id: 'c1', execId: e });
      }
      const waits = [h.task.Wait({ id: 'c1' }), ...execIds.map((e) => h.task.Wait({ id: 'c1', execId: e }))];
      await settle();

      await within(h.exec('c1', 'late'), 'Exec behind 200 Waits');
      await within(h.task.Kill({ id: 'c1', execId: 'e0', signal: SIGKILL }), 'Kill behind 200 Waits');
      assert.equal((await within(waits[1]!, 'Wait(e0)')).exitStatus, 128 + SIGKILL);
      await within(h.task.Delete({ id: 'c1', execId: 'e0' }), 'Delete behind 199 Waits');
      await within(h.task.Kill({ id: 'c1', signal: SIGKILL }), 'Kill(c1)');
      for (const e of execIds.slice(1)) h.container('c1').execs.get(e)!.exit(3);
      const all = await within(Promise.all(waits), 'the 200 Waits');
      assert.deepEqual(
        all.map((w) => w.exitStatus),
        [128 + SIGKILL, 128 + SIGKILL, ...execIds.slice(1).map(() => 3)],
      );
    });
  });

  describe('stdin', () => {
    it('CloseIO before Start: bytes already in the stdin FIFO reach the process, then its stdin ends', async () => {
      await harness();
      const io = h.io('c1', { stdin: true, stdout: true });
      await h.create('c1', { io });
      io.stdin!.write('typed before start\n');
      io.stdin!.close(); // ctr closes its end at EOF, then sends CloseIO
      await within(h.task.CloseIO({ id: 'c1', stdin: true }), 'CloseIO');
      await h.task.Start({ id: 'c1' });
      const fake = h.container('c1');
      await within(fake.stdinEnd.promise, "the process's stdin ending");
      assert.equal(fake.stdinText, 'typed before start\n');
    });

    it('CloseIO after Start: bytes still in the FIFO when it comes reach the process, then its stdin ends', async () => {
      await harness();
      const io = h.io('c1', { stdin: true, stdout: true });
      await h.create('c1', { io });
      await h.task.Start({ id: 'c1' });
      const fake = h.container('c1');
      // Each WriteStdin takes a while, as an agent round trip does: the shim stops reading the
      // FIFO until it is done, so what the client writes meanwhile stays in the FIFO.
      fake.stdinDelayMs = 50;
      const first = 'a'.repeat(40 * 1024);
      const second = 'b'.repeat(20 * 1024);
      io.stdin!.write(first);
      await until('the first write reaching the process', () => fake.stdinChunks.length > 0);
      io.stdin!.write(second);
      io.stdin!.close(); // ctr closes its end at EOF, then sends CloseIO
      await within(h.task.CloseIO({ id: 'c1', stdin: true }), 'CloseIO');
      await within(fake.stdinEnd.promise, "the process's stdin ending");
      assert.equal(fake.stdinText.length, first.length + second.length, 'every byte written before CloseIO');
      assert.equal(fake.stdinText, first + second);
    });

    it('the client closing its stdin writer is no EOF: a later writer (ctr task attach) reaches the process, and CloseIO ends its stdin', async () => {
      await harness();
      const io = h.io('c1', { stdin: true, stdout: true });
      await h.create('c1', { io });
      await h.task.Start({ id: 'c1' });
      const fake = h.container('c1');
      io.stdin!.write('abc');
      await until('stdin bytes at the process', () => fake.stdinText === 'abc');
      io.stdin!.close(); // `ctr run -d -t` exits: its writer goes, without CloseIO
      await settle(100);
      assert.equal(fake.stdinEnded, false, "the first client leaving does not end the process's stdin");
      const again = new FifoWriter(io.paths.stdin); // `ctr task attach` opens the same FIFO
      try {
        again.write('def');
        await until('the second client\'s bytes at the process', () => fake.stdinText === 'abcdef');
        again.close();
        await settle(100);
        assert.equal(fake.stdinEnded, false, 'nor does the second one leaving');
        await within(h.task.CloseIO({ id: 'c1', stdin: true }), 'CloseIO');
        await within(fake.stdinEnd.promise, "the process's stdin ending");
        assert.equal(fake.stdinText, 'abcdef');
      } finally {
        again.close();
      }
    });

    it('an exec\'s stdin outlives its client too and ends on its CloseIO', async () => {
      await harness();
      await h.create('c1');
      await h.task.Start({ id: 'c1' });
      const io = h.io('e1', { stdin: true, stdout: true });
      await h.exec('c1', 'e1', { io });
      await h.task.Start({ id: 'c1', execId: 'e1' });
      const fake = h.container('c1').execs.get('e1')!;
      io.stdin!.write('x');
      io.stdin!.close();
      await until('stdin bytes at the exec', () => fake.stdinText === 'x');
      await settle(100);
      assert.equal(fake.stdinEnded, false);
      await within(h.task.CloseIO({ id: 'c1', execId: 'e1', stdin: true }), 'CloseIO');
      await within(fake.stdinEnd.promise, "the exec's stdin ending");
    });

    it('holds one write end of the stdin FIFO until CloseIO, and none once the process has exited or was deleted (no fd leak)', async () => {
      await harness();
      // The service runs in this process: its fds are ours. The client's writer is the test's own.
      const held = (fifo: string) => readdirSync('/proc/self/fd').filter((fd) => {
        try {
          return readlinkSync(`/proc/self/fd/${fd}`) === fifo;
        } catch {
          return false; // closed meanwhile (readdir's own fd)
        }
      }).length;
      const io = h.io('c1', { stdin: true, stdout: true });
      const client = 1;
      await h.create('c1', { io });
      assert.equal(held(io.paths.stdin), client + 2, 'the client\'s writer, the shim\'s reader and its own writer');
      await h.task.Start({ id: 'c1' });

      const eio = h.io('e1', { stdin: true, stdout: true });
      await h.exec('c1', 'e1', { io: eio });
      await h.task.Start({ id: 'c1', execId: 'e1' });
      assert.equal(held(eio.paths.stdin), client + 2);
      h.container('c1').execs.get('e1')!.exit(1); // exits without any CloseIO
      await within(h.task.Wait({ id: 'c1', execId: 'e1' }), 'Wait');
      await until('the shim\'s reader and writer of the exec closing', () => held(eio.paths.stdin) === client);

      const never = h.io('e2', { stdin: true, stdout: true });
      await h.exec('c1', 'e2', { io: never });
      assert.equal(held(never.paths.stdin), client + 2);
      await within(h.task.Delete({ id: 'c1', execId: 'e2' }), 'Delete of an exec never started');
      await until('the shim\'s reader and writer of the deleted exec closing', () => held(never.paths.stdin) === client);

      await within(h.task.CloseIO({ id: 'c1', stdin: true }), 'CloseIO');
      // The close itself runs on libuv's thread pool and may land just after CloseIO's answer (a
      // full unit run on a loaded machine saw it): wait for it, then the reader must still be there.
      await until('CloseIO closing the shim\'s writer', () => held(io.paths.stdin) <= client + 1);
      assert.equal(held(io.paths.stdin), client + 1, 'CloseIO closes the shim\'s writer; the reader stays for what the client still writes');
      h.container('c1').exit(0);
      await within(h.task.Wait({ id: 'c1' }), 'Wait');
      await until('the reader closing too', () => held(io.paths.stdin) === client);
    });

    it('no stdin path: the process stdin is closed at Start', async () => {
      await harness();
      await h.create('c1');
      await h.task.Start({ id: 'c1' });
      await within(h.container('c1').stdinEnd.promise, "the process's stdin ending");
    });
  });

  describe('the VM dying', () => {
    for (const agentCloses of [false, true]) {
      it(`every running process reports exit 255 (${agentCloses ? 'agent calls then fail' : 'agent calls never answer'}), nothing hangs`, async () => {
        await harness();
        const io = h.io('c1');
        await h.create('c1', { io });
        await h.task.Start({ id: 'c1' });
        await h.exec('c1', 'e1');
        await h.task.Start({ id: 'c1', execId: 'e1' });
        const waits = [h.task.Wait({ id: 'c1' }), h.task.Wait({ id: 'c1', execId: 'e1' })] as const;
        h.sandbox.crash({ agentCloses });
        const [wc, we] = await within(Promise.all(waits), 'Waits after the VM died');
        assert.equal(wc.exitStatus, 255);
        assert.equal(we.exitStatus, 255);
        const s = await h.task.State({ id: 'c1' });
        assert.deepEqual([s.status, s.exitStatus], [Status.STOPPED, 255]);
        await io.stdout!.waitForEof();
        await h.waitForEvent('TaskExit c1', (e) => e.topic === TOPICS.exit && e.msg.id === 'c1' && e.msg.exitStatus === 255);
        await h.waitForEvent('TaskExit e1', (e) => e.topic === TOPICS.exit && e.msg.id === 'e1' && e.msg.exitStatus === 255);
        await within(h.task.Delete({ id: 'c1', execId: 'e1' }), 'Delete(e1)');
        const d = await within(h.task.Delete({ id: 'c1' }), 'Delete(c1)');
        assert.equal(d.exitStatus, 255);
        await within(h.task.Shutdown({ id: 'c1' }), 'Shutdown');
        await until('onShutdown', () => h.shutdowns === 1);
        const evs = await h.flushEvents();
        assert.equal(count(evs, TOPICS.exit), 2, evs.map(brief).join(', '));
      });
    }
  });

  describe('exec', () => {
    it('Exec → TaskExecAdded, Start → TaskExecStarted, its exit via Wait, Delete', async () => {
      await harness();
      await h.create('c1');
      await h.task.Start({ id: 'c1' });
      const io = h.io('e1');
      await h.exec('c1', 'e1', { io, args: ['ls', '-l'] });
      assert.equal(await h.status('c1', 'e1'), Status.CREATED);
      await h.waitForEvent('TaskExecAdded', (e) => e.topic === TOPICS.execAdded);
      await rejectsWith(h.exec('c1', 'e1'), GrpcCode.ALREADY_EXISTS);

      const started = await h.task.Start({ id: 'c1', execId: 'e1' });
      assert.equal(started.pid, VM_PID);
      const fake = h.container('c1').execs.get('e1');
      assert.ok(fake, 'the exec ran in the sandbox');
      assert.deepEqual(h.container('c1').execSpecs[0]!.args, ['ls', '-l']);
      assert.equal(await h.status('c1', 'e1'), Status.RUNNING);
      fake.out('exec output\n');
      await io.stdout!.waitForText('exec output\n');
      fake.exit(5);
      const w = await within(h.task.Wait({ id: 'c1', execId: 'e1' }), 'Wait(e1)');
      assert.equal(w.exitStatus, 5);
      await io.stdout!.waitForEof();
      const s = await h.task.State({ id: 'c1', execId: 'e1' });
      assert.deepEqual([s.status, s.exitStatus, s.execId], [Status.STOPPED, 5, 'e1']);
      assert.equal(await h.status('c1'), Status.RUNNING, 'the container runs on');

      const d = await within(h.task.Delete({ id: 'c1', execId: 'e1' }), 'Delete(e1)');
      assert.equal(d.exitStatus, 5);
      await rejectsWith(h.task.State({ id: 'c1', execId: 'e1' }), GrpcCode.NOT_FOUND);
      assert.equal(await h.status('c1'), Status.RUNNING);
      assert.equal(h.sandbox.stopCalls, 0);

      const evs = await h.flushEvents();
      const briefs = evs.map(brief);
      const order = ['create:c1', 'start:c1', 'exec-added:c1:e1', 'exec-started:c1:e1', 'exit:c1:e1=5'];
      assert.deepEqual(briefs.slice(0, 5), order, briefs.join(', '));
      const started_ = evs.find((e) => e.topic === TOPICS.execStarted)!;
      assert.equal(started_.msg.pid, VM_PID);
      assert.equal(count(evs, TOPICS.exit, 'c1'), 0, 'the container itself has not exited');
    });

    it('an exec whose Start fails in the agent: the agent\'s code and message, its FIFOs at EOF, a pending Wait answers, the exec id is free again', async () => {
      await harness();
      await h.create('c1');
      await h.task.Start({ id: 'c1' });
      const io = h.io('bad');
      await h.exec('c1', 'bad', { io, args: ['/nonexistent-binary'] });
      const waiting = h.task.Wait({ id: 'c1', execId: 'bad' });
      const agentSaid = 'exec: "/nonexistent-binary": executable file not found in the container';
      h.container('c1').execFailure = new AgentError('call', `agent ExecProcess failed: the agent answered INVALID_ARGUMENT: ${agentSaid}`, { method: 'ExecProcess', grpcCode: GrpcCode.INVALID_ARGUMENT });
      const err = await rejectsWith(h.task.Start({ id: 'c1', execId: 'bad' }), GrpcCode.INVALID_ARGUMENT);
      assert.ok(err.statusMessage.includes(agentSaid), err.statusMessage);
      // containerd's client waits for this EOF before it reports the error.
      await io.stdout!.waitForEof();
      await io.stderr!.waitForEof();
      const w = await within(waiting, 'Wait(bad)');
      assert.equal(w.exitStatus, FAILED_START_STATUS);
      await rejectsWith(h.task.State({ id: 'c1', execId: 'bad' }), GrpcCode.NOT_FOUND);
      assert.equal(await h.status('c1'), Status.RUNNING, 'the container runs on');
      await h.exec('c1', 'bad');
      await h.task.Start({ id: 'c1', execId: 'bad' });
      const evs = await h.flushEvents();
      assert.deepEqual(evs.map(brief).filter((b) => b.includes(':bad')), ['exec-added:c1:bad', 'exec-added:c1:bad', 'exec-started:c1:bad'], 'no start or exit event for the exec that never ran');
    });

    it('a container whose Start fails in the agent: the agent\'s code, its FIFOs at EOF, CREATED until Delete', async () => {
      await harness();
      const io = h.io('c1');
      await h.create('c1', { io });
      h.container('c1').startFailure = new AgentError('call', 'agent StartContainer failed: the agent answered FAILED_PRECONDITION: container c1 is stopped', {
        method: 'StartContainer',
        grpcCode: GrpcCode.FAILED_PRECONDITION,
      });
      await rejectsWith(h.task.Start({ id: 'c1' }), GrpcCode.FAILED_PRECONDITION, /container c1 is stopped/);
      await io.stdout!.waitForEof();
      assert.equal(await h.status('c1'), Status.CREATED);
      await within(h.task.Delete({ id: 'c1' }), 'Delete');
      await rejectsWith(h.task.State({ id: 'c1' }), GrpcCode.NOT_FOUND);
    });

    it('Exec into a stopped container: FAILED_PRECONDITION; into an unknown one: NOT_FOUND', async () => {
      await harness();
      await h.create('c1');
      await h.task.Start({ id: 'c1' });
      await rejectsWith(h.task.State({ id: 'c1', execId: 't1' }), GrpcCode.NOT_FOUND);
      await rejectsWith(h.exec('nope', 'e1'), GrpcCode.NOT_FOUND);
      h.container('c1').exit(0);
      await within(h.task.Wait({ id: 'c1' }), 'Wait');
      await rejectsWith(h.exec('c1', 'e1'), GrpcCode.FAILED_PRECONDITION, /KATA_ERR_TASK_STATE/);
      assert.equal(h.container('c1').execs.size, 0);
      const evs = await h.flushEvents();
      assert.equal(count(evs, TOPICS.execAdded), 0, evs.map(brief).join(', '));
    });
  });

  describe('terminals', () => {
    it('Create with a terminal (spec or request) runs the init on one, of the spec\'s consoleSize or the default; State says terminal', async () => {
      await harness();
      const io = h.io('t1', { stdout: true });
      await h.create('t1', { terminal: true, io });
      assert.deepEqual(h.container('t1').spec.process.terminal, { rows: 0, cols: 0 });
      assert.equal((await h.task.State({ id: 't1' })).terminal, true);
      const pod = { 'io.kubernetes.cri.container-type': 'container', 'io.kubernetes.cri.sandbox-id': 't1' };
      await h.create('t2', { req: { terminal: true }, annotations: pod });
      assert.deepEqual(h.container('t2').spec.process.terminal, { rows: 0, cols: 0 });
      await h.create('t3', { annotations: pod });
      assert.equal(h.container('t3').spec.process.terminal, undefined);
      assert.equal((await h.task.State({ id: 't3' })).terminal, false);
      // The terminal's output is stdout; there is no stderr FIFO.
      await h.task.Start({ id: 't1' });
      h.container('t1').out('hi\r\n');
      h.container('t1').exit(4);
      assert.equal((await within(h.task.Wait({ id: 't1' }), 'Wait')).exitStatus, 4);
      await io.stdout!.waitForEof();
      assert.equal(io.stdout!.text, 'hi\r\n');
    });

    it('ResizePty before Start is kept for the start, later ones go to the process at once; none after the exit', async () => {
      await harness();
      await h.create('c1', { terminal: true });
      await h.task.ResizePty({ id: 'c1', execId: '', width: 100, height: 30 });
      assert.deepEqual(h.container('c1').resizes, []);
      await h.task.Start({ id: 'c1' });
      await until('the kept size applied', () => h.container('c1').resizes.length === 1);
      await h.task.ResizePty({ id: 'c1', execId: '', width: 132, height: 50 });
      assert.deepEqual(h.container('c1').resizes, [{ rows: 30, cols: 100 }, { rows: 50, cols: 132 }]);
      h.container('c1').exit(0);
      await within(h.task.Wait({ id: 'c1' }), 'Wait');
      await h.task.ResizePty({ id: 'c1', execId: '', width: 10, height: 10 });
      assert.equal(h.container('c1').resizes.length, 2);
    });

    it('Exec with a terminal runs on one and resizes; ResizePty on a process without one: FAILED_PRECONDITION (KATA_ERR_TASK_STATE)', async () => {
      await harness();
      await h.create('c1');
      await h.task.Start({ id: 'c1' });
      await rejectsWith(h.task.ResizePty({ id: 'c1', execId: '', width: 80, height: 24 }), GrpcCode.FAILED_PRECONDITION, /KATA_ERR_TASK_STATE/);
      await h.exec('c1', 't1', { terminal: true });
      await h.exec('c1', 't2', { specTerminal: true });
      await h.exec('c1', 'p1');
      for (const id of ['t1', 't2', 'p1']) await h.task.Start({ id: 'c1', execId: id });
      const specs = h.container('c1').execSpecs;
      assert.deepEqual(specs.map((s) => s.terminal), [{ rows: 0, cols: 0 }, { rows: 0, cols: 0 }, undefined]);
      await h.task.ResizePty({ id: 'c1', execId: 't1', width: 90, height: 40 });
      assert.deepEqual(h.container('c1').execs.get('t1')!.resizes, [{ rows: 40, cols: 90 }]);
      await rejectsWith(h.task.ResizePty({ id: 'c1', execId: 'p1', width: 90, height: 40 }), GrpcCode.FAILED_PRECONDITION, /KATA_ERR_TASK_STATE/);
      await rejectsWith(h.task.ResizePty({ id: 'c1', execId: 'nope', width: 90, height: 40 }), GrpcCode.NOT_FOUND);
    });
  });

  describe('pause and resume', () => {
    it('Pause → PAUSED and TaskPaused; Resume → RUNNING and TaskResumed', async () => {
      await harness();
      await h.create('c1');
      await h.task.Start({ id: 'c1' });
      await h.task.Pause({ id: 'c1' });
      assert.equal(await h.status('c1'), Status.PAUSED);
      assert.deepEqual(h.sandbox.vmCalls, ['pause']);
      await h.task.Resume({ id: 'c1' });
      assert.equal(await h.status('c1'), Status.RUNNING);
      assert.deepEqual(h.sandbox.vmCalls, ['pause', 'resume']);
      await rejectsWith(h.task.Resume({ id: 'c1' }), GrpcCode.FAILED_PRECONDITION);
      const evs = await h.flushEvents();
      assert.deepEqual(evs.map(brief), ['create:c1', 'start:c1', 'paused:c1', 'resumed:c1']);
    });

    it('a driver that cannot pause: Pause and Resume are UNIMPLEMENTED and the task keeps running', async () => {
      await harness({ pausable: false });
      await h.create('c1');
      await h.task.Start({ id: 'c1' });
      await rejectsWith(h.task.Pause({ id: 'c1' }), GrpcCode.UNIMPLEMENTED, /KATA_ERR_NOT_IMPLEMENTED/);
      await rejectsWith(h.task.Resume({ id: 'c1' }), GrpcCode.UNIMPLEMENTED, /KATA_ERR_NOT_IMPLEMENTED/);
      assert.equal(await h.status('c1'), Status.RUNNING);
    });
  });

  describe('Create refusals', () => {
    it('a bundle that is empty or relative: INVALID_ARGUMENT (KATA_ERR_OCI_SPEC) before any sandbox starts', async () => {
      await harness();
      await rejectsWith(h.create('b1', { req: { bundle: '' } }), GrpcCode.INVALID_ARGUMENT, /KATA_ERR_OCI_SPEC/);
      // A valid bundle, named relative to the shim's working directory: still refused.
      const relative = path.relative(process.cwd(), h.bundle('b2', {}));
      await rejectsWith(h.create('b2', { req: { bundle: relative } }), GrpcCode.INVALID_ARGUMENT, /KATA_ERR_OCI_SPEC/);
      assert.equal(h.factory.requests.length, 0);
      assert.deepEqual(await h.flushEvents(), []);
    });

    it('a duplicate id: ALREADY_EXISTS; a container of no pod or of another pod: FAILED_PRECONDITION; the first one unharmed', async () => {
      await harness();
      await h.create('c1');
      await rejectsWith(h.create('c1'), GrpcCode.ALREADY_EXISTS);
      await rejectsWith(h.create('c2'), GrpcCode.FAILED_PRECONDITION);
      await rejectsWith(h.create('c3', { annotations: POD_ANNOTATIONS('container', 'other-pod') }), GrpcCode.FAILED_PRECONDITION);
      await rejectsWith(h.task.State({ id: 'c2' }), GrpcCode.NOT_FOUND);
      assert.equal(h.factory.sandboxes.length, 1);
      assert.equal(h.sandbox.stopCalls, 0, 'a refused Create leaves the running sandbox alone');
      assert.deepEqual([...h.sandbox.containers.keys()], ['c1']);
      assert.equal(await h.status('c1'), Status.CREATED);
      await h.task.Start({ id: 'c1' });
      assert.equal(await h.status('c1'), Status.RUNNING);
      const evs = await h.flushEvents();
      assert.deepEqual(evs.map(brief), ['create:c1', 'start:c1']);
    });
  });

  describe('Shutdown', () => {
    it('with tasks left and now=false: does nothing; with none: stops the sandbox once and lets the shim exit', async () => {
      await harness();
      await h.create('c1');
      await within(h.task.Shutdown({ id: 'c1', now: false }), 'Shutdown');
      await settle();
      assert.equal(h.shutdowns, 0, 'onShutdown not called while a task is left');
      assert.equal(h.sandbox.stopCalls, 0);
      assert.equal(await h.status('c1'), Status.CREATED, 'the task is still served');
      await h.task.Start({ id: 'c1' });
      h.container('c1').exit(0);
      await within(h.task.Wait({ id: 'c1' }), 'Wait');
      await within(h.task.Delete({ id: 'c1' }), 'Delete');
      await within(h.task.Shutdown({ id: 'c1', now: false }), 'Shutdown');
      await until('onShutdown', () => h.shutdowns > 0);
      await settle();
      assert.equal(h.shutdowns, 1, 'onShutdown called once');
      assert.equal(h.sandbox.stopCalls, 1, 'the sandbox is stopped once');
      assert.ok(h.sandbox.stopped);
      await rejectsWith(h.create('c9'), GrpcCode.FAILED_PRECONDITION);
    });
  });
});
