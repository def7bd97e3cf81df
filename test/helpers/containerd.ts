/**
 * A private containerd for end-to-end tests of a shim: Debian's containerd (1.6) started by the
 * test with its own root, state, sockets and namespace under a temp dir, a busybox image imported
 * without a registry, a `ctr` runner, and a stop that reports and removes what was left behind.
 *
 * ```ts
 * startContainerd(ctx: Mocha.Context, opts?: ContainerdOptions): Promise<TestContainerd>
 *   // skips the suite when containerd/ctr are not installed, unless CI is set (then it throws)
 * interface TestContainerd {
 *   dir; socket; namespace; fifoDir; stateDir;          // paths of this instance
 *   ctr(args: string[], opts?: CtrOptions): Promise<CtrResult>;  // ctr -a SOCK -n NS ...args
 *   run(id: string, cmd: string[], opts?: RunOptions): Promise<CtrResult>;  // ctr run --rm [--runtime R] IMAGE id cmd…
 *   logTail(lines?: number): string;                     // containerd's last log lines (stderr, debug level)
 *   stop(): Promise<Leftovers>;                          // idempotent; compare with NO_LEFTOVERS
 * }
 * busyboxImageTar(): Promise<string>                     // the OCI tarball, built once into the cache dir
 * pauseImageTar(): Promise<string>                       // the same busybox, whose default command sleeps
 * BUSYBOX_IMAGE = 'localhost/busybox:test'   PAUSE_IMAGE = 'localhost/pause:test'
 * NO_LEFTOVERS   SHIM_SOCKET_DIR = '/run/containerd/s'   CRI_NAMESPACE = 'k8s.io'
 * ```
 *
 * By default containerd runs without its CRI plugin. With `cri: { runtimes: { kata: 'io.containerd.kata.v2' } }`
 * the plugin serves CRI's gRPC API (runtime.v1 and v1alpha2) on {@link TestContainerd.socket}, with
 * those runtime handlers, {@link PAUSE_IMAGE} as the sandbox image, no registry, no CNI network
 * unless `cri.cni` gives one (else pods must use the host network; with one, pass `netns` too so the
 * CNI bridge is made in the test's namespace), and both images imported into CRI's namespace `k8s.io`. Its
 * streaming server (exec, attach, port-forward) listens on a free port of 127.0.0.1.
 *
 * Usage, for the kata shim (put the directory holding `containerd-shim-kata-v2` first on PATH):
 * ```ts
 * describe('containerd-shim-kata-v2 @integration', function () {
 *   this.timeout(120_000);
 *   let ctrd: TestContainerd | undefined;
 *   before(async function () { ctrd = await startContainerd(this, { pathPrefix: [shimBinDir] }); });
 *   after(async () => { await ctrd?.stop(); });
 *   it('runs echo in a VM', async () => {
 *     const r = await ctrd!.run('t1', ['echo', 'hello'], { runtime: 'io.containerd.kata.v2' });
 *     assert.deepEqual([r.code, r.stdout], [0, 'hello\n'], ctrd!.logTail());
 *   });
 *   it('leaves nothing behind', async () => assert.deepEqual(await ctrd!.stop(), NO_LEFTOVERS, ctrd!.logTail()));
 * });
 * ```
 *
 * What lives outside the temp dir, because containerd 1.6 or ctr hard-code it:
 * - Shim sockets: Go shims listen in `/run/containerd/s/<sha256(address/ns/id)>`. stop() finds them
 *   through the `address` file of each bundle left in the state dir, reports and removes them.
 * - Stdio FIFOs: ctr makes them in `/run/containerd/fifo` unless given `--fifo-dir`; {@link
 *   TestContainerd.ctr} adds `--fifo-dir <dir>/fifo` to `run`, `task start` and `task exec`.
 * - cgroups: ctr asks for `/<ns>/<id>`; runc leaves the `<ns>` level behind (removed by stop(),
 *   not reported; a container's own cgroup still there is reported). runc keeps its state in
 *   `/run/containerd/runc/<ns>` (removed by stop()).
 * Every process containerd starts inherits the marker variable `KATA_TS_TEST_CONTAINERD=<dir>`, and
 * so does the QEMU a shim starts if the shim passes its environment on; that, or naming the temp
 * dir in its arguments or working in it, is how stop() tells this instance's processes from
 * others' (other containerds run on the same host).
 *
 * stdin and ctr 1.6: ctr sends CloseIO only when stdin's EOF comes after the task was created, so
 * an EOF that arrives at once is lost and `cat` never ends. With `input`, the runner therefore
 * holds stdin open until the container has printed something; a command that prints nothing
 * before its stdin ends cannot be driven this way. ctr 1.6 has no `run -i`: stdin is always
 * connected unless `--null-io`.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, existsSync, lstatSync, type Stats, readFileSync, readdirSync, readlinkSync, rmSync, rmdirSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, symlink, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { promisify } from 'node:util';
import { LineRing } from '../../core/line-ring.js';
import { defaultCacheDir } from '../../guest/image/build-image.js';
import { aptDownload, findTool, showCandidates, unpackDeb } from '../../guest/image/debian.js';
import { TempDir } from './tmp.js';

const execFileP = promisify(execFile);

export const BUSYBOX_IMAGE = 'localhost/busybox:test';
export const PAUSE_IMAGE = 'localhost/pause:test';
export const SHIM_SOCKET_DIR = '/run/containerd/s';
/** The containerd namespace CRI keeps its pods, containers and images in. */
export const CRI_NAMESPACE = 'k8s.io';
const MARKER = 'KATA_TS_TEST_CONTAINERD';
/** Part of the cached tarball's name: bump it when the image's contents change. */
const IMAGE_VERSION = 1;
const UNIX_PATH_MAX = 108;

