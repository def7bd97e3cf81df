/**
 * The QMP client (plugins/qemu/qmp.ts). Protocol edge cases (split and coalesced frames, malformed
 * lines, a silent peer, a connection closed under pending commands) run against a small unix-socket
 * simulator; everything else runs against the real qemu-system-x86_64, started paused (-S).
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { KataError } from '../../../core/errors.js';
import { QmpClient, QmpError, type QmpEvent } from '../../../plugins/qemu/qmp.js';
import { killQemuMentioning, qemuBinary, qemuLeftBehind, startPausedQemu, type PausedQemu } from '../../helpers/qemu.js';
import { TempDir } from '../../helpers/tmp.js';

const GREETING = { QMP: { version: { qemu: { micro: 0, minor: 2, major: 8 }, package: 'simulator' }, capabilities: ['oob'] } };

type Reply = (obj: unknown) => void;

/**
 * A QMP peer: sends the greeting (unless `greeting` is false), answers qmp_capabilities, and hands
 * every other command to `onCommand`. `send` writes raw text, so tests control the framing.
 */
async function simulator(
  dir: string,
  onCommand: (cmd: { execute: string; arguments?: Record<string, unknown>; id?: unknown }, reply: Reply, sock: net.Socket) => void,
  opts: { greeting?: boolean | string; capabilities?: boolean } = {},
): Promise<{ socketPath: string; server: net.Server; sockets: net.Socket[] }> {
  const socketPath = path.join(dir, `sim-${Math.random().toString(36).slice(2)}.sock`);
  const sockets: net.Socket[] = [];
  const server = net.createServer((sock) => {
    sockets.push(sock);
    const reply: Reply = (obj) => sock.write(`${typeof obj === 'string' ? obj : JSON.stringify(obj)}\r\n`);
    if (opts.greeting !== false) sock.write(typeof opts.greeting === 'string' ? opts.greeting : `${JSON.stringify(GREETING)}\r\n`);
    let buf = '';
    sock.on('data', (d) => {
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const cmd = JSON.parse(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (cmd.execute === 'qmp_capabilities' && opts.capabilities !== false) reply({ return: {}, id: cmd.id });
        else onCommand(cmd, reply, sock);
      }
    });
    sock.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  return { socketPath, server, sockets };
}

const isCode = (code: string) => (e: unknown) => e instanceof KataError && e.code === code;

describe('QmpClient (simulated peer)', () => {
  let tmp: TempDir;
  const servers: net.Server[] = [];
  const clients: QmpClient[] = [];
  const track = (c: QmpClient) => (clients.push(c), c);

  beforeEach(() => (tmp = new TempDir('kata-ts-qmp-')));
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
    tmp.cleanup();
  });

  async function sim(...args: Parameters<typeof simulator> extends [string, ...infer R] ? R : never) {
    const s = await simulator(tmp.path, ...args);
    servers.push(s.server);
    return s;
  }

  it('reads the greeting, negotiates capabilities and records the version', async () => {
    const seen: string[] = [];
    const { socketPath } = await sim((cmd, reply) => {
      seen.push(cmd.execute);
      reply({ return: { status: 'prelaunch', running: false }, id: cmd.id });
    });
    const qmp = track(await QmpClient.connect(socketPath));
    assert.equal(qmp.version, '8.2.0');
    assert.equal(qmp.greeting.version.package, 'simulator');
    assert.deepEqual(qmp.greeting.capabilities, ['oob']);
    assert.deepEqual(await qmp.execute('query-status'), { status: 'prelaunch', running: false });
    assert.deepEqual(seen, ['query-status']);
  });

  it('handles a greeting split into one-byte chunks, and replies and events coalesced into one chunk', async () => {
    const greeting = `${JSON.stringify(GREETING)}\r\n`;
    let held: { id: unknown; execute: string }[] = [];
    const { socketPath, sockets } = await sim(
      (cmd, _reply, sock) => {
        held.push({ id: cmd.id, execute: cmd.execute });
        if (held.length < 3) return;
        // All three answers, reversed, with an event between them, in one write…
        const event = { event: 'RESUME', data: {}, timestamp: { seconds: 1, microseconds: 2 } };
        const text = [...held].reverse().map((c) => JSON.stringify({ return: c.execute, id: c.id })).join('\r\n');
        const [first, ...rest] = text.split('\r\n');
        sock.write(`${first}\r\n${JSON.stringify(event)}\r\n${rest.join('\r\n')}\r\n`);
        held = [];
      },
      { greeting: false },
    );
    const socket = net.connect(socketPath);
    const handshake = QmpClient.handshake(socket);
    const server = await serverSide(sockets);
    for (const ch of greeting) {
      server.write(ch);
      await delay(1);
    }
    const qmp = track(await handshake);
    const events: QmpEvent[] = [];
    qmp.onEvent((e) => events.push(e));
    const results = await Promise.all(['a', 'b', 'c'].map((c) => qmp.execute(c)));
    assert.deepEqual(results, ['a', 'b', 'c']);
    assert.deepEqual(events.map((e) => [e.event, e.timestamp?.microseconds]), [['RESUME', 2]]);
  });

  it('splits a reply across chunks, even inside a multi-byte character', async () => {
    const { socketPath } = await sim((cmd, _reply, sock) => {
      const bytes = Buffer.from(`${JSON.stringify({ return: { name: 'Gerät ✓' }, id: cmd.id })}\r\n`);
      const cut = bytes.indexOf(Buffer.from('✓')) + 1; // in the middle of the 3-byte character
      sock.write(bytes.subarray(0, cut));
      setTimeout(() => sock.write(bytes.subarray(cut)), 20);
    });
    const qmp = track(await QmpClient.connect(socketPath));
    assert.deepEqual(await qmp.execute('query-name'), { name: 'Gerät ✓' });
  });

  it('reports malformed lines and unexpected replies, and goes on working', async () => {
    const { socketPath } = await sim((cmd, reply) => {
      reply('this is not json');
      reply('[1, 2]');
      reply({ return: {}, id: 987654 });
      reply({ error: { class: 'GenericError', desc: 'no id' } });
      reply({ return: 'ok', id: cmd.id });
    });
    const reported: KataError[] = [];
    const qmp = track(await QmpClient.connect(socketPath, { onProtocolError: (e) => reported.push(e) }));
    assert.equal(await qmp.execute('query-status'), 'ok');
    assert.equal(reported.length, 4);
    assert.ok(reported.every((e) => e.code === 'KATA_ERR_QMP' && e.plugin === 'qemu'));
    assert.match(reported[0]?.message ?? '', /not JSON.*this is not json/);
    assert.match(reported[2]?.message ?? '', /unknown id 987654/);
    assert.equal(await qmp.execute('again'), 'ok');
  });

  it('surfaces an error reply as KATA_ERR_QMP with its class and desc', async () => {
    const { socketPath } = await sim((cmd, reply) => reply({ id: cmd.id, error: { class: 'DeviceNotFound', desc: "Device 'x' not found" } }));
    const qmp = track(await QmpClient.connect(socketPath));
    const err = await qmp.execute('device_del', { id: 'x' }).then(
      () => assert.fail('resolved'),
      (e: unknown) => e,
    );
    assert.ok(err instanceof QmpError);
    assert.ok(err instanceof KataError);
    assert.equal(err.code, 'KATA_ERR_QMP');
    assert.equal(err.class, 'DeviceNotFound');
    assert.equal(err.desc, "Device 'x' not found");
    assert.equal(err.command, 'device_del');
    assert.equal(err.plugin, 'qemu');
  });

  it('times a command out on a silent peer, drops the late reply cleanly, and keeps other commands apart', async () => {
    const late: { id: unknown }[] = [];
    const { socketPath, sockets } = await sim((cmd, reply) => {
      if (cmd.execute === 'slow') late.push({ id: cmd.id });
      else reply({ return: cmd.execute, id: cmd.id });
    });
    const reported: KataError[] = [];
    const qmp = track(await QmpClient.connect(socketPath, { onProtocolError: (e) => reported.push(e) }));
    const t = Date.now();
    await assert.rejects(qmp.execute('slow', undefined, { timeoutMs: 100 }), isCode('KATA_ERR_QMP_TIMEOUT'));
    assert.ok(Date.now() - t < 1000);
    assert.equal(qmp.pendingCount, 0);
    // The answer comes after all: dropped without a protocol error, and it resolves nothing else.
    const next = qmp.execute('fast');
    (await serverSide(sockets)).write(`${JSON.stringify({ return: 'late', id: late[0]?.id })}\r\n`);
    assert.equal(await next, 'fast');
    await delay(20);
    assert.deepEqual(reported, []);
  });

  it('times out a handshake with a peer that never greets', async () => {
    const { socketPath } = await sim(() => undefined, { greeting: false });
    await assert.rejects(QmpClient.connect(socketPath, { handshakeTimeoutMs: 150 }), isCode('KATA_ERR_QMP_TIMEOUT'));
  });

  it('times out a handshake whose qmp_capabilities gets no answer', async () => {
    const { socketPath } = await sim(() => undefined, { capabilities: false });
    await assert.rejects(QmpClient.connect(socketPath, { handshakeTimeoutMs: 150 }), isCode('KATA_ERR_QMP_TIMEOUT'));
  });

  it('refuses a QEMU older than 5.0', async () => {
    const old = { QMP: { version: { qemu: { micro: 1, minor: 12, major: 4 }, package: '' }, capabilities: [] } };
    const { socketPath } = await sim(() => undefined, { greeting: `${JSON.stringify(old)}\r\n` });
    await assert.rejects(QmpClient.connect(socketPath), (e: KataError) => e.code === 'KATA_ERR_QMP' && /4\.12\.1 is older than 5\.0/.test(e.message));
  });

  it('rejects every pending command and event wait with KATA_ERR_QMP_CLOSED when the peer closes', async () => {
    let received = 0;
    const { socketPath } = await sim((_cmd, _reply, sock) => {
      if (++received === 3) sock.destroy();
    });
    const qmp = track(await QmpClient.connect(socketPath));
    const closedWith: string[] = [];
    qmp.onClose((e) => closedWith.push(e.code));
    const waiting = qmp.waitForEvent('DEVICE_DELETED', () => true, 5000);
    const pending = [qmp.execute('a'), qmp.execute('b'), qmp.execute('c')];
    const results = await Promise.allSettled([...pending, waiting]);
    for (const r of results) {
      assert.equal(r.status, 'rejected');
      assert.equal((r as PromiseRejectedResult).reason.code, 'KATA_ERR_QMP_CLOSED');
    }
    assert.deepEqual(closedWith, ['KATA_ERR_QMP_CLOSED']);
    assert.equal(qmp.closed, true);
    await assert.rejects(qmp.execute('after'), isCode('KATA_ERR_QMP_CLOSED'));
  });

  it('rejects pending commands with KATA_ERR_QMP_CLOSED when the client closes', async () => {
    const { socketPath } = await sim(() => undefined);
    const qmp = track(await QmpClient.connect(socketPath));
    const pending = qmp.execute('never-answered');
    qmp.close();
    await assert.rejects(pending, isCode('KATA_ERR_QMP_CLOSED'));
  });

  it('delivers events to listeners and to waiters, and waitForEvent with a cursor sees an event that came before the call', async () => {
    const { socketPath } = await sim((cmd, reply) => {
      // The event the command causes arrives before its reply, as DEVICE_DELETED may.
      reply({ event: 'DEVICE_DELETED', data: { device: cmd.arguments?.id, path: `/machine/peripheral/${String(cmd.arguments?.id)}` }, timestamp: { seconds: 1, microseconds: 0 } });
      reply({ event: 'DEVICE_DELETED', data: { path: '/machine/peripheral/x/virtio-backend' }, timestamp: { seconds: 1, microseconds: 1 } });
      reply({ return: {}, id: cmd.id });
    });
    const qmp = track(await QmpClient.connect(socketPath));
    const heard: string[] = [];
    const off = qmp.onEvent((e) => heard.push(`${e.event}:${String(e.data.device ?? '-')}`));

    const mark = qmp.eventCursor;
    await qmp.execute('device_del', { id: 'disk1' });
    const got = await qmp.waitForEvent('DEVICE_DELETED', (e) => e.data.device === 'disk1', 1000, { since: mark });
    assert.equal(got.data.device, 'disk1');
    assert.ok(got.seq > mark);
    assert.deepEqual(heard, ['DEVICE_DELETED:disk1', 'DEVICE_DELETED:-']);

    // Without the cursor the event is in the past: the wait times out.
    await assert.rejects(qmp.waitForEvent('DEVICE_DELETED', (e) => e.data.device === 'disk1', 100), isCode('KATA_ERR_QMP_TIMEOUT'));
    // A waiter registered before the command needs no cursor.
    const waiter = qmp.waitForEvent('DEVICE_DELETED', (e) => e.data.device === 'disk2', 1000);
    await qmp.execute('device_del', { id: 'disk2' });
    assert.equal((await waiter).data.device, 'disk2');
    off();
    await qmp.execute('device_del', { id: 'disk3' });
    assert.equal(heard.length, 4);
  });
});

