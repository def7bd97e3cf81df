/**
 * A task's stdio as containerd's client sets it up: paths of FIFOs it created and opened for
 * reading (stdout, stderr) or writing (stdin) before Create, a file (`--log-uri file://…`), or
 * empty (not connected).
 *
 * FIFOs are opened non-blocking and wrapped in sockets, so a slow or vanished reader never blocks
 * the shim. The write ends are closed once the process has exited and its output is drained:
 * containerd waits for that EOF before it deletes a task.
 *
 * As containerd's runc shim does (`openStdin` in its process/init.go and exec.go), the shim keeps a
 * write end of the stdin FIFO of its own: a client going away (`ctr run -d -t`, a detached `ctr task
 * attach`) is then no EOF, and a later client can write to the process's stdin again. Only CloseIO
 * closes that write end; the process's stdin ends once the client's has closed too.
 */
import { constants, fstat, open, close } from 'node:fs';
import net from 'node:net';
import { createReadStream, createWriteStream } from 'node:fs';
import { promisify } from 'node:util';
import type { Readable, Writable } from 'node:stream';
import { KataError } from '../core/errors.js';

const openFd = promisify(open);
const fstatFd = promisify(fstat);
const closeFd = promisify(close);

/**
 * The path a stdio value names: a plain path, or a `file://` URI (`ctr run --log-uri file://…`).
 * `binary://` (a logging program containerd's Go shims start) is not built.
 */
export function stdioPath(value: string, what: string): string {
  if (!value.includes('://')) return value;
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new KataError('KATA_ERR_SHIM', `the task's ${what} "${value}" is not a valid URI`);
  }
  if (url.protocol === 'file:') return decodeURIComponent(url.pathname);
  throw new KataError('KATA_ERR_NOT_IMPLEMENTED', `the task's ${what} uses a ${url.protocol}// log URI, which this shim does not support`, {
    fix: 'use FIFOs (the default) or a file:// log URI',
  });
}

async function openPath(file: string, flags: number, what: string): Promise<{ fd: number; fifo: boolean }> {
  let fd: number;
  try {
    fd = await openFd(file, flags);
  } catch (e) {
    throw new KataError('KATA_ERR_SHIM', `cannot open the task's ${what} ${file}: ${(e as Error).message}`, { fix: 'containerd\'s client creates these FIFOs; check that it is still running', cause: e });
  }
  const st = await fstatFd(fd);
  return { fd, fifo: st.isFIFO() || st.isSocket() };
}

/**
 * Opens an output (stdout/stderr); undefined when not connected. A FIFO is opened read-write, as
 * containerd's own shims do: the pipe then never loses its last reader, so output written while
 * the client is away (containerd restarting) waits in the pipe for the next reader instead of
 * failing with EPIPE.
 */
export async function openOutput(value: string, what: string): Promise<Writable | undefined> {
  if (!value) return undefined;
  const file = stdioPath(value, what);
  // A file:// log: appended to, created when missing.
  if (file !== value) return createWriteStream(file, { flags: 'a' }).on('error', () => undefined);
  const { fd, fifo } = await openPath(file, constants.O_RDWR | constants.O_NONBLOCK, what);
  if (fifo) {
    const sock = new net.Socket({ fd, readable: false, writable: true });
    sock.on('error', () => undefined);
    return sock;
  }
  await closeFd(fd);
  return createWriteStream(file, { flags: 'a' }).on('error', () => undefined);
}

/** Opens the stdin path; undefined when not connected. */
export async function openInput(value: string): Promise<Readable | undefined> {
  const stdin = await openStdin(value);
  if (stdin?.hold !== undefined) close(stdin.hold, () => undefined);
  return stdin?.stream;
}

/**
 * Opens the stdin path to read it and, for a FIFO, a write end of the shim's own (`hold`). That
 * one is opened through /proc/self/fd of the read end, so it is the very pipe being read even if
 * the path was replaced meanwhile; after the read end, since a non-blocking write open of a FIFO
 * without a reader fails (ENXIO).
 */
async function openStdin(value: string): Promise<{ stream: Readable; hold: number | undefined } | undefined> {
  if (!value) return undefined;
  const file = stdioPath(value, 'stdin');
  const { fd, fifo } = await openPath(file, constants.O_RDONLY | constants.O_NONBLOCK, 'stdin');
  if (fifo) {
    let hold: number | undefined;
    try {
      if ((await fstatFd(fd)).isFIFO()) hold = await openFd(`/proc/self/fd/${fd}`, constants.O_WRONLY | constants.O_NONBLOCK);
    } catch (e) {
      await closeFd(fd);
      throw new KataError('KATA_ERR_SHIM', `cannot open a write end of the task's stdin FIFO ${file}: ${(e as Error).message}`, { fix: 'check that /proc is mounted in the shim\'s mount namespace', cause: e });
    }
    const sock = new net.Socket({ fd, readable: true, writable: false });
    sock.on('error', () => undefined);
    return { stream: sock, hold };
  }
  return { stream: createReadStream('', { fd }).on('error', () => undefined), hold: undefined };
}

/** The three streams of one process, opened together and closed together. */
export class TaskIo {
  /** The shim's own write end of the stdin FIFO (a raw fd, never written to); undefined once closed. */
  #stdinHold: number | undefined;

  private constructor(
    readonly stdin: Readable | undefined,
    readonly stdout: Writable | undefined,
    readonly stderr: Writable | undefined,
    stdinHold: number | undefined,
  ) {
    this.#stdinHold = stdinHold;
  }

  static async open(paths: { stdin: string; stdout: string; stderr: string }): Promise<TaskIo> {
    const opened: (Readable | Writable)[] = [];
    try {
      const stdout = await openOutput(paths.stdout, 'stdout');
      if (stdout) opened.push(stdout);
      const stderr = paths.stderr === paths.stdout ? stdout : await openOutput(paths.stderr, 'stderr');
      if (stderr && stderr !== stdout) opened.push(stderr);
      const stdin = await openStdin(paths.stdin);
      return new TaskIo(stdin?.stream, stdout, stderr, stdin?.hold);
    } catch (e) {
      for (const s of opened) s.destroy();
      throw e;
    }
  }

  /** Copies a process's output into ours; resolves at the end of `from`, `to` stays open. */
  static copy(from: Readable, to: Writable | undefined): Promise<void> {
    return new Promise((resolve) => {
      from.on('data', (chunk: Buffer) => {
        if (to && !to.destroyed && !to.write(chunk)) {
          from.pause();
          to.once('drain', () => from.resume());
        }
      });
      from.once('end', resolve);
      from.once('error', () => resolve());
      to?.once('close', () => from.resume());
    });
  }

  /** Whether the shim still holds its write end of the stdin FIFO (CloseIO has not come). */
  get holdsStdin(): boolean {
    return this.#stdinHold !== undefined;
  }

  /**
   * CloseIO: closes the shim's write end of the stdin FIFO, so the reader sees EOF once the client
   * has closed its own; what the client wrote before is still read.
   */
  releaseStdin(): void {
    const fd = this.#stdinHold;
    if (fd === undefined) return;
    this.#stdinHold = undefined;
    close(fd, () => undefined);
  }

  /** Closes everything: the reader of stdout/stderr sees EOF. */
  close(): void {
    this.releaseStdin();
    this.stdin?.destroy();
    for (const w of [this.stdout, this.stderr]) if (w && !w.destroyed) w.end();
  }
}
