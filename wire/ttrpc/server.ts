import net from 'node:net';
import type { Duplex } from 'node:stream';
import { FrameChannel } from './channel.js';
import { GrpcCode } from './codes.js';
import { TtrpcError, oversizeMessage } from './errors.js';
import { MAX_MESSAGE_LENGTH, MessageType, type Frame, type FrameHeader } from './frame.js';
import { Request, Response } from './proto.gen.js';
import type { MessageInit, RequestOf, ResponseOf, ServiceDescriptor } from './codec.js';

/** What a handler knows about the call it serves. */
export interface CallContext {
  readonly service: string;
  readonly method: string;
  readonly streamId: number;
  /** Request metadata; a key may carry several values. */
  readonly metadata: ReadonlyMap<string, readonly string[]>;
  /** When the client stops waiting (epoch ms), from the request's `timeout_nano`; absent: never. */
  readonly deadline: number | undefined;
  /** Aborted when the deadline passes or the connection closes: the reply would go nowhere. */
  readonly signal: AbortSignal;
}

export type RawHandler = (payload: Uint8Array, ctx: CallContext) => Uint8Array | Promise<Uint8Array>;

/** Handlers for some or all methods of a generated service; the others answer UNIMPLEMENTED. */
export type ServiceImpl<S extends ServiceDescriptor> = {
  readonly [K in keyof S['methods']]?: (
    request: RequestOf<S['methods'][K]>,
    ctx: CallContext,
  ) => MessageInit<ResponseOf<S['methods'][K]>> | Promise<MessageInit<ResponseOf<S['methods'][K]>>>;
};

export interface TtrpcServerOptions {
  /** A handler threw something that is not a TtrpcError (answered as UNKNOWN): a bug worth logging. */
  onHandlerError?: (err: unknown, ctx: CallContext) => void;
  /** A client sent something no client should; it was answered or ignored, the connection stays up. */
  onProtocolError?: (err: TtrpcError) => void;
}

/** One served connection. */
export interface ServerConnection {
  close(): void;
  /** Settles once the connection has closed. */
  readonly closed: Promise<void>;
}

/**
 * The serving side of ttrpc. Each request runs as soon as it arrives, so replies go out in the
 * order handlers finish: a long poll such as WaitProcess does not hold up the calls behind it.
 * Error answers follow the Go server: unknown service or method → UNIMPLEMENTED ("service X",
 * "method X"); an undecodable request, an even or non-increasing stream id → INVALID_ARGUMENT; an
 * oversized frame → RESOURCE_EXHAUSTED; a handler's TtrpcError → its code; anything else → UNKNOWN.
 */
export class TtrpcServer {
  private readonly services = new Map<string, ReadonlyMap<string, RawHandler>>();
  private readonly connections = new Set<ServerConnection>();
  private readonly listeners = new Set<net.Server>();

  constructor(private readonly opts: TtrpcServerOptions = {}) {}

  /** Serves a generated service; methods without a handler answer UNIMPLEMENTED "method X". */
  register<S extends ServiceDescriptor>(desc: S, impl: ServiceImpl<S>): this {
    const handlers = new Map<string, RawHandler>();
    for (const [name, m] of Object.entries(desc.methods)) {
      const fn = (impl as Record<string, ((req: unknown, ctx: CallContext) => unknown) | undefined>)[name];
      if (!fn) continue;
      handlers.set(m.name, async (payload, ctx) => {
        let req: unknown;
        try {
          req = m.requestType.decode(payload);
        } catch (e) {
          throw new TtrpcError(GrpcCode.INVALID_ARGUMENT, `cannot decode ${m.requestType.typeName}: ${(e as Error).message}`, { cause: e });
        }
        const res = await fn.call(impl, req, ctx);
        try {
          return m.responseType.encode((res ?? {}) as MessageInit<unknown>);
        } catch (e) {
          throw new TtrpcError(GrpcCode.INTERNAL, `cannot encode ${m.responseType.typeName}: ${(e as Error).message}`, { cause: e });
        }
      });
    }
    return this.registerRaw(desc.name, handlers);
  }

  /** Serves a service given as raw handlers, keyed by bare method name. */
  registerRaw(serviceName: string, methods: ReadonlyMap<string, RawHandler> | Readonly<Record<string, RawHandler>>): this {
    if (this.services.has(serviceName)) throw new Error(`ttrpc: service ${serviceName} is already registered`);
    this.services.set(serviceName, methods instanceof Map ? methods : new Map(Object.entries(methods)));
    return this;
  }

  /** Serves one connection until it closes. */
  serve(stream: Duplex): ServerConnection {
    const conn = new Connection(stream, this.services, this.opts);
    this.connections.add(conn);
    void conn.closed.then(() => this.connections.delete(conn));
    return conn;
  }

