/**
 * Logging with pino. The CLI logs to stderr at `warn` unless --log-level/--debug say otherwise;
 * the shim (later) logs to containerd's log pipe. Every plugin gets a child logger bound to
 * `{ plugin: <name> }`.
 */
import { pino, type Logger, type Level } from 'pino';

export type { Logger };
export type LogLevel = Level | 'silent';

export const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export interface LoggerOptions {
  level?: LogLevel;
  /** File descriptor to write to; 2 (stderr) by default. */
  fd?: number;
  /** Write log lines here instead of a file descriptor (tests, in-process CLI). */
  stream?: { write(line: string): void };
  name?: string;
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  return pino(
    {
      name: opts.name ?? 'kata-runtime',
      level: opts.level ?? 'warn',
      timestamp: pino.stdTimeFunctions.isoTime,
      base: { pid: process.pid },
    },
    opts.stream ?? pino.destination({ fd: opts.fd ?? 2, sync: true }),
  );
}

/** A logger that drops everything (library use and tests). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
