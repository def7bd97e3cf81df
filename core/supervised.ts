/**
 * A supervised child process: the one way the runtime runs a hypervisor or a host-side daemon.
 *
 * - started tied to this process (core/child.ts: killed when the runtime dies, binary trust-checked);
 * - its stderr (and optionally stdout) kept as the last lines and logged line by line;
 * - its end observed once, as `exited` (never rejects), with whether it was expected;
 * - stopped by a ladder of steps (power button, API shutdown, SIGTERM …), each given a bounded
 *   time, then SIGKILL, itself bounded.
 *
 * The QEMU and Cloud Hypervisor drivers and `Daemon` (virtiofsd) use it; what differs between them
 * (their stop steps, their words for a failure) stays in them.
 */
import type { ChildProcess } from 'node:child_process';
import { setTimeout as delay } from 'node:timers/promises';
import { spawnTied } from './child.js';
import { LineRing } from './line-ring.js';
import type { Logger } from './logger.js';

export interface SupervisedOptions {
  /** Human name for logs, e.g. `QEMU`, `virtiofsd`. */
  readonly name: string;
  readonly binary: string;
  readonly args: readonly string[];
  readonly cwd?: string;
  readonly log: Logger;
  /** What the binary is, for the trust check's message (`the hypervisor binary`). */
  readonly what?: string;
  /** Lines of output kept for error messages (default 20). */
  readonly tailLines?: number;
  /** Level stderr lines are logged at (default `warn`: a hypervisor says little unless something is wrong). */
  readonly outputLevel?: 'debug' | 'warn';
  /** Read stdout too and log its lines at `level` under `message` (Cloud Hypervisor writes a Tty console there). */
  readonly stdout?: { readonly level: 'debug' | 'warn'; readonly message: string };
}

export interface ProcessExit {
  /** True when the runtime asked it to stop before it ended. */
  readonly expected: boolean;
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  /** The last stderr lines, for the failure report. */
  readonly stderrTail: readonly string[];
  /** Set when the program could not be started at all (ENOENT, EACCES …). */
  readonly spawnError?: Error;
}

/**
 * One rung of a stop ladder: do something, then give the process `waitMs` to end. An action that
 * returns `false` did not apply (e.g. no power button for a paused guest): the ladder goes on at once.
 */
export interface StopStep {
  readonly name: string;
  readonly action: () => unknown;
  readonly waitMs: number;
}

export class SupervisedProcess {
  readonly #opts: SupervisedOptions;
  readonly #child: ChildProcess;
  readonly #stderr: LineRing;
  readonly #stdout: LineRing;
  #expected = false;
  #exit: ProcessExit | undefined;
  #spawnError: Error | undefined;
  /** Settles once, when the process ends or could not start. Never rejects. */
  readonly exited: Promise<ProcessExit>;

