/**
 * The generated protobuf codecs: hand-computed bytes for small cases, the same bytes as
 * protobufjs's reflection encoder (from the same .proto files) for random messages of every type,
 * clean errors for garbage, and the committed modules equal to a fresh generation.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import protobuf from 'protobufjs';
import { PACKAGE_ROOT } from '../../../core/paths.js';
import type { MessageCodec } from '../../../wire/ttrpc/codec.js';
import * as ttrpcProto from '../../../wire/ttrpc/proto.gen.js';
import * as agentProto from '../../../wire/agent/proto.gen.js';
import * as shimProto from '../../../wire/containerd/proto.gen.js';
import { PROTO_MODULES, generateAllProtoModules, loadProtos } from '../../../scripts/gen-protos.js';

const SEED = 20261126;

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

function codecs(mod: Record<string, unknown>): MessageCodec<any>[] {
  return Object.values(mod).filter((v): v is MessageCodec<any> => typeof v === 'object' && v !== null && 'typeName' in v && 'decode' in v);
}

/** Random values for a reflected message type, as a caller would build them (fields left out at will). */
function arbitraryFor(type: protobuf.Type): fc.Arbitrary<Record<string, unknown>> {
  const model: Record<string, fc.Arbitrary<unknown>> = {};
  for (const f of type.fieldsArray) {
    const one = valueArb(f);
    if (f instanceof protobuf.MapField) model[f.name] = fc.dictionary(fc.string({ unit: 'binary', maxLength: 6 }), one, { maxKeys: 3, noNullPrototype: true });
    else if (f.repeated) model[f.name] = fc.array(one, { maxLength: 3 });
    else model[f.name] = one;
  }
  return fc.record(model, { requiredKeys: [] });
}

function valueArb(f: protobuf.Field): fc.Arbitrary<unknown> {
  if (f.resolvedType instanceof protobuf.Type) return fc.constant(null).chain(() => arbitraryFor(f.resolvedType as protobuf.Type));
  if (f.resolvedType instanceof protobuf.Enum) return fc.oneof(fc.constantFrom(...Object.values(f.resolvedType.values)), fc.integer({ min: -5, max: 1000 }));
  switch (f.type) {
    case 'string':
      return fc.string({ unit: 'binary', maxLength: 12 });
    case 'bytes':
      return fc.uint8Array({ maxLength: 12 });
    case 'bool':
      return fc.boolean();
    case 'int32':
      return fc.integer();
    case 'uint32':
      return fc.nat({ max: 0xffffffff });
    case 'int64':
      return fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n });
    case 'uint64':
      return fc.bigInt({ min: 0n, max: 2n ** 63n - 1n });
    default:
      throw new Error(`no arbitrary for ${f.type}`);
  }
}

/** What protobufjs's reflection encoder needs: no proto3 default values (it would write them), 64-bit as strings. */
function forReflection(type: protobuf.Type, m: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const f of type.fieldsArray) {
    const v = m[f.name];
    if (v === undefined) continue;
    const conv = (x: unknown): unknown => (f.resolvedType instanceof protobuf.Type ? forReflection(f.resolvedType, x as Record<string, unknown>) : typeof x === 'bigint' ? x.toString() : x);
    if (f instanceof protobuf.MapField) out[f.name] = Object.fromEntries(Object.entries(v as object).map(([k, x]) => [k, conv(x)]));
    else if (f.repeated) out[f.name] = (v as unknown[]).map(conv);
    else if (v === '' || v === 0 || v === false || v === 0n || (v instanceof Uint8Array && v.length === 0)) continue;
    else out[f.name] = conv(v);
  }
  return out;
}

/** A message as comparable data: every field present (proto3 defaults), bytes as hex, 64-bit as strings. */
function canon(type: protobuf.Type, m: Record<string, unknown> | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const f of [...type.fieldsArray].sort((a, b) => a.id - b.id)) {
    const v = m?.[f.name];
    const sub = f.resolvedType instanceof protobuf.Type ? f.resolvedType : undefined;
    const one = (x: unknown): unknown => (sub ? canon(sub, x as Record<string, unknown>) : x instanceof Uint8Array ? hex(x) : typeof x === 'bigint' ? x.toString() : x);
    if (f instanceof protobuf.MapField) out[f.name] = Object.fromEntries(Object.entries((v ?? {}) as object).map(([k, x]) => [k, one(x)]).sort(([a], [b]) => (a! < b! ? -1 : 1)));
    else if (f.repeated) out[f.name] = ((v ?? []) as unknown[]).map(one);
    else if (sub) out[f.name] = v === undefined ? null : one(v);
    else if (v !== undefined) out[f.name] = one(v);
    else out[f.name] = f.type === 'string' ? '' : f.type === 'bytes' ? '' : f.type === 'bool' ? false : /64/.test(f.type) ? '0' : 0;
  }
  return out;
}

