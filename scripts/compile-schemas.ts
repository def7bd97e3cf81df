/**
 * Precompiles every JSON Schema in schemas/ into one ES module of standalone ajv validators
 * (dist/schemas/validators.js), so that no schema is compiled at run time: compiling them with ajv
 * on each `kata-runtime` start costs tens of milliseconds, against a start-up budget of 2x a bare
 * `node -e 0` (issue 2). Third-party plugin schemas, unknown at build time, are compiled lazily.
 *
 * Alongside each validator it records the keys each schema declares per TOML table, which the core
 * uses to warn about unknown keys.
 */
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Ajv } from 'ajv';
import standaloneModule from 'ajv/dist/standalone/index.js';
import { PACKAGE_ROOT } from '../core/paths.js';
import { AJV_OPTIONS } from '../core/config/ajv-options.js';

interface SchemaDoc {
  $id?: string;
  properties?: Record<string, SchemaDoc & { $ref?: string }>;
  additionalProperties?: (SchemaDoc & { $ref?: string }) | boolean;
  definitions?: Record<string, SchemaDoc>;
  $ref?: string;
}

/** Keys per table: '' for the schema's own level, 'runtime', 'agent.*' … for sub-tables given by $ref. */
export function tableKeys(schema: SchemaDoc): Record<string, string[]> {
  const out: Record<string, string[]> = { '': Object.keys(schema.properties ?? {}) };
  const deref = (s: SchemaDoc | undefined): SchemaDoc | undefined => {
    const ref = s?.$ref;
    if (!ref) return s;
    const name = ref.replace('#/definitions/', '');
    return schema.definitions?.[name];
  };
  for (const [k, v] of Object.entries(schema.properties ?? {})) {
    const d = deref(v);
    if (d && d !== v && d.properties) out[k] = Object.keys(d.properties);
    const ap = typeof v.additionalProperties === 'object' ? deref(v.additionalProperties) : undefined;
    if (ap?.properties) out[`${k}.*`] = Object.keys(ap.properties);
  }
  return out;
}

async function main(): Promise<void> {
  const dir = path.join(PACKAGE_ROOT, 'schemas');
  const files = (await readdir(dir)).filter((f) => f.endsWith('.schema.json')).sort();
  const ajv = new Ajv({ ...AJV_OPTIONS, code: { source: true, esm: true, lines: false } });
  const exportsMap: Record<string, string> = {};
  const keys: Record<string, Record<string, string[]>> = {};
  for (const f of files) {
    const schema = JSON.parse(await readFile(path.join(dir, f), 'utf8')) as SchemaDoc;
    ajv.addSchema(schema as object, f);
    exportsMap[ident(f)] = f;
    keys[f] = tableKeys(schema);
  }
  let code = esmRequires(standaloneCode(ajv, exportsMap));
  code += `\nexport const schemaKeys = ${JSON.stringify(keys)};\n`;
  code += `export const validatorNames = ${JSON.stringify(Object.fromEntries(files.map((f) => [f, ident(f)])))};\n`;
  const out = path.join(PACKAGE_ROOT, 'dist', 'schemas');
  await mkdir(out, { recursive: true });
  await writeFile(path.join(out, 'validators.js'), code);
  process.stdout.write(`compiled ${files.length} schemas into dist/schemas/validators.js\n`);
}

// ajv's ESM output still require()s its small runtime helpers; turn those into imports.
function esmRequires(code: string): string {
  const imports: string[] = [];
  const out = code.replace(/require\("([^"]+)"\)/g, (_m, mod: string) => {
    const name = `__rt${imports.length}`;
    imports.push(`import ${name} from '${mod}.js';`);
    return name;
  });
  return out.replace(/^"use strict";/, `"use strict";${imports.join('')}`);
}

type StandaloneFn = (ajv: Ajv, refsOrFunc: Record<string, string>) => string;
const standaloneCode: StandaloneFn =
  (standaloneModule as unknown as { default?: StandaloneFn }).default ?? (standaloneModule as unknown as StandaloneFn);

function ident(file: string): string {
  return file.replace(/\.schema\.json$/, '').replace(/[^A-Za-z0-9]+(.)/g, (_, c: string) => c.toUpperCase());
}

await main();
