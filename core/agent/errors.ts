import { KataError, type ErrorCode } from '../errors.js';
import { grpcCodeName } from '../../wire/ttrpc/codes.js';

/** What went wrong between the runtime and the guest agent. */
export type AgentErrorKind =
  /** Nothing answered at the agent's address before the dial deadline. */
  | 'unreachable'
  /** The hybrid-vsock socket answered CONNECT with something other than `OK <port>`. */
  | 'handshake'
  /** The agent address is malformed or has an unknown scheme. */
  | 'address'
  /** The host kernel cannot open AF_VSOCK sockets (socat's socket() fails with EAFNOSUPPORT). */
  | 'transport-unsupported'
  /** socat, which opens AF_VSOCK connections for the runtime, is missing or too old. */
  | 'socat-missing'
  /** The agent answered a call with an error status, or did not answer before the call's deadline. */
  | 'call'
  /** The connection closed while the call was pending, or before it was made. */
  | 'closed';

/** The coded error of each kind. */
export const AGENT_ERROR_CODES: Readonly<Record<AgentErrorKind, ErrorCode>> = Object.freeze({
  unreachable: 'KATA_ERR_AGENT_UNREACHABLE',
  handshake: 'KATA_ERR_AGENT_HANDSHAKE',
  address: 'KATA_ERR_AGENT_ADDRESS',
  'transport-unsupported': 'KATA_ERR_VSOCK_UNSUPPORTED',
  'socat-missing': 'KATA_ERR_VSOCK_SOCAT',
  call: 'KATA_ERR_AGENT_CALL',
  closed: 'KATA_ERR_AGENT_CLOSED',
});

export interface AgentErrorOptions {
  /** The RPC, e.g. `CreateContainer`. */
  method?: string;
  /** The gRPC status code, for `call` and `closed`. */
  grpcCode?: number;
  /** The agent address, for the connection kinds. */
  address?: string;
  fix?: string;
  cause?: unknown;
}

export class AgentError extends KataError {
  readonly kind: AgentErrorKind;
  readonly method: string | undefined;
  readonly grpcCode: number | undefined;
  readonly address: string | undefined;

  constructor(kind: AgentErrorKind, message: string, opts: AgentErrorOptions = {}) {
    super(AGENT_ERROR_CODES[kind], message, { fix: opts.fix, cause: opts.cause });
    this.name = 'AgentError';
    this.kind = kind;
    this.method = opts.method;
    this.grpcCode = opts.grpcCode;
    this.address = opts.address;
  }

  /** The gRPC code's name, e.g. `NOT_FOUND`, when there is one. */
  get grpcCodeName(): string | undefined {
    return this.grpcCode === undefined ? undefined : grpcCodeName(this.grpcCode);
  }

  override toJSON(): Record<string, unknown> {
    const out: Record<string, unknown> = { ...super.toJSON(), kind: this.kind };
    if (this.method !== undefined) out.method = this.method;
    if (this.grpcCode !== undefined) out.grpcCode = this.grpcCodeName;
    if (this.address !== undefined) out.address = this.address;
    return out;
  }
}

/**
 * One dial attempt failed in a way a later attempt may not repeat: nothing listens yet, or the
 * attempt ran out of time. Internal to the transports; the dial loop turns the last one into an
 * `unreachable` AgentError at the deadline.
 */
export class RetryableDialError extends Error {
  constructor(
    message: string,
    /** The attempt ran out of time, which says less about the cause than any other failure. */
    readonly timedOut = false,
  ) {
    super(message);
    this.name = 'RetryableDialError';
  }
}
