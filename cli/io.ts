/**
 * The CLI's view of the outside world, injectable so tests can run commands in-process and capture
 * what they print.
 */
import path from 'node:path';
import { writeSync } from 'node:fs';
import { formatProblem, isKataError, ConfigInvalidError, type KataError } from '../core/errors.js';

export interface CliIO {
  out(text: string): void;
  err(text: string): void;
  env: NodeJS.ProcessEnv;
}

export const processIO: CliIO = {
  out: (t) => writeAll(1, t),
  err: (t) => writeAll(2, t),
  env: process.env,
};

function writeAll(fd: number, text: string): void {
  const buf = Buffer.from(text);
  let off = 0;
  while (off < buf.length) off += writeSync(fd, buf, off);
}

/** JSON.stringify that writes BigInt values (Kata's files have integers beyond 2^53) as numbers in text. */
export function toJson(value: unknown): string {
  return JSON.stringify(value, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v), 2);
}

/** The text of a coded error for a terminal: the message, then its fix and code. No stack trace. */
export function describeError(e: KataError): string {
  if (e instanceof ConfigInvalidError) {
    const head = `kata-runtime: ${e.configPath ? `${e.configPath}: ` : ''}invalid configuration (${e.problems.length} problem${e.problems.length === 1 ? '' : 's'}):`;
    return [head, ...e.problems.map((p) => `  - ${formatProblem(p)}`)].join('\n') + '\n';
  }
  return `kata-runtime: ${e.message}\n  fix: ${e.fix}\n  code: ${e.code}\n`;
}

/**
 * With --debug: what a plugin's error was caused by, with the stack frames in the plugin's own files
 * (its file and line); frames of the runtime and of Node itself are left out, they only tell where
 * the runtime called the plugin.
 */
export function describeCause(e: KataError, runtimeRoot: string): string {
  const out: string[] = [];
  let cause: unknown = e.cause;
  for (let depth = 0; cause !== undefined && cause !== null && depth < 4; depth++) {
    const c = cause as { name?: unknown; message?: unknown; stack?: unknown; cause?: unknown };
    out.push(`  cause: ${typeof c.name === 'string' ? `${c.name}: ` : ''}${typeof c.message === 'string' ? c.message : String(cause)}`);
    const frames = typeof c.stack === 'string' ? c.stack.split('\n').filter((l) => /^\s+at /.test(l)) : [];
    for (const f of frames) if (!isRuntimeFrame(f, runtimeRoot)) out.push(`    ${f.trim()}`);
    cause = c.cause;
  }
  return out.length === 0 ? '' : out.join('\n') + '\n';
}

function isRuntimeFrame(frame: string, runtimeRoot: string): boolean {
  const own = [path.join(runtimeRoot, 'dist') + path.sep, path.join(runtimeRoot, 'node_modules') + path.sep];
  return /\(?node:/.test(frame) || own.some((dir) => frame.includes(dir));
}

export { isKataError };

export { problemsOf } from '../core/validate-report.js';

/**
 * `text` in bold for a terminal; plain when the stream is not one (a pipe, a file, CI logs) or
 * NO_COLOR is set, so logs and tests get no escape codes.
 */
export function bold(text: string, stream: { isTTY?: boolean }, env: NodeJS.ProcessEnv = process.env): string {
  return stream.isTTY && !env.NO_COLOR ? `\x1b[1m${text}\x1b[0m` : text;
}
