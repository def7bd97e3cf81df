/**
 * A process's standard streams: real pipes (named FIFOs, unlinked once open), so that inside the
 * container `/dev/stdout`, `/proc/self/fd/1` and `fstat` behave as with runc; node's own 'pipe'
 * stdio would be a socketpair, which `echo x >/dev/stderr` cannot open. The child's ends are
 * blocking, the agent's ends non-blocking (each end is its own open file description).
 *
 * Output is buffered in {@link OutputBuffer} for the ReadStdout/ReadStderr long polls, with
 * backpressure: past a high-water mark the agent stops reading the pipe and the writer blocks,
 * as it would on a full pipe.
 */
import { closeSync, constants, openSync, unlinkSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { cancelled, endOfFile } from './errors.js';
import { busyboxOk } from './sys.js';

/** Where the FIFOs are made (and at once unlinked). */
export const FIFO_DIR = '/run/kata-ts-agent';

export interface StdioPipes {
  /** The fds to hand to the child as 0, 1, 2; close them once it is spawned. */
  readonly childFds: readonly [number, number, number];
  readonly stdin: net.Socket;
  readonly stdout: net.Socket;
  readonly stderr: net.Socket;
}

let fifoSeq = 0;

/** Three pipes for a new process. One `mkfifo` run for the three. */
export async function makeStdioPipes(dir = FIFO_DIR): Promise<StdioPipes> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const base = path.join(dir, `${process.pid}-${++fifoSeq}`);
  const [inPath, outPath, errPath] = [`${base}-in`, `${base}-out`, `${base}-err`];
  // World-writable so that a process running as any user can reopen its own stdio through
  // /proc/self/fd (`echo x >/dev/stderr`); unlinked at once, the FIFOs are reachable only that way.
  await busyboxOk('mkfifo', ['-m', '666', inPath, outPath, errPath]);
  const opened: number[] = [];
  const open = (p: string, flags: number): number => {
    const fd = openSync(p, flags);
    opened.push(fd);
    return fd;
  };
  try {
    const { O_RDONLY, O_WRONLY, O_NONBLOCK } = constants;
    // stdin: a temporary non-blocking reader lets the agent's writer open without blocking; then
    // the child's blocking reader opens at once because a writer exists.
    const tmpReader = open(inPath, O_RDONLY | O_NONBLOCK);
    const stdinW = open(inPath, O_WRONLY | O_NONBLOCK);
    const childIn = open(inPath, O_RDONLY);
    closeSync(tmpReader);
    opened.splice(opened.indexOf(tmpReader), 1);
    // stdout, stderr: the agent's non-blocking reader first, then the child's blocking writer.
    const stdoutR = open(outPath, O_RDONLY | O_NONBLOCK);
    const childOut = open(outPath, O_WRONLY);
    const stderrR = open(errPath, O_RDONLY | O_NONBLOCK);
    const childErr = open(errPath, O_WRONLY);
    const stdin = new net.Socket({ fd: stdinW, readable: false, writable: true });
    const stdout = new net.Socket({ fd: stdoutR, readable: true, writable: false });
    const stderr = new net.Socket({ fd: stderrR, readable: true, writable: false });
    return { childFds: [childIn, childOut, childErr], stdin, stdout, stderr };
  } catch (e) {
    for (const fd of opened) closeSync(fd);
    throw e;
  } finally {
    for (const p of [inPath, outPath, errPath]) {
      try {
        unlinkSync(p);
      } catch {
        // already gone
      }
    }
  }
}

/**
 * Bytes a process wrote, kept until the host reads them. `read` returns what is there (up to a
 * length) at once, or waits for the next bytes; once the writer has closed its end and
 * everything was read, it fails with kata-agent's end-of-file status.
 */
export class OutputBuffer {
  private chunks: Buffer[] = [];
  private size = 0;
  private ended = false;
  private waiters = new Set<() => void>();
  private source: Readable | undefined;
  private paused = false;
  private eofSent = false;

  constructor(private readonly highWaterMark = 1024 * 1024) {}

  /** Buffers everything `stream` produces, pausing it while more than the high-water mark waits to be read. */
  attach(stream: Readable): this {
    this.source = stream;
    stream.on('data', (chunk: Buffer) => this.push(chunk));
    stream.once('end', () => this.end());
    stream.once('close', () => this.end());
    stream.on('error', () => this.end());
    return this;
  }

  push(chunk: Buffer): void {
    if (this.ended || chunk.length === 0) return;
    this.chunks.push(chunk);
    this.size += chunk.length;
    if (this.source && !this.paused && this.size > this.highWaterMark) {
      this.paused = true;
      this.source.pause();
    }
    this.wake();
  }

  /** No more bytes will come (the write end is closed everywhere). */
  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.wake();
  }

  get buffered(): number {
    return this.size;
  }

  /** True once a reader was told about the end (every byte read, and then end of file). */
  get drained(): boolean {
    return this.eofSent;
  }

  /** Up to `max` bytes, waiting for some if none are there; end of file → INTERNAL "read meet eof". */
  async read(max: number, signal?: AbortSignal): Promise<Buffer> {
    for (;;) {
      if (this.size > 0) return this.take(max);
      if (this.ended) {
        this.eofSent = true;
        throw endOfFile();
      }
      if (signal?.aborted) throw cancelled('the read was cancelled');
      await new Promise<void>((resolve) => {
        const done = (): void => {
          this.waiters.delete(done);
          signal?.removeEventListener('abort', done);
          resolve();
        };
        this.waiters.add(done);
        signal?.addEventListener('abort', done, { once: true });
      });
    }
  }

  /** Drops everything and fails waiting readers with end of file. */
  discard(): void {
    this.chunks = [];
    this.size = 0;
    this.end();
  }

  private take(max: number): Buffer {
    const parts: Buffer[] = [];
    let n = 0;
    while (n < max && this.chunks.length) {
      const c = this.chunks[0] as Buffer;
      const want = max - n;
      if (c.length <= want) {
        parts.push(c);
        n += c.length;
        this.chunks.shift();
      } else {
        parts.push(c.subarray(0, want));
        this.chunks[0] = c.subarray(want);
        n += want;
      }
    }
    this.size -= n;
    if (this.paused && this.size <= this.highWaterMark / 2) {
      this.paused = false;
      this.source?.resume();
    }
    return parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts, n);
  }

  private wake(): void {
    for (const w of [...this.waiters]) w();
  }
}
