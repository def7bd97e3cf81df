/**
 * ttrpc client and server over real unix sockets in a temporary directory, with each other and
 * with a hand-written peer that sends what a correct one never would.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import fc from 'fast-check';
import { TtrpcClient } from '../../../wire/ttrpc/client.js';
import { TtrpcServer, type CallContext } from '../../../wire/ttrpc/server.js';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { MAX_MESSAGE_LENGTH, MessageType, type DecodedItem } from '../../../wire/ttrpc/frame.js';
import { method, service } from '../../../wire/ttrpc/codec.js';
import { KeyValue, Request, Response } from '../../../wire/ttrpc/proto.gen.js';
import { TempDir } from '../../helpers/tmp.js';
import { until } from '../../helpers/wait.js';
import { RawPeer, closeServer, rawServer } from './raw-peer.js';

const SEED = 20261126;

/** A test service built from the ttrpc messages themselves: no extra .proto needed. */
const Echo = service('test.Echo', {
  Echo: method('Echo', KeyValue, KeyValue),
  Wait: method('Wait', KeyValue, KeyValue),
  Fail: method('Fail', KeyValue, KeyValue),
  Context: method('Context', KeyValue, KeyValue),
  Big: method('Big', KeyValue, Request),
  Missing: method('Missing', KeyValue, KeyValue),
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function isStatus(code: number, origin?: 'local' | 'remote', text?: RegExp): (e: unknown) => boolean {
  return (e) => {
    assert.ok(e instanceof TtrpcError, `not a TtrpcError: ${String(e)}`);
    assert.equal(e.codeName, Object.keys(GrpcCode)[code]);
    if (origin) assert.equal(e.origin, origin);
    if (text) assert.match(e.statusMessage, text);
    return true;
  };
}

function responseOf(item: DecodedItem): { streamId: number; code: number; message: string; payload: Uint8Array } {
  assert.equal(item.kind, 'frame');
  assert.equal(item.type, MessageType.RESPONSE);
  assert.ok(item.kind === 'frame');
  const r = Response.decode(item.payload);
  return { streamId: item.streamId, code: r.status?.code ?? 0, message: r.status?.message ?? '', payload: r.payload };
}

function requestBytes(serviceName: string, methodName: string, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  return Request.encode({ service: serviceName, method: methodName, payload });
}

describe('ttrpc client and server', () => {
  let tmp: TempDir;
  let sock: string;
  let server: TtrpcServer;
  let releaseWait: (() => void)[];
  let handlerErrors: unknown[];
  let protocolErrors: TtrpcError[];
  let lastCtx: CallContext | undefined;
  const clients: TtrpcClient[] = [];

  const connect = (opts: ConstructorParameters<typeof TtrpcClient>[1] = {}): TtrpcClient => {
    const c = new TtrpcClient(net.connect(sock), opts);
    clients.push(c);
    return c;
  };

  beforeEach(async () => {
    tmp = new TempDir('kata-ts-ttrpc-');
    sock = path.join(tmp.path, 'ttrpc.sock');
    releaseWait = [];
    handlerErrors = [];
    protocolErrors = [];
    server = new TtrpcServer({ onHandlerError: (e) => handlerErrors.push(e), onProtocolError: (e) => protocolErrors.push(e) });
    server.register(Echo, {
      Echo: async (req) => {
        const delay = Number(req.value) || 0;
        if (delay) await sleep(delay);
        return { key: req.key, value: req.value };
      },
      Wait: (req, ctx) => {
        lastCtx = ctx;
        return new Promise((resolve) => releaseWait.push(() => resolve({ key: req.key, value: 'released' })));
      },
      Fail: (req) => {
        if (req.key === 'status') throw new TtrpcError(GrpcCode.NOT_FOUND, `container ${req.value} not found`);
        throw new Error(`boom ${req.value}`);
      },
      Context: (_req, ctx) => {
        lastCtx = ctx;
        return { key: JSON.stringify(Object.fromEntries(ctx.metadata)), value: String(ctx.deadline !== undefined) };
      },
      Big: (req) => ({ payload: new Uint8Array(Number(req.value)) }),
    });
    await server.listen(sock);
  });

  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const f of releaseWait) f();
    await server.close();
    tmp.cleanup();
  });

  it('answers a call with the decoded reply', async () => {
    const echo = connect().service(Echo);
    assert.deepEqual(await echo.Echo({ key: 'k', value: 'v' }), { key: 'k', value: 'v' });
  });

  it('keeps concurrent calls apart and matches replies that come out of order', async () => {
    const echo = connect().service(Echo);
    const order: number[] = [];
    const delays = [120, 90, 60, 30, 0];
    const results = await Promise.all(
      delays.map(async (d, i) => {
        const r = await echo.Echo({ key: String(i), value: String(d) });
        order.push(i);
        return r;
      }),
    );
    assert.deepEqual(results.map((r) => r.key), ['0', '1', '2', '3', '4']);
    assert.deepEqual(order, [4, 3, 2, 1, 0]);
  });

  it('serves other calls while a long poll waits', async () => {
    const c = connect();
    const echo = c.service(Echo);
    const wait = echo.Wait({ key: 'w' });
    for (let i = 0; i < 5; i++) assert.equal((await echo.Echo({ key: `e${i}` })).key, `e${i}`);
    assert.equal(c.pendingCalls, 1);
    releaseWait.shift()!();
    assert.deepEqual(await wait, { key: 'w', value: 'released' });
  });

  it('uses odd stream ids from 1 upwards, two apart', async () => {
    const seen: number[] = [];
    const s2 = path.join(tmp.path, 'raw.sock');
    const raw = await rawServer(s2, (p) => {
      void (async () => {
        for (;;) {
          const item = await p.next(5000).catch(() => undefined);
          if (!item) return;
          seen.push(item.streamId);
          p.send(item.streamId, MessageType.RESPONSE, 0, Response.encode({ status: {} }));
        }
      })();
    });
    const c = new TtrpcClient(net.connect(s2));
    clients.push(c);
    for (let i = 0; i < 4; i++) await c.service(Echo).Echo({});
    assert.deepEqual(seen, [1, 3, 5, 7]);
    c.close();
    await closeServer(raw);
  });

  it('rejects a call that outlives its timeout with DEADLINE_EXCEEDED, and drops the late reply', async () => {
    const c = connect();
    const echo = c.service(Echo);
    await assert.rejects(echo.Echo({ key: 'slow', value: '200' }, { timeoutMs: 50 }), isStatus(GrpcCode.DEADLINE_EXCEEDED, 'local'));
    assert.equal(c.pendingCalls, 0);
    await sleep(250);
    assert.equal(c.droppedReplies, 1);
    assert.equal((await echo.Echo({ key: 'after' })).key, 'after');
  });

  it('keeps a call whose deadline is beyond what one timer can wait (30 days) running, on both sides', async () => {
    const echo = connect().service(Echo);
    const days30 = 30 * 24 * 3600 * 1000;
    const call = echo.Wait({ key: 'long' }, { timeoutMs: days30 });
    const outcome = call.then(
      (r) => r,
      (e: unknown) => e,
    );
    await until('the call to run', () => releaseWait.length === 1);
    await sleep(50);
    assert.equal(lastCtx!.signal.aborted, false, `the server aborted the call: ${String(lastCtx!.signal.reason)}`);
    assert.ok(lastCtx!.deadline! > Date.now() + days30 - 60_000, 'the deadline is 30 days away');
    releaseWait[0]!();
    assert.deepEqual(await outcome, { key: 'long', value: 'released' });
  });

  it('sends the deadline and the metadata to the server', async () => {
    const echo = connect().service(Echo);
    const r = await echo.Context({}, { timeoutMs: 5000, metadata: { 'X-Trace': 'a', multi: ['1', '2'] } });
    assert.deepEqual(JSON.parse(r.key), { 'x-trace': ['a'], multi: ['1', '2'] });
    assert.equal(r.value, 'true');
    assert.ok(lastCtx!.deadline! > Date.now() && lastCtx!.deadline! <= Date.now() + 5000);
  });

  it('rejects a call with CANCELLED when its signal aborts', async () => {
    const echo = connect().service(Echo);
    const ac = new AbortController();
    const p = echo.Echo({ value: '200' }, { signal: ac.signal });
    ac.abort();
    await assert.rejects(p, isStatus(GrpcCode.CANCELLED, 'local'));
  });

  it('rejects every pending call when the client closes, and every later call', async () => {
    const c = connect();
    const echo = c.service(Echo);
    const pending = [echo.Wait({}), echo.Wait({}), echo.Echo({ value: '500' })];
    await sleep(30);
    c.close();
    for (const p of pending) await assert.rejects(p, isStatus(GrpcCode.UNAVAILABLE, 'local', /ttrpc: closed/));
    await assert.rejects(echo.Echo({}), isStatus(GrpcCode.UNAVAILABLE, 'local'));
    assert.equal((await c.closed).code, GrpcCode.UNAVAILABLE);
  });

  it('rejects every pending call when the server goes away', async () => {
    const c = connect();
    const pending = [c.service(Echo).Wait({}), c.service(Echo).Wait({})];
    await sleep(30);
    await server.close();
    for (const p of pending) await assert.rejects(p, isStatus(GrpcCode.UNAVAILABLE, 'local'));
  });

  it('answers an unknown service or method with UNIMPLEMENTED "service X" / "method X", as the Go server does', async () => {
    const c = connect();
    await assert.rejects(c.callRaw('no.Such', 'Echo', new Uint8Array(0)), isStatus(GrpcCode.UNIMPLEMENTED, 'remote', /^service no\.Such$/));
    await assert.rejects(c.service(Echo).Missing({}), isStatus(GrpcCode.UNIMPLEMENTED, 'remote', /^method Missing$/));
  });

  it("passes a handler's status error through, and reports anything else as UNKNOWN", async () => {
    const echo = connect().service(Echo);
    await assert.rejects(echo.Fail({ key: 'status', value: 'c1' }), isStatus(GrpcCode.NOT_FOUND, 'remote', /^container c1 not found$/));
    await assert.rejects(echo.Fail({ key: 'plain', value: 'x' }), isStatus(GrpcCode.UNKNOWN, 'remote', /^boom x$/));
    assert.equal(handlerErrors.length, 1);
  });

  it('answers a request payload its method cannot decode with INVALID_ARGUMENT', async () => {
    const c = connect();
    await assert.rejects(c.callRaw('test.Echo', 'Echo', Uint8Array.of(0x0a, 0x05, 0x61)), isStatus(GrpcCode.INVALID_ARGUMENT, 'remote', /cannot decode ttrpc\.KeyValue/));
  });

  it('refuses to send a request over 4 MiB, without using the connection', async () => {
    const c = connect();
    const echo = c.service(Echo);
    await assert.rejects(echo.Echo({ value: 'x'.repeat(MAX_MESSAGE_LENGTH) }), isStatus(GrpcCode.RESOURCE_EXHAUSTED, 'local', /exceed maximum message size of 4194304/));
    assert.equal((await echo.Echo({ key: 'still fine' })).key, 'still fine');
  });

  it('refuses to send a reply over 4 MiB, answering RESOURCE_EXHAUSTED instead', async () => {
    const echo = connect().service(Echo);
    await assert.rejects(echo.Big({ value: String(MAX_MESSAGE_LENGTH + 1) }), isStatus(GrpcCode.RESOURCE_EXHAUSTED, 'remote', /exceed maximum message size/));
    assert.equal((await echo.Big({ value: '1000' })).payload.length, 1000);
  });

  describe('against a hand-written client', () => {
    let peer: RawPeer;
    beforeEach(async () => {
      peer = await RawPeer.connect(sock);
    });
    afterEach(() => peer.close());

    it('answers an oversized frame with RESOURCE_EXHAUSTED on its stream, then closes that connection only', async () => {
      peer.send(1, MessageType.REQUEST, 0, Buffer.alloc(MAX_MESSAGE_LENGTH + 1, 1));
      peer.send(3, MessageType.REQUEST, 0, requestBytes('test.Echo', 'Echo', KeyValue.encode({ key: 'after' })));
      const r1 = responseOf(await peer.next());
      assert.deepEqual([r1.streamId, r1.code, r1.message], [1, GrpcCode.RESOURCE_EXHAUSTED, `message length ${MAX_MESSAGE_LENGTH + 1} exceed maximum message size of 4194304`]);
      await assert.rejects(peer.next(), /connection closed/);
      const echo = connect().service(Echo);
      assert.equal((await echo.Echo({ key: 'other connection' })).key, 'other connection');
    });

    it('answers an even stream id with INVALID_ARGUMENT on that id', async () => {
      peer.send(2, MessageType.REQUEST, 0, requestBytes('test.Echo', 'Echo'));
      const r = responseOf(await peer.next());
      assert.deepEqual([r.streamId, r.code, r.message], [2, GrpcCode.INVALID_ARGUMENT, 'StreamID must be odd for client initiated streams']);
    });

    it('answers a reused or decreasing stream id with INVALID_ARGUMENT', async () => {
      peer.send(5, MessageType.REQUEST, 0, requestBytes('test.Echo', 'Echo'));
      assert.equal(responseOf(await peer.next()).code, 0);
      peer.send(5, MessageType.REQUEST, 0, requestBytes('test.Echo', 'Echo'));
      peer.send(3, MessageType.REQUEST, 0, requestBytes('test.Echo', 'Echo'));
      for (const id of [5, 3]) {
        const r = responseOf(await peer.next());
        assert.deepEqual([r.streamId, r.code, r.message], [id, GrpcCode.INVALID_ARGUMENT, 'StreamID cannot be re-used and must increment']);
      }
    });

    it('answers an undecodable request with INVALID_ARGUMENT', async () => {
      peer.send(1, MessageType.REQUEST, 0, Uint8Array.of(0x0a, 0x10, 0x41));
      const r = responseOf(await peer.next());
      assert.deepEqual([r.streamId, r.code], [1, GrpcCode.INVALID_ARGUMENT]);
      assert.match(r.message, /^unmarshal request error: /);
    });

    it('answers a data frame with INVALID_ARGUMENT and ignores frame types it does not know', async () => {
      peer.send(1, MessageType.DATA, 0, new Uint8Array(0));
      assert.deepEqual(responseOf(await peer.next()).code, GrpcCode.INVALID_ARGUMENT);
      peer.send(3, 9, 0, Uint8Array.of(1, 2, 3));
      assert.equal(await peer.silent(100), true);
      assert.ok(protocolErrors.some((e) => /type 9/.test(e.message)));
    });

    it('answers the Go way: an empty status on success', async () => {
      peer.send(1, MessageType.REQUEST, 0, requestBytes('test.Echo', 'Echo', KeyValue.encode({ key: 'k' })));
      const item = await peer.next();
      assert.ok(item.kind === 'frame');
      assert.equal(item.flags, 0);
      assert.equal(Buffer.from(item.payload).subarray(0, 2).toString('hex'), '0a00');
    });

    it('survives random bytes: it answers, ignores or closes, and keeps serving other connections', async () => {
      await fc.assert(
        fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 300 }), async (garbage) => {
          const p = await RawPeer.connect(sock);
          p.write(garbage);
          await sleep(5);
          p.close();
        }),
        { seed: SEED, numRuns: 60 },
      );
      const echo = connect().service(Echo);
      assert.equal((await echo.Echo({ key: 'alive' })).key, 'alive');
    });
  });

  describe('against a hand-written server', () => {
    let rawSock: string;
    let raw: net.Server;
    let peers: RawPeer[];
    beforeEach(async () => {
      rawSock = path.join(tmp.path, 'raw.sock');
      peers = [];
      raw = await rawServer(rawSock, (p) => peers.push(p));
    });
    afterEach(async () => {
      for (const p of peers) p.close();
      await closeServer(raw);
    });
    const client = async (): Promise<{ c: TtrpcClient; p: () => RawPeer }> => {
      const c = new TtrpcClient(net.connect(rawSock), { onProtocolError: (e) => protocolErrors.push(e) });
      clients.push(c);
      while (peers.length === 0) await sleep(2);
      return { c, p: () => peers[0]! };
    };

    it('rejects the call whose reply frame is oversized with RESOURCE_EXHAUSTED, and keeps the connection', async () => {
      const { c, p } = await client();
      const big = c.service(Echo).Echo({ key: 'big' });
      const small = c.service(Echo).Echo({ key: 'small' });
      const r1 = await p().next();
      const r3 = await p().next();
      p().send(r1.streamId, MessageType.RESPONSE, 0, Buffer.alloc(MAX_MESSAGE_LENGTH + 10));
      p().send(r3.streamId, MessageType.RESPONSE, 0, Response.encode({ status: {}, payload: KeyValue.encode({ key: 'small' }) }));
      await assert.rejects(big, isStatus(GrpcCode.RESOURCE_EXHAUSTED, 'local', /exceed maximum message size of 4194304/));
      assert.equal((await small).key, 'small');
    });

    it('rejects a call whose reply cannot be decoded with INTERNAL', async () => {
      const { c, p } = await client();
      const call = c.service(Echo).Echo({});
      const req = await p().next();
      p().send(req.streamId, MessageType.RESPONSE, 0, Uint8Array.of(0x12, 0x7f));
      await assert.rejects(call, isStatus(GrpcCode.INTERNAL, 'local', /undecodable response/));
    });

    it('rejects pending calls cleanly when the server sends garbage and goes away', async () => {
      await fc.assert(
        fc.asyncProperty(fc.uint8Array({ maxLength: 200 }), async (garbage) => {
          peers.length = 0;
          const { c, p } = await client();
          const call = c.service(Echo).Echo({});
          await p().next();
          p().write(garbage);
          p().sock.end();
          // Whatever the bytes were, the call settles: mostly a local error, in principle a reply.
          await call.then(
            () => undefined,
            (e: unknown) => assert.ok(e instanceof TtrpcError, String(e)),
          );
          c.close();
        }),
        { seed: SEED, numRuns: 40 },
      );
    });
  });
});
