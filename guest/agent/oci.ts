/**
 * From an OCI process (and the container's spec) to the command lines that run it: pure functions,
 * unit-tested without a VM. Node can neither unshare, chroot, setuid nor mount, so the agent starts
 * a chain of busybox applets, each `exec`ing the next, so that no intermediate process is left
 * between the container's process and the one the agent waits for:
 *
 * Container init (CreateContainer prepares it, StartContainer lets it go):
 *
 *   busybox unshare -m -u -p -f --propagation=private -- busybox sh -c SETUP kata-ts-init
 *     └ (forked, PID 1 of the new pid namespace) sh: sets the hostname, mounts /proc, /dev, … under
 *       the rootfs, applies rlimits, says `ready` on fd 3, waits for `start` on fd 3, then
 *       exec busybox env -i ENV… busybox [setpriv --nnp busybox] nsenter -r<root> -w<root><cwd> -S uid -G gid -- ARGS…
 *         └ chroot + chdir + setgid/setuid, then execvp(ARGS) with the container's PATH
 *
 * Exec (ExecProcess), into the namespaces and root of the container's init:
 *
 *   [busybox sh -c 'ulimit…; exec "$@"'] busybox env -i ENV… busybox nsenter -t PID -m -u -p -r -w/proc/PID/root<cwd> -S uid -G gid -- ARGS…
 *     └ (forked after entering the pid namespace) the process
 *
 * `unshare -f` and `nsenter -p` must fork (a new pid namespace applies to children only); their
 * parent only waits and then exits with the child's status, or kills itself with the signal that
 * killed the child. So the agent's child reports exactly what the container process did
 * (exit code, or death by signal → 128 + signal), and signals go to the real process, the
 * parent's only child. The container's PID 1 gets only the signals it handles (plus SIGKILL),
 * as with every runtime.
 */
import { lstat, readlink, stat } from 'node:fs/promises';
import path from 'node:path';
import type { LinuxDevice, Mount, POSIXRlimit, StringUser, User } from '../../wire/agent/proto.gen.js';
import { invalidArgument } from './errors.js';
import { checkGuestPath } from './storage.js';
import { BUSYBOX } from './sys.js';

/** kata-agent's rule for container ids (`verify_id`). */
export function checkContainerId(id: string): void {
  if (!/^[a-zA-Z0-9][a-zA-Z0-9_.-]+$/.test(id)) {
    throw invalidArgument(`invalid container id ${JSON.stringify(id)} (letters, digits, "_", "." and "-", at least 2, not starting with a symbol)`);
  }
}

