/**
 * TOML parsing. smol-toml is used rather than `toml` (the chosen base) for a measured reason written
 * in the README: on Kata's own files it is several times faster and its errors carry line and
 * column (bench/toml-parsers.ts measures both in the same run). Integers beyond 2^53 (Kata's
 * dragonball file has 9223372036854775807) are kept exact as BigInt.
 */
import { readFileSync } from 'node:fs';
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

export function parseToml(text: string, file?: string): RawConfig {
  try {
    return parse(text, { integersAsBigInt: 'asNeeded' }) as RawConfig;
  } catch (e) {
    if (e instanceof TomlError) {
      // smol-toml's message is "Invalid TOML document: <what>\n\n<code frame>"; keep the first line.
      const what = e.message.split('\n')[0]?.replace(/^Invalid TOML document: /, '') ?? 'invalid TOML';
      throw new ConfigParseError(what, file, e.line, e.column, e);
    }
    throw new KataError('KATA_ERR_CONFIG_PARSE', `${file ?? '<config>'}: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
}

export function readConfigFile(file: string): RawConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new KataError('KATA_ERR_CONFIG_READ', `cannot read configuration file "${file}": ${code ?? String(e)}`, { value: file, cause: e });
  }
  return parseToml(text, file);
}
