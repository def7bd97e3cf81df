/**
 * A QMP client (QEMU Machine Protocol, docs/interop/qmp-spec.rst) over a unix socket.
 *
 * Unlike Kata's govmm, which keeps exactly one command in flight and never uses `id`, every
 * command here carries a numeric `id` and replies are matched by it, so callers may have several
 * commands outstanding (QEMU still executes in-band commands one at a time, in order). Events are
 * delivered to listeners and kept in a small backlog, so a caller can take a cursor before sending
 * a command and wait afterwards for an event the command causes without losing one that arrived
 * in between (`device_del` → `DEVICE_DELETED`).
 *
 * Errors are coded: a QMP error reply is a {@link QmpError} (KATA_ERR_QMP, with QEMU's `class` and
 * `desc`), no answer in time is KATA_ERR_QMP_TIMEOUT (a late reply is then dropped), and a closed
 * connection rejects everything pending with KATA_ERR_QMP_CLOSED.
 */
import net from 'node:net';
import { KataError, errorText, silentLogger, type Logger } from '../../core/plugin-api.js';
import { PLUGIN_NAME } from './config.js';

/** QMP's version triple, from the greeting. */
export interface QemuVersion {
  readonly major: number;
  readonly minor: number;
  readonly micro: number;
  /** Distribution package string, e.g. `Debian 1:7.2+dfsg-7`. */
  readonly package: string;
}

export interface QmpGreeting {
  readonly version: QemuVersion;
  /** Capabilities the server offers (`oob`); none are enabled by this client. */
  readonly capabilities: readonly string[];
}

export interface QmpEvent {
  readonly event: string;
  readonly data: Record<string, unknown>;
  readonly timestamp: { readonly seconds: number; readonly microseconds: number } | undefined;
  /** Order of arrival on this connection, from 1; see {@link QmpClient.eventCursor}. */
  readonly seq: number;
}

/** The oldest QEMU this client accepts, as govmm does (`query-named-block-nodes` `flat`, stable `blockdev-del`). */
export const MIN_QEMU_VERSION = Object.freeze({ major: 5, minor: 0 });

export const QMP_DEFAULTS = Object.freeze({
  /** Connect + greeting + capabilities negotiation. */
  handshakeTimeoutMs: 5_000,
  commandTimeoutMs: 10_000,
  /** Events kept for {@link QmpClient.waitForEvent}'s `since`. */
  eventBacklog: 256,
  /** A line longer than this (no newline in sight) is a broken peer: the connection is closed. */
  maxLineBytes: 16 * 1024 * 1024,
});

export interface QmpClientOptions {
  readonly log?: Logger;
  readonly handshakeTimeoutMs?: number;
  /** Default per-command timeout; `execute(…, { timeoutMs })` overrides it. */
  readonly commandTimeoutMs?: number;
  readonly eventBacklog?: number;
  /**
   * Called for every line that is not valid QMP (bad JSON, an unknown message shape, a reply
   * nobody waits for). The connection goes on; the default only logs a warning.
   */
  readonly onProtocolError?: (error: KataError, line: string) => void;
}

/** A QMP error reply: `{"error": {"class": …, "desc": …}}`. */
export class QmpError extends KataError {
  /** QEMU's error class, e.g. `GenericError`, `DeviceNotFound`, `CommandNotFound`. */
  readonly class: string;
  /** QEMU's description. */
  readonly desc: string;
  /** The command that failed. */
  readonly command: string;

  constructor(command: string, errorClass: string, desc: string) {
    super('KATA_ERR_QMP', `QMP ${command}: ${errorClass}: ${desc}`, { plugin: PLUGIN_NAME });
    this.name = 'QmpError';
    this.class = errorClass;
    this.desc = desc;
    this.command = command;
  }
}

interface Pending {
  readonly command: string;
  readonly resolve: (value: unknown) => void;
  readonly reject: (error: KataError) => void;
  readonly timer: NodeJS.Timeout | undefined;
}

interface EventWaiter {
  readonly name: string;
  readonly predicate: (e: QmpEvent) => boolean;
  readonly resolve: (e: QmpEvent) => void;
  readonly reject: (error: KataError) => void;
  readonly timer: NodeJS.Timeout;
}

type Message = Record<string, unknown>;

const MAX_ABANDONED = 1024;

export class QmpClient {
  /** Connects to QEMU's QMP socket, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(socketPath: string, opts: QmpClientOptions = {}): Promise<QmpClient> {
    const socket = net.connect(socketPath);
    return QmpClient.handshake(socket, opts, socketPath);
  }

  /** As {@link connect}, on a socket the caller opened (connected or connecting). */
  static async handshake(socket: net.Socket, opts: QmpClientOptions = {}, label = 'QMP socket'): Promise<QmpClient> {
    const client = new QmpClient(socket, opts, label);
    try {
      await client.#negotiate(opts.handshakeTimeoutMs ?? QMP_DEFAULTS.handshakeTimeoutMs);
      return client;
    } catch (e) {
      client.close();
      throw e;
    }
  }

