/**
 * Plugin loading. Built-in plugins are handed to the runtime by the executables (a list of
 * {@link PluginSource}, `plugins/builtin.ts`); third-party plugins are imported by absolute path, path relative to the
 * configuration file, or package name from `[runtime] plugins`. Which of them apply is each manifest's `activation`. Each is checked in a fixed order
 * before its apply() runs (as fastify-plugin does):
 *
 *   0. running as root, the module's file (its real path) and every directory above it are owned by
 *      root and not group/world-writable (KATA_ERR_UNTRUSTED_PATH), checked before import() runs
 *      any of its code (core/trusted-path.ts)
 *   1. the module imports (KATA_ERR_PLUGIN_NOT_FOUND / KATA_ERR_PLUGIN_IMPORT)
 *   2. it has a default export (KATA_ERR_PLUGIN_NO_DEFAULT_EXPORT)
 *   3. the manifest has the right shape and apply() is a function (KATA_ERR_PLUGIN_BAD_MANIFEST)
 *   4. its name is not taken (KATA_ERR_PLUGIN_DUPLICATE)
 *   5. its API range includes this runtime's plugin API (KATA_ERR_PLUGIN_API_VERSION)
 *   6. once all are loaded: every `requires` is provided (KATA_ERR_PLUGIN_MISSING_DEPENDENCY)
 *   7. apply() does not throw (KATA_ERR_PLUGIN_APPLY)
 */
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
// Only the three functions used: the whole semver package costs a CLI start ~10 ms more.
import satisfies from 'semver/functions/satisfies.js';
import validVersion from 'semver/functions/valid.js';
import validRange from 'semver/ranges/valid.js';
import { KataError, errorText } from './errors.js';
import { createTapView, type Hooks } from './hooks.js';
import type { Logger } from './logger.js';
import { builtinSchema } from './config/schema.js';
import { PLUGIN_API_VERSION, type ActivationCondition, type ActivationValue, type KataPlugin, type PluginActivation, type PluginManifest, type PluginSource } from './plugin-api.js';
import type { RawConfig } from './config/types.js';
import { assertTrustedPath, trustCheckApplies } from './trusted-path.js';

export interface LoadedPlugin {
  readonly plugin: KataPlugin;
  readonly manifest: PluginManifest;
  readonly builtin: boolean;
  /** What was imported: the built-in name, a file URL or a package name. */
  readonly specifier: string;
  /** Resolved module URL, when known (for schema paths relative to the module). */
  readonly moduleUrl: string | undefined;
  /** Why the plugin was loaded, e.g. `shared_fs = "virtio-fs"`. */
  readonly reason: string;
}

let builtins: readonly PluginSource[] = Object.freeze([]);
const builtinCache = new WeakMap<PluginSource, Promise<LoadedPlugin>>();

/**
 * Sets the built-in plugins offered to every configuration. The executables call it once with
 * `plugins/builtin.ts`'s list (the core imports no plugin); a test or an embedding program may
 * hand other lists, or pass `builtins` to each judgement instead.
 */
export function useBuiltinPlugins(sources: readonly PluginSource[]): void {
  builtins = Object.freeze([...sources]);
}

/** The built-in plugins set by {@link useBuiltinPlugins}. */
export function builtinPlugins(): readonly PluginSource[] {
  return builtins;
}

/** Imports and checks a built-in plugin once per process. */
export function importBuiltin(source: PluginSource): Promise<LoadedPlugin> {
  let loaded = builtinCache.get(source);
  if (!loaded) {
    loaded = (async () => {
      let mod: unknown;
      try {
        mod = await source.load();
      } catch (e) {
        throw new KataError('KATA_ERR_PLUGIN_IMPORT', `built-in plugin "${source.name}" failed to import: ${errorText(e)}`, { plugin: source.name, cause: e });
      }
      const loaded = await checkModule(mod, { specifier: source.name, moduleUrl: undefined, builtin: true, reason: '' });
      if (source.manifest && JSON.stringify(source.manifest) !== JSON.stringify(loaded.manifest)) {
        throw new KataError('KATA_ERR_PLUGIN_BAD_MANIFEST', `built-in plugin "${source.name}": the manifest it was offered with differs from its module's`, { plugin: source.name });
      }
      return loaded;
    })();
    builtinCache.set(source, loaded);
    loaded.catch(() => builtinCache.delete(source));
  }
  return loaded;
}

