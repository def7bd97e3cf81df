import type { Timestamp } from '../wire/containerd/proto.gen.js';

/** A google.protobuf.Timestamp for a date (millisecond precision). */
export function timestamp(d: Date): Timestamp {
  const ms = d.getTime();
  const seconds = Math.floor(ms / 1000);
  return { seconds: BigInt(seconds), nanos: (ms - seconds * 1000) * 1_000_000 };
}
