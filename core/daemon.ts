/**
 * A supervised host-side process that serves a unix socket (virtiofsd, and other daemons a sandbox
 * needs): started, ready when its socket appears, its stderr kept and logged, its exit observed,
 * stopped with SIGTERM then SIGKILL. Plugins use it from their lifecycle hooks.
 */
import { rm, stat } from 'node:fs/promises';
import { KataError } from './errors.js';
import type { Logger } from './logger.js';
import { SupervisedProcess, describeExit } from './supervised.js';

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
/** How long a daemon gets to disappear after SIGKILL. */
const KILL_TIMEOUT_MS = 2_000;

export class Daemon {
  readonly #opts: DaemonOptions;
  readonly #proc: SupervisedProcess;
  /** Settles when the process ends, whoever ended it. */
  readonly exited: Promise<DaemonExit>;

  private constructor(opts: DaemonOptions) {
    this.#opts = opts;
    this.#proc = SupervisedProcess.start({ name: opts.name, binary: opts.binary, args: opts.args, cwd: opts.cwd, log: opts.log, what: `the ${opts.name} binary`, tailLines: TAIL_LINES, outputLevel: 'debug' });
    this.exited = this.#proc.exited.then((e) => {
      const exit = { expected: e.expected, code: e.code, signal: e.signal, stderrTail: e.stderrTail };
      if (!exit.expected && !e.spawnError) opts.log.error({ daemon: opts.name, code: e.code, signal: e.signal, stderr: exit.stderrTail }, `${opts.name} exited unexpectedly`);
      return exit;
    });
  }

  get pid(): number | undefined {
    return this.#proc.pid;
  }

  /** Starts the daemon and resolves once its socket exists; on failure nothing is left running. */
  static async start(opts: DaemonOptions): Promise<Daemon> {
    const d = new Daemon(opts);
    const deadline = Date.now() + (opts.readyTimeoutMs ?? 10_000);
    for (;;) {
      const exit = d.#proc.exit;
      if (exit) {
        throw new KataError('KATA_ERR_DAEMON_START', `${opts.name} exited before it was ready (${describeExit(exit)})${tailText(exit.stderrTail)}`, { plugin: opts.plugin, value: opts.binary });
      }
      if (await exists(opts.socket)) break;
      if (Date.now() > deadline) {
        await d.stop();
        throw new KataError('KATA_ERR_DAEMON_START', `${opts.name} did not create its socket ${opts.socket} within ${opts.readyTimeoutMs ?? 10_000} ms${tailText(d.#proc.tail(TAIL_LINES))}`, {
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
    await this.#proc.stop(() => [{ name: 'SIGTERM', action: () => this.#proc.signal('SIGTERM'), waitMs: this.#opts.stopTimeoutMs ?? 3_000 }], KILL_TIMEOUT_MS);
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


function tailText(lines: readonly string[]): string {
  return lines.length ? `; last output:\n    ${lines.join('\n    ')}` : '';
}