/** Whether a plugin's `activation` matches a configuration, and the words that say why it does. */
export function activationOf(activation: PluginActivation | undefined, raw: RawConfig, hypervisorName: string): { active: boolean; reason: string } {
  if (!activation) return { active: true, reason: '' };
  const why: string[] = [];
  if (activation.hypervisor !== undefined) {
    if (activation.hypervisor !== hypervisorName) return { active: false, reason: `not [hypervisor.${activation.hypervisor}]` };
    why.push(`[hypervisor.${hypervisorName}] section`);
  }
  for (const c of activation.when ?? []) {
    const v = conditionValue(c, raw, hypervisorName);
    if (v === undefined || !c.in.includes(v)) return { active: false, reason: `${shortKey(c.key)} is not ${c.in.map((x) => JSON.stringify(x)).join(' or ')}` };
    why.push(`${shortKey(c.key)} = ${JSON.stringify(v)}`);
  }
  for (const c of activation.unless ?? []) {
    const v = conditionValue(c, raw, hypervisorName);
    if (v !== undefined && c.in.includes(v)) return { active: false, reason: `${shortKey(c.key)} = ${JSON.stringify(v)}` };
  }
  return { active: true, reason: why.join(', ') };
}

/** The key's raw value (before the shape check), or its declared default when absent. */
function conditionValue(c: ActivationCondition, raw: RawConfig, hypervisorName: string): ActivationValue | undefined {
  const parts = c.key.split('.');
  if (parts[0] === 'hypervisor' && parts[1] === '*') parts[1] = hypervisorName;
  let node: unknown = raw;
  for (const part of parts) node = node !== null && typeof node === 'object' && !Array.isArray(node) ? (node as Record<string, unknown>)[part] : undefined;
  if (node === undefined) return c.default;
  // A value of the wrong type activates nothing; the shape check reports it.
  return typeof node === 'string' || typeof node === 'number' || typeof node === 'boolean' ? node : undefined;
}

/** `hypervisor.*.shared_fs` → `shared_fs`: the hypervisor section is implied in reasons. */
function shortKey(key: string): string {
  return key.startsWith('hypervisor.*.') ? key.slice('hypervisor.*.'.length) : key;
}

/**
 * `spec` is an absolute path to an ES module, a path starting with `./` or `../` (resolved against
 * `configDir`, the directory of the configuration file that lists it, never the working directory),
 * or the name of a package the runtime can import (resolved from the runtime's own location). The
 * trust check applies to the resolved file either way.
 */
export async function importThirdParty(spec: string, reason: string, configDir?: string): Promise<LoadedPlugin> {
  let target: string;
  if (path.isAbsolute(spec)) target = pathToFileURL(spec).href;
  else if (isRelativeSpec(spec)) {
    if (configDir === undefined) {
      throw new KataError('KATA_ERR_PLUGIN_NOT_FOUND', `is a relative path, and the configuration was not read from a file to resolve it against`, {
        plugin: spec,
        key: 'runtime.plugins',
        value: spec,
        fix: 'Name the plugin by absolute path or by package name, or read the configuration from a file (relative plugin paths resolve against its directory).',
      });
    }
    target = pathToFileURL(path.resolve(configDir, spec)).href;
  } else target = spec;
  // Before import() runs a line of the module: as root, only a file nobody else can write.
  const opened = trustedTarget(target);
  const mod = await importModule(opened, spec);
  return checkModule(mod, {
    specifier: spec,
    moduleUrl: target.startsWith('file:') ? opened : undefined,
    builtin: false,
    reason,
  });
}

/**
 * The URL to import: the checked file's real path when running as root (KATA_ERR_UNTRUSTED_PATH
 * otherwise), `target` unchanged when the check does not apply or the module cannot be resolved
 * (import() then reports that).
 */
