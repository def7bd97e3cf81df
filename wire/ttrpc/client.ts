import type { Duplex } from 'node:stream';
import { FrameChannel } from './channel.js';
import { GrpcCode } from './codes.js';
import { TtrpcError, oversizeMessage } from './errors.js';
import { MAX_MESSAGE_LENGTH, MessageType, type Frame, type FrameHeader } from './frame.js';
import { Request, Response } from './proto.gen.js';
import { setLongTimeout } from './timer.js';
import type { MessageInit, MethodDescriptor, RequestOf, ResponseOf, ServiceDescriptor } from './codec.js';

export interface CallOptions {
  /**
   * Give up after this many milliseconds: the call rejects with DEADLINE_EXCEEDED and a reply that
   * comes later is dropped. Also sent to the server as `timeout_nano`. Overrides the client default;
   * 0 means no deadline.
   */
  timeoutMs?: number;
  /** Sent as ttrpc metadata; keys are lower-cased, as Go's ttrpc.MD does. */
  metadata?: Readonly<Record<string, string | readonly string[]>>;
  /** Aborting rejects the call with CANCELLED (ttrpc cannot tell the server; its reply is dropped). */
  signal?: AbortSignal;
}

export interface TtrpcClientOptions {
  /** Deadline of calls that give none; absent or 0: none. */
  defaultTimeoutMs?: number;
  /** Something arrived that a server should never send; the connection stays up. */
  onProtocolError?: (err: TtrpcError) => void;
}

/** A stub with one method per RPC of a service: `stub.CreateContainer(request, opts)`. */
export type ServiceClient<S extends ServiceDescriptor> = {
  readonly [K in keyof S['methods']]: (request: MessageInit<RequestOf<S['methods'][K]>>, opts?: CallOptions) => Promise<ResponseOf<S['methods'][K]>>;
};

interface Pending {
  readonly label: string;
  resolve(payload: Uint8Array): void;
  reject(err: TtrpcError): void;
}

const MAX_STREAM_ID = 0xffffffff;

/**
 * The calling side of a ttrpc connection. Calls are unary and may be in flight together: each gets
 * the next odd stream id (1, 3, 5 …) and its reply is matched by id, in whatever order replies come.
 * Closing the connection, from either side, rejects every pending call with UNAVAILABLE.
 */
export class TtrpcClient {
  private readonly channel: FrameChannel;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closeReason: TtrpcError | undefined;
  private readonly closedPromise: Promise<TtrpcError>;
  private resolveClosed!: (reason: TtrpcError) => void;
  /** Replies that came for no pending call (usually after that call's deadline); they are dropped. */
  droppedReplies = 0;

  constructor(
    stream: Duplex,
    private readonly opts: TtrpcClientOptions = {},
  ) {
    this.closedPromise = new Promise((resolve) => (this.resolveClosed = resolve));
    this.channel = new FrameChannel(stream, {
      frame: (f) => this.onFrame(f),
      oversize: (h) => this.onOversize(h),
      close: (reason) => this.onClose(reason),
    });
  }

  /** Settles, never rejects, once the connection has closed, with the error pending calls got. */
  get closed(): Promise<TtrpcError> {
    return this.closedPromise;
  }

  get isClosed(): boolean {
    return this.closeReason !== undefined;
  }

  /** Calls in flight. */
  get pendingCalls(): number {
    return this.pending.size;
  }

  close(): void {
    this.channel.close();
  }

  /** A typed stub for a generated service descriptor. */
  service<S extends ServiceDescriptor>(desc: S): ServiceClient<S> {
    const stub: Record<string, unknown> = {};
    for (const [name, m] of Object.entries(desc.methods)) {
      stub[name] = (request: MessageInit<unknown>, opts?: CallOptions) => this.call(desc.name, m, request, opts);
    }
    return Object.freeze(stub) as ServiceClient<S>;
  }

  async call<Req, Res>(serviceName: string, m: MethodDescriptor<Req, Res>, request: MessageInit<Req>, opts: CallOptions = {}): Promise<Res> {
    const payload = await this.callRaw(serviceName, m.name, m.requestType.encode(request), opts);
    try {
      return m.responseType.decode(payload);
    } catch (e) {
      throw new TtrpcError(GrpcCode.INTERNAL, `cannot decode the ${m.responseType.typeName} reply of ${serviceName}/${m.name}: ${(e as Error).message}`, { cause: e });
    }
  }