/** Single-quotes a word for sh. */
export function shq(word: string): string {
  return `'${word.replaceAll("'", `'\\''`)}'`;
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

/** The OCI env with entries that are not `NAME=value` dropped, and HOME added (as runc does) when absent. */
export function buildEnv(env: readonly string[], home: string | undefined): string[] {
  const out = env.filter((e) => e.indexOf('=') > 0);
  if (!out.some((e) => e.startsWith('HOME='))) out.push(`HOME=${home ?? '/'}`);
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
      return undefined;
    }
    if (!st.isSymbolicLink()) {
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
 * Shell lines setting each rlimit with ash's `ulimit` (inherited through the exec chain). Hard
 * then soft, or soft then hard when lowering the hard limit below the current soft one. Each line
 * calls `fail` when neither order works. INVALID_ARGUMENT for a type ash cannot set.
 */
export function ulimitLines(rlimits: readonly POSIXRlimit[]): string[] {
  return rlimits.map((r) => {
    const f = ULIMIT_FLAGS[r.Type];
    if (!f) throw invalidArgument(`rlimit ${JSON.stringify(r.Type)} is not supported (supported: ${Object.keys(ULIMIT_FLAGS).join(', ')})`);
    const hard = `ulimit -H -${f.flag} ${ulimitValue(r.Hard, f.unit)}`;
    const soft = `ulimit -S -${f.flag} ${ulimitValue(r.Soft, f.unit)}`;
    return `{ ${hard} && ${soft}; } 2>/dev/null || { ${soft} && ${hard}; } || fail ${shq(`cannot set ${r.Type} to soft ${r.Soft} hard ${r.Hard}`)}`;
  });
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
const PROPAGATION = new Set(['private', 'rprivate', 'shared', 'rshared', 'slave', 'rslave', 'unbindable', 'runbindable']);
/** Mount types the agent does not mount in a container (no cgroup support in this guest). */
export const SKIPPED_MOUNT_TYPES: ReadonlySet<string> = new Set(['cgroup', 'cgroup2']);

/** Shell lines mounting the spec's mounts (or {@link DEFAULT_MOUNTS}) under `root`, making /dev usable and the spec's devices. */
export function mountLines(root: string, specMounts: readonly Mount[], devices: readonly LinuxDevice[]): string[] {
  const B = BUSYBOX;
  const lines: string[] = [];
  const mounts = specMounts.length ? specMounts : DEFAULT_MOUNTS;
  for (const m of mounts) {
    const dest = checkGuestPath(m.destination, 'mount destination');
    const target = path.posix.join(root, dest);
    const T = shq(target);
    const isBind = m.type === 'bind' || m.options.includes('bind') || m.options.includes('rbind');
    if (!isBind && SKIPPED_MOUNT_TYPES.has(m.type)) continue;
    const opts = m.options.filter((o) => !PROPAGATION.has(o));
    const what = `${m.type || 'bind'} on ${dest}`;
    if (isBind) {
      const src = checkGuestPath(m.source, 'bind mount source');
      const S = shq(src);
      const bindOpts = opts.filter((o) => o !== 'ro' && o !== 'rw' && o !== 'bind' && o !== 'rbind');
      const flag = opts.includes('rbind') ? 'rbind' : 'bind';
      lines.push(`[ -e ${S} ] || fail ${shq(`bind mount source ${src} does not exist in the guest`)}`);
      lines.push(`if [ -d ${S} ]; then ${B} mkdir -p ${T}; else ${B} mkdir -p ${shq(path.posix.dirname(target))} && { [ -e ${T} ] || ${B} touch ${T}; }; fi || fail ${shq(`cannot create ${dest}`)}`);
      lines.push(`${B} mount -o ${[flag, ...bindOpts].join(',')} ${S} ${T} || fail ${shq(`cannot mount ${what}`)}`);
      if (opts.includes('ro')) lines.push(`${B} mount -o remount,bind,ro ${T} || fail ${shq(`cannot make ${dest} read-only`)}`);
      continue;
    }
    const type = m.type || 'none';
    lines.push(
      `${B} mkdir -p ${T} && ${B} mount -t ${shq(type)}${opts.length ? ` -o ${shq(opts.join(','))}` : ''} ${shq(m.source || type)} ${T} || fail ${shq(`cannot mount ${what}`)}`,
    );
    if (dest === '/dev' && type === 'tmpfs') {
      for (const d of DEFAULT_DEVICES) {
        lines.push(`${B} mknod -m 666 ${shq(`${target}/${d.name}`)} c ${d.major} ${d.minor} || fail ${shq(`cannot create /dev/${d.name}`)}`);
      }
      for (const [name, to] of DEV_LINKS) lines.push(`${B} ln -sf ${shq(to)} ${shq(`${target}/${name}`)}`);
    }
  }
  for (const d of devices) {
    const dest = checkGuestPath(d.Path, 'device path');
    const target = path.posix.join(root, dest);
    const type = d.Type === 'u' ? 'c' : d.Type;
    if (!['c', 'b', 'p'].includes(type)) throw invalidArgument(`device ${dest}: unknown type ${JSON.stringify(d.Type)}`);
    const mode = ((d.FileMode || 0o666) & 0o7777).toString(8);
    const numbers = type === 'p' ? '' : ` ${d.Major} ${d.Minor}`;
    lines.push(
      `${B} mkdir -p ${shq(path.posix.dirname(target))} && ${B} rm -f ${shq(target)} && ${B} mknod -m ${mode} ${shq(target)} ${type}${numbers} && ${B} chown ${d.UID}:${d.GID} ${shq(target)} || fail ${shq(`cannot create device ${dest}`)}`,
    );
  }
  return lines;
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

/** Where the final exec happens: chrooted into `root` (the container's init) or inside the namespaces of `pid` (an exec). */
export type ExecTarget = { readonly kind: 'root'; readonly root: string } | { readonly kind: 'ns'; readonly pid: number };

/** `busybox env -i ENV… busybox [setpriv --nnp busybox] nsenter … -S uid -G gid -- ARGS…` */
export function finalChain(plan: ProcessPlan, target: ExecTarget): string[] {
  const where =
    target.kind === 'root'
      ? [`-r${target.root}`, `-w${path.posix.join(target.root, plan.cwd)}`]
      : ['-t', String(target.pid), '-m', '-u', '-p', '-r', `-w${path.posix.join(`/proc/${target.pid}/root`, plan.cwd)}`];
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
  /** The container's root in the guest (OCI Root.Path). */
  readonly root: string;
  readonly readonly: boolean;
  /** Empty: keep the guest's hostname (in a new uts namespace all the same). */
  readonly hostname: string;
  readonly mounts: readonly Mount[];
  readonly devices: readonly LinuxDevice[];
}

/** The word fd 3 carries from the agent to let a prepared container go. */
export const START_WORD = 'start';
/** The line the init script writes on fd 3 once the container is prepared. */
export const READY_WORD = 'ready';

/** The setup script of a container's init (runs as PID 1 of the new namespaces, before the chroot). */
export function initScript(plan: ProcessPlan, spec: InitSpec): string {
  const B = BUSYBOX;
  const R = shq(spec.root);
  const lines = [
    // A failure goes to the agent (fd 3), which answers CreateContainer with it.
    `fail() { echo "$*" >&3; exit 1; }`,
    ...(spec.readonly ? [`${B} mount --bind ${R} ${R} || fail 'cannot bind-mount the rootfs'`] : []),
    ...(spec.hostname ? [`${B} hostname ${shq(spec.hostname)} || fail ${shq(`cannot set the hostname to ${spec.hostname}`)}`] : []),
    ...mountLines(spec.root, spec.mounts, spec.devices),
    ...(spec.readonly ? [`${B} mount -o remount,bind,ro ${R} || fail 'cannot make the rootfs read-only'`] : []),
    ...ulimitLines(plan.rlimits),
    `echo ${READY_WORD} >&3`,
    // The agent closing fd 3 instead (RemoveContainer before StartContainer) ends the container here.
    `read -r go <&3 || exit 1`,
    `[ "$go" = ${START_WORD} ] || exit 1`,
    `exec 3>&-`,
    `exec ${finalChain(plan, { kind: 'root', root: spec.root }).map(shq).join(' ')}`,
  ];
  return `${lines.join('\n')}\n`;
}

/** argv of a container's init: unshare's fork becomes PID 1 of new mount, pid and uts namespaces. */
export function initArgv(plan: ProcessPlan, spec: InitSpec): string[] {
  return [BUSYBOX, 'unshare', '-m', '-u', '-p', '-f', '--propagation=private', '--', BUSYBOX, 'sh', '-c', initScript(plan, spec), 'kata-ts-init'];
}

/** argv of an exec'd process, entering the namespaces and root of `initPid`. */
export function execArgv(plan: ProcessPlan, initPid: number): string[] {
  const chain = finalChain(plan, { kind: 'ns', pid: initPid });
  if (plan.rlimits.length === 0) return chain;
  const script = [`fail() { echo "kata-ts-agent: $*" >&2; exit 126; }`, ...ulimitLines(plan.rlimits), 'exec "$@"'].join('\n');
  return [BUSYBOX, 'sh', '-c', script, 'kata-ts-exec', ...chain];
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
