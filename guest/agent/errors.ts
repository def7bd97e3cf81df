/**
 * The gRPC statuses the agent answers with. kata-agent answers INTERNAL for nearly every failure;
 * we keep its INTERNAL where the runtime matches on it (end of file on ReadStdout/ReadStderr) and
 * otherwise use the code that says what went wrong, so that containerd's errdefs mapping works:
 *
 * | situation | code |
 * |---|---|
 * | unknown container or exec id | NOT_FOUND |
 * | container or exec id already in use, sandbox already created | ALREADY_EXISTS |
 * | a malformed request (missing spec, bad id, bad PCI path, unknown storage driver, terminal) | INVALID_ARGUMENT |
 * | a request that does not fit the state (start twice, exec into a stopped container, stdin closed) | FAILED_PRECONDITION |
 * | a hot-plugged device or the container's processes did not appear / go in time | DEADLINE_EXCEEDED |
 * | the caller went away while a long poll waited | CANCELLED |
 * | mount, spawn or any other failure in the guest; end of file of a stream (as kata-agent) | INTERNAL |
 */
import { GrpcCode } from '../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../wire/ttrpc/errors.js';

/** kata-agent's status message at the end of a stream (`read_stream` in its rpc.rs), with code INTERNAL. */
export const EOF_MESSAGE = 'read meet eof';

export const notFound = (message: string): TtrpcError => new TtrpcError(GrpcCode.NOT_FOUND, message);
export const alreadyExists = (message: string): TtrpcError => new TtrpcError(GrpcCode.ALREADY_EXISTS, message);
export const invalidArgument = (message: string): TtrpcError => new TtrpcError(GrpcCode.INVALID_ARGUMENT, message);
export const failedPrecondition = (message: string): TtrpcError => new TtrpcError(GrpcCode.FAILED_PRECONDITION, message);
export const deadlineExceeded = (message: string): TtrpcError => new TtrpcError(GrpcCode.DEADLINE_EXCEEDED, message);
export const cancelled = (message: string): TtrpcError => new TtrpcError(GrpcCode.CANCELLED, message);
export const internal = (message: string, cause?: unknown): TtrpcError => new TtrpcError(GrpcCode.INTERNAL, message, { cause });
export const endOfFile = (): TtrpcError => new TtrpcError(GrpcCode.INTERNAL, EOF_MESSAGE);

/** True for the status {@link endOfFile} makes (what a host reading a stream treats as its end). */
export function isEndOfFile(err: unknown): boolean {
  return err instanceof TtrpcError && err.code === GrpcCode.INTERNAL && err.statusMessage === EOF_MESSAGE;
}

/**
 * The status a handler's failure is answered with: a TtrpcError as it is, anything else as
 * INTERNAL with its message (a bug or an unexpected system error; the ttrpc server would say UNKNOWN).
 */
export function toStatus(err: unknown): TtrpcError {
  if (err instanceof TtrpcError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return internal(message, err);
}
