/**
 * TOML parsing. smol-toml is used rather than `toml` (the chosen base) for a measured reason written
 * in the README: on Kata's own files it is several times faster and its errors carry line and
 * column (bench/toml-parsers.ts measures both in the same run). Integers beyond 2^53 (Kata's
 * dragonball file has 9223372036854775807) are kept exact as BigInt.
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { parse, TomlError } from 'smol-toml';
import { KataError } from '../errors.js';
import type { RawConfig } from './types.js';

export class ConfigParseError extends KataError {
  readonly line: number;
  readonly column: number;
  readonly file: string | undefined;
  constructor(message: string, file: string | undefined, line: number, column: number, cause: unknown) {
    super('KATA_ERR_CONFIG_PARSE', `${file ?? '<config>'}:${line}:${column}: ${message}`, { key: `${line}:${column}`, cause });
    this.line = line;
    this.column = column;
    this.file = file;
  }
  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), file: this.file, line: this.line, column: this.column };
  }
}

/**
 * The largest configuration file read: Kata's own files are about 30 KB, so 1 MiB is far beyond
 * any real one, and a larger file is a mistake (or a device, or an attack) to refuse before reading.
 */
export const MAX_CONFIG_BYTES = 1024 * 1024;

/** Sections Kata's format defines as one table each: `[[hypervisor.qemu]]` is a mistake for `[hypervisor.qemu]`. */
const SECTION_PARENTS = ['hypervisor', 'agent'] as const;
const SECTIONS = ['hypervisor', 'agent', 'runtime', 'factory'] as const;

export function parseToml(text: string, file?: string): RawConfig {
  if (text.length > MAX_CONFIG_BYTES) throw tooLarge(file, `${text.length} characters`);
  let raw: RawConfig;
  try {
    raw = parse(text, { integersAsBigInt: 'asNeeded' }) as RawConfig;
  } catch (e) {
    if (e instanceof TomlError) {
      // smol-toml's message is "Invalid TOML document: <what>\n\n<code frame>"; keep the first line.
      const what = e.message.split('\n')[0]?.replace(/^Invalid TOML document: /, '') ?? 'invalid TOML';
      throw new ConfigParseError(what, file, e.line, e.column, e);
    }
    throw new KataError('KATA_ERR_CONFIG_PARSE', `${file ?? '<config>'}: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
  checkSectionsAreTables(raw, file);
  return raw;
}

/** Refuses `[[x]]` where Kata's format has `[x]`, naming the section, instead of a confusing "no section" later. */
function checkSectionsAreTables(raw: RawConfig, file: string | undefined): void {
  const arrays: string[] = [];
  for (const s of SECTIONS) if (Array.isArray(raw[s])) arrays.push(s);
  for (const parent of SECTION_PARENTS) {
    const t = raw[parent];
    if (t === null || typeof t !== 'object' || Array.isArray(t)) continue;
    for (const [name, v] of Object.entries(t)) if (Array.isArray(v) && v.length > 0 && v.every((x) => x !== null && typeof x === 'object' && !Array.isArray(x))) arrays.push(`${parent}.${name}`);
  }
  if (arrays.length === 0) return;
  const first = arrays[0] as string;
  throw new KataError('KATA_ERR_CONFIG_TABLE_ARRAY', `${file ?? '<config>'}: ${arrays.map((a) => `[[${a}]]`).join(', ')} ${arrays.length === 1 ? 'is an array of tables' : 'are arrays of tables'}; Kata's format has one table each: ${arrays.map((a) => `[${a}]`).join(', ')}`, {
    key: first,
    fix: `write the section header with single brackets: [${first}], not [[${first}]]`,
  });
}

function tooLarge(file: string | undefined, size: string): KataError {
  return new KataError('KATA_ERR_CONFIG_TOO_LARGE', `${file ?? '<config>'} is ${size}, more than the ${MAX_CONFIG_BYTES} bytes (1 MiB) a configuration file may have (Kata's own are about 30 KB)`, { value: file });
}

/**
 * Reads and parses a configuration file. The size is checked on the open file before anything is
 * read, and at most {@link MAX_CONFIG_BYTES} + 1 bytes are read whatever it claims (a device or a
 * file growing meanwhile).
 */
export function readConfigFile(file: string): RawConfig {
  const readError = (e: unknown) => {
    const code = (e as NodeJS.ErrnoException).code;
    return new KataError('KATA_ERR_CONFIG_READ', `cannot read configuration file "${file}": ${code ?? String(e)}`, { value: file, cause: e });
  };
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch (e) {
    throw readError(e);
  }
  let text: string;
  try {
    let st;
    try {
      st = fstatSync(fd);
    } catch (e) {
      throw readError(e);
    }
    if (st.isDirectory()) throw readError(Object.assign(new Error('EISDIR'), { code: 'EISDIR' }));
    if (!st.isFile()) throw new KataError('KATA_ERR_CONFIG_READ', `cannot read configuration file "${file}": not a regular file`, { value: file });
    if (st.size > MAX_CONFIG_BYTES) throw tooLarge(file, `${st.size} bytes`);
    const buf = Buffer.alloc(MAX_CONFIG_BYTES + 1);
    let n = 0;
    try {
      for (let r; n < buf.length && (r = readSync(fd, buf, n, buf.length - n, null)) > 0; ) n += r;
    } catch (e) {
      throw readError(e);
    }
    if (n > MAX_CONFIG_BYTES) throw tooLarge(file, `more than ${MAX_CONFIG_BYTES} bytes`);
    text = buf.subarray(0, n).toString('utf8');
  } finally {
    closeSync(fd);
  }
  return parseToml(text, file);
}
