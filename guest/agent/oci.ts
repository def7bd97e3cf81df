/**
 * From an OCI process (and the container's spec) to the command lines that run it: pure functions,
 * unit-tested without a VM. Node can neither unshare, chroot, setuid nor mount, so the agent starts
 * a chain of busybox applets, each `exec`ing the next, so that no intermediate process is left
 * between the container's process and the one the agent waits for:
 *
 * Container init (CreateContainer prepares it, StartContainer lets it go):
 *
 *   busybox unshare -m -u -p -f --propagation=private -- busybox sh -c SETUP kata-ts-init DATA… CHAIN…
 *     └ (forked, PID 1 of the new pid namespace) sh: sets the hostname, mounts /proc, /dev, … under
 *       the rootfs, applies rlimits, says `ready` on fd 3, waits for `start` on fd 3, then
 *       exec CHAIN = busybox env -i ENV… busybox [setpriv --nnp busybox] nsenter -r<root> -w<root><cwd> -S uid -G gid -- ARGS…
 *         └ chroot + chdir + setgid/setuid, then execvp(ARGS) with the container's PATH
 *
 * Exec (ExecProcess), into the namespaces and root of the container's init:
 *
 *   [busybox sh -c 'ulimit…; shift N; exec "$@"' kata-ts-exec DATA…] busybox env -i ENV… busybox nsenter -t PID -m -u -p -r -w/proc/PID/root<cwd> -S uid -G gid -- ARGS…
 *     └ (forked after entering the pid namespace) the process
 *
 * No value from a spec or a request is ever part of a script's text: SETUP is written by
 * {@link Script}, which passes every value (paths, mount options, the hostname, rlimits) as a
 * positional parameter (DATA) and the chain as the arguments after them. Mount options are checked
 * against the known flags and filesystem options, mount targets are resolved inside the root.
 *
 * `unshare -f` and `nsenter -p` must fork (a new pid namespace applies to children only); their
 * parent only waits and then exits with the child's status, or kills itself with the signal that
 * killed the child. So the agent's child reports exactly what the container process did
 * (exit code, or death by signal → 128 + signal), and signals go to the real process, the
 * parent's only child. The container's PID 1 gets only the signals it handles (plus SIGKILL),
 * as with every runtime.
 */
import { constants as fsConstants } from 'node:fs';
import { lstat, open, readlink, stat, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type { LinuxDevice, Mount, POSIXRlimit, StringUser, User } from '../../wire/agent/proto.gen.js';
import { internal, invalidArgument } from './errors.js';
import { checkFsType, checkGuestPath, checkOperand } from './storage.js';
import { BUSYBOX } from './sys.js';

/**
 * A hostname as sethostname(2) takes it and a DNS name allows: letters, digits, `-` and `.`, not
 * starting with `-`, at most 64 bytes. INVALID_ARGUMENT otherwise (busybox `hostname` would read
 * a leading `-` as an option, e.g. `-F FILE`).
 */
export function checkHostname(name: string, what: string): string {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/.test(name)) throw invalidArgument(`${what} ${JSON.stringify(name)} is not a hostname (letters, digits, "-", "." and "_", at most 64, not starting with "-" or ".")`);
  return name;
}

/** kata-agent's rule for container ids (`verify_id`). */
export function checkContainerId(id: string): void {
  if (!/^[a-zA-Z0-9][a-zA-Z0-9_.-]+$/.test(id)) {
    throw invalidArgument(`invalid container id ${JSON.stringify(id)} (letters, digits, "_", "." and "-", at least 2, not starting with a symbol)`);
  }
}

// ---------------------------------------------------------------------------------------------
// Users

export interface PasswdEntry {
  readonly name: string;
  readonly uid: number;
  readonly gid: number;
  readonly home: string;
}

export function parsePasswd(text: string): PasswdEntry[] {
  const out: PasswdEntry[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f.length < 7 || !f[0] || !/^\d+$/.test(f[2] ?? '') || !/^\d+$/.test(f[3] ?? '')) continue;
    out.push({ name: f[0], uid: Number(f[2]), gid: Number(f[3]), home: f[5] ?? '' });
  }
  return out;
}

export function parseGroup(text: string): { name: string; gid: number }[] {
  const out: { name: string; gid: number }[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f.length < 3 || !f[0] || !/^\d+$/.test(f[2] ?? '')) continue;
    out.push({ name: f[0], gid: Number(f[2]) });
  }
  return out;
}

export interface ResolvedUser {
  readonly uid: number;
  readonly gid: number;
  /** From the container's /etc/passwd when the uid has an entry there. */
  readonly home: string | undefined;
}

