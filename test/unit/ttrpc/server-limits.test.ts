/**
 * What a hostile or broken client can make the ttrpc server hold, measured on the server's own
 * counters (not RSS, see test/unit/shim/shim-memory.test.ts for that): partial frames, pipelined
 * calls whose replies are never read, calls left running, oversized frames and replies, and what
 * is left after the connections go.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { TtrpcClient } from '../../../wire/ttrpc/client.js';
import { method, service } from '../../../wire/ttrpc/codec.js';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { HEADER_LENGTH, MAX_MESSAGE_LENGTH, MessageType, encodeFrame } from '../../../wire/ttrpc/frame.js';
import { KeyValue, Request, Response } from '../../../wire/ttrpc/proto.gen.js';
import { TtrpcServer, type ServerLimits, type ServerStats } from '../../../wire/ttrpc/server.js';
import { TempDir } from '../../helpers/tmp.js';
import { until } from '../../helpers/wait.js';

const Echo = service('test.Echo', {
  Echo: method('Echo', KeyValue, KeyValue),
  Hold: method('Hold', KeyValue, KeyValue),
  /** As Hold, but served parked: a long poll such as the shim's Wait. */
  Park: method('Park', KeyValue, KeyValue),
  Quote: method('Quote', KeyValue, KeyValue),
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function header(length: number, streamId: number): Buffer {
  const h = Buffer.alloc(HEADER_LENGTH);
  h.writeUInt32BE(length, 0);
  h.writeUInt32BE(streamId, 4);
  h[8] = MessageType.REQUEST;
  return h;
}

function requestFrame(streamId: number, methodName: string, key = ''): Buffer {
  return encodeFrame(streamId, MessageType.REQUEST, 0, Request.encode({ service: 'test.Echo', method: methodName, payload: KeyValue.encode({ key }) }));
}

/** A raw client socket that records whether the server closed it, and reads nothing unless told to. */
class Peer {
  closed = false;
  received = 0;
  readonly closedP: Promise<void>;
  private constructor(readonly sock: net.Socket) {
    this.closedP = new Promise((resolve) => sock.once('close', () => ((this.closed = true), resolve())));
    sock.on('error', () => undefined);
  }
  static connect(file: string, read = true): Promise<Peer> {
    return new Promise((resolve, reject) => {
      const s = net.connect(file, () => {
        const p = new Peer(s);
        if (read) p.read();
        else s.pause();
        resolve(p);
      });
      s.once('error', reject);
    });
  }
  read(): void {
    this.sock.on('data', (c: Buffer) => (this.received += c.length));
    this.sock.resume();
  }
}

