/**
 * The gRPC status codes (google.rpc.Code), which ttrpc carries in `Response.status.code`. Numbers
 * are the wire values; the names are the canonical upper-case ones that gRPC tooling prints.
 */
export const GrpcCode = Object.freeze({
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const);

export type GrpcCodeName = keyof typeof GrpcCode;
/** A code from the table; a peer may also send a number outside it, which is kept as it came. */
export type GrpcCodeValue = (typeof GrpcCode)[GrpcCodeName];

const NAMES: readonly string[] = Object.keys(GrpcCode);

/** `NOT_FOUND` for 5; `CODE_42` for a number outside the table. */
export function grpcCodeName(code: number): string {
  return NAMES[code] ?? `CODE_${code}`;
}