  private constructor(opts: SupervisedOptions) {
    this.#opts = opts;
    const tail = opts.tailLines ?? 20;
    this.#stderr = new LineRing(tail);
    this.#stdout = new LineRing(tail);
    // Throws KATA_ERR_UNTRUSTED_PATH before anything runs when the binary fails the trust check.
    const child = spawnTied(opts.binary, opts.args, { cwd: opts.cwd, stdio: ['ignore', opts.stdout ? 'pipe' : 'ignore', 'pipe'] }, opts.what);
    this.#child = child;
    const level = opts.outputLevel ?? 'warn';
    const logStderr = (lines: readonly string[]) => {
      for (const line of lines) opts.log[level]({ pid: child.pid, stderr: line }, `${opts.name} stderr`);
    };
    const out = opts.stdout;
    const logStdout = (lines: readonly string[]) => {
      if (out) for (const line of lines) opts.log[out.level]({ pid: child.pid, stdout: line }, out.message);
    };
    child.stderr?.setEncoding('utf8').on('data', (chunk: string) => logStderr(this.#stderr.push(chunk)));
    child.stdout?.setEncoding('utf8').on('data', (chunk: string) => logStdout(this.#stdout.push(chunk)));
    this.exited = new Promise((resolve) => {
      const settle = (code: number | null, signal: NodeJS.Signals | null) => {
        if (this.#exit) return;
        logStderr(this.#stderr.flush());
        logStdout(this.#stdout.flush());
        this.#exit = Object.freeze({
          expected: this.#expected,
          code: this.#spawnError ? null : code,
          signal,
          stderrTail: this.tail(),
          ...(this.#spawnError ? { spawnError: this.#spawnError } : {}),
        });
        resolve(this.#exit);
      };
      child.on('error', (err) => {
        if (child.pid === undefined) {
          this.#spawnError = err;
          this.#stderr.push(`${opts.binary}: ${err.message}\n`);
          settle(null, null);
        } else opts.log.error({ err, pid: child.pid }, `${opts.name} process error`);
      });
      child.on('close', settle);
    });
  }

  /** Starts the program. Throws only for a binary that fails the trust check; a failed spawn shows in `exited`. */
  static start(opts: SupervisedOptions): SupervisedProcess {
    return new SupervisedProcess(opts);
  }

  get pid(): number | undefined {
    return this.#child.pid;
  }

  /** The exit, once it happened. */
  get exit(): ProcessExit | undefined {
    return this.#exit;
  }

  /** Why the program could not be started, when it could not. */
  get spawnError(): Error | undefined {
    return this.#spawnError;
  }

  /** The last lines of stderr, for error messages. */
  tail(lines = this.#opts.tailLines ?? 20): string[] {
    return this.#stderr.tail(lines);
  }

  /** From now on the end of the process is expected (a stop was asked for). */
  expectExit(): void {
    this.#expected = true;
  }

  /** Sends a signal if the process still runs. */
  signal(sig: NodeJS.Signals): void {
    if (!this.#exit && this.#child.pid !== undefined) this.#child.kill(sig);
  }

  /** True when the process has ended within `ms`. */
  async waitExit(ms: number): Promise<boolean> {
    if (this.#exit) return true;
    const timer = new AbortController();
    const ended = await Promise.race([this.exited.then(() => true), delay(ms, false, { signal: timer.signal }).catch(() => false)]);
    timer.abort();
    return ended;
  }

  /** SIGKILL, then wait at most `timeoutMs`; logs when even that did not end it. */
  async kill(timeoutMs: number): Promise<void> {
    if (this.#exit || this.#child.pid === undefined) return;
    this.#expected = true;
    this.#child.kill('SIGKILL');
    if (!(await this.waitExit(timeoutMs))) this.#opts.log.error({ pid: this.pid }, `${this.#opts.name} did not exit within ${timeoutMs} ms of SIGKILL`);
  }

  /**
   * Stops the process: each step's action (errors ignored: the next step follows), then up to its
   * `waitMs` for the exit; SIGKILL when no step ended it. Resolves to true when it ended before
   * SIGKILL. Calls `steps` only while the process still runs, so a step may look at current state.
   */
  async stop(steps: () => readonly StopStep[], killTimeoutMs: number): Promise<boolean> {
    this.#expected = true;
    if (this.#exit || this.#child.pid === undefined) return true;
    for (const step of steps()) {
      if (this.#exit) return true;
      try {
        if ((await step.action()) === false) continue;
      } catch (err) {
        this.#opts.log.debug({ err, step: step.name }, `${this.#opts.name}: stop step failed`);
      }
      if (await this.waitExit(step.waitMs)) return true;
    }
    await this.kill(killTimeoutMs);
    return false;
  }
}

/** `killed by SIGKILL`, `exit status 1`, `could not be started`. */
export function describeExit(exit: Pick<ProcessExit, 'code' | 'signal'> & { spawnError?: Error }): string {
  if (exit.spawnError) return `could not be started (${exit.spawnError.message})`;
  if (exit.signal) return `killed by ${exit.signal}`;
  return exit.code === null ? 'no exit status' : `exit status ${exit.code}`;
}
