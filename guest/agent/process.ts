/**
 * A process the agent started in a container: the helper chain's first process (our child, whose
 * exit status is the container process's, see oci.ts), its real process (the helper's only
 * child, which signals go to) and its standard streams.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, readFileSync, readdirSync } from 'node:fs';
import type net from 'node:net';
import { failedPrecondition, internal } from './errors.js';
import { OutputBuffer, makeStdioPipes } from './io.js';
import { exitStatus } from './oci.js';
import { PtyMaster } from './pty.js';
import { BUSYBOX, HELPER_ENV, sleep } from './sys.js';

/** The children of `pid` (needs CONFIG_PROC_CHILDREN; falls back to scanning /proc). */
export function childrenOf(pid: number, procRoot = '/proc'): number[] {
  try {
    const text = readFileSync(`${procRoot}/${pid}/task/${pid}/children`, 'utf8').trim();
    return text ? text.split(/\s+/).map(Number) : [];
  } catch {
    // no such file: scan
  }
  const out: number[] = [];
  for (const name of readdirSync(procRoot)) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`${procRoot}/${name}/stat`, 'utf8');
      // pid (comm) state ppid …; comm may hold spaces and parentheses: parse after the last ')'.
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) out.push(Number(name));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

export interface SpawnOptions {
  /** Pass a socket as fd 3 (the container init's control channel). */
  readonly control?: boolean;
  /** Give the process a pseudo-terminal of this size (rows, cols; 0 = default) instead of pipes. */
  readonly terminal?: { readonly rows: number; readonly cols: number };
}

/** Where a process's input goes: a pipe's socket, or a terminal's master. */
interface StdinSink {
  write(data: Uint8Array, cb: (err?: Error | null) => void): unknown;
  end(cb?: () => void): unknown;
  destroy(): unknown;
}

export class GuestProcess {
  readonly stdout = new OutputBuffer();
  readonly stderr = new OutputBuffer();
  /** Resolves with the WaitProcess status once the helper (hence the process) has exited. */
  readonly exited: Promise<number>;
  private exitStatus: number | undefined;
  private realPid: number | undefined;
  private stdinOpen = true;