function trustedTarget(target: string): string {
  if (!trustCheckApplies()) return target;
  let url: string;
  try {
    // A package name resolves as import() would resolve it from here, to the file it would load.
    url = target.startsWith('file:') ? target : import.meta.resolve(target);
  } catch {
    return target;
  }
  if (!url.startsWith('file:')) return target;
  const opened = assertTrustedPath(fileURLToPath(url), 'plugin module', { key: 'runtime.plugins' });
  return pathToFileURL(opened).href;
}

async function importModule(target: string, spec: string): Promise<unknown> {
  try {
    return await import(target);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    const notFound = err.code === 'ERR_MODULE_NOT_FOUND' || err.code === 'ERR_UNSUPPORTED_DIR_IMPORT' || err.code === 'ERR_PACKAGE_PATH_NOT_EXPORTED';
    // A missing module *inside* the plugin is the plugin's bug, not a missing plugin.
    if (notFound && mentions(err.message, spec, target)) {
      // `plugins/x.mjs` is a package subpath to import(); the author most likely meant a file.
      const meantFile = !target.startsWith('file:') && /\.[cm]?js$/.test(spec);
      throw new KataError('KATA_ERR_PLUGIN_NOT_FOUND', `cannot be found${target.startsWith('file:') && target !== pathToFileURL(spec).href ? ` (looked for ${fileURLToPath(target)})` : ''}${meantFile ? ' as a package' : ''}`, {
        plugin: spec,
        key: 'runtime.plugins',
        value: spec,
        cause: e,
        ...(meantFile ? { fix: `A name without ./ or / in front is a package name; for a file, write "./${spec}" (resolved against the configuration file's directory) or an absolute path.` } : {}),
      });
    }
    throw new KataError('KATA_ERR_PLUGIN_IMPORT', `failed to import: ${err.message ?? String(e)}`, { plugin: spec, key: 'runtime.plugins', value: spec, cause: e });
  }
}

/** `./x.mjs`, `../x.mjs` (either separator): a path, not a package name. */
function isRelativeSpec(spec: string): boolean {
  return /^\.\.?(\/|\\)/.test(spec) || spec === '.' || spec === '..';
}

function mentions(message: string, spec: string, target: string): boolean {
  const file = target.startsWith('file:') ? decodeURIComponent(new URL(target).pathname) : target;
  // `a/b.mjs` or `@s/p/x.js` as a bare specifier: Node names only the package (`a`, `@s/p`) it could not find.
  const pkg = target.startsWith('file:') ? spec : spec.split('/').slice(0, spec.startsWith('@') ? 2 : 1).join('/');
  return message.includes(`'${file}'`) || message.includes(`'${spec}'`) || message.includes(`"${spec}"`) || message.includes(`package '${pkg}'`);
}

/**
 * Checks a plugin handed over in process (its module's default export), as a module listed in
 * `[runtime] plugins` is checked after its import.
 */
export function checkInProcess(plugin: unknown, reason: string): Promise<LoadedPlugin> {
  const named = (plugin as { manifest?: { name?: unknown } } | null)?.manifest?.name;
  return checkModule({ default: plugin }, { specifier: typeof named === 'string' && named ? named : '(in-process plugin)', moduleUrl: undefined, builtin: false, reason });
}

async function checkModule(mod: unknown, meta: Omit<LoadedPlugin, 'plugin' | 'manifest'>): Promise<LoadedPlugin> {
  const plugin = (mod as { default?: unknown }).default;
  if (plugin === undefined || plugin === null) {
    throw new KataError('KATA_ERR_PLUGIN_NO_DEFAULT_EXPORT', `the module has no default export`, { plugin: meta.specifier, value: meta.specifier });
  }
  // Built-in manifests are checked by a unit test (test/unit/core/plugin-activation.test.ts), not at every start.
  const problems = meta.builtin ? [] : await manifestProblems(plugin);
  const named = (plugin as { manifest?: { name?: unknown } }).manifest?.name;
  // A name the manifest check refuses is not one to file the error under: the specifier is.
  const who = typeof named === 'string' && /^[a-z0-9][a-z0-9._-]*$/.test(named) ? named : meta.specifier;
  if (problems.length > 0) {
    throw new KataError('KATA_ERR_PLUGIN_BAD_MANIFEST', `has a bad manifest: ${problems.join('; ')}`, { plugin: who, value: meta.specifier });
  }
  const p = plugin as KataPlugin;
  if (!satisfies(PLUGIN_API_VERSION, p.manifest.runtime)) {
    throw new KataError('KATA_ERR_PLUGIN_API_VERSION', `supports plugin API ${p.manifest.runtime}, but this runtime implements ${PLUGIN_API_VERSION}`, {
      plugin: p.manifest.name,
      value: p.manifest.runtime,
    });
  }
  return { ...meta, plugin: p, manifest: p.manifest };
}

