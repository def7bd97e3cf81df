import net from 'node:net';
import type { Duplex } from 'node:stream';
import { FrameChannel } from './channel.js';
import { GrpcCode } from './codes.js';
import { TtrpcError, oversizeMessage } from './errors.js';
import { FrameBudget, MAX_MESSAGE_LENGTH, MessageType, type Frame, type FrameHeader } from './frame.js';
import { Request, Response } from './proto.gen.js';
import { setLongTimeout } from './timer.js';
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

/** How a service's methods are served. */
export interface RegisterOptions<M extends string = string> {
  /**
   * Methods whose calls wait, for as long as it takes, on something the client cannot hasten: a
   * process's exit (the shim's Wait, the agent's WaitProcess). containerd keeps one connection to
   * a shim and one Wait open per process it waits on, so such calls must not hold up the others:
   * they are "parked", counted apart from {@link ServerLimits.maxInFlightPerConnection} and never
   * a reason to stop reading. They are bounded by {@link ServerLimits.maxParkedPerConnection} and
   * {@link ServerLimits.maxParkedBytesPerConnection} instead; a parked call beyond either is
   * answered RESOURCE_EXHAUSTED at once (pausing would stall the connection until a process
   * ends, which may be never). Meant for calls with small requests and bounded replies: the
   * reply of a parked call that ends while the client does not read is written all the same.
   */
  readonly parked?: readonly M[];
}

/**
 * What a server lets its clients make it hold. A client that writes faster than it reads is slowed
 * down (its connection is no longer read), never answered with an error; one that would make the
 * server hold too much of a frame, or takes too long to send one, is disconnected. Parked calls
 * (see {@link RegisterOptions.parked}) have caps of their own, beyond which they are refused.
 */
export interface ServerLimits {
  /** Bytes of partial (started, unfinished) request frames of all connections together (four frames of the largest size); a connection whose frame does not fit is closed. 16 MiB. */
  maxBufferedFrameBytes: number;
  /** Once a request frame has started, its last byte must arrive within this time, or the connection is closed; 0: no limit. 30 s. */
  frameTimeoutMs: number;
  /** Calls of one connection running at once, parked ones aside; beyond it, the connection is not read until one ends. 128. */
  maxInFlightPerConnection: number;
  /** Request bytes of one connection's running calls, parked ones aside; beyond it, the connection is not read until calls end. 16 MiB. */
  maxInFlightBytesPerConnection: number;
  /** Parked calls of one connection at once; one more is answered RESOURCE_EXHAUSTED. 4096. */
  maxParkedPerConnection: number;
  /** Request bytes of one connection's parked calls (containerd's Wait request, with an exec id and its namespace, is some 200 bytes); a parked call that would go beyond is answered RESOURCE_EXHAUSTED. 4 MiB. */
  maxParkedBytesPerConnection: number;
  /** Reply bytes written to one connection but not yet read by its client; beyond it, the connection is not read until they drain. 1 MiB. */
  maxPendingReplyBytes: number;
}

export const DEFAULT_SERVER_LIMITS: Readonly<ServerLimits> = Object.freeze({
  maxBufferedFrameBytes: 16 << 20,
  frameTimeoutMs: 30_000,
  maxInFlightPerConnection: 128,
  maxInFlightBytesPerConnection: 16 << 20,
  maxParkedPerConnection: 4096,
  maxParkedBytesPerConnection: 4 << 20,
  maxPendingReplyBytes: 1 << 20,
});

/** What a server holds now, for tests and diagnostics. */
export interface ServerStats {
  readonly connections: number;
  /** Bytes held for partial request frames, all connections together. */
  readonly bufferedFrameBytes: number;
  /** The most {@link bufferedFrameBytes} ever was. */
  readonly peakBufferedFrameBytes: number;
  /** Calls running, parked ones included. */
  readonly inFlight: number;
  /** Request bytes of the calls running, parked ones included. */
  readonly inFlightBytes: number;
  /** Parked calls running (see {@link RegisterOptions.parked}). */
  readonly parked: number;
  /** Frames decoded but not yet dispatched (their connection is held back). */
  readonly queuedFrames: number;
  /** Reply bytes written but not yet read by the clients. */
  readonly pendingReplyBytes: number;
  /** Connections not being read now (held back by a limit). */
  readonly pausedConnections: number;
}

export interface TtrpcServerOptions {
  /** A handler threw something that is not a TtrpcError (answered as UNKNOWN): a bug worth logging. */
  onHandlerError?: (err: unknown, ctx: CallContext) => void;
  /** A client sent something no client should; it was answered or ignored, the connection stays up. */
  onProtocolError?: (err: TtrpcError) => void;
  /** A connection was closed, or a reply replaced, because of a limit (see {@link ServerLimits} and the frame size limit). */
  onLimit?: (message: string) => void;
  limits?: Partial<ServerLimits>;
}