/** The container's /etc/passwd and /etc/group, when it has them. */
export interface UserFiles {
  readonly passwd?: string;
  readonly group?: string;
}

/**
 * The uid and gid a process runs as. `stringUser` (names or numbers, kata's StringUser) wins over
 * the OCI user; an OCI `Username` with uid 0 is looked up too. Names are looked up in the
 * container's own /etc/passwd and /etc/group; an unknown name is INVALID_ARGUMENT.
 */
export function resolveUser(user: User | undefined, stringUser: StringUser | undefined, files: UserFiles): ResolvedUser {
  const passwd = parsePasswd(files.passwd ?? '');
  const groups = parseGroup(files.group ?? '');
  let uid = user?.UID ?? 0;
  let gid = user?.GID ?? 0;
  const byName = (name: string) => {
    const e = passwd.find((p) => p.name === name);
    if (!e) throw invalidArgument(`no user ${JSON.stringify(name)} in the container's /etc/passwd`);
    return e;
  };
  if (stringUser?.uid) {
    if (/^\d+$/.test(stringUser.uid)) uid = Number(stringUser.uid);
    else {
      const e = byName(stringUser.uid);
      uid = e.uid;
      if (!stringUser.gid) gid = e.gid;
    }
  } else if (user?.Username && !user.UID) {
    const e = byName(user.Username);
    uid = e.uid;
    if (!user.GID) gid = e.gid;
  }
  if (stringUser?.gid) {
    if (/^\d+$/.test(stringUser.gid)) gid = Number(stringUser.gid);
    else {
      const g = groups.find((x) => x.name === stringUser.gid);
      if (!g) throw invalidArgument(`no group ${JSON.stringify(stringUser.gid)} in the container's /etc/group`);
      gid = g.gid;
    }
  }
  return { uid, gid, home: passwd.find((p) => p.uid === uid)?.home || undefined };
}

// ---------------------------------------------------------------------------------------------
// Environment and executable

/**
 * The OCI env with entries that are not `NAME=value` dropped, and HOME added (as runc does) when
 * absent; a process with a terminal gets TERM=xterm unless the spec sets TERM (containerd's
 * WithTTY and CRI set it; a bare OCI spec may not).
 */
export function buildEnv(env: readonly string[], home: string | undefined, terminal = false): string[] {
  const out = env.filter((e) => e.indexOf('=') > 0);
  if (!out.some((e) => e.startsWith('HOME='))) out.push(`HOME=${home ?? '/'}`);
  if (terminal && !out.some((e) => e.startsWith('TERM='))) out.push('TERM=xterm');
  return out;
}

/** execvp's search path when the environment has no PATH (glibc's default). */
export const DEFAULT_EXEC_PATH = '/bin:/usr/bin';

/**
 * Where execvp inside the container will find `arg0` (a path inside the container), or undefined
 * when nothing executable is there, which the agent reports before starting anything.
 * `executable` says whether a container path names an executable file.
 *
 * The agent then execs that absolute path rather than the bare name: busybox (Debian's static
 * build prefers its own applets) would otherwise run its own `sh`, `ls`, … instead of the
 * container's whenever /proc is mounted in the container. argv[0] is therefore the full path.
 */
export async function lookPath(
  arg0: string,
  env: readonly string[],
  cwd: string,
  executable: (containerPath: string) => Promise<boolean>,
): Promise<string | undefined> {
  if (arg0 === '') return undefined;
  if (arg0.includes('/')) {
    const inContainer = arg0.startsWith('/') ? arg0 : path.posix.join(cwd, arg0);
    return (await executable(inContainer)) ? arg0 : undefined;
  }
  const pathVar = env.find((e) => e.startsWith('PATH='))?.slice(5) ?? DEFAULT_EXEC_PATH;
  for (const dir of pathVar.split(':')) {
    const inContainer = path.posix.join(dir === '' ? cwd : dir.startsWith('/') ? dir : path.posix.join(cwd, dir), arg0);
    if (await executable(inContainer)) return inContainer;
  }
  return undefined;
}

/**
 * The agent-side path of `containerPath` under `root` with every symlink resolved as the
 * container would (absolute targets relative to `root`, `..` never above it), or undefined when
 * some component does not exist or links loop.
 */
export async function resolveInRoot(root: string, containerPath: string): Promise<string | undefined> {
  return walkInRoot(root, containerPath, false);
}

/**
 * Where a mount or a device node for `containerPath` goes under `root`: every symlink that exists
 * is resolved inside the root as in {@link resolveInRoot} (so `/var/run -> /run` lands on
 * `<root>/run`, and `/data -> /` or `-> ../../..` on the root itself, never above it); what does
 * not exist yet is taken as it is, to be created. INVALID_ARGUMENT when links loop.
 */