/**
 * Every reason the default export is not a usable plugin, or none. The shape comes from
 * schemas/plugin-manifest.schema.json; semver validity is checked here (JSON Schema cannot).
 */
export async function manifestProblems(plugin: unknown): Promise<string[]> {
  if (plugin === null || typeof plugin !== 'object') return ['the default export is not an object'];
  const { manifest, apply } = plugin as { manifest?: unknown; apply?: unknown };
  const out: string[] = [];
  if (typeof apply !== 'function') out.push('apply must be a function');
  if (manifest === null || typeof manifest !== 'object') {
    out.push('manifest must be an object');
    return out;
  }
  const shape = await builtinSchema('plugin-manifest.schema.json', '', 'core');
  if (!shape.validate(manifest)) {
    for (const e of shape.validate.errors ?? []) {
      const where = ['manifest', ...e.instancePath.split('/').slice(1)].join('.');
      const missing = e.keyword === 'required' ? `.${(e.params as { missingProperty: string }).missingProperty}` : '';
      out.push(`${where}${missing}: ${e.keyword === 'required' ? 'is required' : e.message ?? 'is invalid'}`);
    }
  }
  const m = manifest as Record<string, unknown>;
  if (typeof m.version === 'string' && validVersion(m.version) === null) out.push('manifest.version: must be a semver version');
  if (typeof m.runtime === 'string' && validRange(m.runtime) === null) out.push('manifest.runtime: must be a semver range (e.g. "^1.0.0")');
  return out;
}

/** Checks names are unique and every `requires` is provided. */
export function checkPluginSet(plugins: readonly LoadedPlugin[]): void {
  const byName = new Map<string, LoadedPlugin>();
  for (const p of plugins) {
    const prev = byName.get(p.manifest.name);
    if (prev) {
      throw new KataError('KATA_ERR_PLUGIN_DUPLICATE', `plugin name "${p.manifest.name}" is used by both ${describe(prev)} and ${describe(p)}`, {
        plugin: p.manifest.name,
        key: 'runtime.plugins',
        value: p.specifier,
      });
    }
    byName.set(p.manifest.name, p);
  }
  const provided = new Set<string>();
  for (const p of plugins) {
    provided.add(p.manifest.name);
    for (const r of p.manifest.provides ?? []) provided.add(r);
  }
  for (const p of plugins) {
    for (const r of p.manifest.requires ?? []) {
      if (!provided.has(r)) {
        throw new KataError('KATA_ERR_PLUGIN_MISSING_DEPENDENCY', `requires "${r}", which no loaded plugin provides (loaded: ${[...byName.keys()].join(', ')})`, {
          plugin: p.manifest.name,
          value: r,
        });
      }
    }
  }
}

function describe(p: LoadedPlugin): string {
  return p.builtin ? `the built-in plugin` : `"${p.specifier}"`;
}

/** Calls apply() with the plugin's tap-only view. */
export function applyPlugin(p: LoadedPlugin, hooks: Hooks, log: Logger): void {
  const name = p.manifest.name;
  try {
    const own = log.child({ plugin: name });
    p.plugin.apply(Object.freeze({ name, hooks: createTapView(hooks, name, own), log: own, apiVersion: PLUGIN_API_VERSION }));
  } catch (e) {
    if (e instanceof KataError && e.code === 'KATA_ERR_PLUGIN_TAP') throw e;
    throw new KataError('KATA_ERR_PLUGIN_APPLY', `apply() threw: ${e instanceof Error ? e.message : String(e)}`, { plugin: name, cause: e });
  }
}
