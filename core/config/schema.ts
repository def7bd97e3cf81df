/**
 * The shape check: every table of the configuration is validated by every schema that claims it
 * (the core's and the loaded plugins'), all errors at once, each reported as
 * `hypervisor.clh.default_memory: must be >= 0`. Keys no schema declares are returned as warnings,
 * never errors (Kata ignores unknown keys too).
 *
 * Built-in schemas come precompiled (scripts/compile-schemas.ts); third-party plugin schemas are
 * compiled with ajv on first use.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { DIST_ROOT } from '../paths.js';
import type { ErrorObject } from 'ajv';
import { KataError, formatValue, type Problem } from '../errors.js';
import { AJV_OPTIONS } from './ajv-options.js';

export interface ValidateFn {
  (data: unknown): boolean;
  errors?: ErrorObject[] | null;
}

/** One schema applied to one table. `table` is a dotted path; `*` matches the active hypervisor or any agent. */
export interface TableSchema {
  readonly table: string;
  readonly name: string;
  /** `core`, or the plugin that contributed it. */
  readonly owner: string;
  readonly validate: ValidateFn;
  /** Keys the schema declares, per sub-table ('' = the table itself). */
  readonly keys: Readonly<Record<string, readonly string[]>>;
}

interface PrecompiledModule {
  schemaKeys: Record<string, Record<string, string[]>>;
  validatorNames: Record<string, string>;
  [validator: string]: unknown;
}

let precompiled: Promise<PrecompiledModule> | undefined;

function loadPrecompiled(): Promise<PrecompiledModule> {
  precompiled ??= import(pathToFileURL(path.join(DIST_ROOT, 'schemas', 'validators.js')).href).catch((e: unknown) => {
    precompiled = undefined;
    throw new KataError('KATA_ERR_INTERNAL', 'precompiled schema validators are missing; run `npm run build`', { cause: e });
  }) as Promise<PrecompiledModule>;
  return precompiled;
}

/** A built-in schema (a file in schemas/) applied to `table`. */
export async function builtinSchema(file: string, table: string, owner: string): Promise<TableSchema> {
  const mod = await loadPrecompiled();
  const fnName = mod.validatorNames[file];
  const validate = fnName ? (mod[fnName] as ValidateFn | undefined) : undefined;
  const keys = mod.schemaKeys[file];
  if (!validate || !keys) {
    throw new KataError('KATA_ERR_PLUGIN_SCHEMA', `no precompiled schema "${file}" (rebuild with \`npm run build\`)`, { plugin: owner === 'core' ? undefined : owner });
  }
  return { table, name: file, owner, validate, keys };
}

/**
 * A third-party plugin's schema: an object, or a path relative to the plugin module. Compiled with
 * ajv, which is only imported when a plugin needs it.
 */
export async function pluginSchema(schemaRef: string | object, table: string, owner: string, moduleUrl: string | undefined): Promise<TableSchema> {
  let schema: Record<string, unknown>;
  let name: string;
  try {
    if (typeof schemaRef === 'string') {
      const base = moduleUrl?.startsWith('file:') ? path.dirname(fileURLToPath(moduleUrl)) : process.cwd();
      const file = path.resolve(base, schemaRef);
      schema = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>;
      name = schemaRef;
    } else {
      schema = structuredClone(schemaRef) as Record<string, unknown>;
      name = `${owner} (inline schema)`;
    }
    const { Ajv } = await import('ajv');
    const ajv = new Ajv({ ...AJV_OPTIONS });
    const validate = ajv.compile(schema) as ValidateFn;
    const props = (schema.properties ?? {}) as Record<string, unknown>;
    return { table, name, owner, validate, keys: { '': Object.keys(props) } };
  } catch (e) {
    throw new KataError('KATA_ERR_PLUGIN_SCHEMA', `configuration schema ${typeof schemaRef === 'string' ? `"${schemaRef}" ` : ''}cannot be loaded: ${e instanceof Error ? e.message : String(e)}`, {
      plugin: owner,
      cause: e,
    });
  }
}

export interface ShapeResult {
  readonly problems: Problem[];
  /** Dotted keys no schema declares. */
  readonly unknownKeys: string[];
}

/**
 * Checks `data` (mutated: defaults are filled in) against `schemas`. `hypervisorTable` is the
 * active `hypervisor.<name>`, which `hypervisor.*` tables resolve to.
 */
export function checkShape(data: Record<string, unknown>, schemas: readonly TableSchema[], hypervisorTable: string): ShapeResult {
  const problems: Problem[] = [];
  const known = new Map<string, Set<string>>();
  const knownAt = (table: string) => {
    let s = known.get(table);
    if (!s) known.set(table, (s = new Set()));
    return s;
  };
  for (const s of schemas) {
    const tables = resolveTables(s.table, data, hypervisorTable);
    for (const table of tables) {
      const target = table === '' ? data : getTable(data, table);
      if (target === undefined) continue;
      if (!s.validate(target)) {
        for (const err of s.validate.errors ?? []) problems.push(toProblem(err, table, target, s.owner));
      }
      for (const [sub, keys] of Object.entries(s.keys)) {
        for (const t of resolveTables(sub === '' ? table : joinKey(table, sub), data, hypervisorTable)) {
          const set = knownAt(t);
          for (const k of keys) set.add(k);
        }
      }
    }
  }
  const unknownKeys: string[] = [];
  for (const [table, keys] of known) {
    const target = table === '' ? data : getTable(data, table);
    if (!isPlainObject(target)) continue;
    for (const k of Object.keys(target)) {
      if (keys.has(k)) continue;
      // Sub-tables are reported through their own keys when some schema knows them.
      const child = joinKey(table, k);
      if (isPlainObject(target[k]) && known.has(child)) continue;
      unknownKeys.push(child);
    }
  }
  // A key a schema refuses is reported once, as that problem, never also as an ignored key.
  const refused = new Set(problems.map((p) => p.key));
  return { problems: dedupe(problems), unknownKeys: unknownKeys.filter((k) => !refused.has(k)).sort() };
}