export async function secureJoin(root: string, containerPath: string): Promise<string> {
  const out = await walkInRoot(root, containerPath, true);
  if (out === undefined) throw invalidArgument(`${JSON.stringify(containerPath)}: too many levels of symbolic links in the container`);
  return out;
}

/** At most this much of a container's /etc/passwd or /etc/group is read (a 1 MiB passwd has thousands of users). */
export const MAX_USER_FILE_BYTES = 1024 * 1024;

/**
 * The text of the container's file `containerPath` (resolved inside `root`), for /etc/passwd and
 * /etc/group: undefined unless it is a regular file of at most {@link MAX_USER_FILE_BYTES}. The
 * container chose what is there: a FIFO would block one of libuv's threads for good (O_NONBLOCK,
 * then the type is checked), a link to /dev/zero or a huge file would fill the agent's memory,
 * and a symlink swapped in after the resolution is not followed (O_NOFOLLOW).
 */
export async function readFileInRoot(root: string, containerPath: string): Promise<string | undefined> {
  const real = await resolveInRoot(root, containerPath);
  if (!real) return undefined;
  let fh: FileHandle;
  try {
    fh = await open(real, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile() || st.size > MAX_USER_FILE_BYTES) return undefined;
    const buf = Buffer.alloc(Math.min(st.size, MAX_USER_FILE_BYTES));
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    return buf.subarray(0, bytesRead).toString('utf8');
  } catch {
    return undefined;
  } finally {
    await fh.close().catch(() => undefined);
  }
}

/**
 * Opens the directory `containerPath` of the container whose root is `root`, resolved inside the
 * root as {@link secureJoin} does, then opened one component at a time with O_NOFOLLOW through
 * the previous component's descriptor (`/proc/self/fd/N/name`): a component the container turned
 * into a symlink after the resolution fails (ELOOP) instead of being followed out of the root. The
 * handle pins the directory: a process started with `/proc/<agent pid>/fd/<fd>` as its working
 * directory gets exactly it, whatever happens to the path meanwhile. The caller closes it.
 */
export async function openDirInRoot(root: string, containerPath: string): Promise<FileHandle> {
  const resolved = await secureJoin(root, containerPath);
  const flags = fsConstants.O_RDONLY | fsConstants.O_DIRECTORY;
  let dir = await open(root, flags);
  try {
    for (const c of path.posix.relative(root, resolved).split('/').filter((x) => x !== '')) {
      const next = await open(`/proc/self/fd/${dir.fd}/${c}`, flags | fsConstants.O_NOFOLLOW);
      await dir.close();
      dir = next;
    }
    return dir;
  } catch (e) {
    await dir.close();
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') throw invalidArgument(`chdir to cwd ${JSON.stringify(containerPath)}: no such directory in the container`);
    if (code === 'ELOOP') throw invalidArgument(`cwd ${JSON.stringify(containerPath)}: a symlink appeared on its path while it was resolved; try again`);
    throw e;
  }
}

async function walkInRoot(root: string, containerPath: string, keepMissing: boolean): Promise<string | undefined> {
  const todo = containerPath.split('/').filter((c) => c !== '' && c !== '.');
  const done: string[] = [];
  let links = 0;
  while (todo.length) {
    const c = todo.shift() as string;
    if (c === '..') {
      done.pop();
      continue;
    }
    const here = path.posix.join(root, ...done, c);
    let st;
    try {
      st = await lstat(here);
    } catch {
      if (!keepMissing) return undefined;
    }
    if (!st?.isSymbolicLink()) {
      done.push(c);
      continue;
    }
    if (++links > 40) return undefined;
    const target = await readlink(here);
    if (target.startsWith('/')) done.length = 0;
    todo.unshift(...target.split('/').filter((x) => x !== '' && x !== '.'));
  }
  return path.posix.join(root, ...done);
}

