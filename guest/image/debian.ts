/**
 * The Debian side of the guest image builder: which packages to take (apt-cache), fetching them
 * without installing them (apt-get download) and unpacking them (dpkg-deb -x). Every external
 * command runs through {@link run}, which turns a missing program into a KATA_ERR_GUEST_IMAGE
 * that names the Debian package to install.
 */
import { execFile } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { KataError } from '../../core/errors.js';

export interface DebPackage {
  readonly name: string;
  readonly version: string;
}

/** The Debian package that provides each program the builder runs. */
export const TOOL_PACKAGES: Readonly<Record<string, string>> = Object.freeze({
  'apt-get': 'apt',
  'apt-cache': 'apt',
  'dpkg-deb': 'dpkg',
  depmod: 'kmod',
  xz: 'xz-utils',
  zstd: 'zstd',
});

/**
 * The absolute path of a program: PATH first, then /usr/sbin and /sbin, which an ordinary user's
 * PATH usually lacks although depmod lives there. Undefined when it is nowhere.
 */
export function findTool(cmd: string): string | undefined {
  if (cmd.includes('/')) return cmd;
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), '/usr/sbin', '/sbin'];
  for (const dir of dirs) {
    const candidate = path.join(dir, cmd);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** Fails once, naming every missing program and its Debian package, before anything is downloaded. */
export function requireTools(cmds: readonly string[]): void {
  const missing = cmds.filter((c) => findTool(c) === undefined);
  if (missing.length === 0) return;
  const pkgs = [...new Set(missing.map((c) => TOOL_PACKAGES[c] ?? c))];
  throw new KataError('KATA_ERR_GUEST_IMAGE', `missing programs: ${missing.map((c) => `${c} (Debian package ${TOOL_PACKAGES[c] ?? '?'})`).join(', ')}`, {
    fix: `apt-get install ${pkgs.join(' ')}`,
  });
}

export interface RunResult {
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a program (no shell); a non-zero exit or a missing binary is a KATA_ERR_GUEST_IMAGE. */
export function run(cmd: string, args: readonly string[], opts: { cwd?: string; encoding?: 'utf8' | 'buffer' } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(findTool(cmd) ?? cmd, args, { cwd: opts.cwd, maxBuffer: 256 * 1024 * 1024, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout, stderr) => {
      if (!err) return resolve({ stdout: String(stdout), stderr: String(stderr) });
      const e = err as NodeJS.ErrnoException & { code?: string | number };
      if (e.code === 'ENOENT') {
        const pkg = TOOL_PACKAGES[cmd];
        return reject(
          new KataError('KATA_ERR_GUEST_IMAGE', `${cmd} is not installed${pkg ? ` (Debian package ${pkg})` : ''}`, {
            fix: pkg ? `apt-get install ${pkg}` : undefined,
            cause: err,
          }),
        );
      }
      const tail = String(stderr).trim().split('\n').slice(-5).join(' | ');
      reject(new KataError('KATA_ERR_GUEST_IMAGE', `${cmd} ${args.join(' ')} failed (exit ${String(e.code)})${tail ? `: ${tail}` : ''}`, { cause: err }));
    });
  });
}

/** `run` for a program that writes binary output (decompressors). */
export function runBuffer(cmd: string, args: readonly string[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    execFile(findTool(cmd) ?? cmd, args, { encoding: 'buffer', maxBuffer: 1024 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (!err) return resolve(stdout);
      const e = err as NodeJS.ErrnoException;
      const pkg = TOOL_PACKAGES[cmd];
      const why = e.code === 'ENOENT' ? `${cmd} is not installed${pkg ? ` (Debian package ${pkg})` : ''}` : `${cmd} failed: ${stderr.toString().trim()}`;
      reject(new KataError('KATA_ERR_GUEST_IMAGE', why, { fix: pkg ? `apt-get install ${pkg}` : undefined, cause: err }));
    });
  });
}

/** True when apt has package lists to answer from (a fresh container has none until `apt-get update`). */
export async function aptListsPresent(listsDir = '/var/lib/apt/lists'): Promise<boolean> {
  try {
    return (await readdir(listsDir)).some((f) => /_Packages(\.|$)/.test(f));
  } catch {
    return false;
  }
}

