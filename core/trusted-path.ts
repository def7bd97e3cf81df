/**
 * Whether a file may be trusted to run as root: the check sshd's StrictModes makes of
 * authorized_keys, applied to what the runtime imports or executes (plugin modules, the
 * hypervisor and daemon binaries) and to a configuration file a pod chose by annotation.
 *
 * Symlinks are resolved first and the real path is judged, since that is what will be opened.
 * The file and every directory above it, up to `/`, must be owned by root and not writable by
 * group or others; a directory writable by others is accepted only with the sticky bit (like
 * /tmp), where nobody but root can rename or replace the root-owned entry below it.
 *
 * The check applies only when this process runs as root (`geteuid() == 0`): an unprivileged
 * runtime runs what its own user could run anyway. Callers may say `asRoot` to decide for tests.
 */
import { lstatSync, realpathSync, type Stats } from 'node:fs';
import path from 'node:path';
import { KataError } from './errors.js';

export interface TrustOptions {
  /** Check as if running as root (default: `process.geteuid() === 0`). */
  readonly asRoot?: boolean;
}

export interface TrustProblem {
  /** The real path of the file that was judged. */
  readonly realPath: string;
  /** The file or directory that failed. */
  readonly offender: string;
  readonly uid: number;
  readonly mode: number;
  /** Why, e.g. `is writable by group or others`. */
  readonly why: string;
}

/** Whether the check applies (running as root, unless `opts.asRoot` says otherwise). */
export function trustCheckApplies(opts: TrustOptions = {}): boolean {
  return opts.asRoot ?? process.geteuid?.() === 0;
}

/**
 * The first reason `file` cannot be trusted, or undefined when it can. Throws the errno error of
 * `realpath` when the file does not exist or cannot be resolved (the caller reports that its way).
 */
export function trustProblem(file: string): TrustProblem | undefined {
  const realPath = realpathSync(file);
  const chain: string[] = [];
  for (let p = realPath; ; p = path.dirname(p)) {
    chain.push(p);
    if (p === path.dirname(p)) break;
  }
  for (const [i, p] of chain.entries()) {
    const st = lstatSync(p);
    const problem = i === 0 ? fileProblem(st) : dirProblem(st);
    if (problem) return { realPath, offender: p, uid: st.uid, mode: st.mode & 0o7777, why: problem };
  }
  return undefined;
}

function fileProblem(st: Stats): string | undefined {
  if (!st.isFile()) return 'is not a regular file';
  if (st.uid !== 0) return `is owned by uid ${st.uid}, not root`;
  if (st.mode & 0o022) return 'is writable by group or others';
  return undefined;
}

function dirProblem(st: Stats): string | undefined {
  if (!st.isDirectory()) return 'is not a directory';
  if (st.uid !== 0) return `is owned by uid ${st.uid}, not root`;
  if (st.mode & 0o022 && !(st.mode & 0o1000)) return 'is writable by group or others and has no sticky bit';
  return undefined;
}

/**
 * Throws KATA_ERR_UNTRUSTED_PATH when the check applies and `file` fails it; returns the path to
 * open: the real path when checked (so a symlink swapped afterwards changes nothing), `file`
 * itself otherwise. A file that does not exist is returned unchanged, for the caller's own
 * not-found error.
 */
export function assertTrustedPath(file: string, what: string, opts: TrustOptions & { key?: string; plugin?: string } = {}): string {
  if (!trustCheckApplies(opts)) return file;
  let problem: TrustProblem | undefined;
  try {
    problem = trustProblem(file);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return file;
    throw e;
  }
  if (!problem) return realpathSync(file);
  throw untrustedError(file, what, problem, opts);
}

export function untrustedError(file: string, what: string, p: TrustProblem, opts: { key?: string; plugin?: string } = {}): KataError {
  const via = p.realPath === file ? '' : ` (resolved to "${p.realPath}")`;
  const at = p.offender === p.realPath ? 'the file' : `its directory "${p.offender}"`;
  const stickyHint = p.why.includes('sticky') ? `, or chmod +t ${p.offender} if others must write there` : '';
  return new KataError(
    'KATA_ERR_UNTRUSTED_PATH',
    `refusing to use ${what} "${file}"${via} as root: ${at} ${p.why} (owner uid ${p.uid}, mode ${p.mode.toString(8).padStart(4, '0')})`,
    {
      key: opts.key,
      plugin: opts.plugin,
      value: file,
      fix: `Make "${p.offender}" and every directory above it owned by root and not writable by group or others (chown root ${p.offender}; chmod go-w ${p.offender}${stickyHint}), or install the file in such a directory.`,
    },
  );
}