/** One served connection. */
export interface ServerConnection {
  close(): void;
  /** Settles once the connection has closed. */
  readonly closed: Promise<void>;
}

interface ConnectionStats {
  inFlight: number;
  inFlightBytes: number;
  parked: number;
  queuedFrames: number;
  pendingReplyBytes: number;
  paused: boolean;
}

/** A method's handler, and whether its calls are parked. */
interface Method {
  readonly handler: RawHandler;
  readonly parked: boolean;
}

/**
 * The serving side of ttrpc. Each request runs as soon as it arrives, so replies go out in the
 * order handlers finish: a long poll such as WaitProcess does not hold up the calls behind it, and
 * as a parked call (see {@link RegisterOptions.parked}) it does not count toward the calls that
 * stop the connection being read.
 * Error answers follow the Go server: unknown service or method → UNIMPLEMENTED ("service X",
 * "method X"); an undecodable request, an even or non-increasing stream id → INVALID_ARGUMENT; an
 * oversized request frame → RESOURCE_EXHAUSTED, then the connection is closed (its sender is not
 * a ttrpc client we can serve); a reply over the frame limit → RESOURCE_EXHAUSTED instead; a
 * handler's TtrpcError → its code; anything else → UNKNOWN. What a client can make the server hold
 * is bounded by {@link ServerLimits}.
 */
export class TtrpcServer {
  private readonly services = new Map<string, ReadonlyMap<string, Method>>();
  private readonly connections = new Set<Connection>();
  private readonly listeners = new Set<net.Server>();
  private readonly limits: Readonly<ServerLimits>;
  private readonly budget: FrameBudget;

  constructor(private readonly opts: TtrpcServerOptions = {}) {
    this.limits = { ...DEFAULT_SERVER_LIMITS, ...opts.limits };
    this.budget = new FrameBudget(this.limits.maxBufferedFrameBytes);
  }

  /** What the server holds now. */
  stats(): ServerStats {
    const per = [...this.connections].map((c) => c.stats());
    const sum = (f: (s: ConnectionStats) => number) => per.reduce((n, s) => n + f(s), 0);
    return {
      connections: per.length,
      bufferedFrameBytes: this.budget.used,
      peakBufferedFrameBytes: this.budget.peak,
      inFlight: sum((s) => s.inFlight),
      inFlightBytes: sum((s) => s.inFlightBytes),
      parked: sum((s) => s.parked),
      queuedFrames: sum((s) => s.queuedFrames),
      pendingReplyBytes: sum((s) => s.pendingReplyBytes),
      pausedConnections: sum((s) => (s.paused ? 1 : 0)),
    };
  }

  /** Serves a generated service; methods without a handler answer UNIMPLEMENTED "method X". */
  register<S extends ServiceDescriptor>(desc: S, impl: ServiceImpl<S>, opts: RegisterOptions<Extract<keyof S['methods'], string>> = {}): this {
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
    return this.registerRaw(desc.name, handlers, { parked: opts.parked?.map((k) => desc.methods[k]!.name) });
  }

  /** Serves a service given as raw handlers, keyed by bare method name. */
  registerRaw(serviceName: string, methods: ReadonlyMap<string, RawHandler> | Readonly<Record<string, RawHandler>>, opts: RegisterOptions = {}): this {
    if (this.services.has(serviceName)) throw new Error(`ttrpc: service ${serviceName} is already registered`);
    const handlers = methods instanceof Map ? methods : new Map(Object.entries(methods));
    const parked = new Set(opts.parked);
    // A misspelt name would leave the calls it means able to stall the connection: say so now.
    for (const name of parked) if (!handlers.has(name)) throw new Error(`ttrpc: parked method ${serviceName}/${name} has no handler`);
    this.services.set(serviceName, new Map([...handlers].map(([name, handler]) => [name, { handler, parked: parked.has(name) }])));
    return this;
  }