  /**
   * Listens on a unix socket and serves every connection. `{ fd }` serves a socket some other
   * process bound and passed down (the shim's `start` binds, its daemon serves).
   */
  async listen(socket: string | { readonly fd: number }): Promise<net.Server> {
    const server = net.createServer((sock) => this.serve(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(typeof socket === 'string' ? socket : { fd: socket.fd }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.listeners.add(server);
    return server;
  }

  /** Stops listening and closes every connection; handlers still running see their signal abort. */
  async close(): Promise<void> {
    const waits = [...this.listeners].map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    this.listeners.clear();
    for (const c of [...this.connections]) c.close();
    await Promise.all([...waits, ...[...this.connections].map((c) => c.closed)]);
  }
}

class Connection implements ServerConnection {
  private readonly channel: FrameChannel;
  private lastStreamId = 0;
  private readonly active = new Map<number, AbortController>();
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;

  constructor(
    stream: Duplex,
    private readonly services: ReadonlyMap<string, ReadonlyMap<string, RawHandler>>,
    private readonly opts: TtrpcServerOptions,
  ) {
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.channel = new FrameChannel(stream, {
      frame: (f) => this.onFrame(f),
      oversize: (h) => this.onOversize(h),
      close: (reason) => this.onClose(reason),
    });
  }

  close(): void {
    this.channel.close();
  }

  private onOversize(h: FrameHeader): void {
    this.protocolError(`oversized frame of ${h.length} bytes on stream ${h.streamId}`);
    this.sendStatus(h.streamId, GrpcCode.RESOURCE_EXHAUSTED, oversizeMessage(h.length, MAX_MESSAGE_LENGTH));
  }

  private onFrame(f: Frame): void {
    if (f.streamId % 2 !== 1) {
      this.protocolError(`even stream id ${f.streamId}`);
      this.sendStatus(f.streamId, GrpcCode.INVALID_ARGUMENT, 'StreamID must be odd for client initiated streams');
      return;
    }
    if (f.type === MessageType.DATA) {
      this.protocolError(`data frame on stream ${f.streamId}`);
      this.sendStatus(f.streamId, GrpcCode.INVALID_ARGUMENT, 'StreamID is no longer active (this server serves unary calls only)');
      return;
    }
    if (f.type !== MessageType.REQUEST) {
      // As the Go server does, for compatibility with future frame types: ignore.
      this.protocolError(`frame of type ${f.type} on stream ${f.streamId} ignored`);
      return;
    }
    if (f.streamId <= this.lastStreamId) {
      this.protocolError(`stream id ${f.streamId} not above ${this.lastStreamId}`);
      this.sendStatus(f.streamId, GrpcCode.INVALID_ARGUMENT, 'StreamID cannot be re-used and must increment');
      return;
    }
    this.lastStreamId = f.streamId;
    let req: Request;
    try {
      req = Request.decode(f.payload);
    } catch (e) {
      this.sendStatus(f.streamId, GrpcCode.INVALID_ARGUMENT, `unmarshal request error: ${(e as Error).message}`);
      return;
    }
    const svc = this.services.get(req.service);
    if (!svc) {
      this.sendStatus(f.streamId, GrpcCode.UNIMPLEMENTED, `service ${req.service}`);
      return;
    }
    const handler = svc.get(req.method);
    if (!handler) {
      this.sendStatus(f.streamId, GrpcCode.UNIMPLEMENTED, `method ${req.method}`);
      return;
    }
    void this.run(f.streamId, req, handler);
  }

  private async run(streamId: number, req: Request, handler: RawHandler): Promise<void> {
    const ac = new AbortController();
    this.active.set(streamId, ac);
    const metadata = new Map<string, string[]>();
    for (const kv of req.metadata) {
      const key = kv.key.toLowerCase();
      metadata.set(key, [...(metadata.get(key) ?? []), kv.value]);
    }
    const timeoutMs = req.timeoutNano > 0n ? Number(req.timeoutNano / 1_000_000n) : 0;
    const timer =
      req.timeoutNano > 0n
        ? setTimeout(() => ac.abort(new TtrpcError(GrpcCode.DEADLINE_EXCEEDED, 'context deadline exceeded')), Math.max(1, timeoutMs))
        : undefined;
    const ctx: CallContext = {
      service: req.service,
      method: req.method,
      streamId,
      metadata,
      deadline: timer ? Date.now() + timeoutMs : undefined,
      signal: ac.signal,
    };
    let code: number = GrpcCode.OK;
    let message = '';
    let payload: Uint8Array = new Uint8Array(0);
    try {
      payload = await handler(req.payload, ctx);
    } catch (e) {
      if (e instanceof TtrpcError) {
        code = e.code;
        message = e.statusMessage;
      } else {
        code = GrpcCode.UNKNOWN;
        message = e instanceof Error ? e.message : String(e);
        this.opts.onHandlerError?.(e, ctx);
      }
    } finally {
      if (timer) clearTimeout(timer);
      this.active.delete(streamId);
    }
    if (this.channel.closed) return;
    if (code !== GrpcCode.OK) {
      this.sendStatus(streamId, code, message);
      return;
    }
    // The Go server always sends a status; an empty one means OK.
    const body = Response.encode({ status: {}, payload });
    if (body.length > MAX_MESSAGE_LENGTH) {
      this.sendStatus(streamId, GrpcCode.RESOURCE_EXHAUSTED, `reply refused: ${oversizeMessage(body.length, MAX_MESSAGE_LENGTH)}`);
      return;
    }
    this.send(streamId, body);
  }

  private sendStatus(streamId: number, code: number, message: string): void {
    this.send(streamId, Response.encode({ status: { code, message } }));
  }

  private send(streamId: number, body: Uint8Array): void {
    if (this.channel.closed) return;
    try {
      this.channel.send(streamId, MessageType.RESPONSE, 0, body);
    } catch (e) {
      this.protocolError(`cannot answer stream ${streamId}: ${(e as Error).message}`);
    }
  }

  private onClose(reason: TtrpcError): void {
    for (const ac of this.active.values()) ac.abort(reason);
    this.active.clear();
    this.resolveClosed();
  }

  private protocolError(message: string): void {
    this.opts.onProtocolError?.(new TtrpcError(GrpcCode.INVALID_ARGUMENT, `ttrpc: ${message}`));
  }
}
