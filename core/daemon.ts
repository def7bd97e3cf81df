/**
 * A supervised host-side process that serves a unix socket (virtiofsd, and other daemons a sandbox
 * needs): started, ready when its socket appears, its stderr kept and logged, its exit observed,
 * stopped with SIGTERM then SIGKILL. Plugins use it from their lifecycle hooks.
 */
import type { ChildProcess } from 'node:child_process';
import { spawnTied } from './child.js';
import { rm, stat } from 'node:fs/promises';
import { KataError } from './errors.js';
import { LineRing } from './line-ring.js';
import type { Logger } from './logger.js';

export interface DaemonOptions {
  /** Short name for logs and errors, e.g. `virtiofsd`. */
  readonly name: string;
  readonly binary: string;
  readonly args: readonly string[];
  /** The socket the daemon creates; it is ready once this exists. */
  readonly socket: string;
  readonly cwd?: string;
  readonly log: Logger;
  /** How long to wait for the socket (default 10 s). */
  readonly readyTimeoutMs?: number;
  /** How long SIGTERM gets before SIGKILL (default 3 s). */
  readonly stopTimeoutMs?: number;
  /** Which plugin runs it (named in errors). */
  readonly plugin?: string;
}

export interface DaemonExit {
  readonly expected: boolean;
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stderrTail: readonly string[];
}

const TAIL_LINES = 20;

export class Daemon {
  readonly #opts: DaemonOptions;
  readonly #child: ChildProcess;
  readonly #stderr = new LineRing(TAIL_LINES);
  #stopping = false;
  /** Settles when the process ends, whoever ended it. */
  readonly exited: Promise<DaemonExit>;

  private constructor(opts: DaemonOptions) {
    this.#opts = opts;
    this.#child = spawnTied(opts.binary, opts.args, { cwd: opts.cwd, stdio: ['ignore', 'ignore', 'pipe'] }, `the ${opts.name} binary`);
    this.#child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
      for (const line of this.#stderr.push(chunk)) opts.log.debug({ daemon: opts.name }, line);
    });
    this.exited = new Promise((resolve) => {
      this.#child.once('error', (e) => {
        this.#stderr.push(`${opts.binary}: ${e.message}\n`);
        resolve({ expected: this.#stopping, code: null, signal: null, stderrTail: this.#stderr.tail(TAIL_LINES) });
      });
      this.#child.once('exit', (code, signal) => {
        this.#stderr.flush();
        const exit = { expected: this.#stopping, code, signal, stderrTail: this.#stderr.tail(TAIL_LINES) };
        if (!exit.expected) opts.log.error({ daemon: opts.name, code, signal, stderr: exit.stderrTail }, `${opts.name} exited unexpectedly`);
        resolve(exit);
      });
    });
  }

  get pid(): number | undefined {
    return this.#child.pid;
  }

  /** Starts the daemon and resolves once its socket exists; on failure nothing is left running. */
  static async start(opts: DaemonOptions): Promise<Daemon> {
    const d = new Daemon(opts);
    const deadline = Date.now() + (opts.readyTimeoutMs ?? 10_000);
    let exit: DaemonExit | undefined;
    void d.exited.then((e) => (exit = e));
    for (;;) {
      if (exit) {
        throw new KataError('KATA_ERR_DAEMON_START', `${opts.name} exited before it was ready (${describeExit(exit)})${tailText(exit.stderrTail)}`, { plugin: opts.plugin, value: opts.binary });
      }
      if (await exists(opts.socket)) break;
      if (Date.now() > deadline) {
        await d.stop();
        throw new KataError('KATA_ERR_DAEMON_START', `${opts.name} did not create its socket ${opts.socket} within ${opts.readyTimeoutMs ?? 10_000} ms${tailText(d.#stderr.tail(TAIL_LINES))}`, {
          plugin: opts.plugin,
          value: opts.binary,
        });
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    opts.log.info({ daemon: opts.name, pid: d.pid, socket: opts.socket }, `${opts.name} ready`);
    return d;
  }

  /** SIGTERM, then SIGKILL after the stop timeout; removes the socket. Safe to call twice. */
  async stop(): Promise<DaemonExit> {
    this.#stopping = true;
    if (this.#child.exitCode === null && this.#child.signalCode === null) {
      this.#child.kill('SIGTERM');
      const timer = setTimeout(() => this.#child.kill('SIGKILL'), this.#opts.stopTimeoutMs ?? 3_000);
      try {
        await this.exited;
      } finally {
        clearTimeout(timer);
      }
    }
    await rm(this.#opts.socket, { force: true });
    return this.exited;
  }

}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

function describeExit(e: DaemonExit): string {
  return e.signal ? `signal ${e.signal}` : e.code === null ? 'could not be started' : `exit code ${e.code}`;
}

function tailText(lines: readonly string[]): string {
  return lines.length ? `; last output:\n    ${lines.join('\n    ')}` : '';
}