describe('ttrpc server limits', () => {
  let tmp: TempDir;
  let sock: string;
  let server: TtrpcServer;
  let limitEvents: string[];
  let echoed: number;
  let release: (() => void)[];
  const peers: Peer[] = [];

  async function start(limits: Partial<ServerLimits>): Promise<void> {
    server = new TtrpcServer({ limits, onLimit: (m) => limitEvents.push(m) });
    server.register(Echo, {
      Echo: (req) => {
        echoed++;
        return { key: req.key };
      },
      Hold: () => new Promise((resolve) => release.push(() => resolve({}))),
      Park: (req) => new Promise((resolve) => release.push(() => resolve({ key: req.key }))),
      Quote: (req) => {
        // A status quoting a huge request, as "container <id> not found" does.
        throw new TtrpcError(GrpcCode.NOT_FOUND, `container "${req.key}" not found`);
      },
    }, { parked: ['Park'] });
    await server.listen(sock);
  }

  const connect = async (read = true): Promise<Peer> => {
    const p = await Peer.connect(sock, read);
    peers.push(p);
    return p;
  };

  beforeEach(() => {
    tmp = new TempDir('kata-ts-ttrpc-limits-');
    sock = path.join(tmp.path, 'ttrpc.sock');
    limitEvents = [];
    echoed = 0;
    release = [];
  });

  afterEach(async () => {
    for (const p of peers.splice(0)) p.sock.destroy();
    for (const r of release.splice(0)) r();
    await server?.close();
    tmp.cleanup();
  });

  it('holds partial frames only up to the total cap, closing the connections whose frame does not fit, and times a started frame out', async () => {
    const frame = 1 << 20;
    const cap = 4 * frame;
    await start({ maxBufferedFrameBytes: cap, frameTimeoutMs: 3000 });
    let peak: ServerStats | undefined;
    const sample = setInterval(() => {
      const s = server.stats();
      if (!peak || s.bufferedFrameBytes > peak.bufferedFrameBytes) peak = s;
    }, 2);
    try {
      for (let i = 0; i < 20; i++) {
        const p = await connect();
        // A header promising 1 MiB, and all of it but the last byte.
        p.sock.write(Buffer.concat([header(frame, 1), Buffer.alloc(frame - 1, 7)]));
      }
      await until('20 connections served or closed', () => peers.filter((p) => p.closed).length === 16 && server.stats().connections === 4);
      assert.equal(server.stats().bufferedFrameBytes, cap, 'four connections hold a 1 MiB frame each');
      assert.ok(server.stats().peakBufferedFrameBytes <= cap, `peak ${server.stats().peakBufferedFrameBytes} over the cap`);
      assert.ok(peak && peak.bufferedFrameBytes <= cap);
      assert.equal(limitEvents.filter((m) => /no room for a frame of 1048576 bytes/.test(m)).length, 16);

      // The four that fit get no more time than the frame timeout to finish their frame.
      await until('the stalled frames to time out', () => peers.every((p) => p.closed), 5_000);
      assert.equal(limitEvents.filter((m) => /still incomplete \(1048585 of 1048586 bytes\)/.test(m)).length, 4);
      await until('the server to forget them', () => server.stats().connections === 0);
      assert.deepEqual(server.stats().bufferedFrameBytes, 0, 'every reservation is given back');
    } finally {
      clearInterval(sample);
    }
  });

  it('gives a partial frame back when its connection goes, and takes new frames after', async () => {
    await start({ maxBufferedFrameBytes: 2 << 20 });
    const a = await connect();
    a.sock.write(Buffer.concat([header(2 << 20, 1), Buffer.alloc(1000)]));
    await until('the frame to be held', () => server.stats().bufferedFrameBytes === 2 << 20);
    a.sock.destroy();
    await until('the frame to be given back', () => server.stats().bufferedFrameBytes === 0 && server.stats().connections === 0);
    const c = new TtrpcClient(net.connect(sock));
    try {
      assert.equal((await c.service(Echo).Echo({ key: 'x'.repeat(100_000) })).key.length, 100_000, 'a large frame fits again');
    } finally {
      c.close();
    }
  });

  it('stops reading a client that pipelines calls without reading the replies, and serves all of them once it reads', async () => {
    const limits = { maxPendingReplyBytes: 64 << 10, maxInFlightPerConnection: 32 };
    await start(limits);
    const total = 30_000;
    const p = await connect(false);
    const frames: Buffer[] = [];
    for (let i = 0; i < total; i++) frames.push(requestFrame(2 * i + 1, 'Echo', `k${i}`));
    p.sock.write(Buffer.concat(frames));

    // The replies fill the kernel's socket buffers, then the server's write buffer up to the bound.
    await until('the server to stop reading', () => server.stats().pausedConnections === 1, 10_000);
    let last = -1;
    await until('the server to settle', async () => {
      const now = echoed;
      await sleep(200);
      return now === last || ((last = now), false);
    }, 10_000, 0);
    const s = server.stats();
    const replyFrame = encodeFrame(1, MessageType.RESPONSE, 0, Response.encode({ status: {}, payload: KeyValue.encode({ key: `k${total}` }) })).length;
    const bound = limits.maxPendingReplyBytes + limits.maxInFlightPerConnection * replyFrame;
    assert.ok(s.pendingReplyBytes <= bound, `replies held ${s.pendingReplyBytes} > ${bound}`);
    assert.ok(s.pendingReplyBytes > 0);
    assert.ok(echoed < total / 2, `the server went on reading: ${echoed} of ${total} calls served`);
    assert.ok(s.queuedFrames * 20 <= 128 << 10, `${s.queuedFrames} frames queued`);

    p.read();
    await until('every reply', () => p.received === total * replyFrame - sumShorterKeys(total), 20_000);
    assert.equal(echoed, total);
    await until('nothing held', () => {
      const t = server.stats();
      return t.pendingReplyBytes === 0 && t.pausedConnections === 0 && t.inFlight === 0;
    });
    p.sock.destroy();
    await until('the connection to be forgotten', () => server.stats().connections === 0);
  });

  it('runs at most the per-connection number of calls at once, reading more as they end', async () => {
    await start({ maxInFlightPerConnection: 8 });
    const p = await connect();
    for (let i = 0; i < 50; i++) p.sock.write(requestFrame(2 * i + 1, 'Hold'));
    await until('eight calls running', () => server.stats().inFlight === 8);
    await sleep(100);
    assert.equal(server.stats().inFlight, 8);
    assert.equal(server.stats().pausedConnections, 1);
    release.splice(0).forEach((r) => r());
    await until('the next eight', () => server.stats().inFlight === 8 && release.length === 8);
    p.sock.destroy();
    await until('released on close', () => server.stats().connections === 0);
    for (const r of release.splice(0)) r();
    await until('no call left', () => server.stats().inFlight === 0);
  });

  it('does not count parked calls toward the in-flight cap: with 200 parked (pending Waits), other calls are still answered', async () => {
    await start({});
    const c = new TtrpcClient(net.connect(sock));
    try {
      const echo = c.service(Echo);
      const parked = Array.from({ length: 200 }, (_, i) => echo.Park({ key: `w${i}` }));
      await until('200 parked calls', () => server.stats().parked === 200);
      assert.equal((await echo.Echo({ key: 'kill' })).key, 'kill', 'a call behind 200 parked ones is answered');
      assert.equal(server.stats().pausedConnections, 0);

      // Ordinary calls still pause the connection at their own cap, parked ones running or not.
      const held = Array.from({ length: 128 }, () => echo.Hold({}));
      await until('128 held calls and 200 parked', () => server.stats().inFlight === 328);
      const behind = echo.Echo({ key: 'behind' });
      await until('the connection to pause', () => server.stats().pausedConnections === 1);
      await sleep(50);
      assert.equal(echoed, 1, 'a call beyond 128 ordinary ones waits');
      release.splice(200, 1)[0]!();
      assert.equal((await behind).key, 'behind');

      release.splice(0).forEach((r) => r());
      assert.deepEqual((await Promise.all(parked)).map((r) => r.key), Array.from({ length: 200 }, (_, i) => `w${i}`));
      await Promise.all(held);
      assert.deepEqual(limitEvents, []);
    } finally {
      c.close();
    }
  });

  it('answers a parked call beyond the parked caps (calls, bytes) RESOURCE_EXHAUSTED at once, never pausing the connection', async () => {
    await start({ maxParkedPerConnection: 10, maxParkedBytesPerConnection: 64 << 10 });
    const c = new TtrpcClient(net.connect(sock));
    const refused = (e: unknown) => {
      assert.ok(e instanceof TtrpcError);
      assert.equal(e.code, GrpcCode.RESOURCE_EXHAUSTED);
      assert.equal(e.origin, 'remote');
      assert.match(e.statusMessage, /^call refused: \d+ parked calls of \d+ bytes already wait on this connection \(limits 10 calls, 65536 bytes\)$/);
      return true;
    };
    try {
      const echo = c.service(Echo);
      const parked = Array.from({ length: 10 }, (_, i) => echo.Park({ key: `w${i}` }));
      await until('10 parked calls', () => server.stats().parked === 10);
      await assert.rejects(echo.Park({ key: 'one too many' }), refused);
      assert.equal((await echo.Echo({ key: 'after' })).key, 'after');
      release.splice(0).forEach((r) => r());
      await Promise.all(parked);

      // By bytes: two 30 KiB requests fit in 64 KiB, a third does not.
      const big = Array.from({ length: 2 }, () => echo.Park({ key: 'x'.repeat(30 << 10) }));
      await until('2 big parked calls', () => server.stats().parked === 2);
      await assert.rejects(echo.Park({ key: 'x'.repeat(30 << 10) }), refused);
      assert.equal(server.stats().pausedConnections, 0);
      release.splice(0).forEach((r) => r());
      await Promise.all(big);
      assert.equal(limitEvents.length, 2);
      assert.match(limitEvents[0]!, /^ttrpc: test\.Echo\/Park on stream \d+ refused: 10 parked calls of \d+ bytes already wait/);
      await until('nothing held', () => server.stats().parked === 0 && server.stats().inFlightBytes === 0);
    } finally {
      c.close();
    }
  });

  it('refuses to serve a parked method that has no handler', () => {
    const s = new TtrpcServer();
    assert.throws(() => s.registerRaw('test.Raw', { Echo: () => new Uint8Array(0) }, { parked: ['Wiat'] }), /parked method test\.Raw\/Wiat has no handler/);
  });

  it('answers a reply over the frame limit with RESOURCE_EXHAUSTED and keeps serving the connection', async () => {
    await start({});
    const c = new TtrpcClient(net.connect(sock));
    try {
      const echo = c.service(Echo);
      const id = 'x'.repeat(MAX_MESSAGE_LENGTH - 32);
      await assert.rejects(echo.Quote({ key: id }), (e: unknown) => {
        assert.ok(e instanceof TtrpcError);
        assert.equal(e.code, GrpcCode.RESOURCE_EXHAUSTED);
        assert.equal(e.origin, 'remote');
        assert.match(e.statusMessage, /^reply refused: message length \d+ exceed maximum message size of 4194304$/);
        return true;
      });
      assert.equal((await echo.Echo({ key: 'after' })).key, 'after');
      assert.equal(limitEvents.filter((m) => /replaced by RESOURCE_EXHAUSTED/.test(m)).length, 1);
    } finally {
      c.close();
    }
  });

  it('closes a connection that sends a request frame over the limit, after answering it, and says so', async () => {
    await start({});
    const p = await connect();
    const got: Buffer[] = [];
    p.sock.on('data', (b: Buffer) => got.push(b));
    p.sock.write(header(MAX_MESSAGE_LENGTH + 1, 7));
    await p.closedP;
    const bytes = Buffer.concat(got);
    assert.equal(bytes.readUInt32BE(4), 7);
    const r = Response.decode(bytes.subarray(HEADER_LENGTH, HEADER_LENGTH + bytes.readUInt32BE(0)));
    assert.equal(r.status?.code, GrpcCode.RESOURCE_EXHAUSTED);
    assert.deepEqual(limitEvents, [`ttrpc: connection closed: request frame of ${MAX_MESSAGE_LENGTH + 1} bytes on stream 7 is over the ${MAX_MESSAGE_LENGTH}-byte limit`]);
    await until('forgotten', () => server.stats().connections === 0 && server.stats().bufferedFrameBytes === 0);
  });
});

/** Keys are `k0` … `k<n-1>`: shorter than the longest one used to size a reply frame. */
function sumShorterKeys(n: number): number {
  const longest = `k${n}`.length;
  let short = 0;
  for (let i = 0; i < n; i++) short += longest - `k${i}`.length;
  return short;
}