/**
 * The candidate record (`apt-cache show --no-all-versions`) of each package apt knows, by name.
 * One apt-cache run for all of them: without a binary package cache (Debian's container images
 * turn it off) each run re-reads every package list, about a second.
 */
export async function showCandidates(pkgs: readonly string[]): Promise<Map<string, Record<string, string>>> {
  const out = new Map<string, Record<string, string>>();
  let text: string;
  try {
    text = (await run('apt-cache', ['show', '--no-all-versions', ...pkgs])).stdout;
  } catch (err) {
    // Exit 100 when none of them is known.
    if (err instanceof KataError && /exit 100/.test(err.message)) return out;
    throw err;
  }
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields: Record<string, string> = {};
    for (const m of stanza.matchAll(/^([A-Za-z0-9-]+):[ \t]*(.*)$/gm)) fields[m[1] as string] = (m[2] as string).trim();
    if (fields.Package && !out.has(fields.Package)) out.set(fields.Package, fields);
  }
  return out;
}

export interface KernelPackage extends DebPackage {
  /** The meta package it was found through. */
  readonly meta: string;
  /** The kernel release (`uname -r`), e.g. 6.1.0-41-amd64. */
  readonly release: string;
}

export interface ResolvedPackages {
  /** Undefined when apt does not know the meta package. */
  readonly kernel: KernelPackage | undefined;
  /** Candidate versions of the other packages asked for (absent when unknown). */
  readonly versions: ReadonlyMap<string, string>;
}

/**
 * The versioned kernel package the meta package depends on (`linux-image-amd64` →
 * `linux-image-6.1.0-41-amd64`) with its version, and the candidate versions of `others`.
 * Debian's meta package pins the exact version (`(= 6.1.x-y)`), which saves a second apt-cache run.
 */
export async function resolvePackages(meta: string, others: readonly string[]): Promise<ResolvedPackages> {
  const records = await showCandidates([meta, ...others]);
  const versions = new Map<string, string>();
  for (const o of others) {
    const v = records.get(o)?.Version;
    if (v) versions.set(o, v);
  }
  const depends = records.get(meta)?.Depends;
  if (depends === undefined) return { kernel: undefined, versions };
  for (const alt of depends.split(/[,|]/)) {
    const m = /^\s*(linux-image-(\d\S*))\s*(?:\(\s*=\s*([^)\s]+)\s*\))?/.exec(alt);
    if (!m?.[1] || !m[2]) continue;
    const version = m[3] ?? (await showCandidates([m[1]])).get(m[1])?.Version;
    if (version === undefined) continue;
    return { kernel: { meta, name: m[1], version, release: m[2] }, versions };
  }
  throw new KataError('KATA_ERR_GUEST_IMAGE', `${meta} depends on no versioned linux-image package apt knows (Depends: ${depends})`);
}

/**
 * `apt-get download name=version` into `dir`; returns the .deb's path. As root, apt would hand the
 * download to its unprivileged `_apt` user, who cannot write into a private temp dir: the sandbox
 * is turned off for this one command instead of loosening the directory's permissions.
 */
export async function aptDownload(pkg: DebPackage, dir: string, asRoot: boolean): Promise<string> {
  const args = [...(asRoot ? ['-o', 'APT::Sandbox::User=root'] : []), '-q', 'download', `${pkg.name}=${pkg.version}`];
  await run('apt-get', args, { cwd: dir });
  const deb = (await readdir(dir)).find((f) => f.startsWith(`${pkg.name}_`) && f.endsWith('.deb'));
  if (!deb) throw new KataError('KATA_ERR_GUEST_IMAGE', `apt-get download ${pkg.name}=${pkg.version} left no .deb in ${dir}`);
  return path.join(dir, deb);
}

/** Unpacks a .deb's files (not its maintainer scripts) under `dir`. */
export async function unpackDeb(deb: string, dir: string): Promise<void> {
  await run('dpkg-deb', ['-x', deb, dir]);
}
