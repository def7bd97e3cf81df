/**
 * Where the configuration comes from. Precedence, as in the Kata runtime's README, except for the
 * annotation (below):
 *
 * - `kata-runtime`: `--config`, then `KATA_CONF_FILE`, then the default paths.
 * - the shim: the runtime options' `ConfigPath`, `KATA_CONF_FILE`, then the default paths (then,
 *   only when nothing was named at all, the file the project ships): this is the ADMINISTRATOR's
 *   configuration. Only then the pod's `io.katacontainers.config_path` annotation, see
 *   {@link configFromAnnotation}.
 *
 * An explicitly named file (flag, annotation, option, variable) must exist: it is an error, not a
 * reason to fall back, because silently running with another configuration is worse than failing.
 * Among the default paths the first that exists wins.
 *
 * The annotation is pod input, so it may only choose among configurations the administrator
 * placed, and only when the administrator allows it (Kata's Go runtime and runtime-rs honour it
 * unconditionally, with any path, before `ConfigPath`; a pod could then run any host file as its
 * configuration, and the plugins that file names as root):
 *
 * 1. The administrator's configuration must enable it: `config_path` must match (as a whole, the
 *    way core/annotations.ts matches hypervisor annotations) one of the regular expressions in its
 *    `[hypervisor.<name>] enable_annotations`. Kata has no gate for this annotation; that list is
 *    the one it uses for every other pod override, so it is reused rather than a new key invented.
 * 2. The value must be an absolute, clean path (never resolved from the bundle) directly inside
 *    /etc/kata-containers or /usr/share/defaults/kata-containers, checked before anything is
 *    looked up on disk, so that a pod cannot probe which host files exist elsewhere.
 * 3. Its real path must be a regular file directly inside one of those directories, and, when
 *    running as root, pass the StrictModes check of core/trusted-path.ts.
 *
 * `KATA_TS_SYSROOT` (tests only) prefixes both default paths and both directories, so tests can
 * relocate them without changing what users get: unset, the paths are exactly Kata's.
 */
import { realpathSync, statSync } from 'node:fs';
import path from 'node:path';
import { AnnotationError, compileEnable, pathProblem } from '../annotations.js';
import { KataError } from '../errors.js';
import { assertTrustedPath, type TrustOptions } from '../trusted-path.js';
import { readConfigFile } from './parse.js';

export const SYSCONF_CONFIG_PATH = '/etc/kata-containers/configuration.toml';
export const DEFAULT_CONFIG_PATH = '/usr/share/defaults/kata-containers/configuration.toml';
export const CONFIG_PATH_ANNOTATION = 'io.katacontainers.config_path';

export type ConfigSource = 'flag' | 'annotation' | 'shim-option' | 'env' | 'default';

export interface LocateOptions {
  /** `kata-runtime --config`. */
  flag?: string | undefined;
  /** The runtime options' ConfigPath (shim only). */
  shimConfigPath?: string | undefined;
  env?: NodeJS.ProcessEnv;
}

export interface LocatedConfig {
  readonly path: string;
  readonly source: ConfigSource;
  /** Every path considered, in order, with why it was or was not used. */
  readonly tried: readonly { path: string; source: ConfigSource; used: boolean; why?: string }[];
}

/** The two default paths, /etc first, relocated under KATA_TS_SYSROOT when that is set. */
export function defaultConfigPaths(env: NodeJS.ProcessEnv = process.env): [string, string] {
  const root = env.KATA_TS_SYSROOT;
  const at = (p: string) => (root ? path.join(root, p) : p);
  return [at(SYSCONF_CONFIG_PATH), at(DEFAULT_CONFIG_PATH)];
}

/** The administrator's (or operator's) configuration: flag, ConfigPath, KATA_CONF_FILE, then the default paths. */
export function locateConfig(opts: LocateOptions = {}): LocatedConfig {
  const env = opts.env ?? process.env;
  const explicit: { path: string | undefined; source: ConfigSource; what: string }[] = [
    { path: opts.flag, source: 'flag', what: '--config' },
    { path: opts.shimConfigPath, source: 'shim-option', what: 'runtime option ConfigPath' },
    { path: env.KATA_CONF_FILE, source: 'env', what: 'KATA_CONF_FILE' },
  ];
  const tried: { path: string; source: ConfigSource; used: boolean; why?: string }[] = [];
  for (const c of explicit) {
    if (!c.path) continue;
    const abs = path.resolve(c.path);
    const problem = fileProblem(abs);
    if (problem) {
      throw new KataError('KATA_ERR_CONFIG_NOT_FOUND', `configuration file "${abs}" named by ${c.what} ${problem}`, {
        key: c.what,
        value: abs,
        fix: `Point ${c.what} at an existing configuration file, or unset it to use the default paths.`,
      });
    }
    tried.push({ path: abs, source: c.source, used: true });
    return { path: abs, source: c.source, tried };
  }
  const reasons: string[] = [];
  for (const p of defaultConfigPaths(env)) {
    const problem = fileProblem(p);
    if (!problem) {
      tried.push({ path: p, source: 'default', used: true });
      return { path: p, source: 'default', tried };
    }
    tried.push({ path: p, source: 'default', used: false, why: problem });
    reasons.push(`config file "${p}" ${problem}`);
  }
  throw new KataError('KATA_ERR_CONFIG_NOT_FOUND', `cannot find a usable configuration file (${reasons.join(', ')})`);
}

function fileProblem(p: string): string | undefined {
  try {
    const st = statSync(p);
    return st.isFile() ? undefined : 'is not a regular file';
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return code === 'ENOENT' || code === 'ENOTDIR' ? 'does not exist' : `cannot be read (${code ?? String(e)})`;
  }
}

