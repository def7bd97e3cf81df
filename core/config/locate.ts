/**
 * Where the configuration comes from. Precedence, as in the Kata runtime's README:
 *
 * - `kata-runtime`: `--config`, then `KATA_CONF_FILE`, then the default paths.
 * - the shim: the `io.katacontainers.config_path` annotation, the runtime options' `ConfigPath`,
 *   `KATA_CONF_FILE`, then the default paths.
 *
 * An explicitly named file (flag, annotation, option, variable) must exist: it is an error, not a
 * reason to fall back, because silently running with another configuration is worse than failing.
 * Among the default paths the first that exists wins.
 *
 * `KATA_TS_SYSROOT` (tests only) prefixes both default paths, so tests can relocate them without
 * changing what users get: unset, the paths are exactly Kata's.
 */
import { statSync } from 'node:fs';
import path from 'node:path';
import { KataError } from '../errors.js';

export const SYSCONF_CONFIG_PATH = '/etc/kata-containers/configuration.toml';
export const DEFAULT_CONFIG_PATH = '/usr/share/defaults/kata-containers/configuration.toml';
export const CONFIG_PATH_ANNOTATION = 'io.katacontainers.config_path';

export type ConfigSource = 'flag' | 'annotation' | 'shim-option' | 'env' | 'default';

export interface LocateOptions {
  /** `kata-runtime --config`. */
  flag?: string | undefined;
  /** OCI annotations of the sandbox (shim only). */
  annotations?: Readonly<Record<string, string>> | undefined;
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

export function locateConfig(opts: LocateOptions = {}): LocatedConfig {
  const env = opts.env ?? process.env;
  const explicit: { path: string | undefined; source: ConfigSource; what: string }[] = [
    { path: opts.flag, source: 'flag', what: '--config' },
    { path: opts.annotations?.[CONFIG_PATH_ANNOTATION], source: 'annotation', what: `annotation ${CONFIG_PATH_ANNOTATION}` },
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
