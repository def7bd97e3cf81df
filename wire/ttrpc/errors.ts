import { GrpcCode, grpcCodeName } from './codes.js';

/**
 * A failed ttrpc call: a gRPC status code and message. The server turns a TtrpcError thrown by a
 * handler into exactly that status; the client rejects a call with one, either carrying the
 * status the peer sent (`origin: 'remote'`) or made up locally (`'local'`: the deadline passed,
 * the connection closed, the reply was too large or could not be decoded).
 */
export class TtrpcError extends Error {
  /** The gRPC code (see {@link GrpcCode}). */
  readonly code: number;
  /** The status message alone, without the code name that `message` starts with. */
  readonly statusMessage: string;
  readonly origin: 'local' | 'remote';

  constructor(code: number, statusMessage: string, opts: { origin?: 'local' | 'remote'; cause?: unknown } = {}) {
    super(`${grpcCodeName(code)}: ${statusMessage}`, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'TtrpcError';
    this.code = code;
    this.statusMessage = statusMessage;
    this.origin = opts.origin ?? 'local';
  }

  /** The code's canonical name, e.g. `DEADLINE_EXCEEDED`. */
  get codeName(): string {
    return grpcCodeName(this.code);
  }
}

export function isTtrpcError(e: unknown): e is TtrpcError {
  return e instanceof TtrpcError;
}

/** The message ttrpc's Go implementation uses for an oversized frame, so logs read the same on both sides. */
export function oversizeMessage(length: number, max: number): string {
  return `message length ${length} exceed maximum message size of ${max}`;
}

export function closedError(detail?: string, cause?: unknown): TtrpcError {
  return new TtrpcError(GrpcCode.UNAVAILABLE, detail ? `ttrpc: closed: ${detail}` : 'ttrpc: closed', { cause });
}