export interface ContainerdOptions {
  /** Directories put first on containerd's PATH, so it finds our `containerd-shim-*-v2` there. */
  pathPrefix?: string[];
  /** Extra environment for containerd, and so for the shims it starts. */
  env?: Record<string, string>;
  /** Import {@link BUSYBOX_IMAGE} (default true). */
  image?: boolean;
  /** How long containerd may take to answer `ctr version` (default 15 s). */
  readyTimeoutMs?: number;
  /** Enable the CRI plugin (it is disabled by default); see the top of this file. */
  cri?: CriOptions;
  /**
   * Run containerd (and so the CNI plugins and shims it starts) in this named network namespace,
   * which the caller created and removes: a CNI bridge is then made there, not on the host.
   */
  netns?: string;
}

export interface CriOptions {
  /** Runtime handlers (RunPodSandbox's `runtime_handler`) → containerd runtime type, e.g. `{ kata: 'io.containerd.kata.v2' }`. */
  runtimes: Record<string, string>;
  /** Per handler: CRI's `pod_annotations` (which pod annotations reach the runtime) and the runtime options' `ConfigPath`. */
  handlers?: Record<string, { podAnnotations?: string[]; configPath?: string }>;
  /**
   * A CNI network for pods that do not use the host network: the plugins' directory (e.g.
   * Debian's /usr/lib/cni) and a network configuration list, written to `<temp dir>/cni/net.d`.
   * Without it CRI has no CNI configuration and pods must use the host network.
   */
  cni?: { binDir: string; conflist: Record<string, unknown> };
}

export interface CtrOptions {
  /** Written to ctr's stdin, which is then held open until the container prints (see the top). */
  input?: string;
  /** ctr is SIGKILLed after this long (default 60 s); the result then has `timedOut`. */
  timeoutMs?: number;
}

export interface RunOptions extends CtrOptions {
  /** `--runtime`, e.g. `io.containerd.kata.v2`; containerd's default is `io.containerd.runc.v2`. */
  runtime?: string;
  /** More `ctr run` flags, before the image. */
  flags?: string[];
}