describe('generated protobuf codecs', () => {
  it('encode a ttrpc Request as hand-computed protobuf bytes', () => {
    const bytes = ttrpcProto.Request.encode({ service: 's', method: 'm', payload: Uint8Array.of(1, 2), timeoutNano: 1000n, metadata: [{ key: 'k', value: 'v' }] });
    // 0a 01 's' | 12 01 'm' | 1a 02 01 02 | 20 e8 07 (1000 as varint) | 2a 06 (0a 01 'k' 12 01 'v')
    assert.equal(hex(bytes), '0a0173' + '12016d' + '1a020102' + '20e807' + '2a06' + '0a016b120176');
    assert.deepEqual(ttrpcProto.Request.decode(bytes), { service: 's', method: 'm', payload: Buffer.from([1, 2]), timeoutNano: 1000n, metadata: [{ key: 'k', value: 'v' }] });
  });

  it('encode the responses the Go server sends: an empty status for OK, code and message for an error', () => {
    assert.equal(hex(ttrpcProto.Response.encode({ status: {} })), '0a00');
    const err = ttrpcProto.Response.encode({ status: { code: 12, message: 'service x' } });
    assert.equal(hex(err), '0a0d' + '080c' + '1209' + Buffer.from('service x').toString('hex'));
    assert.deepEqual(ttrpcProto.Response.decode(err).status, { code: 12, message: 'service x', details: [] });
  });

  it('leave proto3 default values out and decode absent fields as defaults', () => {
    assert.equal(ttrpcProto.Request.encode({ service: '', timeoutNano: 0n, metadata: [] }).length, 0);
    assert.deepEqual(agentProto.Storage.decode(new Uint8Array(0)), {
      driver: '', driverOptions: [], source: '', fstype: '', options: [], mountPoint: '', fsGroup: undefined, shared: false,
    });
  });

  it('carry 64-bit integers exactly, negative ones as 10-byte varints', () => {
    assert.equal(hex(ttrpcProto.Request.encode({ timeoutNano: -1n })), '20' + 'ff'.repeat(9) + '01');
    for (const v of [-(2n ** 63n), -1n, 1n, 2n ** 53n + 1n, 2n ** 63n - 1n]) {
      assert.equal(ttrpcProto.Request.decode(ttrpcProto.Request.encode({ timeoutNano: v })).timeoutNano, v);
    }
    const max = agentProto.GuestDetailsResponse.encode({ memBlockSizeBytes: 2n ** 64n - 1n });
    assert.equal(agentProto.GuestDetailsResponse.decode(max).memBlockSizeBytes, 2n ** 64n - 1n);
    assert.equal(ttrpcProto.Request.decode(ttrpcProto.Request.encode({ timeoutNano: 5_000_000_000 })).timeoutNano, 5_000_000_000n);
  });

  it('skip fields they do not know, and known fields that come with another wire type', () => {
    const known = agentProto.StartContainerRequest.encode({ containerId: 'c1' });
    // field 99 varint 5, field 100 length-delimited "xy", field 1 as varint (wrong wire type), field 101 fixed32
    const extra = Buffer.from('98060' + '5' + 'a2060278' + '79' + '0807' + 'ad0601020304', 'hex');
    const decoded = agentProto.StartContainerRequest.decode(Buffer.concat([known, extra]));
    assert.deepEqual(decoded, { containerId: 'c1' });
  });

  it('decode a map key "__proto__" as an ordinary entry', () => {
    const spec = agentProto.Spec.decode(agentProto.Spec.encode({ Annotations: { ['__proto__']: 'x', a: 'b' } as Record<string, string> }));
    assert.equal(Object.getPrototypeOf(spec.Annotations), Object.prototype);
    assert.deepEqual(Object.entries(spec.Annotations), [['__proto__', 'x'], ['a', 'b']]);
  });

  for (const mod of PROTO_MODULES) {
    const root = loadProtos(mod.protos);
    const gen = { 'wire/ttrpc/proto.gen.ts': ttrpcProto, 'wire/agent/proto.gen.ts': agentProto, 'wire/containerd/proto.gen.ts': shimProto }[mod.out];
    if (!gen) throw new Error(`no test import for ${mod.out}`);
    for (const codec of codecs(gen as Record<string, unknown>)) {
      const type = root.lookupType(codec.typeName);
      it(`encode ${codec.typeName} as protobufjs's reflection does, and decode it back`, () => {
        fc.assert(
          fc.property(arbitraryFor(type), (m) => {
            const mine = codec.encode(m);
            const theirs = type.encode(forReflection(type, m)).finish();
            assert.equal(hex(mine), hex(theirs));
            assert.deepEqual(canon(type, codec.decode(mine)), canon(type, m));
          }),
          { seed: SEED, numRuns: codec.typeName === 'grpc.CreateContainerRequest' || codec.typeName === 'grpc.Spec' ? 300 : 60 },
        );
      });
    }
  }

  it('reject garbage with an Error, never anything else, for every message type', () => {
    const all = [ttrpcProto, agentProto, shimProto].flatMap((m) => codecs(m as Record<string, unknown>));
    fc.assert(
      fc.property(fc.constantFrom(...all), fc.uint8Array({ maxLength: 64 }), (codec, bytes) => {
        try {
          codec.decode(bytes);
        } catch (e) {
          assert.ok(e instanceof Error, `${codec.typeName}: threw ${String(e)}`);
        }
      }),
      { seed: SEED, numRuns: 3000 },
    );
  });

  it('reject a length-delimited field that runs past its enclosing message', () => {
    // CreateContainerRequest.storages (field 5) of 3 bytes, holding driver (field 1) claiming 10 bytes.
    const bytes = Buffer.from('2a03' + '0a0a61' + '626262626262626262', 'hex');
    assert.throws(() => agentProto.CreateContainerRequest.decode(bytes), RangeError);
  });

  it('are what scripts/gen-protos.ts generates from protos/ (run `npm run gen` after changing a .proto)', () => {
    for (const [out, code] of generateAllProtoModules()) {
      assert.equal(readFileSync(path.join(PACKAGE_ROOT, out), 'utf8'), code, `${out} is stale`);
    }
  });
});