  readonly #socket: net.Socket;
  readonly #label: string;
  readonly #log: Logger;
  readonly #commandTimeoutMs: number;
  readonly #backlogSize: number;
  readonly #onProtocolError: (error: KataError, line: string) => void;
  readonly #pending = new Map<number, Pending>();
  /** Ids of commands that timed out: their replies, if they come, are dropped quietly. */
  readonly #abandoned = new Set<number>();
  readonly #waiters = new Set<EventWaiter>();
  readonly #listeners = new Set<(e: QmpEvent) => void>();
  readonly #closeListeners = new Set<(cause: KataError) => void>();
  readonly #backlog: QmpEvent[] = [];
  #buffer = '';
  #nextId = 1;
  #seq = 0;
  #greeting: QmpGreeting | undefined;
  #onGreeting: ((g: Message) => void) | undefined;
  #closed: KataError | undefined;
  #socketError: Error | undefined;

  private constructor(socket: net.Socket, opts: QmpClientOptions, label: string) {
    this.#socket = socket;
    this.#label = label;
    this.#log = (opts.log ?? silentLogger()).child({ qmp: label });
    this.#commandTimeoutMs = opts.commandTimeoutMs ?? QMP_DEFAULTS.commandTimeoutMs;
    this.#backlogSize = opts.eventBacklog ?? QMP_DEFAULTS.eventBacklog;
    this.#onProtocolError = opts.onProtocolError ?? ((err) => this.#log.warn({ err }, 'QMP protocol error'));
    socket.setEncoding('utf8'); // a StringDecoder: multi-byte characters split across chunks stay whole
    socket.on('data', (chunk: string) => this.#onData(chunk));
    socket.on('error', (err) => (this.#socketError ??= err));
    socket.on('close', () => this.#shutdown(this.#closedError('the connection closed')));
  }

  /** The greeting's version and capabilities (after a successful handshake). */
  get greeting(): QmpGreeting {
    if (!this.#greeting) throw new KataError('KATA_ERR_INTERNAL', 'QMP greeting read before the handshake', { plugin: PLUGIN_NAME });
    return this.#greeting;
  }

  /** `major.minor.micro` of the QEMU on the other end. */
  get version(): string {
    const v = this.greeting.version;
    return `${v.major}.${v.minor}.${v.micro}`;
  }

  get closed(): boolean {
    return this.#closed !== undefined;
  }

  /** Sequence number of the last event received: pass it as `since` to {@link waitForEvent}. */
  get eventCursor(): number {
    return this.#seq;
  }

  /** Number of commands sent and not yet answered (timed-out ones excluded). */
  get pendingCount(): number {
    return this.#pending.size;
  }

  /**
   * Sends a command and resolves with its `return` value. Rejects with a {@link QmpError}
   * (KATA_ERR_QMP) on an error reply, KATA_ERR_QMP_TIMEOUT when no reply comes in time, and
   * KATA_ERR_QMP_CLOSED when the connection is or becomes closed.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    return this.#send(command, args, opts.timeoutMs ?? this.#commandTimeoutMs) as Promise<T>;
  }

  /** Calls `listener` for every event; returns the function that unsubscribes it. */
  onEvent(listener: (e: QmpEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Calls `listener` once when the connection closes (at once if it already has). */
  onClose(listener: (cause: KataError) => void): () => void {
    if (this.#closed) {
      listener(this.#closed);
      return () => undefined;
    }
    this.#closeListeners.add(listener);
    return () => this.#closeListeners.delete(listener);
  }

  /**
   * Resolves with the first event named `name` that satisfies `predicate`. Without `since`, only
   * events arriving after the call count. With `since` (an earlier {@link eventCursor}), events that
   * arrived after that cursor count too, so that
   *
   *     const mark = qmp.eventCursor; await qmp.execute('device_del', …);
   *     await qmp.waitForEvent('DEVICE_DELETED', (e) => e.data.device === id, 5000, { since: mark });
   *
   * cannot miss an event that came before the reply. The backlog holds the last 256 events by
   * default. Rejects with KATA_ERR_QMP_TIMEOUT or KATA_ERR_QMP_CLOSED.
   */
  waitForEvent(name: string, predicate: (e: QmpEvent) => boolean = () => true, timeoutMs = this.#commandTimeoutMs, opts: { since?: number } = {}): Promise<QmpEvent> {
    if (opts.since !== undefined) {
      const seen = this.#backlog.find((e) => e.seq > (opts.since as number) && e.event === name && predicate(e));
      if (seen) return Promise.resolve(seen);
    }
    if (this.#closed) return Promise.reject(this.#closedError(`the connection is closed; no ${name} event will come`));
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        predicate,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.#waiters.delete(waiter);
          reject(new KataError('KATA_ERR_QMP_TIMEOUT', `no ${name} event from QEMU within ${timeoutMs} ms`, { plugin: PLUGIN_NAME }));
        }, timeoutMs),
      };
      this.#waiters.add(waiter);
    });
  }

  /** Closes the connection; pending commands and event waits reject with KATA_ERR_QMP_CLOSED. */
  close(): void {
    this.#shutdown(this.#closedError('the connection was closed by the runtime'));
    this.#socket.destroy();
  }

  // -------------------------------------------------------------------------------------------

  async #negotiate(timeoutMs: number): Promise<void> {
    const deadline = setTimeout(() => {
      this.#shutdown(new KataError('KATA_ERR_QMP_TIMEOUT', `no QMP greeting and capabilities negotiation on ${this.#label} within ${timeoutMs} ms`, { plugin: PLUGIN_NAME }));
      this.#socket.destroy();
    }, timeoutMs);
    try {
      let unsubscribe = () => undefined as unknown;
      const raw = await new Promise<Message>((resolve, reject) => {
        this.#onGreeting = resolve;
        unsubscribe = this.onClose(reject);
      }).finally(() => unsubscribe());
      this.#onGreeting = undefined;
      this.#greeting = parseGreeting(raw);
      const v = this.#greeting.version;
      if (v.major < MIN_QEMU_VERSION.major || (v.major === MIN_QEMU_VERSION.major && v.minor < MIN_QEMU_VERSION.minor)) {
        throw new KataError('KATA_ERR_QMP', `QEMU ${this.version} is older than ${MIN_QEMU_VERSION.major}.${MIN_QEMU_VERSION.minor}, the oldest this runtime drives`, {
          plugin: PLUGIN_NAME,
          fix: `Install QEMU ${MIN_QEMU_VERSION.major}.${MIN_QEMU_VERSION.minor} or newer (the Debian package qemu-system-x86).`,
        });
      }
      await this.#send('qmp_capabilities', undefined, timeoutMs);
    } finally {
      clearTimeout(deadline);
    }
  }

  #send(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<unknown> {
    if (this.#closed) return Promise.reject(this.#closedError(`the connection is closed; ${command} cannot be sent`));
    const id = this.#nextId++;
    const line = `${JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id })}\n`;
    return new Promise((resolve, reject) => {
      const timer =
        timeoutMs > 0 && Number.isFinite(timeoutMs)
          ? setTimeout(() => {
              this.#pending.delete(id);
              this.#abandoned.add(id);
              // A hung QEMU may never answer: remember only the most recent ones.
              if (this.#abandoned.size > MAX_ABANDONED) this.#abandoned.delete(this.#abandoned.values().next().value as number);
              reject(new KataError('KATA_ERR_QMP_TIMEOUT', `QMP ${command}: no answer from QEMU within ${timeoutMs} ms`, { plugin: PLUGIN_NAME }));
            }, timeoutMs)
          : undefined;
      this.#pending.set(id, { command, resolve, reject, timer });
      this.#socket.write(line);
    });
  }

  #onData(chunk: string): void {
    this.#buffer += chunk;
    let nl: number;
    while ((nl = this.#buffer.indexOf('\n')) >= 0) {
      const line = this.#buffer.slice(0, nl).replace(/\r$/, '');
      this.#buffer = this.#buffer.slice(nl + 1);
      if (line.trim() !== '') this.#onLine(line);
      if (this.#closed) return;
    }
    if (this.#buffer.length > QMP_DEFAULTS.maxLineBytes) {
      this.#protocolError(`a QMP message longer than ${QMP_DEFAULTS.maxLineBytes} bytes without a line end; closing the connection`, this.#buffer.slice(0, 200));
      this.#shutdown(this.#closedError('the peer sent an unterminated message'));
      this.#socket.destroy();
    }
  }

  #onLine(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch (e) {
      this.#protocolError(`a line from QEMU is not JSON (${(e as Error).message})`, line);
      return;
    }
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
      this.#protocolError('a line from QEMU is not a JSON object', line);
      return;
    }
    const m = msg as Message;
    if (typeof m.event === 'string') this.#onEventMessage(m);
    else if ('return' in m || 'error' in m) this.#onReply(m, line);
    else if ('QMP' in m && this.#onGreeting) this.#onGreeting(m);
    else this.#protocolError('a QMP message that is neither a reply, an event nor an expected greeting', line);
  }

  #onReply(m: Message, line: string): void {
    const id = m.id;
    const pending = typeof id === 'number' ? this.#pending.get(id) : undefined;
    if (!pending) {
      if (typeof id === 'number' && this.#abandoned.delete(id)) {
        this.#log.debug({ id }, 'late QMP reply to a timed-out command dropped');
        return;
      }
      this.#protocolError(id === undefined ? 'a QMP reply without an id' : `a QMP reply with an unknown id ${JSON.stringify(id)}`, line);
      return;
    }
    this.#pending.delete(id as number);
    if (pending.timer) clearTimeout(pending.timer);
    if ('error' in m) {
      const err = (m.error ?? {}) as { class?: unknown; desc?: unknown };
      pending.reject(new QmpError(pending.command, String(err.class ?? 'GenericError'), String(err.desc ?? '')));
    } else {
      pending.resolve(m.return);
    }
  }

  #onEventMessage(m: Message): void {
    const ts = m.timestamp as { seconds?: unknown; microseconds?: unknown } | undefined;
    const event: QmpEvent = Object.freeze({
      event: m.event as string,
      data: (m.data !== null && typeof m.data === 'object' ? m.data : {}) as Record<string, unknown>,
      timestamp: ts && typeof ts.seconds === 'number' ? { seconds: ts.seconds, microseconds: Number(ts.microseconds ?? 0) } : undefined,
      seq: ++this.#seq,
    });
    this.#backlog.push(event);
    if (this.#backlog.length > this.#backlogSize) this.#backlog.shift();
    this.#log.debug({ event: event.event, data: event.data }, 'QMP event');
    for (const listener of [...this.#listeners]) {
      try {
        listener(event);
      } catch (err) {
        this.#log.error({ err, event: event.event }, 'QMP event listener threw');
      }
    }
    for (const w of [...this.#waiters]) {
      if (w.name !== event.event) continue;
      let match: boolean;
      try {
        match = w.predicate(event);
      } catch {
        match = false;
      }
      if (!match) continue;
      clearTimeout(w.timer);
      this.#waiters.delete(w);
      w.resolve(event);
    }
  }

  #protocolError(what: string, line: string): void {
    const err = new KataError('KATA_ERR_QMP', `${what}: ${line.length > 200 ? `${line.slice(0, 200)}…` : line}`, { plugin: PLUGIN_NAME });
    try {
      this.#onProtocolError(err, line);
    } catch (e) {
      this.#log.error({ err: e }, 'QMP protocol error handler threw');
    }
  }

  #closedError(what: string): KataError {
    const cause = this.#socketError;
    return new KataError('KATA_ERR_QMP_CLOSED', `QMP ${this.#label}: ${what}${cause ? ` (${cause.message})` : ''}`, { plugin: PLUGIN_NAME, cause });
  }

  /** Marks the connection closed (once) and rejects everything that waits on it. */
  #shutdown(cause: KataError): void {
    if (this.#closed) return;
    this.#closed = cause;
    const closed = cause.code === 'KATA_ERR_QMP_CLOSED';
    for (const p of this.#pending.values()) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(closed ? new KataError('KATA_ERR_QMP_CLOSED', `QMP ${p.command}: no answer, ${errorText(cause)}`, { plugin: PLUGIN_NAME, cause }) : cause);
    }
    this.#pending.clear();
    for (const w of this.#waiters) {
      clearTimeout(w.timer);
      w.reject(closed ? new KataError('KATA_ERR_QMP_CLOSED', `no ${w.name} event, ${errorText(cause)}`, { plugin: PLUGIN_NAME, cause }) : cause);
    }
    this.#waiters.clear();
    this.#abandoned.clear();
    for (const l of [...this.#closeListeners]) {
      try {
        l(cause);
      } catch (err) {
        this.#log.error({ err }, 'QMP close listener threw');
      }
    }
    this.#closeListeners.clear();
  }
}

function parseGreeting(raw: Message): QmpGreeting {
  const qmp = (raw.QMP ?? {}) as { version?: { qemu?: Partial<Record<'major' | 'minor' | 'micro', unknown>>; package?: unknown }; capabilities?: unknown };
  const q = qmp.version?.qemu ?? {};
  const num = (v: unknown) => (typeof v === 'number' && Number.isInteger(v) ? v : NaN);
  const version = { major: num(q.major), minor: num(q.minor), micro: num(q.micro), package: String(qmp.version?.package ?? '').trim() };
  if ([version.major, version.minor, version.micro].some(Number.isNaN)) {
    throw new KataError('KATA_ERR_QMP', `the QMP greeting has no version: ${JSON.stringify(raw).slice(0, 200)}`, { plugin: PLUGIN_NAME });
  }
  const capabilities = Array.isArray(qmp.capabilities) ? qmp.capabilities.map(String) : [];
  return Object.freeze({ version: Object.freeze(version), capabilities: Object.freeze(capabilities) });
}