  /** The call with the payloads as bytes; for services without a descriptor. */
  callRaw(serviceName: string, methodName: string, payload: Uint8Array, opts: CallOptions = {}): Promise<Uint8Array> {
    const label = `${serviceName}/${methodName}`;
    if (this.closeReason) return Promise.reject(this.closeReason);
    if (opts.signal?.aborted) return Promise.reject(new TtrpcError(GrpcCode.CANCELLED, `${label}: cancelled before it was sent`));
    const timeoutMs = opts.timeoutMs ?? this.opts.defaultTimeoutMs ?? 0;
    const body = Request.encode({
      service: serviceName,
      method: methodName,
      payload,
      timeoutNano: timeoutMs > 0 ? BigInt(Math.round(timeoutMs * 1e6)) : 0n,
      metadata: toKeyValues(opts.metadata),
    });
    // The sender refuses an oversized message, before it uses up a stream id.
    if (body.length > MAX_MESSAGE_LENGTH) {
      return Promise.reject(new TtrpcError(GrpcCode.RESOURCE_EXHAUSTED, `${label}: ${oversizeMessage(body.length, MAX_MESSAGE_LENGTH)}`));
    }
    if (this.nextId > MAX_STREAM_ID) {
      return Promise.reject(new TtrpcError(GrpcCode.RESOURCE_EXHAUSTED, `${label}: stream ids of this connection are used up; open a new one`));
    }
    const id = this.nextId;
    this.nextId += 2;

    return new Promise<Uint8Array>((resolve, reject) => {
      let cancelTimer: (() => void) | undefined;
      const onAbort = (): void => settle(new TtrpcError(GrpcCode.CANCELLED, `${label}: cancelled`));
      const settle = (result: Uint8Array | TtrpcError): void => {
        if (this.pending.get(id) !== entry) return;
        this.pending.delete(id);
        cancelTimer?.();
        opts.signal?.removeEventListener('abort', onAbort);
        if (result instanceof TtrpcError) reject(result);
        else resolve(result);
      };
      const entry: Pending = { label, resolve: settle, reject: settle };
      this.pending.set(id, entry);
      if (timeoutMs > 0) {
        cancelTimer = setLongTimeout(() => settle(new TtrpcError(GrpcCode.DEADLINE_EXCEEDED, `${label}: no reply within ${timeoutMs} ms`)), timeoutMs);
      }
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      try {
        this.channel.send(id, MessageType.REQUEST, 0, body);
      } catch (e) {
        settle(e instanceof TtrpcError ? e : new TtrpcError(GrpcCode.UNAVAILABLE, `${label}: ${(e as Error).message}`, { cause: e }));
      }
    });
  }

  private onFrame(f: Frame): void {
    if (f.type !== MessageType.RESPONSE) {
      const p = this.pending.get(f.streamId);
      if (f.type === MessageType.DATA && p) {
        p.reject(new TtrpcError(GrpcCode.INTERNAL, `${p.label}: the server sent a data frame; only unary calls are supported`));
        return;
      }
      this.protocolError(`unexpected frame of type ${f.type} on stream ${f.streamId}`);
      return;
    }
    const p = this.pending.get(f.streamId);
    if (!p) {
      this.droppedReplies++;
      return;
    }
    let res: Response;
    try {
      res = Response.decode(f.payload);
    } catch (e) {
      p.reject(new TtrpcError(GrpcCode.INTERNAL, `${p.label}: undecodable response frame: ${(e as Error).message}`, { cause: e }));
      return;
    }
    const code = res.status?.code ?? 0;
    if (code !== GrpcCode.OK) p.reject(new TtrpcError(code, res.status?.message ?? '', { origin: 'remote' }));
    else p.resolve(res.payload);
  }

  private onOversize(h: FrameHeader): void {
    const p = this.pending.get(h.streamId);
    if (p) p.reject(new TtrpcError(GrpcCode.RESOURCE_EXHAUSTED, `${p.label}: reply refused: ${oversizeMessage(h.length, MAX_MESSAGE_LENGTH)}`));
    else this.protocolError(`oversized frame (${h.length} bytes) on stream ${h.streamId}, which has no call`);
  }

  private onClose(reason: TtrpcError): void {
    this.closeReason = reason;
    for (const p of [...this.pending.values()]) p.reject(new TtrpcError(reason.code, `${p.label}: ${reason.statusMessage}`, { cause: reason.cause }));
    this.pending.clear();
    this.resolveClosed(reason);
  }

  private protocolError(message: string): void {
    this.opts.onProtocolError?.(new TtrpcError(GrpcCode.INTERNAL, `ttrpc: ${message}`));
  }
}

function toKeyValues(md: CallOptions['metadata']): { key: string; value: string }[] {
  if (!md) return [];
  const out: { key: string; value: string }[] = [];
  for (const [k, v] of Object.entries(md)) {
    const key = k.toLowerCase();
    for (const value of typeof v === 'string' ? [v] : v) out.push({ key, value });
  }
  return out;
}
