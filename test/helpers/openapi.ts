/**
 * Validates request bodies against a component schema of an OpenAPI document (the Cloud
 * Hypervisor spec in ../shared/reference/), with ajv. The reference directory is not part of the
 * project: tests that use it check {@link referenceFile} first and skip when it is absent.
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { parse } from 'yaml';
import { PACKAGE_ROOT } from '../../core/paths.js';

/** Where the shared reference material lives, next to the package. */
export const REFERENCE_DIR = path.resolve(PACKAGE_ROOT, '..', 'shared', 'reference');

/** Cloud Hypervisor's OpenAPI spec. */
export const CLH_OPENAPI = path.join(REFERENCE_DIR, 'cloud-hypervisor.yaml');

/** The path of a reference file, or undefined when it is absent (the caller skips). */
/** The pinned subset of the Cloud Hypervisor spec the simulator falls back to when ../shared is absent. */
export const CLH_API_SUBSET = path.join(PACKAGE_ROOT, 'test', 'fixtures', 'clh-api-subset.json');

export function referenceFile(file: string): string | undefined {
  return existsSync(file) ? file : undefined;
}

export interface OpenApiOptions {
  /**
   * Reject properties a schema does not declare (OpenAPI leaves objects open). Catches a
   * misspelt field that the VMM would otherwise ignore or refuse at run time.
   */
  closed?: boolean;
}

export interface OpenApiValidator {
  (data: unknown): boolean;
  /** ajv's errors of the last call, one `path: message` line each. */
  readonly messages: () => string[];
}

/**
 * Compiles `#/components/schemas/<component>` of the OpenAPI document at `file`. OpenAPI-only
 * keywords (nullable, example, deprecated …) are ignored, as are formats such as int64.
 */
export async function compileComponent(file: string, component: string, opts: OpenApiOptions = {}): Promise<OpenApiValidator> {
  const doc = parse(await readFile(file, 'utf8')) as { components?: { schemas?: Record<string, unknown> } };
  const schemas = doc.components?.schemas;
  if (!schemas || !(component in schemas)) throw new Error(`${file} has no components.schemas.${component}`);
  const components = opts.closed ? closeObjects(structuredClone(doc.components)) : doc.components;
  const id = `openapi:${path.basename(file)}`;
  const ajv = new Ajv({ strict: false, validateFormats: false, allErrors: true });
  ajv.addSchema({ $id: id, components }, id);
  const validate = ajv.getSchema(`${id}#/components/schemas/${component}`) as ValidateFunction | undefined;
  if (!validate) throw new Error(`cannot compile components.schemas.${component} of ${file}`);
  const fn = ((data: unknown) => validate(data)) as OpenApiValidator;
  Object.defineProperty(fn, 'messages', { value: () => formatErrors(validate.errors) });
  return fn;
}

function formatErrors(errors: ErrorObject[] | null | undefined): string[] {
  return (errors ?? []).map((e) => {
    const extra = e.keyword === 'additionalProperties' ? ` (${(e.params as { additionalProperty: string }).additionalProperty})` : '';
    return `${e.instancePath || '/'}: ${e.message ?? e.keyword}${extra}`;
  });
}

/** Sets `additionalProperties: false` on every object schema that lists properties and says nothing else. */
function closeObjects<T>(node: T): T {
  if (Array.isArray(node)) {
    for (const item of node) closeObjects(item);
  } else if (node !== null && typeof node === 'object') {
    const o = node as Record<string, unknown>;
    if (o.properties !== null && typeof o.properties === 'object' && !('additionalProperties' in o)) o.additionalProperties = false;
    for (const v of Object.values(o)) closeObjects(v);
  }
  return node;
}