function resolveTables(pattern: string, data: Record<string, unknown>, hypervisorTable: string): string[] {
  if (pattern === '') return [''];
  if (pattern === 'hypervisor.*') return [hypervisorTable];
  if (!pattern.includes('*')) return [pattern];
  const [head, ...rest] = pattern.split('.*');
  const parent = getTable(data, head ?? '');
  if (!isPlainObject(parent)) return [];
  return Object.keys(parent)
    .filter((k) => isPlainObject(parent[k]))
    .map((k) => `${head}.${k}${rest.join('.*')}`);
}

export function getTable(data: Record<string, unknown>, dotted: string): Record<string, unknown> | undefined {
  let cur: unknown = data;
  for (const part of dotted.split('.')) {
    if (!isPlainObject(cur)) return undefined;
    cur = cur[part];
  }
  return isPlainObject(cur) ? cur : undefined;
}

export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Date);
}

function joinKey(table: string, key: string): string {
  return table === '' ? key : `${table}.${key}`;
}

function toProblem(err: ErrorObject, table: string, target: unknown, owner: string): Problem {
  const parts = err.instancePath.split('/').slice(1).map((p) => p.replace(/~1/g, '/').replace(/~0/g, '~'));
  let key = [table, ...parts].filter(Boolean).join('.');
  let value = parts.reduce<unknown>((v, p) => (v !== null && typeof v === 'object' ? (v as Record<string, unknown>)[p] : undefined), target);
  let reason = err.message ?? 'is invalid';
  switch (err.keyword) {
    case 'required': {
      const missing = (err.params as { missingProperty: string }).missingProperty;
      key = joinKey(key, missing);
      value = undefined;
      reason = 'is required';
      break;
    }
    case 'enum': {
      const allowed = (err.params as { allowedValues: unknown[] }).allowedValues;
      reason = `must be one of ${allowed.map((a) => formatValue(a)).join(', ')}`;
      break;
    }
    case 'type': {
      const what = typeWords((err.params as { type: string | string[] }).type);
      reason = typeof value === 'bigint' ? `must be ${what} (the value is too large)` : `must be ${what}`;
      break;
    }
    case 'additionalProperties': {
      const extra = (err.params as { additionalProperty: string }).additionalProperty;
      key = joinKey(key, extra);
      value = isPlainObjectValue(value) ? value[extra] : undefined;
      reason = owner === 'core' ? 'is not a key of this table' : `is not a key plugin ${owner} knows`;
      break;
    }
    case 'minimum':
    case 'exclusiveMinimum':
    case 'maximum':
    case 'exclusiveMaximum': {
      const limit = (err.params as { limit: number }).limit;
      reason = `must be ${BOUND_WORDS[err.keyword]} ${limit}`;
      break;
    }
    case 'pattern':
      reason = `must match the pattern ${(err.params as { pattern: string }).pattern}`;
      break;
    default:
      break;
  }
  const problem: Problem = {
    code: 'KATA_ERR_CONFIG_SCHEMA',
    key,
    reason,
    fix: fixFor(err, reason, typeof value === 'bigint'),
    ...(value === undefined ? {} : { value }),
    ...(owner === 'core' ? {} : { plugin: owner }),
  };
  return problem;
}

const BOUND_FIX: Record<string, string> = { minimum: 'of at least', exclusiveMinimum: 'greater than', maximum: 'of at most', exclusiveMaximum: 'less than' };
const BOUND_WORDS: Record<string, string> = { minimum: 'at least', exclusiveMinimum: 'more than', maximum: 'at most', exclusiveMaximum: 'less than' };

/** JSON Schema type names as words, TOML's: `integer` → "an integer", `object` → "a table". */
function typeWords(type: string | string[]): string {
  const one = (t: string) => ({ integer: 'an integer', number: 'a number', string: 'a string', boolean: 'a boolean (true or false)', array: 'an array', object: 'a table', null: 'absent' })[t] ?? t;
  return (Array.isArray(type) ? type : type.split(',')).map(one).join(' or ');
}

function isPlainObjectValue(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/** An instruction ("give an integer"), never the reason restated. */
function fixFor(err: ErrorObject, reason: string, tooLarge: boolean): string {
  switch (err.keyword) {
    case 'type':
      return tooLarge ? 'give a smaller integer' : `give ${typeWords((err.params as { type: string | string[] }).type)}`;
    case 'enum':
      return 'use one of the allowed values';
    case 'required':
      return 'add this key';
    case 'additionalProperties':
      return 'remove this key, or correct its spelling';
    case 'minimum':
    case 'exclusiveMinimum':
    case 'maximum':
    case 'exclusiveMaximum':
      return `give a value ${BOUND_FIX[err.keyword]} ${(err.params as { limit: number }).limit}`;
    case 'pattern':
      return `give a value matching ${(err.params as { pattern: string }).pattern}`;
    default:
      return `change the value: it ${reason}`;
  }
}

/** One problem per key: a value of the wrong type also fails its enum or range, which says nothing new. */
function dedupe(problems: Problem[]): Problem[] {
  const seen = new Set<string>();
  return problems.filter((p) => {
    if (seen.has(p.key)) return false;
    seen.add(p.key);
    return true;
  });
}
