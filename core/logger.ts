/**
 * Logging with pino. The CLI logs to stderr at `warn` unless --log-level/--debug say otherwise;
 * the shim logs to `sinks` (shim/log-sinks.ts: containerd's log pipe, the system log). Every plugin
 * gets a child logger bound to `{ plugin: <name> }`.
 *
 * pino itself is loaded on the first message that passes the level, not at start-up: a
 * `kata-runtime validate` that has nothing to warn about never pays for it (about 20 ms of a
 * ~75 ms Node start on these machines, measured by `npm run bench`).
 */
import { createRequire } from 'node:module';
import type { Logger as PinoLogger, LoggerOptions as PinoOptions, DestinationStream } from 'pino';

/** Counters of a {@link LogSink}. */
export interface SinkStats {
  /** Lines handed to the destination. */
  readonly written: number;
  /** Lines dropped: destination full, gone or absent. */
  readonly dropped: number;
  /** The last delivery error (code or message), if any. */
  readonly lastError: string | undefined;
}

/** A destination for whole log lines (each ends with "\n"). */
export interface LogSink {
  /** `fifo:<path>`, `journald:<path>`, `syslog:<path>` or `none`. */
  readonly name: string;
  /**
   * Opens the destination on the logger's first line. Returns a warning when the sink cannot work
   * on this host (the logger writes it once through its other sinks), or undefined.
   */
  open(): string | undefined;
  /** Delivers or drops one line; never throws, never waits. `level` is pino's number (10–60). */
  write(line: string, level: number): void;
  /** Delivers what is still buffered (best effort, bounded) and releases the destination. */
  close(): Promise<void>;
  stats(): SinkStats;
}

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
  /**
   * Write every line to each of these instead (the shim: `[logFifo(…), systemLog()]`). They are
   * opened on the first line; a sink that cannot work here is reported once, as a warning written
   * to the others.
   */
  sinks?: readonly LogSink[];
  name?: string;
  /**
   * Whether logged errors (`err`) carry their stack trace; default true. The CLI drops them below
   * debug level: an operator reads the message and the code, a developer asks for --debug.
   */
  stacks?: boolean;
}

/** pino hands a destination marked with this symbol the level of the line it is about to write. */
const PINO_METADATA = Symbol.for('pino.metadata');

/** One pino destination writing each line to several sinks, each told the line's level. */
class SinkFanout {
  readonly [PINO_METADATA] = true;
  lastLevel = 30;
  constructor(private readonly sinks: readonly LogSink[]) {}
  write(line: string): void {
    for (const s of this.sinks) s.write(line, this.lastLevel);
  }
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
        ...(this.opts.stacks === false ? { serializers: { err: (e: Error) => ({ ...pino.stdSerializers.err(e), stack: undefined }) } } : {}),
      };
      const sinks = this.opts.sinks;
      const warnings = sinks ? sinks.map((s) => [s.name, s.open()] as const).filter((w): w is readonly [string, string] => w[1] !== undefined) : [];
      const dest: DestinationStream = sinks ? new SinkFanout(sinks) : (this.opts.stream ?? pino.destination({ fd: this.opts.fd ?? 2, sync: true }));
      this.#pino = pino(options, dest);
      for (const [sink, message] of warnings) this.#pino.warn({ sink }, message);
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