/** The two directories a pod's config_path annotation may choose from, relocated as {@link defaultConfigPaths}. */
export function annotationConfigDirs(env: NodeJS.ProcessEnv = process.env): [string, string] {
  const [etc, usr] = defaultConfigPaths(env);
  return [path.dirname(etc), path.dirname(usr)];
}

export interface AnnotationLocateOptions extends TrustOptions {
  env?: NodeJS.ProcessEnv;
}

/**
 * The configuration a pod chose with the `io.katacontainers.config_path` annotation, or `admin`
 * itself when the annotation is absent. Throws KATA_ERR_ANNOTATION when the administrator's
 * configuration `admin` does not enable the annotation or the value names a path outside the
 * allowed directories, KATA_ERR_CONFIG_NOT_FOUND when the named file does not exist there, and
 * KATA_ERR_UNTRUSTED_PATH when it fails the trust check.
 */
export function configFromAnnotation(admin: LocatedConfig, annotations: Readonly<Record<string, string>> | undefined, opts: AnnotationLocateOptions = {}): LocatedConfig {
  const value = annotations?.[CONFIG_PATH_ANNOTATION];
  if (value === undefined) return admin;
  const env = opts.env ?? process.env;
  const refuse = (reason: 'not-enabled' | 'path-not-allowed', message: string, fix: string, list?: string): never => {
    throw new AnnotationError([{ annotation: CONFIG_PATH_ANNOTATION, value, reason, ...(list ? { list } : {}), message, fix }]);
  };

  const { table, patterns } = enabledPatterns(admin.path);
  const listKey = table ? `${table}.enable_annotations` : 'hypervisor.<name>.enable_annotations';
  if (!patterns.some((re) => re.test('config_path'))) {
    refuse(
      'not-enabled',
      `not enabled: the administrator's configuration "${admin.path}" does not allow pods to choose their configuration ("config_path" matches no regular expression in ${listKey})`,
      `remove the annotation, or have the administrator add "config_path" to enable_annotations in [${table ?? 'hypervisor.<name>'}] of ${admin.path} and install the configurations pods may choose in ${annotationConfigDirs(env).join(' or ')}`,
      listKey,
    );
  }

  const dirs = annotationConfigDirs(env);
  const placeFix = `name a configuration file installed directly in ${dirs.join(' or ')}, by absolute path`;
  // Judged on the string alone, before any look-up, so that a refusal says nothing about the host.
  const unclean = pathProblem(value);
  if (unclean) refuse('path-not-allowed', `path not allowed: ${unclean}; the annotation only accepts an absolute, clean path`, placeFix);
  if (!dirs.includes(path.dirname(value))) refuse('path-not-allowed', `path not allowed: it is not directly inside ${dirs.join(' or ')}`, placeFix);

  let real: string;
  try {
    real = realpathSync(value);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new KataError('KATA_ERR_CONFIG_NOT_FOUND', `configuration file "${value}" named by annotation ${CONFIG_PATH_ANNOTATION} ${code === 'ENOENT' || code === 'ENOTDIR' ? 'does not exist' : `cannot be read (${code ?? String(e)})`}`, {
      key: CONFIG_PATH_ANNOTATION,
      value,
      fix: `Remove the annotation, or ${placeFix}.`,
    });
  }
  const realDirs = dirs.map((d) => {
    try {
      return realpathSync(d);
    } catch {
      return d;
    }
  });
  if (!realDirs.includes(path.dirname(real))) refuse('path-not-allowed', `path not allowed: it is a symbolic link that resolves outside ${dirs.join(' or ')}`, placeFix);
  const problem = fileProblem(real);
  if (problem) {
    throw new KataError('KATA_ERR_CONFIG_NOT_FOUND', `configuration file "${value}" named by annotation ${CONFIG_PATH_ANNOTATION} ${problem}`, { key: CONFIG_PATH_ANNOTATION, value, fix: `Remove the annotation, or ${placeFix}.` });
  }
  const opened = assertTrustedPath(real, `the configuration named by annotation ${CONFIG_PATH_ANNOTATION}`, { ...opts, key: CONFIG_PATH_ANNOTATION });
  return {
    path: opened,
    source: 'annotation',
    tried: [...admin.tried.map((t) => ({ ...t, used: false, ...(t.used ? { why: `overridden by annotation ${CONFIG_PATH_ANNOTATION}` } : {}) })), { path: opened, source: 'annotation', used: true }],
  };
}

/** The administrator's `[hypervisor.<name>] enable_annotations`, compiled as core/annotations.ts compiles them. */
function enabledPatterns(file: string): { table: string | undefined; patterns: RegExp[] } {
  const raw = readConfigFile(file);
  const hv = raw.hypervisor;
  const names = hv !== null && typeof hv === 'object' && !Array.isArray(hv) ? Object.keys(hv).filter((k) => isTable((hv as Record<string, unknown>)[k])) : [];
  // Not exactly one section: the validated phase reports that; nothing is enabled meanwhile.
  if (names.length !== 1) return { table: undefined, patterns: [] };
  const name = names[0] as string;
  const section = (hv as Record<string, Record<string, unknown>>)[name] as Record<string, unknown>;
  const patterns = compileEnable(Array.isArray(section.enable_annotations) ? section.enable_annotations.filter((s): s is string => typeof s === 'string') : []);
  return { table: `hypervisor.${name}`, patterns };
}

function isTable(v: unknown): boolean {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}
