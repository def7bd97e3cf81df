/**
 * ttrpc framing, property-based (fixed seed): whatever the cut points of the byte stream, the
 * decoder gives back exactly the frames that were encoded; random bytes give frames or oversize
 * reports, never an exception.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { FrameDecoder, HEADER_LENGTH, MAX_MESSAGE_LENGTH, MessageType, encodeFrame, type DecodedItem } from '../../../wire/ttrpc/frame.js';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';

const SEED = 20261126;

interface F {
  streamId: number;
  type: number;
  flags: number;
  payload: Uint8Array;
}

const frameArb: fc.Arbitrary<F> = fc.record({
  streamId: fc.nat({ max: 0xffffffff }),
  type: fc.nat({ max: 255 }),
  flags: fc.nat({ max: 255 }),
  payload: fc.uint8Array({ maxLength: 300 }),
});

/** Cuts `bytes` at the given points (taken modulo its length, sorted, duplicates kept: empty chunks too). */
function split(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = cuts.map((c) => (bytes.length ? c % (bytes.length + 1) : 0)).sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of points) {
    out.push(bytes.subarray(prev, p));
    prev = p;
  }
  out.push(bytes.subarray(prev));
  return out;
}

function decodeAll(chunks: Buffer[], max?: number): DecodedItem[] {
  const d = new FrameDecoder(max === undefined ? {} : { maxMessageLength: max });
  return chunks.flatMap((c) => d.push(c));
}

function plain(item: DecodedItem): unknown {
  return item.kind === 'frame'
    ? { kind: item.kind, streamId: item.streamId, type: item.type, flags: item.flags, length: item.length, payload: Buffer.from(item.payload).toString('hex') }
    : { kind: item.kind, streamId: item.streamId, type: item.type, flags: item.flags, length: item.length };
}

describe('ttrpc frames', () => {
  it('encodes the 10-byte big-endian header: length, stream id, type, flags', () => {
    const b = encodeFrame(0x01020304, MessageType.RESPONSE, 0x05, Uint8Array.of(0xaa, 0xbb));
    assert.equal(b.toString('hex'), '00000002' + '01020304' + '02' + '05' + 'aabb');
    assert.equal(HEADER_LENGTH, 10);
    assert.equal(MAX_MESSAGE_LENGTH, 4194304);
  });

  it('gives back the same frames whatever the split points and coalescing of the stream', () => {
    fc.assert(
      fc.property(fc.array(frameArb, { maxLength: 12 }), fc.array(fc.nat(), { maxLength: 40 }), (frames, cuts) => {
        const bytes = Buffer.concat(frames.map((f) => encodeFrame(f.streamId, f.type, f.flags, f.payload)));
        const items = decodeAll(split(bytes, cuts));
        assert.deepEqual(
          items.map(plain),
          frames.map((f) => ({ kind: 'frame', streamId: f.streamId, type: f.type, flags: f.flags, length: f.payload.length, payload: Buffer.from(f.payload).toString('hex') })),
        );
      }),
      { seed: SEED, numRuns: 500 },
    );
  });

  it('reports a frame over the limit once, skips its body, and stays in step for the frames after it', () => {
    const max = 64;
    fc.assert(
      fc.property(
        fc.array(fc.tuple(frameArb, fc.boolean()), { maxLength: 8 }),
        fc.array(fc.nat(), { maxLength: 30 }),
        (spec, cuts) => {
          const frames = spec.map(([f, big]) => (big ? { ...f, payload: new Uint8Array(max + 1 + (f.payload.length % 50)).fill(7) } : { ...f, payload: f.payload.subarray(0, max) }));
          // encodeFrame refuses only the real limit, so these test frames encode fine.
          const bytes = Buffer.concat(frames.map((f) => encodeFrame(f.streamId, f.type, f.flags, f.payload)));
          const items = decodeAll(split(bytes, cuts), max);
          assert.equal(items.length, frames.length);
          items.forEach((it, i) => {
            const f = frames[i]!;
            assert.equal(it.kind, f.payload.length > max ? 'oversize' : 'frame');
            assert.equal(it.streamId, f.streamId);
            assert.equal(it.length, f.payload.length);
            if (it.kind === 'frame') assert.deepEqual(Buffer.from(it.payload), Buffer.from(f.payload));
          });
        },
      ),
      { seed: SEED, numRuns: 300 },
    );
  });

  it('turns random bytes into frames or oversize reports only, never an exception', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2000 }), fc.array(fc.nat(), { maxLength: 20 }), (garbage, cuts) => {
        const items = decodeAll(split(Buffer.from(garbage), cuts));
        for (const it of items) {
          assert.ok(it.kind === 'frame' || it.kind === 'oversize');
          if (it.kind === 'frame') assert.equal(it.payload.length, it.length);
          else assert.ok(it.length > MAX_MESSAGE_LENGTH);
        }
      }),
      { seed: SEED, numRuns: 500 },
    );
  });

  it('knows when the stream stopped inside a frame', () => {
    const d = new FrameDecoder();
    assert.equal(d.midFrame, false);
    d.push(encodeFrame(1, 1, 0, new Uint8Array(20)).subarray(0, 15));
    assert.equal(d.midFrame, true);
    assert.deepEqual(d.progress(), { have: 15, need: 30 });
  });

  it('refuses to encode a payload over 4 MiB with RESOURCE_EXHAUSTED, and accepts exactly 4 MiB', () => {
    assert.equal(encodeFrame(1, 1, 0, new Uint8Array(MAX_MESSAGE_LENGTH)).length, MAX_MESSAGE_LENGTH + HEADER_LENGTH);
    assert.throws(
      () => encodeFrame(1, 1, 0, new Uint8Array(MAX_MESSAGE_LENGTH + 1)),
      (e: unknown) => e instanceof TtrpcError && e.code === GrpcCode.RESOURCE_EXHAUSTED && /exceed maximum message size of 4194304/.test(e.message),
    );
  });

  it('decodes a 4 MiB frame that arrives in 64 KiB pieces', () => {
    const payload = Buffer.alloc(MAX_MESSAGE_LENGTH, 0x5a);
    const bytes = encodeFrame(7, MessageType.REQUEST, 0, payload);
    const d = new FrameDecoder();
    const items: DecodedItem[] = [];
    for (let i = 0; i < bytes.length; i += 65536) items.push(...d.push(bytes.subarray(i, i + 65536)));
    assert.equal(items.length, 1);
    assert.equal(items[0]!.kind, 'frame');
    assert.ok(items[0]!.kind === 'frame' && items[0]!.payload.equals(payload));
  });
});
