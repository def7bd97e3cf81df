/**
 * Where the shim's log lines go besides stderr: containerd's log pipe and the host's system log.
 *
 *   const fifo = logFifo(path.join(bundle, 'log'));
 *   const sys = systemLog();
 *   const log = createLogger({ level, name: 'kata', sinks: [fifo, sys] });
 *   …
 *   await closeSinks([fifo, sys]);
 *
 * A sink never throws and never blocks the shim: a line it cannot deliver now is dropped and
 * counted (`stats().dropped`). Sinks open on the logger's first line (pino is loaded then too), so a
 * command that logs nothing pays for none of this. A sink that cannot work on this host says why
 * once, as a warning the logger writes to the other sinks (e.g. "no system log here" goes to the
 * log pipe); it is never an error.
 *
 * - {@link logFifo}: containerd creates a FIFO named `log` in the bundle and opens it O_RDWR itself,
 *   so it always has a reader while containerd runs. We open it O_WRONLY|O_NONBLOCK|O_NOFOLLOW and
 *   check that what opened is a FIFO: a symlink, a regular file or a device there is refused for
 *   good (with a warning on the other sinks), never written to. Each line goes out
 *   with one non-blocking write: a full pipe (EAGAIN) drops the line, a vanished reader (EPIPE;
 *   Node ignores SIGPIPE) closes the sink. A line longer than PIPE_BUF may be written in part; its
 *   remainder is finished before any later line, so a reader never sees two lines interleaved.
 * - {@link systemLog}: the journal when `/run/systemd/journal/stdout` exists (journald's stream
 *   protocol over a SOCK_STREAM socket, which Node's `net` speaks), else syslog when `/dev/log` exists
 *   (a SOCK_DGRAM socket, which Node cannot open: a long-lived util-linux `logger` child reads our
 *   lines on its stdin and sends one datagram each), else nothing, with one warning. Identifier
 *   `kata`, as Kata's own runtime tags its syslog lines.
 */
import { closeSync, fstatSync, lstatSync, openSync, statSync, writeSync, constants as fsc, type Stats } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';

import type { LogSink, SinkStats } from '../core/logger.js';

export type { LogSink, SinkStats };

const require = createRequire(import.meta.url);

/** pino level → syslog severity (journald takes the same numbers). */
export function syslogSeverity(level: number): number {
  if (level >= 60) return 2; // crit
  if (level >= 50) return 3; // err
  if (level >= 40) return 4; // warning
  if (level >= 30) return 6; // info
  return 7; // debug
}

/** Closes every sink, waiting for each to hand over what it still holds. */
export async function closeSinks(sinks: readonly LogSink[]): Promise<void> {
  await Promise.all(sinks.map((s) => s.close()));
}

class Counter {
  written = 0;
  dropped = 0;
  lastError: string | undefined;
  snapshot(): SinkStats {
    return { written: this.written, dropped: this.dropped, lastError: this.lastError };
  }
}

function errCode(e: unknown): string {
  return (e as NodeJS.ErrnoException)?.code ?? (e instanceof Error ? e.message : String(e));
}

// ---------------------------------------------------------------------------------------------
// containerd's log pipe

export interface LogFifoOptions {
  /** After a failed open (no reader yet), try again at most this often on later lines. Default 1000 ms. */
  reopenIntervalMs?: number;
  /**
   * The path turned out not to be a FIFO on a later open (the first open's refusal is the warning
   * `open()` returns). Called once, outside any write; log it through the other sinks.
   */
  onRefused?: (message: string) => void;
}

class FifoSink implements LogSink {
  readonly name: string;
  readonly #path: string;
  readonly #reopenMs: number;
  readonly #onRefused: ((message: string) => void) | undefined;
  readonly #c = new Counter();
  #fd = -1;
  #closed = false;
  /** Not a FIFO: never opened again. */
  #refused: string | undefined;
  #opened = false;
  #lastOpenAttempt = 0;
  /** The unwritten tail of a line that went out in part. */
  #pending: Buffer | undefined;
  #retry: NodeJS.Timeout | undefined;

  constructor(file: string, opts: LogFifoOptions) {
    this.#path = file;
    this.name = `fifo:${file}`;
    this.#reopenMs = opts.reopenIntervalMs ?? 1000;
    this.#onRefused = opts.onRefused;
  }