  private constructor(
    readonly containerId: string,
    readonly execId: string,
    private readonly child: ChildProcess,
    private readonly stdin: StdinSink,
    /** fd 3 of the helper, for the container init. */
    readonly control: net.Socket | undefined,
    /** The process's terminal, when it has one (its output is all on stdout). */
    readonly pty?: PtyMaster,
  ) {
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitStatus = exitStatus(code, signal);
        resolve(this.exitStatus);
      });
    });
  }

  /** Starts `argv` with fresh pipes for its stdio, or a terminal when `opts.terminal` says so. */
  static async spawn(containerId: string, execId: string, argv: readonly string[], opts: SpawnOptions = {}): Promise<GuestProcess> {
    if (opts.terminal) return GuestProcess.spawnWithTerminal(containerId, execId, argv, opts, opts.terminal);
    const pipes = await makeStdioPipes();
    let child: ChildProcess;
    try {
      child = spawn(argv[0] as string, argv.slice(1), {
        stdio: [...pipes.childFds, ...(opts.control ? (['pipe'] as const) : [])],
        env: HELPER_ENV,
        cwd: '/',
      });
    } finally {
      for (const fd of pipes.childFds) closeSync(fd);
    }
    if (child.pid === undefined) {
      const err = await new Promise<Error>((resolve) => child.once('error', resolve));
      pipes.stdin.destroy();
      pipes.stdout.destroy();
      pipes.stderr.destroy();
      throw internal(`cannot start ${argv[0]}: ${err.message}`, err);
    }
    child.on('error', () => undefined);
    const control = opts.control ? (child.stdio[3] as net.Socket) : undefined;
    control?.on('error', () => undefined);
    // A write to a pipe nobody reads any more must not take the agent down.
    pipes.stdin.on('error', () => undefined);
    const p = new GuestProcess(containerId, execId, child, pipes.stdin, control);
    p.stdout.attach(pipes.stdout);
    p.stderr.attach(pipes.stderr);
    return p;
  }

  /**
   * Starts `argv` on the slave of a new pty (fds 0-2). `busybox setsid -c` in front makes the
   * helper chain a new session whose controlling terminal is that slave; it execs (the agent's
   * child is no process group leader, so setsid does not fork), so the chain keeps its shape and
   * the container process, further down, inherits session, terminal and foreground group.
   */
  private static async spawnWithTerminal(containerId: string, execId: string, argv: readonly string[], opts: SpawnOptions, size: { rows: number; cols: number }): Promise<GuestProcess> {
    let pty: PtyMaster;
    try {
      pty = PtyMaster.open(size.rows, size.cols);
    } catch (e) {
      throw internal(`cannot open a terminal: ${(e as Error).message}`, e);
    }
    const slave = pty.slave as number;
    let child: ChildProcess;
    try {
      child = spawn(BUSYBOX, ['setsid', '-c', ...argv], {
        stdio: [slave, slave, slave, ...(opts.control ? (['pipe'] as const) : [])],
        env: HELPER_ENV,
        cwd: '/',
      });
    } finally {
      pty.closeSlave();
    }
    if (child.pid === undefined) {
      const err = await new Promise<Error>((resolve) => child.once('error', resolve));
      pty.destroy();
      throw internal(`cannot start ${BUSYBOX}: ${err.message}`, err);
    }
    child.on('error', () => undefined);
    const control = opts.control ? (child.stdio[3] as net.Socket) : undefined;
    control?.on('error', () => undefined);
    const p = new GuestProcess(containerId, execId, child, pty, control, pty);
    p.stdout.attach(pty.output);
    // One output stream: stderr is the terminal too, so ReadStderr answers end of file at once.
    p.stderr.end();
    return p;
  }

  /** Sets the terminal's window size (the kernel sends SIGWINCH to its foreground group). */
  resize(rows: number, cols: number): void {
    if (!this.pty) throw failedPrecondition(`${this.describe()} has no terminal`);
    this.pty.resize(rows, cols);
  }

  /** The container process's pid once {@link pid} has found it. */
  get knownPid(): number | undefined {
    return this.realPid;
  }

  /** The helper's pid (our child). */
  get helperPid(): number {
    return this.child.pid as number;
  }

  get hasExited(): boolean {
    return this.exitStatus !== undefined;
  }

  get status(): number | undefined {
    return this.exitStatus;
  }

  /**
   * The container process's pid in the guest: the helper's only child, once it has forked.
   * Waits up to `timeoutMs` for the fork; undefined when the helper exited first.
   */
  async pid(timeoutMs = 5000): Promise<number | undefined> {
    if (this.realPid !== undefined) return this.realPid;
    const deadline = Date.now() + timeoutMs;
    while (!this.hasExited) {
      const kids = childrenOf(this.helperPid);
      if (kids.length) {
        this.realPid = kids[0] as number;
        return this.realPid;
      }
      if (Date.now() > deadline) return undefined;
      await sleep(5);
    }
    return undefined;
  }

  /** Sends `signal` to the container process; a process that is already gone is not an error (as kata-agent). */
  async signal(signal: number): Promise<void> {
    if (this.hasExited) return;
    const pid = await this.pid();
    try {
      if (pid !== undefined) process.kill(pid, signal);
      else if (!this.hasExited && signal === 9) process.kill(this.helperPid, signal);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw internal(`cannot signal pid ${pid}: ${(e as Error).message}`, e);
    }
  }

  /** Writes to the process's stdin; resolves with the byte count once the pipe took them. */
  writeStdin(data: Uint8Array): Promise<number> {
    if (!this.stdinOpen) return Promise.reject(failedPrecondition(`stdin of ${this.describe()} is closed`));
    if (data.length === 0) return Promise.resolve(0);
    return new Promise((resolve, reject) => {
      this.stdin.write(data, (err) => {
        if (err) reject(failedPrecondition(`cannot write to the stdin of ${this.describe()}: ${err.message}`));
        else resolve(data.length);
      });
    });
  }

  closeStdin(): void {
    if (!this.stdinOpen) return;
    this.stdinOpen = false;
    // As runc: a terminal stays open when its input ends (closing the master would hang it up).
    if (this.pty) return;
    this.stdin.end(() => this.stdin.destroy());
  }

  /** Frees the streams (after the process has gone). */
  dispose(): void {
    this.stdinOpen = false;
    this.stdin.destroy();
    this.control?.destroy();
    this.stdout.discard();
    this.stderr.discard();
  }

  describe(): string {
    return this.execId === this.containerId ? `container ${this.containerId}` : `exec ${this.execId} of container ${this.containerId}`;
  }
}