  /** Serves one connection until it closes. */
  serve(stream: Duplex): ServerConnection {
    const conn = new Connection(stream, this.services, this.opts, this.limits, this.budget);
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
  /** Request bytes of the running calls that are not parked. */
  private inFlightBytes = 0;
  private parked = 0;
  private parkedBytes = 0;
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;

  constructor(
    stream: Duplex,
    private readonly services: ReadonlyMap<string, ReadonlyMap<string, Method>>,
    private readonly opts: TtrpcServerOptions,
    private readonly limits: Readonly<ServerLimits>,
    budget: FrameBudget,
  ) {
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.channel = new FrameChannel(
      stream,
      {
        frame: (f) => this.onFrame(f),
        oversize: (h) => this.onOversize(h),
        close: (reason) => this.onClose(reason),
        ready: () => this.ready(),
        refused: (reason) => this.opts.onLimit?.(`ttrpc: connection closed: ${reason}`),
      },
      { budget, frameTimeoutMs: limits.frameTimeoutMs },
    );
    // Replies the client did not read have drained: it may be read from again.
    stream.on('drain', () => this.channel.pump());
  }

  close(): void {
    this.channel.close();
  }

  stats(): ConnectionStats {
    return {
      inFlight: this.active.size,
      inFlightBytes: this.inFlightBytes + this.parkedBytes,
      parked: this.parked,
      queuedFrames: this.channel.queuedFrames,
      pendingReplyBytes: this.channel.pendingWriteBytes,
      paused: this.channel.readPaused,
    };
  }

  /** Parked calls are left out: they may run until a process ends, and the calls behind them must not wait for that. */
  private ready(): boolean {
    return (
      this.active.size - this.parked < this.limits.maxInFlightPerConnection &&
      this.inFlightBytes < this.limits.maxInFlightBytesPerConnection &&
      this.channel.pendingWriteBytes <= this.limits.maxPendingReplyBytes
    );
  }

  private onOversize(h: FrameHeader): void {
    // Skipping up to 4 GiB the client claims to send would keep the connection busy for nothing.
    this.opts.onLimit?.(`ttrpc: connection closed: request frame of ${h.length} bytes on stream ${h.streamId} is over the ${MAX_MESSAGE_LENGTH}-byte limit`);
    this.sendStatus(h.streamId, GrpcCode.RESOURCE_EXHAUSTED, oversizeMessage(h.length, MAX_MESSAGE_LENGTH));
    this.channel.closeAfterFlush();
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
    const m = svc.get(req.method);
    if (!m) {
      this.sendStatus(f.streamId, GrpcCode.UNIMPLEMENTED, `method ${req.method}`);
      return;
    }
    if (m.parked && (this.parked >= this.limits.maxParkedPerConnection || this.parkedBytes + f.length > this.limits.maxParkedBytesPerConnection)) {
      const why = `${this.parked} parked calls of ${this.parkedBytes} bytes already wait on this connection (limits ${this.limits.maxParkedPerConnection} calls, ${this.limits.maxParkedBytesPerConnection} bytes)`;
      this.opts.onLimit?.(`ttrpc: ${req.service}/${req.method} on stream ${f.streamId} refused: ${why}`);
      this.sendStatus(f.streamId, GrpcCode.RESOURCE_EXHAUSTED, `call refused: ${why}`);
      return;
    }
    void this.run(f.streamId, req, m, f.length);
  }

  private async run(streamId: number, req: Request, { handler, parked }: Method, size: number): Promise<void> {
    const ac = new AbortController();
    this.active.set(streamId, ac);
    if (parked) {
      this.parked++;
      this.parkedBytes += size;
    } else this.inFlightBytes += size;
    const metadata = new Map<string, string[]>();
    for (const kv of req.metadata) {
      const key = kv.key.toLowerCase();
      metadata.set(key, [...(metadata.get(key) ?? []), kv.value]);
    }
    const timeoutMs = req.timeoutNano > 0n ? Number(req.timeoutNano / 1_000_000n) : 0;
    const cancelTimer =
      req.timeoutNano > 0n ? setLongTimeout(() => ac.abort(new TtrpcError(GrpcCode.DEADLINE_EXCEEDED, 'context deadline exceeded')), timeoutMs) : undefined;
    const ctx: CallContext = {
      service: req.service,
      method: req.method,
      streamId,
      metadata,
      deadline: cancelTimer ? Date.now() + timeoutMs : undefined,
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
      cancelTimer?.();
      this.active.delete(streamId);
      if (parked) {
        this.parked--;
        this.parkedBytes -= size;
      } else this.inFlightBytes -= size;
    }
    if (this.channel.closed) return;
    if (code !== GrpcCode.OK) this.sendStatus(streamId, code, message);
    // The Go server always sends a status; an empty one means OK.
    else this.sendChecked(streamId, Response.encode({ status: {}, payload }));
    this.channel.pump();
  }

  private sendStatus(streamId: number, code: number, message: string): void {
    this.sendChecked(streamId, Response.encode({ status: { code, message } }));
  }

  /** A reply over the frame limit (a big payload, or a status message quoting a huge request) becomes RESOURCE_EXHAUSTED. */
  private sendChecked(streamId: number, body: Uint8Array): void {
    if (body.length > MAX_MESSAGE_LENGTH) {
      const why = oversizeMessage(body.length, MAX_MESSAGE_LENGTH);
      this.opts.onLimit?.(`ttrpc: reply on stream ${streamId} replaced by RESOURCE_EXHAUSTED: ${why}`);
      body = Response.encode({ status: { code: GrpcCode.RESOURCE_EXHAUSTED, message: `reply refused: ${why}` } });
    }
    this.send(streamId, body);
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
