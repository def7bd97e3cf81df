/**
 * `kata-runtime run` as a process, as an operator runs it: the installed bin (the bundle), a
 * configuration pointing at the project's guest image, a hot-plugged ext4 rootfs.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { qemuBinary, qemuLeftBehind, qemuProcessesMentioning } from '../helpers/qemu.js';
import { STACK_FRAME } from '../helpers/cli.js';
import { TempDir } from '../helpers/tmp.js';
import { useSharedTemplate } from '../helpers/template.js';
import { until } from '../helpers/wait.js';

const BIN = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');
const SHIPPED_CONFIG = path.join(PACKAGE_ROOT, 'configs', 'configuration-qemu.toml');

describe('kata-runtime run @integration', function () {
  this.timeout(300_000);
  let image: GuestImage;
  let tmp: TempDir;
  let config: string;
  /** The configuration without templating, as text and as a file (for the tests that need a cold boot). */
  let coldText: string;
  let coldConfig: string;
  let n = 0;
  const runRoot = () => path.join(tmp.path, 'run');
  const rootfs = () => {
    const p = path.join(tmp.path, `rootfs-${n++}.ext4`);
    copyFileSync(image.busyboxRootfs as string, p);
    return p;
  };
  const env = () => ({ ...process.env, KATA_TS_RUN_ROOT: runRoot(), KATA_CONF_FILE: '' });

  before(async function () {
    if (!qemuBinary()) this.skip();
    image = await ensureGuestImage();
    if (!image.busyboxRootfs) this.skip();
    tmp = new TempDir('kata-run-cli-');
    coldText = `[hypervisor.qemu]\npath = "${qemuBinary()}"\nkernel = "${image.kernel}"\ninitrd = "${image.initrd}"\ndefault_memory = 512\nshared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"\n[agent.kata]\ndial_timeout = 120\n`;
    config = tmp.file('configuration.toml', coldText);
    coldConfig = tmp.file('configuration-cold.toml', coldText);
    // What this suite tests is `run` around a sandbox (stdio, status, signals, teardown), so its
    // sandboxes are clones of a VM template; the virtio-scsi case below, the shipped configuration
    // and `npm run demo` boot cold, as do the guest, agent and lifecycle suites.
    useSharedTemplate(config);
  });
  after(async () => {
    if (tmp) {
      assert.deepEqual(await qemuLeftBehind(tmp.path), []);
      tmp.cleanup();
    }
  });

  const run = (args: string[], input?: string) => spawnSync(process.execPath, [BIN, '--config', config, 'run', '--rootfs', rootfs(), ...args], { encoding: 'utf8', env: env(), input: input ?? '' });

  it("exits with the process's status and keeps stdout and stderr apart", () => {
    const r = run(['--', 'sh', '-c', 'echo out; echo err >&2; exit 3']);
    assert.equal(r.status, 3, r.stderr);
    assert.equal(r.stdout, 'out\n');
    assert.equal(r.stderr, 'err\n');
  });

  it('connects stdin with -i', () => {
    const r = run(['-i', '--', 'cat'], 'piped in\n');
    assert.deepEqual([r.status, r.stdout], [0, 'piped in\n']);
  });

  it('passes on the status of a process killed by SIGKILL (128+9)', () => {
    // The inner shell is not the container's PID 1, which would ignore a signal from inside (the
    // trailing command keeps the outer shell from exec-ing it).
    assert.equal(run(['--', 'sh', '-c', 'sh -c "kill -9 \\$\\$"; exit $?']).status, 137);
  });

  it('prints the phases with --timings, on stderr', () => {
    const r = run(['--timings', '--', 'true']);
    assert.equal(r.status, 0);
    assert.match(r.stderr, /timings:\n(.*ms.*\n)+.*ms {2}total/);
  });

  it('tears everything down on Ctrl-C', async () => {
    const child = spawn(process.execPath, [BIN, '--config', config, 'run', '--rootfs', rootfs(), '--', 'sh', '-c', 'echo started; sleep 1000'], { env: env(), stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    // Interrupt once the container is running.
    await new Promise<void>((resolve) => child.stdout.on('data', (d: Buffer) => d.toString().includes('started') && resolve()));
    child.kill('SIGINT');
    const code = await new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
    assert.equal(code, 130, stderr);
    assert.doesNotMatch(stderr, STACK_FRAME);
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
    assert.deepEqual(existsSync(runRoot()) ? readdirSync(runRoot()) : [], []);
  });

  /** A run of `sh -c 'echo started; sleep 1000'` under `root`, resolved once the container runs. */
  async function sleeper(root: string) {
    const child = spawn(process.execPath, [BIN, '--config', config, 'run', '--rootfs', rootfs(), '--', 'sh', '-c', 'echo started; sleep 1000'], { env: { ...env(), KATA_TS_RUN_ROOT: root }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => d.toString().includes('started') && resolve());
      void exited.then((c) => reject(new Error(`run exited ${c} before the container started: ${stderr}`)));
    });
    return { child, exited, stderr: () => stderr, runDir: () => runDirsIn(root)[0] as string };
  }
  const runDirsIn = (root: string) => (existsSync(root) ? readdirSync(root).filter((e) => e.startsWith('run-')).map((e) => path.join(root, e)) : []);
  const cleanup = (root: string) => spawnSync(process.execPath, [BIN, 'cleanup', '--json'], { encoding: 'utf8', env: { ...env(), KATA_TS_RUN_ROOT: root } });

  it('takes its VM down with it when it is SIGKILLed; `kata-runtime cleanup` removes what it left and keeps a live sandbox', async () => {
    const root = path.join(tmp.path, 'run-killed');
    // A live sandbox in the shim's <namespace>/<sandbox> layout, which cleanup must not touch.
    const live = await sleeper(path.join(root, 'k8s.io'));
    const killed = await sleeper(root);
    const leftDir = killed.runDir();
    assert.notDeepEqual(qemuProcessesMentioning(leftDir), [], 'the VM runs while the container does');
    killed.child.kill('SIGKILL');
    await killed.exited;
    await until('QEMU to die with the runtime', () => qemuProcessesMentioning(leftDir).length === 0, 10_000, 100);
    assert.ok(existsSync(leftDir), 'a SIGKILLed run cannot remove its run directory');

    const r = cleanup(root);
    assert.equal(r.status, 0, r.stderr);
    const report = JSON.parse(r.stdout) as { removed: string[]; kept: { dir: string }[]; problems: unknown[] };
    assert.deepEqual(report.removed, [leftDir]);
    assert.deepEqual(report.kept.map((k) => k.dir), [live.runDir()]);
    assert.deepEqual(report.problems, []);
    assert.equal(existsSync(leftDir), false);
    assert.ok(existsSync(path.join(live.runDir(), 'qmp.sock')), "the live sandbox's run directory is intact");
    assert.notDeepEqual(qemuProcessesMentioning(live.runDir()), [], 'the live VM still runs');

    live.child.kill('SIGINT');
    assert.equal(await live.exited, 130, live.stderr());
    assert.deepEqual(runDirsIn(path.join(root, 'k8s.io')), []);
  });

  it('removes, when it starts, the run directory a SIGKILLed run left', async () => {
    const root = path.join(tmp.path, 'run-reap');
    const killed = await sleeper(root);
    const leftDir = killed.runDir();
    killed.child.kill('SIGKILL');
    await killed.exited;
    await until('QEMU to die with the runtime', () => qemuProcessesMentioning(leftDir).length === 0, 10_000, 100);
    const r = spawnSync(process.execPath, [BIN, '--config', config, 'run', '--rootfs', rootfs(), '--', 'true'], { encoding: 'utf8', env: { ...env(), KATA_TS_RUN_ROOT: root } });
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(runDirsIn(root), []);
  });

  it('reports a VM killed under it as KATA_ERR_VM_EXITED (exit 125), without a stack trace, and removes its run directory', async () => {
    const root = path.join(tmp.path, 'run-vm-killed');
    const run = await sleeper(root);
    const pid = Number(readFileSync(path.join(run.runDir(), 'qemu.pid'), 'utf8'));
    process.kill(pid, 'SIGKILL');
    assert.equal(await run.exited, 125, run.stderr());
    assert.match(run.stderr(), /code: KATA_ERR_VM_EXITED/);
    assert.doesNotMatch(run.stderr(), STACK_FRAME);
    assert.doesNotMatch(run.stderr(), /"stack"|Unhandled|KATA_ERR_INTERNAL/);
    assert.deepEqual(runDirsIn(root), []);
  });

  // Each signal at another moment of the start: the run directory just made, QEMU started, the
  // guest agent listening (the dial and CreateSandbox), the sandbox created (the rootfs hot-plug).
  const consoleSays = (re: RegExp) => (d: string) => existsSync(path.join(d, 'console.log')) && re.test(readFileSync(path.join(d, 'console.log'), 'latin1'));
  for (const [signal, moment, ready] of [
    ['SIGINT', 'as soon as the run directory exists', (d: string) => existsSync(path.join(d, 'owner.json'))],
    ['SIGTERM', 'once QEMU runs', (d: string) => existsSync(path.join(d, 'qemu.pid'))],
    ['SIGHUP', 'once the guest agent listens', consoleSays(/KATA-TS-AGENT: listening/)],
    ['SIGINT', 'while the rootfs is hot-plugged', consoleSays(/KATA-TS-AGENT: sandbox \S+ created/)],
  ] as const) {
    it(`on ${signal} ${moment} stops the VM, removes the run directory and exits 128+n, with no error`, async () => {
      const root = path.join(tmp.path, `run-${n}`);
      // Moments of a boot (the agent's console lines): a cold boot.
      const child = spawn(process.execPath, [BIN, '--config', coldConfig, 'run', '--rootfs', rootfs(), '--', 'sh', '-c', 'echo started; sleep 1000'], { env: { ...env(), KATA_TS_RUN_ROOT: root }, stdio: ['ignore', 'pipe', 'pipe'] });
      let stderr = '';
      let stdout = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      const exited = new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
      await until(moment, () => runDirsIn(root).some(ready), 120_000, 5);
      child.kill(signal);
      assert.equal(await exited, 128 + (os.constants.signals[signal] as number), stderr);
      assert.equal(stdout, '', 'interrupted before the container ran');
      // Not even a log line: "cannot unplug a disk: the VM is stopping" was one.
      assert.equal(stderr, '');
      assert.deepEqual(await qemuLeftBehind(root), []);
      assert.deepEqual(existsSync(root) ? readdirSync(root) : [], []);
    });
  }

  it('exits 127 for a command that is not in the container, with a coded error', () => {
    const r = run(['--', '/nonexistent']);
    assert.equal(r.status, 127, r.stderr);
    assert.match(r.stderr, /executable file not found/);
    assert.match(r.stderr, /code: KATA_ERR_/);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  });

  it('runs a container on a block rootfs hot-plugged over virtio-scsi (block_device_driver = "virtio-scsi"), mounted from the SCSI disk', () => {
    const scsiConfig = tmp.file('configuration-scsi.toml', coldText.replace('block_device_driver = "virtio-blk"', 'block_device_driver = "virtio-scsi"'));
    assert.match(readFileSync(scsiConfig, 'utf8'), /block_device_driver = "virtio-scsi"/);
    const script = 'dev=$(awk \'$2=="/"{print $1}\' /proc/self/mounts); echo $dev; readlink -f /sys/class/block/${dev#/dev/}';
    const r = spawnSync(process.execPath, [BIN, '--config', scsiConfig, 'run', '--rootfs', rootfs(), '--', 'sh', '-c', script], { encoding: 'utf8', env: env() });
    assert.equal(r.status, 0, r.stderr);
    const [dev, sysfs] = r.stdout.trim().split('\n');
    assert.match(dev ?? '', /^\/dev\/sd[a-z]$/);
    // Host, channel 0, target 0, LUN 0: the first SCSI address, on the virtio-scsi controller.
    assert.match(sysfs ?? '', new RegExp(`/virtio\\d+/host\\d+/target\\d+:0:0/\\d+:0:0:0/block/${(dev ?? '').slice('/dev/'.length)}$`));
  });

  /** A guest cache of its own: the built guest files linked in, the busybox rootfs copied (it is mounted read-write). */
  function guestCache(name: string): string {
    const cache = path.join(tmp.path, name);
    mkdirSync(path.join(cache, 'guest'), { recursive: true });
    const built = path.dirname(image.initrd);
    for (const f of readdirSync(built)) {
      if (f === 'busybox-rootfs.ext4') copyFileSync(path.join(built, f), path.join(cache, 'guest', f));
      else if (!f.startsWith('.')) symlinkSync(path.join(built, f), path.join(cache, 'guest', f));
    }
    return cache;
  }

  it("takes the shipped configuration's guest files from KATA_TS_CACHE_DIR, and says so in the log", () => {
    const cache = guestCache('cache-run');
    const r = spawnSync(process.execPath, [BIN, '--config', SHIPPED_CONFIG, '--log-level', 'info', 'run', '--', 'echo', 'from the cache'], { encoding: 'utf8', env: { ...env(), KATA_TS_CACHE_DIR: cache } });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, 'from the cache\n');
    assert.match(r.stderr, new RegExp(`"key":"hypervisor.qemu.kernel".*"using":"${path.join(cache, 'guest')}/`));
    assert.match(r.stderr, /KATA_TS_CACHE_DIR is set: hypervisor.qemu.initrd is taken from the cache/);
  });

  it('looks nowhere else when KATA_TS_CACHE_DIR has no guest image (the error names the cache)', () => {
    const empty = path.join(tmp.path, 'cache-empty');
    const r = spawnSync(process.execPath, [BIN, '--config', SHIPPED_CONFIG, 'run', '--', 'true'], { encoding: 'utf8', env: { ...env(), KATA_TS_CACHE_DIR: empty } });
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, new RegExp(`${path.join(empty, 'guest', 'busybox-rootfs.ext4')}`));
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  });

  it('npm run demo: runs its container with the cache in KATA_TS_CACHE_DIR, and prints no escape codes into a pipe', () => {
    const cache = guestCache('cache-demo');
    const r = spawnSync(process.execPath, [path.join(PACKAGE_ROOT, 'dist', 'scripts', 'demo.js')], { encoding: 'utf8', env: { ...env(), KATA_TS_CACHE_DIR: cache, KATA_TS_RUN_ROOT: path.join(tmp.path, 'run-demo') } });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /hello from a container in a VM: \S+, rootfs \/dev\/vda ext4/);
    assert.match(r.stdout, /^\$ kata-runtime /m);
    assert.doesNotMatch(r.stdout + r.stderr, /\x1b/);
  });

  describe('run -t, through a real pty (tmux)', () => {
    let tmux: string;
    /** A tmux session of 91x33 running kata-runtime run -t, then `EXIT=<status>` and the line discipline's icanon/echo flags. */
    const session = (name: string, args: string[]) => {
      const after = 'echo "EXIT=$?"; echo "modes=$(stty -a | tr " ;" "\\n\\n" | grep -x -e icanon -e -icanon -e echo -e -echo | tr "\\n" " ")"; sleep 600';
      const argv = [process.execPath, BIN, '--config', config, 'run', '-t', '--rootfs', rootfs(), '--', ...args];
      const r = spawnSync('tmux', ['-S', tmux, 'new-session', '-d', '-s', name, '-x', '91', '-y', '33', 'sh', '-c', `"$@"; ${after}`, 'sh', ...argv], { encoding: 'utf8', env: env() });
      assert.equal(r.status, 0, r.stderr);
    };
    const tmuxOut = (...args: string[]) => spawnSync('tmux', ['-S', tmux, ...args], { encoding: 'utf8' }).stdout;
    const screen = (name: string) => tmuxOut('capture-pane', '-p', '-J', '-t', name);
    const waitFor = async (name: string, re: RegExp, ms: number) => {
      const deadline = Date.now() + ms;
      while (!re.test(screen(name)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
      assert.match(screen(name), re);
    };
    /** The local line discipline's modes on the session's pty, seen from outside. */
    const localModes = (name: string) => spawnSync('stty', ['-a', '-F', tmuxOut('display', '-p', '-t', name, '#{pane_tty}').trim()], { encoding: 'utf8' }).stdout;
    const waitSize = (rows: number, cols: number) => `i=0; while [ "$(stty size)" != "${rows} ${cols}" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done`;

    before(function () {
      if (spawnSync('tmux', ['-V']).error) this.skip();
      tmux = path.join(tmp.path, 'tmux.sock');
    });
    after(() => {
      spawnSync('tmux', ['-S', tmux, 'kill-server']);
    });

    it('runs the process on a guest terminal of our size, forwards a window change, keys go through raw, and restores our terminal', async () => {
      const script = `echo "pts=$(readlink /proc/self/fd/0)"; ${waitSize(33, 91)}; echo "size1=$(stty size)"; read -r line; echo "got=$line"; ${waitSize(50, 132)}; echo "size2=$(stty size)"; exit 7`;
      session('t1', ['sh', '-c', script]);
      await waitFor('t1', /size1=/, 120_000);
      assert.match(localModes('t1'), /(^|\s)-icanon(\s|$)/, 'our terminal is in raw mode while the process runs');
      assert.equal(spawnSync('tmux', ['-S', tmux, 'send-keys', '-t', 't1', 'typed', 'Enter']).status, 0);
      await waitFor('t1', /got=typed/, 30_000);
      assert.equal(spawnSync('tmux', ['-S', tmux, 'resize-window', '-t', 't1', '-x', '132', '-y', '50']).status, 0);
      await waitFor('t1', /EXIT=/, 60_000);
      const out = screen('t1');
      assert.match(out, /^pts=\/dev\/pts\/\d+$/m, out);
      assert.match(out, /^size1=33 91$/m, out);
      assert.match(out, /^typed$/m, `the guest terminal echoes: ${out}`);
      assert.match(out, /^size2=50 132$/m, out);
      assert.match(out, /^EXIT=7$/m, out);
      assert.match(out, /^modes=icanon echo $/m, `our terminal is restored: ${out}`);
      assert.deepEqual(await qemuLeftBehind(runRoot()), []);
    });

    it('restores our terminal when it is stopped by SIGTERM (143)', async () => {
      session('t2', ['sh', '-c', 'echo started; sleep 1000']);
      await waitFor('t2', /started/, 120_000);
      assert.match(localModes('t2'), /(^|\s)-icanon(\s|$)/);
      const shell = tmuxOut('display', '-p', '-t', 't2', '#{pane_pid}').trim();
      const runPid = spawnSync('pgrep', ['-P', shell], { encoding: 'utf8' }).stdout.trim().split('\n')[0] as string;
      assert.match(runPid, /^\d+$/);
      process.kill(Number(runPid), 'SIGTERM');
      await waitFor('t2', /modes=/, 60_000);
      const out = screen('t2');
      assert.match(out, /^EXIT=143$/m, out);
      assert.match(out, /^modes=icanon echo $/m, out);
      assert.deepEqual(await qemuLeftBehind(runRoot()), []);
    });

    it('restores our terminal when the VM is killed under it (125, KATA_ERR_VM_EXITED)', async () => {
      session('t3', ['sh', '-c', 'echo started; sleep 1000']);
      await waitFor('t3', /started/, 120_000);
      assert.match(localModes('t3'), /(^|\s)-icanon(\s|$)/);
      const dirs = readdirSync(runRoot()).filter((e) => e.startsWith('run-'));
      assert.equal(dirs.length, 1, dirs.join(', '));
      process.kill(Number(readFileSync(path.join(runRoot(), dirs[0] as string, 'qemu.pid'), 'utf8')), 'SIGKILL');
      await waitFor('t3', /modes=/, 60_000);
      const out = screen('t3');
      assert.match(out, /KATA_ERR_VM_EXITED/, out);
      assert.match(out, /^EXIT=125$/m, out);
      assert.match(out, /^modes=icanon echo $/m, out);
    });

    it('refuses -t when stdin is not a terminal, with a usage error', () => {
      const r = run(['-t', '--', 'true']);
      assert.equal(r.status, 2, r.stderr);
      assert.match(r.stderr, /KATA_ERR_USAGE/);
      assert.match(r.stderr, /run -t needs a terminal/);
    });
  });

  it('gives a coded error, no stack trace, for a missing rootfs', () => {
    const r = spawnSync(process.execPath, [BIN, '--config', config, 'run', '--rootfs', '/nonexistent.img', '--', 'true'], { encoding: 'utf8', env: env() });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /KATA_ERR_USAGE/);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  });
});