/** The server side of the simulator's first connection, once it is accepted. */
async function serverSide(sockets: net.Socket[]): Promise<net.Socket> {
  for (let i = 0; i < 200 && !sockets[0]; i++) await delay(5);
  if (!sockets[0]) throw new Error('the simulator accepted no connection');
  return sockets[0];
}

describe('QmpClient against qemu-system-x86_64 -S @integration', function () {
  this.timeout(30_000);
  let binary: string | undefined;
  let tmp: TempDir;
  let vm: PausedQemu | undefined;
  let qmp: QmpClient | undefined;
  let protocolErrors: string[] = [];

  before(function () {
    binary = qemuBinary();
    if (!binary) this.skip();
  });

  beforeEach(async () => {
    tmp = new TempDir('kata-ts-qmp-');
    vm = await startPausedQemu(binary as string, tmp.path);
    protocolErrors = [];
    qmp = await connectWithRetry(vm.qmpSocket, (e) => protocolErrors.push(e.message));
  });

  afterEach(async () => {
    qmp?.close();
    await vm?.kill();
    const left = await qemuLeftBehind(tmp.path);
    killQemuMentioning(tmp.path);
    tmp.cleanup();
    assert.deepEqual(left, [], 'a QEMU process was left running');
    assert.deepEqual(protocolErrors, [], 'QEMU sent something the client did not understand');
  });

  it('negotiates capabilities and reports the installed version', async () => {
    const c = qmp as QmpClient;
    const { major, minor } = c.greeting.version;
    assert.ok(major > 5 || (major === 5 && minor >= 0), c.version);
    const v = await c.execute<{ qemu: { major: number; minor: number; micro: number } }>('query-version');
    assert.equal(`${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`, c.version);
    assert.deepEqual(await c.execute('query-status'), { status: 'prelaunch', singlestep: false, running: false });
  });

  it('matches concurrent commands to their replies by id', async () => {
    const c = qmp as QmpClient;
    const calls = Array.from({ length: 24 }, (_, i) =>
      i % 3 === 0
        ? c.execute<{ qemu: object }>('query-version').then((r) => ['version', 'qemu' in r])
        : i % 3 === 1
          ? c.execute<{ status: string }>('query-status').then((r) => ['status', r.status === 'prelaunch'])
          : c.execute<number>('qom-get', { path: `/machine/peripheral/rp${i % 2}`, property: 'chassis' }).then((r) => ['chassis', r === 1]),
    );
    const results = await Promise.all(calls);
    results.forEach(([kind, ok], i) => {
      assert.equal(kind, ['version', 'status', 'chassis'][i % 3]);
      assert.equal(ok, true, `reply ${i}`);
    });
  });

  it('surfaces QEMU errors with their class and description', async () => {
    const c = qmp as QmpClient;
    await assert.rejects(c.execute('device_del', { id: 'nope' }), (e: QmpError) => e.code === 'KATA_ERR_QMP' && e.class === 'DeviceNotFound' && /nope/.test(e.desc));
    await assert.rejects(c.execute('no-such-command'), (e: QmpError) => e.class === 'CommandNotFound');
    await assert.rejects(c.execute('blockdev-del', { 'node-name': 'ghost' }), (e: QmpError) => e.class === 'GenericError' && /ghost/.test(e.desc));
  });

  it('delivers events (RESUME, STOP) to listeners and waiters', async () => {
    const c = qmp as QmpClient;
    const heard: string[] = [];
    c.onEvent((e) => heard.push(e.event));
    const mark = c.eventCursor;
    await c.execute('cont');
    await c.waitForEvent('RESUME', undefined, 5000, { since: mark });
    const stop = c.waitForEvent('STOP', undefined, 5000);
    await c.execute('stop');
    await stop;
    assert.deepEqual(heard, ['RESUME', 'STOP']);
  });

  it('times out a command to a QEMU that does not answer (SIGSTOP), then drops its late reply', async () => {
    const c = qmp as QmpClient;
    const child = (vm as PausedQemu).child;
    child.kill('SIGSTOP');
    try {
      await assert.rejects(c.execute('query-status', undefined, { timeoutMs: 200 }), isCode('KATA_ERR_QMP_TIMEOUT'));
    } finally {
      child.kill('SIGCONT');
    }
    // QEMU now answers the old command (dropped) and the new one (delivered).
    assert.equal((await c.execute<{ status: string }>('query-status')).status, 'prelaunch');
  });

  it('rejects a pending command with KATA_ERR_QMP_CLOSED when QEMU is killed', async () => {
    const c = qmp as QmpClient;
    const child = (vm as PausedQemu).child;
    child.kill('SIGSTOP'); // cannot answer
    const pending = c.execute('query-status');
    await delay(50);
    child.kill('SIGKILL');
    await assert.rejects(pending, isCode('KATA_ERR_QMP_CLOSED'));
  });
});

async function connectWithRetry(socketPath: string, onProtocolError: (e: KataError) => void): Promise<QmpClient> {
  for (let i = 0; ; i++) {
    try {
      return await QmpClient.connect(socketPath, { onProtocolError });
    } catch (e) {
      if (i > 50) throw e;
      await delay(20);
    }
  }
}
