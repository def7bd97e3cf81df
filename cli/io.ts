/**
 * The CLI's view of the outside world, injectable so tests can run commands in-process and capture
 * what they print.
 */
import { writeSync } from 'node:fs';
import { formatProblem, isKataError, ConfigInvalidError, type KataError, type Problem } from '../core/errors.js';

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

export { isKataError };

/** A coded error as `problems[]` entries: a ConfigInvalidError's own list, else the error as one problem. */
export function problemsOf(e: KataError): Problem[] {
  if (e instanceof ConfigInvalidError) return [...e.problems];
  // The plugin is its own field (formatProblem prefixes it when printed): the reason is the words alone.
  const p: Problem = { code: e.code, key: e.key ?? '', reason: e.text, fix: e.fix };
  return [{ ...p, ...(e.value !== undefined ? { value: e.value } : {}), ...(e.plugin ? { plugin: e.plugin } : {}), ...(e.hook ? { hook: e.hook } : {}) }];
}

/**
 * `text` in bold for a terminal; plain when the stream is not one (a pipe, a file, CI logs) or
 * NO_COLOR is set, so logs and tests get no escape codes.
 */
export function bold(text: string, stream: { isTTY?: boolean }, env: NodeJS.ProcessEnv = process.env): string {
  return stream.isTTY && !env.NO_COLOR ? `\x1b[1m${text}\x1b[0m` : text;
}