/** A regular file with an execute bit at `containerPath` under `root`, symlinks resolved inside the root. */
export async function executableInRoot(root: string, containerPath: string): Promise<boolean> {
  const real = await resolveInRoot(root, containerPath);
  if (!real) return false;
  try {
    const st = await stat(real);
    return st.isFile() && (st.mode & 0o111) !== 0;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Scripts

/**
 * A shell script whose text is the agent's own and whose data are all positional parameters.
 * Every `${value}` in a {@link Script.line} template becomes a new parameter and the text gets
 * only a reference to it (`"${7}"`), so nothing from a spec or a request (a mount option, a path,
 * a hostname, an argument) can ever become shell syntax, whatever characters it holds.
 *
 * `$b` is busybox (parameter 1). The script's text depends on how many mounts, devices and
 * rlimits there are, never on what they say.
 */
export class Script {
  readonly lines: string[] = [];
  /** $1, $2, …: the data. */
  readonly params: string[] = [];

  constructor() {
    this.line`b=${BUSYBOX}`;
  }

  /** Appends a line (a tagged template): each interpolated value becomes a positional parameter. */
  line(text: TemplateStringsArray, ...values: readonly (string | number | bigint)[]): void {
    let out = text[0] as string;
    values.forEach((v, i) => {
      this.params.push(String(v));
      out += `"\${${this.params.length}}"${text[i + 1] as string}`;
    });
    this.lines.push(out);
  }

  /** The script's text; with `then` (argv that follow the parameters), it ends by exec'ing them. */
  text(then: boolean): string {
    const tail = then ? [`shift ${this.params.length}`, 'exec "$@"'] : [];
    return `${[...this.lines, ...tail].join('\n')}\n`;
  }

  /** `busybox sh -c TEXT NAME PARAMS… THEN…`: runs the script, which then execs `then` when given. */
  argv(name: string, then: readonly string[] = []): string[] {
    return [BUSYBOX, 'sh', '-c', this.text(then.length > 0), name, ...this.params, ...then];
  }
}

// ---------------------------------------------------------------------------------------------
// Rlimits

/** OCI rlimit type → busybox ash `ulimit` flag and the unit that flag counts in (bytes per unit). */
export const ULIMIT_FLAGS: Readonly<Record<string, { readonly flag: string; readonly unit: number }>> = Object.freeze({
  RLIMIT_CORE: { flag: 'c', unit: 512 },
  RLIMIT_DATA: { flag: 'd', unit: 1024 },
  RLIMIT_NICE: { flag: 'e', unit: 1 },
  RLIMIT_FSIZE: { flag: 'f', unit: 512 },
  RLIMIT_SIGPENDING: { flag: 'i', unit: 1 },
  RLIMIT_MEMLOCK: { flag: 'l', unit: 1024 },
  RLIMIT_RSS: { flag: 'm', unit: 1024 },
  RLIMIT_NOFILE: { flag: 'n', unit: 1 },
  RLIMIT_MSGQUEUE: { flag: 'q', unit: 1 },
  RLIMIT_RTPRIO: { flag: 'r', unit: 1 },
  RLIMIT_STACK: { flag: 's', unit: 1024 },
  RLIMIT_CPU: { flag: 't', unit: 1 },
  RLIMIT_NPROC: { flag: 'u', unit: 1 },
  RLIMIT_AS: { flag: 'v', unit: 1024 },
  RLIMIT_LOCKS: { flag: 'x', unit: 1 },
});

const RLIM_INFINITY = 0xffff_ffff_ffff_ffffn;

function ulimitValue(v: bigint, unit: number): string {
  return v >= RLIM_INFINITY ? 'unlimited' : String(v / BigInt(unit));
}

/**
 * Lines setting each rlimit with ash's `ulimit` (inherited through the exec chain). Hard then
 * soft, or soft then hard when lowering the hard limit below the current soft one. Each line
 * calls `fail` when neither order works. INVALID_ARGUMENT for a type ash cannot set.
 */
export function addUlimits(s: Script, rlimits: readonly POSIXRlimit[]): void {
  for (const r of rlimits) {
    const f = ULIMIT_FLAGS[r.Type];
    if (!f) throw invalidArgument(`rlimit ${JSON.stringify(r.Type)} is not supported (supported: ${Object.keys(ULIMIT_FLAGS).join(', ')})`);
    const flag = `-${f.flag}`;
    const hard = ulimitValue(r.Hard, f.unit);
    const soft = ulimitValue(r.Soft, f.unit);
    const why = `cannot set ${r.Type} to soft ${r.Soft} hard ${r.Hard}`;
    s.line`{ ulimit -H ${flag} ${hard} && ulimit -S ${flag} ${soft}; } 2>/dev/null || { ulimit -S ${flag} ${soft} && ulimit -H ${flag} ${hard}; } || fail ${why}`;
  }
}

// ---------------------------------------------------------------------------------------------
// Mounts inside the container

/** containerd's default mounts (`oci.defaultMounts`), used when the spec has none. */
export const DEFAULT_MOUNTS: readonly Mount[] = Object.freeze([
  { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid', 'noexec', 'nodev'] },
  { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
  { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5'] },
  { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'] },
  { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
  { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
]);

/** Device nodes made in a /dev tmpfs the agent mounted (runc's default devices), then its symlinks. */
export const DEFAULT_DEVICES: readonly { name: string; major: number; minor: number }[] = Object.freeze([
  { name: 'null', major: 1, minor: 3 },
  { name: 'zero', major: 1, minor: 5 },
  { name: 'full', major: 1, minor: 7 },
  { name: 'random', major: 1, minor: 8 },
  { name: 'urandom', major: 1, minor: 9 },
  { name: 'tty', major: 5, minor: 0 },
]);
const DEV_LINKS: readonly [string, string][] = [
  ['fd', '/proc/self/fd'],
  ['stdin', '/proc/self/fd/0'],
  ['stdout', '/proc/self/fd/1'],
  ['stderr', '/proc/self/fd/2'],
  ['ptmx', 'pts/ptmx'],
];
/** Propagation flags: dropped, the container's mount namespace is private (unshare --propagation=private). */
const PROPAGATION = new Set(['private', 'rprivate', 'shared', 'rshared', 'slave', 'rslave', 'unbindable', 'runbindable']);

/**
 * The mount flags a container mount may carry: kata-agent's list (agent/src/mount.rs `FLAGS`, the
 * same as runc's) without `remount` (the agent decides what it remounts), plus the propagation
 * flags, which are dropped. A bind mount takes nothing else.
 */
export const MOUNT_FLAGS: ReadonlySet<string> = new Set([
  'defaults', 'ro', 'rw', 'suid', 'nosuid', 'dev', 'nodev', 'exec', 'noexec', 'sync', 'async', 'dirsync', 'mand', 'nomand',
  'atime', 'noatime', 'diratime', 'nodiratime', 'relatime', 'norelatime', 'strictatime', 'nostrictatime', 'bind', 'rbind',
  ...PROPAGATION,
]);

/**
 * The filesystem options (`name=value`, or `name` alone where the value is null) the other mounts
 * may carry: those of the filesystems a container mounts itself (tmpfs, devpts, proc, mqueue,
 * sysfs), each value by its grammar.
 */
export const MOUNT_DATA_OPTIONS: ReadonlyMap<string, RegExp | null> = new Map<string, RegExp | null>([
  ['size', /^\d+[kmgKMG%]?$/],
  ['nr_blocks', /^\d+[kmgKMG]?$/],
  ['nr_inodes', /^\d+[kmgKMG]?$/],
  ['mode', /^[0-7]{1,4}$/],
  ['uid', /^\d+$/],
  ['gid', /^\d+$/],
  ['huge', /^(?:never|always|within_size|advise)$/],
  ['newinstance', null],
  ['ptmxmode', /^[0-7]{1,4}$/],
  ['max', /^\d+$/],
  ['hidepid', /^(?:[0-2]|off|noaccess|invisible|ptraceable)$/],
  ['subset', /^pid$/],
]);

/**
 * Mount types that are not mounted as they are: with a container cgroup, such a mount shows that
 * cgroup read-only (what runc's cgroup namespace shows); without one it is skipped.
 */
export const SKIPPED_MOUNT_TYPES: ReadonlySet<string> = new Set(['cgroup', 'cgroup2']);

function isBindMount(m: Mount): boolean {
  return m.type === 'bind' || m.options.includes('bind') || m.options.includes('rbind');
}

/**
 * A mount's options, checked: {@link MOUNT_FLAGS}, and for a mount that is not a bind mount
 * {@link MOUNT_DATA_OPTIONS} too. Returns them without the propagation flags. INVALID_ARGUMENT
 * naming the first option that is neither, and for a filesystem type that is not a plain word.
 */
export function checkMountOptions(m: Mount, dest: string): string[] {
  const bind = isBindMount(m);
  if (!bind) {
    checkFsType(m.type || 'none', `mount on ${dest}: type`);
    if (m.source) checkOperand(m.source, `mount on ${dest}: source`);
  }
  for (const o of m.options) {
    if (MOUNT_FLAGS.has(o)) continue;
    const eq = o.indexOf('=');
    const rule = bind ? undefined : MOUNT_DATA_OPTIONS.get(eq < 0 ? o : o.slice(0, eq));
    const ok = rule === null ? eq < 0 : rule !== undefined && eq > 0 && rule.test(o.slice(eq + 1));
    if (!ok) {
      const allowed = bind ? 'a bind mount takes only the mount flags' : `the mount flags and ${[...MOUNT_DATA_OPTIONS.keys()].join(', ')}`;
      throw invalidArgument(`mount on ${dest}: option ${JSON.stringify(o)} is not supported (${allowed}: ${[...MOUNT_FLAGS].join(', ')})`);
    }
  }
  return m.options.filter((o) => !PROPAGATION.has(o));
}

/**
 * Where each mount destination and device path of a container goes in the guest, by its
 * normalised container path: {@link secureJoin} under `root` (the agent passes the root's real
 * path). Resolved before the setup runs; the setup checks again, right before each mount, that
 * nothing on the way has become a symlink since (the `inroot` check of {@link addMounts}).
 */
export async function mountTargets(root: string, specMounts: readonly Mount[], devices: readonly LinuxDevice[]): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const paths = [
    ...(specMounts.length ? specMounts : DEFAULT_MOUNTS).map((m) => checkGuestPath(m.destination, 'mount destination')),
    ...devices.map((d) => checkGuestPath(d.Path, 'device path')),
  ];
  for (const p of paths) if (!out.has(p)) out.set(p, await secureJoin(root, p));
  return out;
}

/**
 * The script's `inroot PATH`: true when the part of PATH that exists resolves to itself, i.e. no
 * symlink on the way (PATH was resolved inside the root by {@link mountTargets}, so a symlink
 * now means something changed it, e.g. a volume mounted earlier in the list brought one).
 */
const INROOT = [
  'inroot() {',
  '  p=$1',
  '  while [ -n "$p" ] && [ ! -e "$p" ] && [ ! -L "$p" ]; do p=${p%/*}; done',
  '  [ -n "$p" ] && [ "$("$b" readlink -f "$p")" = "$p" ]',
  '}',
].join('\n');

/**
 * Lines mounting the spec's mounts (or {@link DEFAULT_MOUNTS}) at their `targets`
 * ({@link mountTargets}), making /dev usable and the spec's devices. Options are checked
 * ({@link checkMountOptions}); every path and option is a parameter of the script, not its text.
 */
export function addMounts(s: Script, specMounts: readonly Mount[], devices: readonly LinuxDevice[], targets: ReadonlyMap<string, string>, cgroupDir?: string): void {
  const targetOf = (containerPath: string): string => {
    const t = targets.get(containerPath);
    if (t === undefined) throw internal(`no target was resolved for ${containerPath}`);
    return t;
  };
  s.lines.push(INROOT);
  const mounts = specMounts.length ? specMounts : DEFAULT_MOUNTS;
  for (const m of mounts) {
    const dest = checkGuestPath(m.destination, 'mount destination');
    const bind = isBindMount(m);
    if (!bind && SKIPPED_MOUNT_TYPES.has(m.type)) {
      if (!cgroupDir) continue;
      checkMountOptions(m, dest);
      const target = targetOf(dest);
      s.line`inroot ${target} && "$b" mkdir -p ${target} && inroot ${target} || fail ${`${dest} resolves outside the container's root`}`;
      s.line`"$b" mount --bind ${cgroupDir} ${target} && "$b" mount -o remount,bind,ro,nosuid,nodev,noexec ${target} || fail ${`cannot mount the container's cgroup on ${dest}`}`;
      continue;
    }
    const opts = checkMountOptions(m, dest);
    const target = targetOf(dest);
    const what = `${m.type || 'bind'} on ${dest}`;
    const escapes = `${dest} resolves outside the container's root`;
    if (bind) {
      const src = checkGuestPath(m.source, 'bind mount source');
      const flags = [opts.includes('rbind') ? 'rbind' : 'bind', ...opts.filter((o) => o !== 'ro' && o !== 'rw' && o !== 'bind' && o !== 'rbind')].join(',');
      const parent = path.posix.dirname(target);
      s.line`[ -e ${src} ] || fail ${`bind mount source ${src} does not exist in the guest`}`;
      s.line`inroot ${target} || fail ${escapes}`;
      s.line`if [ -d ${src} ]; then "$b" mkdir -p ${target}; else "$b" mkdir -p ${parent} && { [ -e ${target} ] || "$b" touch ${target}; }; fi || fail ${`cannot create ${dest}`}`;
      s.line`inroot ${target} || fail ${escapes}`;
      s.line`"$b" mount -o ${flags} ${src} ${target} || fail ${`cannot mount ${what}`}`;
      if (opts.includes('ro')) s.line`"$b" mount -o remount,bind,ro ${target} || fail ${`cannot make ${dest} read-only`}`;
      continue;
    }
    const type = m.type || 'none';
    s.line`inroot ${target} && "$b" mkdir -p ${target} && inroot ${target} || fail ${escapes}`;
    if (opts.length) s.line`"$b" mount -t ${type} -o ${opts.join(',')} ${m.source || type} ${target} || fail ${`cannot mount ${what}`}`;
    else s.line`"$b" mount -t ${type} ${m.source || type} ${target} || fail ${`cannot mount ${what}`}`;
    if (dest === '/dev' && type === 'tmpfs') {
      for (const d of DEFAULT_DEVICES) {
        s.line`"$b" mknod -m 666 ${`${target}/${d.name}`} c ${d.major} ${d.minor} || fail ${`cannot create /dev/${d.name}`}`;
      }
      for (const [name, to] of DEV_LINKS) s.line`"$b" ln -sf ${to} ${`${target}/${name}`}`;
    }
  }
  for (const d of devices) {
    const dest = checkGuestPath(d.Path, 'device path');
    const target = targetOf(dest);
    const parent = path.posix.dirname(target);
    const type = d.Type === 'u' ? 'c' : d.Type;
    if (!['c', 'b', 'p'].includes(type)) throw invalidArgument(`device ${dest}: unknown type ${JSON.stringify(d.Type)}`);
    const mode = ((d.FileMode || 0o666) & 0o7777).toString(8);
    const owner = `${d.UID}:${d.GID}`;
    const why = `cannot create device ${dest}`;
    s.line`inroot ${parent} && "$b" mkdir -p ${parent} && inroot ${target} || fail ${`${dest} resolves outside the container's root`}`;
    if (type === 'p') s.line`"$b" rm -f ${target} && "$b" mknod -m ${mode} ${target} p && "$b" chown ${owner} ${target} || fail ${why}`;
    else s.line`"$b" rm -f ${target} && "$b" mknod -m ${mode} ${target} ${type} ${d.Major} ${d.Minor} && "$b" chown ${owner} ${target} || fail ${why}`;
  }
}

// ---------------------------------------------------------------------------------------------
// Command lines

export interface ProcessPlan {
  readonly args: readonly string[];
  readonly env: readonly string[];
  /** Absolute, inside the container. */
  readonly cwd: string;
  readonly uid: number;
  readonly gid: number;
  readonly noNewPrivileges: boolean;
  readonly rlimits: readonly POSIXRlimit[];
}

/**
 * Where the final exec happens: chrooted into `root` (the container's init), or inside the
 * namespaces and root of `pid` (an exec) with `cwdDir` as its working directory.
 *
 * nsenter opens its `-w` directory before it enters the root, in the agent's view of the files,
 * so a path such as `<root>/<cwd>` would follow a symlink the container planted (`/work -> /`)
 * out of the root and leave the process's working directory outside its chroot. So `-w` is never
 * a path into the container: the init's script has changed into the working directory and
 * checked it is inside the root (`-w.`), and an exec gets a directory the agent holds open
 * ({@link openDirInRoot}: `/proc/<agent pid>/fd/<fd>`).
 */
export type ExecTarget = { readonly kind: 'root'; readonly root: string } | { readonly kind: 'ns'; readonly pid: number; readonly cwdDir: string };

/** `busybox env -i ENV… busybox [setpriv --nnp busybox] nsenter … -S uid -G gid -- ARGS…` */
export function finalChain(plan: ProcessPlan, target: ExecTarget): string[] {
  const where = target.kind === 'root' ? [`-r${target.root}`, '-w.'] : ['-t', String(target.pid), '-m', '-u', '-p', '-r', `-w${target.cwdDir}`];
  return [
    BUSYBOX,
    'env',
    '-i',
    '--',
    ...plan.env,
    BUSYBOX,
    ...(plan.noNewPrivileges ? ['setpriv', '--nnp', BUSYBOX] : []),
    'nsenter',
    ...where,
    '-S',
    String(plan.uid),
    '-G',
    String(plan.gid),
    '--',
    ...plan.args,
  ];
}

/** What the container's init script needs besides the process. */
export interface InitSpec {
  /** The container's root in the guest (OCI Root.Path, its real path). */
  readonly root: string;
  readonly readonly: boolean;
  /** Empty: keep the guest's hostname (in a new uts namespace all the same). */
  readonly hostname: string;
  readonly mounts: readonly Mount[];
  readonly devices: readonly LinuxDevice[];
  /** Where each mount and device goes: {@link mountTargets} of the same root, mounts and devices. */
  readonly targets: ReadonlyMap<string, string>;
  /** The container's cgroup in the guest: `cgroup` mounts show it (read-only). */
  readonly cgroupDir?: string | undefined;
  /** The process's working directory in the guest: {@link secureJoin} of the root and `cwd` (checked again in the script). */
  readonly cwdTarget: string;
}

/** The word fd 3 carries from the agent to let a prepared container go. */
export const START_WORD = 'start';
/** The line the init script writes on fd 3 once the container is prepared. */
export const READY_WORD = 'ready';

/** The setup script of a container's init (runs as PID 1 of the new namespaces, before the chroot). */
export function initScript(plan: ProcessPlan, spec: InitSpec): Script {
  const s = new Script();
  const root = spec.root;
  // A failure goes to the agent (fd 3), which answers CreateContainer with it.
  s.line`fail() { echo "$*" >&3; exit 1; }`;
  if (spec.readonly) s.line`"$b" mount --bind ${root} ${root} || fail ${'cannot bind-mount the rootfs'}`;
  if (spec.hostname) s.line`"$b" hostname ${checkHostname(spec.hostname, 'hostname')} || fail ${`cannot set the hostname to ${spec.hostname}`}`;
  addMounts(s, spec.mounts, spec.devices, spec.targets, spec.cgroupDir);
  if (spec.readonly) s.line`"$b" mount -o remount,bind,ro ${root} || fail ${'cannot make the rootfs read-only'}`;
  addUlimits(s, plan.rlimits);
  // The working directory, after the mounts (it may be in a volume): nsenter's `-w.` keeps it. The
  // path was resolved inside the root; the physical path of where `cd` landed is checked, so a
  // symlink that appeared meanwhile cannot take the process out of its root (see ExecTarget).
  s.line`cd -P -- ${spec.cwdTarget} 2>/dev/null || fail ${`chdir to cwd ${JSON.stringify(plan.cwd)}: no such directory in the container`}`;
  s.line`case "$(pwd -P)" in ${root}|${root}/*) ;; *) fail ${`cwd ${JSON.stringify(plan.cwd)} resolves outside the container's root`} ;; esac`;
  s.line`echo ${READY_WORD} >&3`;
  // The agent closing fd 3 instead (RemoveContainer before StartContainer) ends the container here.
  s.line`read -r go <&3 || exit 1`;
  s.line`[ "$go" = ${START_WORD} ] || exit 1`;
  s.line`exec 3>&-`;
  return s;
}

/** argv of a container's init: unshare's fork becomes PID 1 of new mount, pid and uts namespaces, runs the setup, then execs the process. */
export function initArgv(plan: ProcessPlan, spec: InitSpec): string[] {
  const setup = initScript(plan, spec).argv('kata-ts-init', finalChain(plan, { kind: 'root', root: spec.root }));
  return [BUSYBOX, 'unshare', '-m', '-u', '-p', '-f', '--propagation=private', '--', ...setup];
}

/** argv of an exec'd process, entering the namespaces and root of `initPid`, in the directory `cwdDir` (see ExecTarget). */
export function execArgv(plan: ProcessPlan, initPid: number, cwdDir: string): string[] {
  const chain = finalChain(plan, { kind: 'ns', pid: initPid, cwdDir });
  if (plan.rlimits.length === 0) return chain;
  const s = new Script();
  s.line`fail() { echo "kata-ts-agent: $*" >&2; exit 126; }`;
  addUlimits(s, plan.rlimits);
  return s.argv('kata-ts-exec', chain);
}

// ---------------------------------------------------------------------------------------------
// Exit status

/** Linux signal numbers by name (what node reports for a process killed by a signal). */
export const SIGNAL_NUMBERS: Readonly<Record<string, number>> = Object.freeze({
  SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGILL: 4, SIGTRAP: 5, SIGABRT: 6, SIGBUS: 7, SIGFPE: 8, SIGKILL: 9, SIGUSR1: 10,
  SIGSEGV: 11, SIGUSR2: 12, SIGPIPE: 13, SIGALRM: 14, SIGTERM: 15, SIGSTKFLT: 16, SIGCHLD: 17, SIGCONT: 18, SIGSTOP: 19,
  SIGTSTP: 20, SIGTTIN: 21, SIGTTOU: 22, SIGURG: 23, SIGXCPU: 24, SIGXFSZ: 25, SIGVTALRM: 26, SIGPROF: 27, SIGWINCH: 28,
  SIGIO: 29, SIGPOLL: 29, SIGPWR: 30, SIGSYS: 31,
});

/** The status WaitProcess reports: the exit code, or 128 + the signal's number when a signal ended the process. */
export function exitStatus(code: number | null, signal: string | null): number {
  if (code !== null) return code;
  const n = signal ? SIGNAL_NUMBERS[signal] : undefined;
  return 128 + (n ?? 0);
}

/** SignalProcess's signal: 0 (existence check) to 64 (SIGRTMAX); INVALID_ARGUMENT otherwise. */
export function checkSignal(n: number): number {
  if (!Number.isInteger(n) || n < 0 || n > 64) throw invalidArgument(`signal ${n} is not a Linux signal number`);
  return n;
}
