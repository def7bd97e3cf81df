/**
 * Logging with pino. The CLI logs to stderr at `warn` unless --log-level/--debug say otherwise;
 * the shim (later) logs to containerd's log pipe. Every plugin gets a child logger bound to
 * `{ plugin: <name> }`.
 *
 * pino itself is loaded on the first message that passes the level, not at start-up: a
 * `kata-runtime validate` that has nothing to warn about never pays for it (about 20 ms of a
 * ~75 ms Node start on these machines, measured by `npm run bench`).
 */
import { createRequire } from 'node:module';
import type { Logger as PinoLogger, LoggerOptions as PinoOptions, DestinationStream } from 'pino';

export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';

export const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

const LEVEL_VALUES: Record<LogLevel, number> = { fatal: 60, error: 50, warn: 40, info: 30, debug: 20, trace: 10, silent: Infinity };

export interface LogFn {
  (obj: object, msg?: string): void;
  (msg: string): void;
}

/** The logger the core and plugins use: pino's call shapes, structured first argument. */
export interface Logger {
  readonly level: LogLevel;
  fatal: LogFn;
  error: LogFn;
  warn: LogFn;
  info: LogFn;
  debug: LogFn;
  trace: LogFn;
  child(bindings: Record<string, unknown>): Logger;
  isLevelEnabled(level: LogLevel): boolean;
}

export interface LoggerOptions {
  level?: LogLevel;
  /** File descriptor to write to; 2 (stderr) by default. */
  fd?: number;
  /** Write log lines here instead of a file descriptor (tests, in-process CLI). */
  stream?: { write(line: string): void };
  name?: string;
}

const require = createRequire(import.meta.url);

/** Creates the pino instance on first use; shared by a root logger and all its children. */
class PinoHolder {
  #pino: PinoLogger | undefined;
  constructor(private readonly opts: LoggerOptions) {}
  get(): PinoLogger {
    if (!this.#pino) {
      const { pino } = require('pino') as typeof import('pino');
      const options: PinoOptions = {
        name: this.opts.name ?? 'kata-runtime',
        level: this.opts.level ?? 'warn',
        timestamp: pino.stdTimeFunctions.isoTime,
        base: { pid: process.pid },
      };
      const dest: DestinationStream = this.opts.stream ?? pino.destination({ fd: this.opts.fd ?? 2, sync: true });
      this.#pino = pino(options, dest);
    }
    return this.#pino;
  }
}

class LazyLogger implements Logger {
  readonly level: LogLevel;
  readonly #holder: PinoHolder;
  readonly #bindings: readonly Record<string, unknown>[];
  #real: PinoLogger | undefined;

  constructor(holder: PinoHolder, level: LogLevel, bindings: readonly Record<string, unknown>[]) {
    this.#holder = holder;
    this.level = level;
    this.#bindings = bindings;
  }

  isLevelEnabled(level: LogLevel): boolean {
    return LEVEL_VALUES[level] >= LEVEL_VALUES[this.level] && this.level !== 'silent';
  }

  child(bindings: Record<string, unknown>): Logger {
    return new LazyLogger(this.#holder, this.level, [...this.#bindings, bindings]);
  }

  #emit(level: Exclude<LogLevel, 'silent'>, args: [object | string, string?]): void {
    if (!this.isLevelEnabled(level)) return;
    this.#real ??= this.#bindings.reduce<PinoLogger>((l, b) => l.child(b), this.#holder.get());
    (this.#real[level] as (...a: unknown[]) => void)(...args);
  }

  fatal: LogFn = (...a: [object | string, string?]) => this.#emit('fatal', a);
  error: LogFn = (...a: [object | string, string?]) => this.#emit('error', a);
  warn: LogFn = (...a: [object | string, string?]) => this.#emit('warn', a);
  info: LogFn = (...a: [object | string, string?]) => this.#emit('info', a);
  debug: LogFn = (...a: [object | string, string?]) => this.#emit('debug', a);
  trace: LogFn = (...a: [object | string, string?]) => this.#emit('trace', a);
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  const level = opts.level ?? 'warn';
  return new LazyLogger(new PinoHolder({ ...opts, level }), level, []);
}

/** A logger that drops everything (library use and tests). */
export function silentLogger(): Logger {
  return createLogger({ level: 'silent' });
}
