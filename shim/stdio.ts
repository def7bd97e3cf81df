/**
 * A task's stdio as containerd's client sets it up: paths of FIFOs it created and opened for
 * reading (stdout, stderr) or writing (stdin) before Create, a file (`--log-uri file://…`), or
 * empty (not connected).
 *
 * FIFOs are opened non-blocking and wrapped in sockets, so a slow or vanished reader never blocks
 * the shim. The write ends are closed once the process has exited and its output is drained:
 * containerd waits for that EOF before it deletes a task. EOF on the stdin FIFO closes the process's
 * stdin, as CloseIO does.
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
  if (!value) return undefined;
  const file = stdioPath(value, 'stdin');
  const { fd, fifo } = await openPath(file, constants.O_RDONLY | constants.O_NONBLOCK, 'stdin');
  if (fifo) {
    const sock = new net.Socket({ fd, readable: true, writable: false });
    sock.on('error', () => undefined);
    return sock;
  }
  return createReadStream('', { fd }).on('error', () => undefined);
}

/** The three streams of one process, opened together and closed together. */
export class TaskIo {
  private constructor(
    readonly stdin: Readable | undefined,
    readonly stdout: Writable | undefined,
    readonly stderr: Writable | undefined,
  ) {}

  static async open(paths: { stdin: string; stdout: string; stderr: string }): Promise<TaskIo> {
    const opened: (Readable | Writable)[] = [];
    try {
      const stdout = await openOutput(paths.stdout, 'stdout');
      if (stdout) opened.push(stdout);
      const stderr = paths.stderr === paths.stdout ? stdout : await openOutput(paths.stderr, 'stderr');
      if (stderr && stderr !== stdout) opened.push(stderr);
      const stdin = await openInput(paths.stdin);
      return new TaskIo(stdin, stdout, stderr);
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

  /** Closes everything: the reader of stdout/stderr sees EOF. */
  close(): void {
    this.stdin?.destroy();
    for (const w of [this.stdout, this.stderr]) if (w && !w.destroyed) w.end();
  }
}