  open(): string | undefined {
    const err = this.#tryOpen();
    this.#opened = true;
    if (err === undefined) return undefined;
    if (this.#refused) return this.#refused;
    return `cannot open the containerd log pipe ${this.#path} (${err}); its lines are dropped until it opens`;
  }

  #tryOpen(): string | undefined {
    this.#lastOpenAttempt = Date.now();
    // Opening is itself an action on some files (a device): look before opening, check after.
    const seen = lstatOrUndefined(this.#path);
    if (seen && !seen.isFIFO()) {
      this.#c.lastError = 'ENOTFIFO';
      this.#refuse(`it is ${seen.isSymbolicLink() ? 'a symlink' : describeFile(seen)}`);
      return this.#c.lastError;
    }
    let fd: number;
    try {
      // ENXIO when no process has the FIFO open for reading: O_NONBLOCK never waits for one.
      // ELOOP for a symlink: whoever can write the bundle must not steer our lines into a file.
      fd = openSync(this.#path, fsc.O_WRONLY | fsc.O_NONBLOCK | fsc.O_NOFOLLOW);
    } catch (e) {
      this.#c.lastError = errCode(e);
      if (this.#c.lastError === 'ELOOP') this.#refuse('it is a symlink');
      return this.#c.lastError;
    }
    let kind: string | undefined;
    try {
      const st = fstatSync(fd);
      if (!st.isFIFO()) kind = describeFile(st);
    } catch (e) {
      kind = `cannot be checked (${errCode(e)})`;
    }
    if (kind === undefined) {
      this.#fd = fd;
      return undefined;
    }
    closeSync(fd);
    this.#c.lastError = 'ENOTFIFO';
    this.#refuse(`it is ${kind}`);
    return this.#c.lastError;
  }

  #refuse(why: string): void {
    if (this.#refused) return;
    this.#refused = `refusing the containerd log pipe ${this.#path}: ${why}, not a FIFO; shim log lines are not written there`;
    // The first open's warning is returned by open(); a later one is told separately, once.
    if (this.#opened && this.#onRefused) {
      const message = this.#refused;
      const cb = this.#onRefused;
      setImmediate(() => cb(message));
    }
  }

  write(line: string): void {
    if (this.#closed) return;
    if (this.#refused) {
      this.#c.dropped++;
      return;
    }
    if (this.#fd < 0 && (Date.now() - this.#lastOpenAttempt < this.#reopenMs || this.#tryOpen() !== undefined)) {
      this.#c.dropped++;
      return;
    }
    if (this.#pending && !this.#flushPending()) {
      this.#c.dropped++;
      return;
    }
    const buf = Buffer.from(line);
    const n = this.#writeSome(buf);
    if (n === 0) {
      this.#c.dropped++;
      return;
    }
    this.#c.written++;
    if (n < buf.length) this.#keepTail(buf.subarray(n));
  }

  /** Bytes written, 0 when none could be; a dead reader closes the sink. */
  #writeSome(buf: Buffer): number {
    try {
      return writeSync(this.#fd, buf);
    } catch (e) {
      const code = errCode(e);
      this.#c.lastError = code;
      if (code !== 'EAGAIN') this.#shut();
      return 0;
    }
  }

  #keepTail(tail: Buffer): void {
    this.#pending = tail;
    this.#retry ??= setTimeout(() => {
      this.#retry = undefined;
      if (this.#pending && !this.#flushPending()) this.#keepTail(this.#pending);
    }, 10);
    this.#retry.unref();
  }

  /** True when nothing is left pending. */
  #flushPending(): boolean {
    const p = this.#pending;
    if (!p || this.#fd < 0) {
      this.#pending = undefined;
      return true;
    }
    const n = this.#writeSome(p);
    this.#pending = n < p.length && this.#fd >= 0 ? p.subarray(n) : undefined;
    return this.#pending === undefined;
  }

  #shut(): void {
    if (this.#fd >= 0) {
      try {
        closeSync(this.#fd);
      } catch {
        // already gone
      }
    }
    this.#fd = -1;
    this.#pending = undefined;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#retry) clearTimeout(this.#retry);
    this.#flushPending();
    this.#shut();
  }

  stats(): SinkStats {
    return this.#c.snapshot();
  }
}

function lstatOrUndefined(p: string): Stats | undefined {
  try {
    return lstatSync(p);
  } catch {
    return undefined;
  }
}

function describeFile(st: Stats): string {
  return st.isFile() ? 'a regular file' : st.isDirectory() ? 'a directory' : st.isCharacterDevice() || st.isBlockDevice() ? 'a device' : st.isSocket() ? 'a socket' : 'something else';
}

/** containerd's log pipe (`<bundle>/log`). */
export function logFifo(file: string, opts: LogFifoOptions = {}): LogSink {
  return new FifoSink(file, opts);
}

// ---------------------------------------------------------------------------------------------
// The system log

export const JOURNAL_STREAM_SOCKET = '/run/systemd/journal/stdout';
export const SYSLOG_SOCKET = '/dev/log';
export const SYSLOG_IDENTIFIER = 'kata';

export interface SystemLogOptions {
  /** journald's stream socket; `/run/systemd/journal/stdout`. */
  journalSocket?: string;
  /** The syslog datagram socket; `/dev/log`. */
  syslogSocket?: string;
  /** util-linux `logger`, found on PATH unless given. */
  loggerBinary?: string;
  /** syslog tag / journal SYSLOG_IDENTIFIER; `kata`. */
  identifier?: string;
  /** Bytes a sink may hold for a slow or connecting receiver before it drops lines; 1 MiB. */
  maxBufferedBytes?: number;
}

interface Resolved {
  journalSocket: string;
  syslogSocket: string;
  loggerBinary: string | undefined;
  identifier: string;
  maxBuffered: number;
}

/**
 * The host's system log: journald if it runs, else syslog through `/dev/log`, else a sink that
 * drops lines and warns once. Which one is decided when the logger opens its sinks.
 */
export function systemLog(opts: SystemLogOptions = {}): LogSink {
  return new SystemLogSink({
    journalSocket: opts.journalSocket ?? JOURNAL_STREAM_SOCKET,
    syslogSocket: opts.syslogSocket ?? SYSLOG_SOCKET,
    loggerBinary: opts.loggerBinary,
    identifier: opts.identifier ?? SYSLOG_IDENTIFIER,
    maxBuffered: opts.maxBufferedBytes ?? 1 << 20,
  });
}

function isSocket(p: string): boolean {
  try {
    return statSync(p).isSocket();
  } catch {
    return false;
  }
}

function findOnPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    if (!dir) continue;
    const p = path.join(dir, name);
    try {
      if (statSync(p).isFile()) return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** Delegates to the journald or syslog transport chosen at open(). */
class SystemLogSink implements LogSink {
  #inner: LogSink | undefined;
  readonly #o: Resolved;
  constructor(o: Resolved) {
    this.#o = o;
  }
  get name(): string {
    return this.#inner?.name ?? 'system-log';
  }
  open(): string | undefined {
    const o = this.#o;
    if (isSocket(o.journalSocket)) this.#inner = new JournaldSink(o);
    else if (isSocket(o.syslogSocket)) {
      const bin = o.loggerBinary ?? findOnPath('logger');
      if (bin) this.#inner = new SyslogSink(o, bin);
      else {
        this.#inner = new NoSink(`${o.syslogSocket} exists but util-linux "logger" (Debian package bsdutils) is not installed`);
      }
    } else this.#inner = new NoSink(`no system log on this host (neither ${o.journalSocket} nor ${o.syslogSocket} is a socket)`);
    return this.#inner.open();
  }
  write(line: string, level: number): void {
    this.#inner?.write(line, level);
  }
  close(): Promise<void> {
    return this.#inner?.close() ?? Promise.resolve();
  }
  stats(): SinkStats {
    return this.#inner?.stats() ?? new Counter().snapshot();
  }
}

class NoSink implements LogSink {
  readonly name = 'none';
  readonly #c = new Counter();
  constructor(readonly why: string) {}
  open(): string {
    return `${this.why}: shim log lines go to the containerd log pipe only`;
  }
  write(): void {
    this.#c.dropped++;
  }
  async close(): Promise<void> {}
  stats(): SinkStats {
    return this.#c.snapshot();
  }
}

/**
 * journald's stdout-stream protocol (systemd's sd_journal_stream_fd): seven header lines, then
 * text lines. Header: identifier, unit id (empty), default priority, level-prefix flag, forward to
 * syslog, to kmsg, to console (0 = journald's own settings decide). With the level prefix on, a
 * line starting `<N>` carries its own syslog priority.
 */
export function journalStreamHeader(identifier: string, priority = 6): string {
  return `${identifier}\n\n${priority}\n1\n0\n0\n0\n`;
}

class JournaldSink implements LogSink {
  readonly name: string;
  readonly #o: Resolved;
  readonly #c = new Counter();
  #sock: Socket | undefined;
  #dead = false;
  constructor(o: Resolved) {
    this.#o = o;
    this.name = `journald:${o.journalSocket}`;
  }
  open(): undefined {
    const net = require('node:net') as typeof import('node:net');
    const sock = net.createConnection(this.#o.journalSocket);
    sock.on('error', (e) => {
      this.#c.lastError = errCode(e);
      this.#dead = true;
    });
    sock.on('close', () => {
      this.#dead = true;
    });
    sock.unref(); // the journal never keeps the shim alive
    sock.write(journalStreamHeader(this.#o.identifier));
    this.#sock = sock;
    return undefined;
  }
  write(line: string, level: number): void {
    const s = this.#sock;
    if (!s || this.#dead || s.writableLength > this.#o.maxBuffered) {
      this.#c.dropped++;
      return;
    }
    s.write(`<${syslogSeverity(level)}>${line}`);
    this.#c.written++;
  }
  close(): Promise<void> {
    // Held unref'd so the journal never keeps the shim alive; while closing, wait for the flush.
    this.#sock?.ref();
    return endStream(this.#sock, this.#dead);
  }
  stats(): SinkStats {
    return this.#c.snapshot();
  }
}

/** Ends a writable and resolves when it has flushed or failed, at most 1 s later. */
function endStream(s: { end(cb?: () => void): unknown; once(ev: string, cb: () => void): unknown; destroy(): unknown } | undefined | null, dead: boolean): Promise<void> {
  if (!s || dead) {
    s?.destroy();
    return Promise.resolve();
  }
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      s.destroy();
      resolve();
    }, 1000);
    t.unref();
    const done = () => {
      clearTimeout(t);
      resolve();
    };
    s.once('error', done);
    s.end(done);
  });
}

/**
 * syslog through `/dev/log`, a SOCK_DGRAM unix socket that Node cannot open: a util-linux `logger`
 * started on the first line reads one message a line from its stdin, each with a `<PRI>` prefix
 * (`--prio-prefix`; facility user), tagged `kata[<shim pid>]`.
 */
class SyslogSink implements LogSink {
  readonly name: string;
  readonly #o: Resolved;
  readonly #bin: string;
  readonly #c = new Counter();
  #child: ChildProcess | undefined;
  #dead = false;
  #closing = false;
  constructor(o: Resolved, bin: string) {
    this.#o = o;
    this.#bin = bin;
    this.name = `syslog:${o.syslogSocket}`;
  }
  open(): string | undefined {
    const { spawn } = require('node:child_process') as typeof import('node:child_process');
    const args = ['-t', this.#o.identifier, `--id=${process.pid}`, '-u', this.#o.syslogSocket, '--prio-prefix', '-S', '8192', '--socket-errors=off'];
    try {
      const child = spawn(this.#bin, args, { stdio: ['pipe', 'ignore', 'ignore'] });
      child.on('error', (e) => {
        this.#c.lastError = errCode(e);
        this.#dead = true;
      });
      child.on('exit', (code, signal) => {
        if (!this.#closing) this.#c.lastError ??= `logger exited (${signal ?? code})`;
        this.#dead = true;
      });
      child.stdin?.on('error', (e) => {
        this.#c.lastError = errCode(e);
        this.#dead = true;
      });
      child.unref();
      (child.stdin as unknown as { unref?: () => void } | null)?.unref?.();
      this.#child = child;
      return undefined;
    } catch (e) {
      this.#dead = true;
      return `cannot start ${this.#bin} for syslog (${errCode(e)}): shim log lines go to the containerd log pipe only`;
    }
  }
  write(line: string, level: number): void {
    const stdin = this.#child?.stdin;
    if (!stdin || this.#dead || stdin.writableLength > this.#o.maxBuffered) {
      this.#c.dropped++;
      return;
    }
    // One message per line: a newline inside a line would split it (pino escapes them in JSON).
    stdin.write(`<${8 + syslogSeverity(level)}>${line}`);
    this.#c.written++;
  }
  async close(): Promise<void> {
    const child = this.#child;
    if (!child) return;
    this.#closing = true;
    // Unref'd while logging; while closing, the flush and logger's exit must keep the loop alive.
    child.ref();
    (child.stdin as unknown as { ref?: () => void } | null)?.ref?.();
    const exited = new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) resolve();
      else child.once('exit', () => resolve());
    });
    await endStream(child.stdin, this.#dead);
    // logger exits at end of input; give it a moment to send the last datagrams.
    await Promise.race([exited, new Promise((r) => setTimeout(r, 1000).unref())]);
    if (child.exitCode === null && child.signalCode === null) child.kill();
  }
  stats(): SinkStats {
    return this.#c.snapshot();
  }
}
