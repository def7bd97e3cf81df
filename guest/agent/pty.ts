/**
 * Pseudo-terminals for processes with `process.terminal = true`. Node has no pty API; node-pty's
 * native addon (built by `npm install` for the same node binary the guest runs, and shipped in the
 * agent archive next to agent.mjs, see guest/image/agent-payload.ts) opens the pair with
 * openpty(3) and sets the window size. Only its `open` and `resize` are used: the process is
 * started by child_process with the slave as fds 0-2, so that the container init keeps its fd 3
 * control channel and the busybox helper chain stays as it is.
 */
import { closeSync, write } from 'node:fs';
import { createRequire } from 'node:module';
import tty from 'node:tty';

interface PtyNative {
  open(cols: number, rows: number): { master: number; slave: number; pty: string };
  resize(fd: number, cols: number, rows: number): void;
}

let native: PtyNative | undefined;

/** node-pty's addon, loaded on first use (an agent without it still runs processes without terminals). */
function ptyNative(): PtyNative {
  native ??= createRequire(import.meta.url)('node-pty/build/Release/pty.node') as PtyNative;
  return native;
}

/** The size a terminal gets when the request names none (or zero), as runc's console default. */
export const DEFAULT_SIZE = Object.freeze({ rows: 24, cols: 80 });

/** A window dimension as TIOCSWINSZ takes it (an unsigned short); 0 means the default. */
export function checkDimension(n: number, fallback: number): number {
  if (!Number.isInteger(n) || n < 0) return fallback;
  return n === 0 ? fallback : Math.min(n, 0xffff);
}

/** The master side of a pty, held by the agent. */
export class PtyMaster {
  /** The master's output (everything the process writes to its terminal); ends with EIO once every slave fd is closed. */
  readonly output: tty.ReadStream;
  private closed = false;
  private queue: Promise<void> = Promise.resolve();

  private constructor(
    private readonly fd: number,
    /** The slave's fd, to hand to the child (the agent closes it once the child has it). */
    public slave: number | undefined,
    /** The slave's path in the guest's devpts (e.g. /dev/pts/0). */
    readonly path: string,
  ) {
    this.output = new tty.ReadStream(fd);
    // The stream closes the fd when it ends (EIO) or fails: from then on the number may be reused.
    this.output.once('close', () => {
      this.closed = true;
    });
  }

  static open(rows: number, cols: number): PtyMaster {
    const p = ptyNative().open(checkDimension(cols, DEFAULT_SIZE.cols), checkDimension(rows, DEFAULT_SIZE.rows));
    return new PtyMaster(p.master, p.slave, p.pty);
  }

  /** Closes the agent's copy of the slave (after the child got it), so that EIO marks the last writer's end. */
  closeSlave(): void {
    if (this.slave === undefined) return;
    closeSync(this.slave);
    this.slave = undefined;
  }

  resize(rows: number, cols: number): void {
    if (this.closed) return;
    ptyNative().resize(this.fd, checkDimension(cols, DEFAULT_SIZE.cols), checkDimension(rows, DEFAULT_SIZE.rows));
  }

  /** Writes all of `data` (the master is non-blocking: EAGAIN waits and retries), in call order. */
  write(data: Uint8Array, cb: (err?: Error | null) => void): void {
    const run = async (): Promise<void> => {
      let off = 0;
      while (off < data.length) {
        if (this.closed) throw new Error('the terminal is closed');
        const n = await new Promise<number>((resolve, reject) =>
          write(this.fd, data, off, data.length - off, null, (err, written) => {
            if (err && err.code === 'EAGAIN') resolve(0);
            else if (err) reject(err);
            else resolve(written);
          }),
        );
        if (n === 0) await new Promise((r) => setTimeout(r, 5));
        off += n;
      }
    };
    this.queue = this.queue.then(run).then(
      () => cb(null),
      (e: Error) => cb(e),
    );
  }

  /** Input ends: as runc, the terminal stays (the process sees no hang-up); nothing more is written. */
  end(cb?: () => void): void {
    cb?.();
  }

  destroy(): void {
    if (this.closed) return;
    this.closed = true;
    this.closeSlave();
    // Destroying the stream closes the master's fd.
    this.output.destroy();
  }
}
