/**
 * What the generated protobuf modules (`*.gen.ts`, made by scripts/gen-protos.ts from protos/)
 * build on: message codecs, method and service descriptors, and the wire primitives of protobufjs
 * (its `minimal` build: varints, zig-zag, 64-bit, UTF-8, length-delimited nesting).
 *
 * Messages are plain objects. A decoded message has every field (proto3 defaults for absent
 * scalars, `undefined` for absent sub-messages); a message to encode may leave any field out
 * ({@link MessageInit}). 64-bit integers are `bigint` when decoded and `bigint | number` to encode.
 */
import protobuf from 'protobufjs/minimal.js';

export type Reader = protobuf.Reader;
export type Writer = protobuf.Writer;
export const Reader = protobuf.Reader;
export const Writer = protobuf.Writer;

type Scalar = string | number | boolean | bigint | Uint8Array;

/** A message to encode: every field optional, 64-bit integers also as numbers, recursively. */
export type MessageInit<T> = {
  [K in keyof T]?: InitValue<T[K]>;
};
type InitValue<V> = V extends bigint
  ? bigint | number
  : V extends Scalar
    ? V
    : V extends readonly (infer E)[]
      ? readonly InitValue<E>[]
      : V extends object
        ? MessageInit<V>
        : V;

export interface MessageCodec<T> {
  /** Full protobuf name, e.g. `grpc.Storage`. */
  readonly typeName: string;
  encode(message: MessageInit<T>): Uint8Array;
  /** Throws (RangeError or Error) on bytes that are not an encoding of this message. */
  decode(bytes: Uint8Array): T;
}

export interface MethodDescriptor<Req, Res> {
  /** The bare RPC name, as it goes into `Request.method`. */
  readonly name: string;
  readonly requestType: MessageCodec<Req>;
  readonly responseType: MessageCodec<Res>;
}

export interface ServiceDescriptor<M extends Record<string, MethodDescriptor<any, any>> = Record<string, MethodDescriptor<any, any>>> {
  /** Full service name, as it goes into `Request.service`, e.g. `grpc.AgentService`. */
  readonly name: string;
  readonly methods: M;
}

export type RequestOf<D> = D extends MethodDescriptor<infer Req, any> ? Req : never;
export type ResponseOf<D> = D extends MethodDescriptor<any, infer Res> ? Res : never;

export function method<Req, Res>(name: string, requestType: MessageCodec<Req>, responseType: MessageCodec<Res>): MethodDescriptor<Req, Res> {
  return Object.freeze({ name, requestType, responseType });
}

export function service<M extends Record<string, MethodDescriptor<any, any>>>(name: string, methods: M): ServiceDescriptor<M> {
  return Object.freeze({ name, methods: Object.freeze(methods) });
}

/** A 64-bit integer for the protobufjs writer, which takes numbers or `{low, high}` pairs. */
export function toLong(v: bigint | number): protobuf.Long | number {
  if (typeof v === 'number') return Math.trunc(v);
  const u = BigInt.asUintN(64, v);
  return { low: Number(u & 0xffffffffn) | 0, high: Number(u >> 32n) | 0, unsigned: false };
}

/** The protobufjs reader gives a Long (or a number when no long library is around); we give bigint. */
export function fromLong(v: protobuf.Long | number, unsigned: boolean): bigint {
  if (typeof v === 'number') return BigInt(v);
  const x = (BigInt(v.high >>> 0) << 32n) | BigInt(v.low >>> 0);
  return unsigned ? x : BigInt.asIntN(64, x);
}

/** End offset of a length-delimited field, checked against the end of the enclosing message. */
export function subEnd(r: Reader, end: number): number {
  const len = r.uint32();
  const sub = r.pos + len;
  if (sub > end) throw new RangeError(`length-delimited field of ${len} bytes at offset ${r.pos} overruns its message (ends at ${end})`);
  return sub;
}

/** After a message or packed run: a field that ran past the end means the bytes are not this message. */
export function checkEnd(r: Reader, end: number): void {
  if (r.pos !== end) throw new RangeError(`field overruns its message: ended at offset ${r.pos}, message ends at ${end}`);
}

/** Reads a field tag; field number 0 is never valid. */
export function readTag(r: Reader): number {
  const tag = r.uint32();
  if (tag >>> 3 === 0) throw new Error(`invalid tag ${tag} (field number 0) at offset ${r.pos}`);
  return tag;
}

/** Skips a field this message does not know, or one that came with an unexpected wire type. */
export function skipField(r: Reader, tag: number): void {
  r.skipType(tag & 7, 0, tag >>> 3);
}