export interface CtrResult {
  /** Exit status; null when ctr was killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

export interface LeftoverProcess {
  pid: number;
  cmdline: string;
}

/** What a suite left behind, as stop() found it before removing it. */
export interface Leftovers {
  /** `containerd-shim-*` processes of this instance. */
  shims: LeftoverProcess[];
  /** `qemu-system-*` processes started under this instance. */
  qemus: LeftoverProcess[];
  /** Mount points under the temp dir (container rootfs mounts, mostly). */
  mounts: string[];
  /** FIFOs in the fifo dir. */
  fifos: string[];
  /** Shim sockets (in {@link SHIM_SOCKET_DIR}) named by leftover bundles. */
  sockets: string[];
  /** Container cgroups `/sys/fs/cgroup/[<controller>/]<ns>/<id>`. */
  cgroups: string[];
}

export const NO_LEFTOVERS: Readonly<Leftovers> = Object.freeze({ shims: [], qemus: [], mounts: [], fifos: [], sockets: [], cgroups: [] });

export interface TestContainerd {
  /** The temp dir holding everything of this instance. */
  readonly dir: string;
  /** containerd's gRPC socket (ttrpc is `<socket>.ttrpc`). */
  readonly socket: string;
  /** This suite's containerd namespace. */
  readonly namespace: string;
  /** Where ctr puts stdio FIFOs. */
  readonly fifoDir: string;
  /** containerd's state dir; bundles are `<stateDir>/io.containerd.runtime.v2.task/<ns>/<id>`. */
  readonly stateDir: string;
  /** `ctr -a SOCK -n NS ...args`, with `--fifo-dir` added to run, task start and task exec. */
  ctr(args: string[], opts?: CtrOptions): Promise<CtrResult>;
  /** `ctr run --rm [--runtime R] [...flags] localhost/busybox:test <id> <cmd...>`. */
  run(id: string, cmd: string[], opts?: RunOptions): Promise<CtrResult>;
  /** The last `lines` lines containerd logged (debug level), for assertion messages. */
  logTail(lines?: number): string;
  /** Stops containerd (SIGTERM, SIGKILL after 5 s), then reports and removes what is left. */
  stop(): Promise<Leftovers>;
}

function truthy(v: string | undefined): boolean {
  return v !== undefined && v !== '' && !/^(0|false|no)$/i.test(v);
}

/**
 * Starts a containerd for a suite; call it from `before` with the hook's `this`. Skips the suite
 * when containerd or ctr is missing, except under CI, where that is a failure.
 */
export async function startContainerd(ctx: Mocha.Context, opts: ContainerdOptions = {}): Promise<TestContainerd> {
  const containerd = findTool('containerd');
  const ctrBin = findTool('ctr');
  if (!containerd || !ctrBin) {
    const why = 'containerd and ctr are not installed (Debian package containerd)';
    if (truthy(process.env.CI)) throw new Error(`${why}; CI must run the containerd tests (.ci/run installs the package)`);
    process.stderr.write(`      [containerd] skipping: ${why}\n`);
    ctx.skip();
  }
  const imageTar = opts.image === false ? undefined : await busyboxImageTar();
  const criImages = opts.cri ? [await busyboxImageTar(), await pauseImageTar()] : [];
  const tmp = new TempDir('kata-ts-ctrd-');
  try {
    return await launch(tmp, containerd as string, ctrBin as string, imageTar, criImages, opts);
  } catch (err) {
    tmp.cleanup();
    throw err;
  }
}

async function launch(tmp: TempDir, containerd: string, ctrBin: string, imageTar: string | undefined, criImages: string[], opts: ContainerdOptions): Promise<TestContainerd> {
  const dir = tmp.path;
  const socket = path.join(dir, 'c.sock');
  if (Buffer.byteLength(`${socket}.ttrpc`) >= UNIX_PATH_MAX) throw new Error(`${socket}.ttrpc is too long for a unix socket: set TMPDIR to a shorter directory`);
  const stateDir = path.join(dir, 'state');
  const fifoDir = path.join(dir, 'fifo');
  const namespace = `kata-ts-${randomBytes(4).toString('hex')}`;
  await mkdir(fifoDir);
  const config = tmp.file(
    'config.toml',
    [
      'version = 2',
      `root = ${JSON.stringify(path.join(dir, 'root'))}`,
      `state = ${JSON.stringify(stateDir)}`,
      ...(opts.cri ? [] : ['disabled_plugins = ["io.containerd.grpc.v1.cri"]']),
      '[grpc]',
      `  address = ${JSON.stringify(socket)}`,
      '[ttrpc]',
      '  address = ""', // containerd derives <grpc address>.ttrpc
      '[debug]',
      '  level = "debug"', // also makes containerd start shims with -debug
      '[plugins."io.containerd.internal.v1.opt"]',
      `  path = ${JSON.stringify(path.join(dir, 'opt'))}`,
      ...(opts.cri ? criConfig(opts.cri, dir) : []),
      '',
    ].join('\n'),
  );
  if (opts.cri?.cni) tmp.file('cni/net.d/10-test.conflist', JSON.stringify(opts.cri.cni.conflist, null, 2));

  const log = new LineRing(500);
  const env = { ...process.env, ...opts.env, PATH: [...(opts.pathPrefix ?? []), process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin'].join(':'), [MARKER]: dir };
  // nsenter execs containerd in place (the pid stays the daemon's) and, unlike `ip netns exec`,
  // keeps the host's mount namespace: the pod namespaces CRI mounts under /var/run/netns stay visible.
  const argv = opts.netns ? ['nsenter', `--net=/var/run/netns/${opts.netns}`, containerd, '--config', config] : [containerd, '--config', config];
  const daemon = spawn(argv[0]!, argv.slice(1), { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
  daemon.stdout.setEncoding('utf8').on('data', (d: string) => log.push(d));
  daemon.stderr.setEncoding('utf8').on('data', (d: string) => log.push(d));
  let spawnError: Error | undefined;
  daemon.on('error', (e) => (spawnError = e));
  const exited = new Promise<void>((resolve) => daemon.once('close', () => resolve()));
  const killOnExit = () => daemon.kill('SIGKILL');
  process.once('exit', killOnExit);

  const clients = new Set<ChildProcess>();
  const base = ['-a', socket, '-n', namespace];
  const ctr = (args: string[], o: CtrOptions = {}) => runCtr(ctrBin, [...base, ...withFifoDir(args, fifoDir)], o, clients);
  const logTail = (lines = 80) => log.tail(lines).join('\n');

  let stopping: Promise<Leftovers> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      for (const c of clients) c.kill('SIGKILL');
      if (daemon.exitCode === null && daemon.signalCode === null) {
        daemon.kill('SIGTERM');
        if ((await Promise.race([exited.then(() => true), delay(5000, false)])) === false) daemon.kill('SIGKILL');
      }
      await exited;
      process.removeListener('exit', killOnExit);
      log.flush();
      const left = await settledLeftovers(dir, namespace, stateDir, fifoDir, daemon.pid);
      await removeLeftovers(left, dir, namespace);
      return left;
    })());

  const run = (id: string, cmd: string[], o: RunOptions = {}) =>
    ctr(['run', '--rm', ...(o.runtime ? ['--runtime', o.runtime] : []), ...(o.flags ?? []), BUSYBOX_IMAGE, id, ...cmd], o);
  const h: TestContainerd = { dir, socket, namespace, fifoDir, stateDir, ctr, run, logTail, stop };
  try {
    const timeout = opts.readyTimeoutMs ?? 15_000;
    const until = Date.now() + timeout;
    for (;;) {
      if (spawnError) throw new Error(`cannot start ${containerd}: ${spawnError.message}`);
      if (daemon.exitCode !== null || daemon.signalCode !== null) throw new Error(`containerd exited (${daemon.exitCode ?? daemon.signalCode}) before it answered on ${socket}; log tail:\n${logTail()}`);
      const r = await runCtr(ctrBin, ['-a', socket, 'version'], { timeoutMs: 5000 }, clients);
      if (r.code === 0) break;
      if (Date.now() > until) throw new Error(`containerd did not answer \`ctr version\` on ${socket} within ${timeout} ms (${r.stderr.trim()}); log tail:\n${logTail()}`);
      await delay(50);
    }
    if (imageTar) {
      const r = await ctr(['images', 'import', imageTar], { timeoutMs: 60_000 });
      if (r.code !== 0) throw new Error(`ctr images import ${imageTar} failed (${r.code}): ${r.stderr.trim()}; log tail:\n${logTail()}`);
    }
    for (const tar of criImages) {
      const r = await runCtr(ctrBin, ['-a', socket, '-n', CRI_NAMESPACE, 'images', 'import', tar], { timeoutMs: 60_000 }, clients);
      if (r.code !== 0) throw new Error(`ctr -n ${CRI_NAMESPACE} images import ${tar} failed (${r.code}): ${r.stderr.trim()}; log tail:\n${logTail()}`);
    }
  } catch (err) {
    await stop();
    throw err;
  }
  return h;
}

/**
 * The CRI plugin's section (containerd 1.6 syntax). Its own root and state default to
 * `<root>/io.containerd.grpc.v1.cri` and `<state>/io.containerd.grpc.v1.cri`, inside the temp dir.
 */
function criConfig(cri: CriOptions, dir: string): string[] {
  const lines = [
    '[plugins."io.containerd.grpc.v1.cri"]',
    `  sandbox_image = ${JSON.stringify(PAUSE_IMAGE)}`,
    // A free loopback port: other containerds on the host run streaming servers of their own.
    '  stream_server_address = "127.0.0.1"',
    '  stream_server_port = "0"',
    // Where AppArmor is enabled, CRI would load its default profile with apparmor_parser; a
    // VM's containers do not use host profiles, and the tests must not change the host's.
    '  disable_apparmor = true',
    `  [plugins."io.containerd.grpc.v1.cri".cni]`,
    // Without cri.cni pods use the host network; either way CRI stays away from the host's CNI set-up.
    `    bin_dir = ${JSON.stringify(cri.cni?.binDir ?? path.join(dir, 'cni', 'bin'))}`,
    `    conf_dir = ${JSON.stringify(path.join(dir, 'cni', 'net.d'))}`,
    `  [plugins."io.containerd.grpc.v1.cri".containerd]`,
    '    default_runtime_name = "runc"',
    `    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]`,
    '      runtime_type = "io.containerd.runc.v2"',
  ];
  for (const [handler, type] of Object.entries(cri.runtimes)) {
    const table = `plugins."io.containerd.grpc.v1.cri".containerd.runtimes.${JSON.stringify(handler)}`;
    const extra = cri.handlers?.[handler];
    lines.push(`    [${table}]`, `      runtime_type = ${JSON.stringify(type)}`);
    if (extra?.podAnnotations) lines.push(`      pod_annotations = ${JSON.stringify(extra.podAnnotations)}`);
    if (extra?.configPath) lines.push(`      [${table}.options]`, `        ConfigPath = ${JSON.stringify(extra.configPath)}`);
  }
  return lines;
}

/** ctr takes --fifo-dir after the subcommand, before its positional arguments. */
function withFifoDir(args: string[], fifoDir: string): string[] {
  if (args.includes('--fifo-dir')) return args;
  const [a, b] = args;
  if (a === 'run') return ['run', '--fifo-dir', fifoDir, ...args.slice(1)];
  if ((a === 'task' || a === 'tasks' || a === 't') && (b === 'start' || b === 'exec')) return [a, b, '--fifo-dir', fifoDir, ...args.slice(2)];
  return args;
}

function runCtr(ctrBin: string, args: string[], opts: CtrOptions, clients: Set<ChildProcess>): Promise<CtrResult> {
  return new Promise((resolve) => {
    const child = spawn(ctrBin, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    clients.add(child);
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    let spawnError: Error | undefined;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, opts.timeoutMs ?? 60_000);
    child.stdin.on('error', () => {}); // EPIPE when ctr is done before its input
    if (opts.input === undefined) child.stdin.end();
    else child.stdin.write(opts.input);
    const endInput = () => {
      if (!child.stdin.writableEnded) child.stdin.end();
    };
    child.stdout.setEncoding('utf8').on('data', (d: string) => ((stdout += d), endInput()));
    child.stderr.setEncoding('utf8').on('data', (d: string) => ((stderr += d), endInput()));
    child.on('error', (e) => (spawnError = e));
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      clients.delete(child);
      resolve({ code, signal, stdout, stderr: spawnError ? `${stderr}${spawnError.message}` : stderr, timedOut });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Leftovers

interface ProcEntry {
  pid: number;
  ppid: number;
  cmdline: string;
  ours: boolean;
}

/** Live (non-zombie) processes; `ours` when they carry the marker or name/sit in `dir`. */
function processes(dir: string, exclude: ReadonlySet<number>): ProcEntry[] {
  const out: ProcEntry[] = [];
  const marker = `${MARKER}=${dir}`;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || exclude.has(Number(entry))) continue;
    try {
      const statText = readFileSync(`/proc/${entry}/stat`, 'latin1');
      const fields = statText.slice(statText.lastIndexOf(')') + 2).split(' ');
      if (fields[0] === 'Z') continue; // dead, not reaped (init here does not reap orphans)
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'latin1').split('\0').join(' ').trim();
      if (!cmdline) continue; // kernel thread
      let ours = cmdline.includes(dir);
      if (!ours) ours = readFileSync(`/proc/${entry}/environ`, 'latin1').split('\0').includes(marker);
      if (!ours) ours = isUnder(readlinkSync(`/proc/${entry}/cwd`), dir);
      out.push({ pid: Number(entry), ppid: Number(fields[1]), cmdline, ours });
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

function isUnder(p: string, dir: string): boolean {
  return p === dir || p.startsWith(`${dir}/`);
}

/** Mount points under `dir`, in mount order (undo from the end). */
function mountsUnder(dir: string): string[] {
  const unescape = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((line) => unescape(line.split(' ')[4] ?? ''))
    .filter((mp) => mp && isUnder(mp, dir));
}

function walk(dir: string, found: (p: string, st: Stats) => void): void {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return;
  }
  for (const n of names) {
    const p = path.join(dir, n);
    const st = lstatSync(p, { throwIfNoEntry: false });
    if (!st) continue;
    found(p, st);
    if (st.isDirectory()) walk(p, found);
  }
}

/** `/sys/fs/cgroup/<ns>` (v2) and `/sys/fs/cgroup/<controller>/<ns>` (v1) that exist. */
function namespaceCgroups(namespace: string): string[] {
  const root = '/sys/fs/cgroup';
  const candidates = [path.join(root, namespace), ...(existsSync(root) ? readdirSync(root).map((c) => path.join(root, c, namespace)) : [])];
  return candidates.filter((p) => lstatSync(p, { throwIfNoEntry: false })?.isDirectory());
}

function scanLeftovers(dir: string, namespace: string, stateDir: string, fifoDir: string, exclude: ReadonlySet<number>): Leftovers {
  const procs = processes(dir, exclude).filter((p) => p.ours);
  const pick = (re: RegExp) => procs.filter((p) => re.test(p.cmdline)).map(({ pid, cmdline }) => ({ pid, cmdline }));
  const fifos: string[] = [];
  walk(fifoDir, (p, st) => st.isFIFO() && fifos.push(p));
  const sockets: string[] = [];
  walk(path.join(stateDir, 'io.containerd.runtime.v2.task'), (p, st) => {
    if (!st.isFile() || path.basename(p) !== 'address') return;
    const sock = readFileSync(p, 'utf8').trim().replace(/^unix:\/\//, '');
    if (sock && existsSync(sock)) sockets.push(sock);
  });
  const cgroups: string[] = [];
  for (const c of namespaceCgroups(namespace)) walk(c, (p, st) => st.isDirectory() && cgroups.push(p));
  return { shims: pick(/containerd-shim-/), qemus: pick(/qemu-system-/), mounts: mountsUnder(dir), fifos, sockets, cgroups };
}

function isEmpty(l: Leftovers): boolean {
  return Object.values(l).every((v: unknown[]) => v.length === 0);
}

/** Scans until nothing is left or 3 s pass: a shim told to shut down exits a moment later. */
async function settledLeftovers(dir: string, namespace: string, stateDir: string, fifoDir: string, daemonPid: number | undefined): Promise<Leftovers> {
  const exclude = new Set([process.pid, ...(daemonPid ? [daemonPid] : [])]);
  const until = Date.now() + 3000;
  for (;;) {
    const left = scanLeftovers(dir, namespace, stateDir, fifoDir, exclude);
    if (isEmpty(left) || Date.now() > until) return left;
    await delay(50);
  }
}

/** Kills leftover shims and QEMUs with their descendants, unmounts, unlinks, removes the temp dir. */
async function removeLeftovers(left: Leftovers, dir: string, namespace: string): Promise<void> {
  const all = processes(dir, new Set([process.pid]));
  const doomed = new Set([...left.shims, ...left.qemus].map((p) => p.pid));
  for (let grew = true; grew; ) {
    grew = false;
    for (const p of all) {
      if (doomed.has(p.ppid) && !doomed.has(p.pid)) {
        doomed.add(p.pid);
        grew = true;
      }
    }
  }
  for (const pid of doomed) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }
  const until = Date.now() + 3000;
  while (processes(dir, new Set([process.pid])).some((p) => doomed.has(p.pid)) && Date.now() < until) await delay(20);

  for (const mp of mountsUnder(dir).reverse()) {
    await execFileP('umount', [mp]).catch(() => execFileP('umount', ['-l', mp]).catch(() => undefined));
  }
  for (const s of left.sockets) await unlink(s).catch(() => undefined);
  const cgroupDirs: string[] = [];
  for (const c of namespaceCgroups(namespace)) {
    walk(c, (p, st) => st.isDirectory() && cgroupDirs.push(p));
    cgroupDirs.push(c);
  }
  // Deepest first; rmdir is the only way to remove a cgroup (its files cannot be unlinked).
  for (const c of cgroupDirs.sort((a, b) => b.length - a.length)) {
    try {
      rmdirSync(c);
    } catch {
      // still has processes
    }
  }
  rmSync(path.join('/run/containerd/runc', namespace), { recursive: true, force: true });
  await rm(dir, { recursive: true, force: true });
}

// ---------------------------------------------------------------------------------------------
// The busybox image

interface ImageVariant {
  /** The file name's stem in the cache dir. */
  file: string;
  /** The image name containerd's importer gives it. */
  name: string;
  /** The image config's default command. */
  cmd: string[];
}

const BUSYBOX: ImageVariant = { file: 'busybox', name: BUSYBOX_IMAGE, cmd: ['/bin/sh'] };
/** CRI's sandbox ("pause") container only has to stay up until it is killed. */
const PAUSE: ImageVariant = { file: 'pause', name: PAUSE_IMAGE, cmd: ['sleep', '2147483647'] };

const imagesPending = new Map<ImageVariant, Promise<string>>();

function imageTar(variant: ImageVariant): Promise<string> {
  let pending = imagesPending.get(variant);
  if (!pending) {
    pending = buildBusyboxImage(path.join(defaultCacheDir(), 'containerd'), variant).catch((err: unknown) => {
      imagesPending.delete(variant);
      throw err;
    });
    imagesPending.set(variant, pending);
  }
  return pending;
}

/**
 * The busybox OCI image tarball, `<cache>/containerd/busybox-oci-v<N>.tar` (cache dir as for the
 * guest image), built on first use and shared by every suite of the run.
 */
export function busyboxImageTar(): Promise<string> {
  return imageTar(BUSYBOX);
}

/** {@link PAUSE_IMAGE}: the busybox image with `sleep` as its default command, `<cache>/containerd/pause-oci-v<N>.tar`. */
export function pauseImageTar(): Promise<string> {
  return imageTar(PAUSE);
}

/** Deterministic archives: same inputs, same bytes, same digests. */
const TAR_FLAGS = ['--sort=name', '--mtime=@0', '--owner=0', '--group=0', '--numeric-owner', '--format=gnu'];

async function buildBusyboxImage(cacheDir: string, variant: ImageVariant): Promise<string> {
  const out = path.join(cacheDir, `${variant.file}-oci-v${IMAGE_VERSION}.tar`);
  if (existsSync(out)) return out;
  await mkdir(cacheDir, { recursive: true });
  const work = await mkdtemp(path.join(cacheDir, '.build-')); // same filesystem as `out`, for the rename
  try {
    const root = path.join(work, 'rootfs');
    for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc', 'root', 'tmp', 'proc', 'sys', 'dev', 'run']) await mkdir(path.join(root, d), { recursive: true });
    await chmod(path.join(root, 'tmp'), 0o1777);
    const busybox = path.join(root, 'bin', 'busybox');
    await copyFile(await staticBusybox(work), busybox);
    await chmod(busybox, 0o755);
    const { stdout } = await execFileP(busybox, ['--list-full']);
    for (const rel of stdout.split('\n').filter(Boolean)) {
      if (rel !== 'bin/busybox') await symlink('/bin/busybox', path.join(root, rel)).catch(() => undefined);
    }
    await writeFile(path.join(root, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n');
    await writeFile(path.join(root, 'etc', 'group'), 'root:x:0:\nnogroup:x:65534:\n');

    const oci = path.join(work, 'oci');
    const blobs = path.join(oci, 'blobs', 'sha256');
    await mkdir(blobs, { recursive: true });
    const layerTar = path.join(work, 'layer.tar');
    await execFileP('tar', [...TAR_FLAGS, '-C', root, '-cf', layerTar, ...(await readdir(root)).sort()]);
    // Uncompressed, so the layer's digest is also its diff_id.
    const layer = await putBlob(blobs, layerTar, 'application/vnd.oci.image.layer.v1.tar');
    const config = await putJson(blobs, 'application/vnd.oci.image.config.v1+json', {
      architecture: 'amd64',
      os: 'linux',
      config: { Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], Cmd: variant.cmd, WorkingDir: '/' },
      rootfs: { type: 'layers', diff_ids: [layer.digest] },
    });
    const manifest = await putJson(blobs, 'application/vnd.oci.image.manifest.v1+json', { schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config, layers: [layer] });
    // containerd's importer names the image after this annotation.
    await writeFile(path.join(oci, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests: [{ ...manifest, annotations: { 'io.containerd.image.name': variant.name } }] }));
    await writeFile(path.join(oci, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
    const tmpOut = path.join(work, 'image.tar');
    await execFileP('tar', [...TAR_FLAGS, '-C', oci, '-cf', tmpOut, 'oci-layout', 'index.json', 'blobs']);
    await rename(tmpOut, out);
    return out;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
}

async function putBlob(blobs: string, file: string, mediaType: string): Promise<Descriptor> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  const hex = hash.digest('hex');
  await rename(file, path.join(blobs, hex));
  return { mediaType, digest: `sha256:${hex}`, size: (await stat(path.join(blobs, hex))).size };
}

async function putJson(blobs: string, mediaType: string, value: unknown): Promise<Descriptor> {
  const data = Buffer.from(JSON.stringify(value));
  const hex = createHash('sha256').update(data).digest('hex');
  await writeFile(path.join(blobs, hex), data);
  return { mediaType, digest: `sha256:${hex}`, size: data.length };
}

/** True for an ELF file without a PT_INTERP program header (it needs no dynamic loader). */
function isStaticElf(b: Buffer): boolean {
  if (b.length < 64 || b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2 /* 64-bit */) return false;
  const phoff = Number(b.readBigUInt64LE(0x20));
  const phentsize = b.readUInt16LE(0x36);
  const phnum = b.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 > b.length) return false;
    if (b.readUInt32LE(off) === 3 /* PT_INTERP */) return false;
  }
  return true;
}

/**
 * A static busybox: the host's when it is one (package busybox-static), else busybox-static
 * fetched with apt-get download into `work` (Debian's `busybox` package is dynamically linked, and
 * installing busybox-static would replace it, so the tests do not).
 */
async function staticBusybox(work: string): Promise<string> {
  const host = findTool('busybox');
  if (host && isStaticElf(await readFile(host))) return host;
  const name = 'busybox-static';
  const version = (await showCandidates([name])).get(name)?.Version;
  if (!version) throw new Error(`apt knows no package ${name}, needed for the containerd test image: run apt-get update`);
  const deb = await aptDownload({ name, version }, work, process.getuid?.() === 0);
  await unpackDeb(deb, path.join(work, 'deb'));
  return path.join(work, 'deb', 'bin', 'busybox');
}
