/**
 * containerd-shim-kata-v2 driven by the real containerd (Debian's 1.6) through `ctr`: containers in
 * QEMU VMs booting the project's guest image under TCG. containerd runs with its own root, state
 * and socket under a temp dir (test/helpers/containerd.ts), a busybox image is imported without a
 * registry, and the shim is put first on containerd's PATH.
 *
 * The overlayfs snapshotter gives a directory rootfs, so these containers reach the guest through
 * the shared filesystem (virtio-9p in the shipped QEMU configuration); the block-device path
 * (devmapper) is covered by the sandbox tests, since this kernel has no device-mapper.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { BUSYBOX_IMAGE, NO_LEFTOVERS, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { ensureGuestImage } from '../helpers/guest.js';
import { TempDir } from '../helpers/tmp.js';
import { until as untilFast, within } from '../helpers/wait.js';
import { liveProcesses, processesMentioning } from '../helpers/procs.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';
import { useSharedTemplate } from '../helpers/template.js';

const RUNTIME = 'io.containerd.kata.v2';

/** Processes whose command line names `dir` (QEMU of a sandbox whose run directory is under it). */
function processesUnder(dir: string): string[] {
  return processesMentioning(`${dir}/`).map((p) => `${p.pid}: ${p.argv.slice(0, 3).join(' ')}`);
}

/** The fds of process `pid` open on a stdio FIFO named `<name>-stdin` (ctr names them `<id>-stdin`). */
function stdinFifoFds(pid: number, name: string): string[] {
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return [];
  }
  return fds.filter((fd) => {
    try {
      return path.basename(readlinkSync(`/proc/${pid}/fd/${fd}`)).replace(/ \(deleted\)$/, '') === `${name}-stdin`;
    } catch {
      return false;
    }
  });
}

/** Polls every 200 ms (probes here run ctr or scan /proc), for up to a minute unless told. */
const until = (what: string, ok: () => boolean | Promise<boolean>, timeoutMs = 60_000) => untilFast(what, ok, timeoutMs, 200);

describe('containerd-shim-kata-v2 with the real containerd @integration', function () {
  this.timeout(180_000);
  let tmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let runRoot: string;
  let config: string;
  let sysroot: string;

  before(async function () {
    this.timeout(600_000);
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-shim-e2e-');
    runRoot = path.join(tmp.path, 'run');
    config = shimConfig(tmp, image);
    // The boot is not this suite's subject: its sandboxes are clones of a VM template (the cold
    // boot through the shim is what shim-cri, resources, shim-resize and the network suites run).
    useSharedTemplate(config);
    // The standard configuration directories a pod's config_path annotation may choose from, relocated.
    sysroot = path.join(tmp.path, 'sysroot');
    ctrd = await startContainerd(this, { pathPrefix: [shimBinDir(tmp)], env: { KATA_CONF_FILE: config, KATA_TS_RUN_ROOT: runRoot, KATA_TS_SYSROOT: sysroot, KATA_TS_SBS_ROOT: path.join(tmp.path, 'sbs') } });
  });

  after(async () => {
    await ctrd?.stop();
    tmp?.cleanup();
  });

  const c = () => ctrd!;
  /** The run directory of a sandbox: the shim keeps each containerd namespace's apart. */
  const sandboxDir = (id: string) => path.join(runRoot, c().namespace, id);
  const why = (r: { stdout: string; stderr: string }) => `stdout: ${r.stdout}\nstderr: ${r.stderr}\n--- containerd log ---\n${c().logTail(40)}`;
  /** The pid of the shim serving sandbox `id` (containerd starts it with `-namespace <ns> … -id <id>`). */
  const shimPid = (id: string): number => {
    const shims = liveProcesses().filter((p) => p.argv.some((a) => a.endsWith('containerd-shim-kata-v2')) && p.argv.includes(c().namespace) && p.argv[p.argv.indexOf('-id') + 1] === id && !p.argv.includes('start'));
    assert.equal(shims.length, 1, `one shim for ${id}: ${JSON.stringify(shims.map((p) => p.argv.join(' ')))}`);
    return shims[0]!.pid;
  };
  /** A ctr client the test drives itself: stdin a pipe it holds, stdout and stderr collected. */
  const ctrClient = (args: string[]) => {
    const child = spawn('ctr', ['-a', c().socket, '-n', c().namespace, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    const client = { child, stdout: '', stderr: '', exit: new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code))) };
    child.stdin.on('error', () => undefined);
    child.stdout.setEncoding('utf8').on('data', (d: string) => (client.stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (client.stderr += d));
    return client;
  };
  /** Kills a ctr client this test started, if it still runs. */
  const stopClient = (client: ReturnType<typeof ctrClient>) => {
    if (client.child.exitCode === null && client.child.signalCode === null) client.child.kill('SIGKILL');
  };
  /** Removes a container and its task whatever state they are in; waits for its VM to go. */
  const removeContainer = async (id: string) => {
    await c().ctr(['task', 'kill', '-s', 'SIGKILL', id]);
    await until('the task to stop', async () => !new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm').test((await c().ctr(['task', 'ls'])).stdout));
    await c().ctr(['task', 'rm', id]);
    await c().ctr(['container', 'rm', id]);
    await until('the VM to go', () => processesUnder(sandboxDir(id)).length === 0, 30_000);
  };

  it('ctr run --rm echo hello prints hello', async () => {
    const r = await c().run('hello', ['echo', 'hello'], { runtime: RUNTIME, timeoutMs: 120_000 });
    assert.equal(r.code, 0, why(r));
    assert.equal(r.stdout, 'hello\n', why(r));
  });

  it('brings a non-zero exit code back through ctr, with stdout and stderr apart', async () => {
    const r = await c().run('exit3', ['sh', '-c', 'echo out; echo err >&2; exit 3'], { runtime: RUNTIME, timeoutMs: 120_000 });
    assert.equal(r.code, 3, why(r));
    assert.equal(r.stdout, 'out\n', why(r));
    assert.match(r.stderr, /^err$/m, why(r));
  });

  it('pipes stdin through (ctr 1.6 connects it without -i)', async () => {
    const r = await c().run('stdin', ['sh', '-c', 'read line; echo "got:$line"'], { runtime: RUNTIME, input: 'piped-in\n', timeoutMs: 120_000 });
    assert.equal(r.code, 0, why(r));
    assert.equal(r.stdout, 'got:piped-in\n', why(r));
  });

  it('ends a process that reads to EOF (cat) once ctr\'s stdin ends: ctr sends CloseIO', async () => {
    const r = await c().run('stdincat', ['cat'], { runtime: RUNTIME, input: 'piped-in\nsecond line\n', timeoutMs: 120_000 });
    assert.equal(r.timedOut, false, why(r));
    assert.equal(r.code, 0, why(r));
    assert.equal(r.stdout, 'piped-in\nsecond line\n', why(r));
  });

  it('ctr run -d, then ctr task attach (no terminal): input reaches the container, again after the first client was killed, and the exit code comes back', async () => {
    const id = 'attach';
    const loop = 'while read -r line; do [ "$line" = quit ] && exit 6; echo "got=$line"; done; echo stdin-ended; exit 9';
    // ctr run -d's stdin stays open until it has returned: its EOF would be a CloseIO.
    const start = ctrClient(['run', '-d', '--fifo-dir', c().fifoDir, '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sh', '-c', loop]);
    const clients = [start];
    try {
      assert.equal(await start.exit, 0, why(start));
      start.child.stdin.end();
      const attach = async () => {
        const client = ctrClient(['task', 'attach', id]);
        clients.push(client);
        await until('ctr task attach to open the stdin FIFO', () => stdinFifoFds(client.child.pid!, id).length > 0, 30_000);
        return client;
      };
      const first = await attach();
      first.child.stdin.write('one\n');
      await until('the first client\'s line echoed', () => first.stdout.includes('got=one\n'), 30_000);
      first.child.kill('SIGKILL'); // detached: its FIFO ends go, no CloseIO
      await first.exit;
      const second = await attach();
      second.child.stdin.write('two\n');
      await until('the second client\'s line echoed', () => second.stdout.includes('got=two\n'), 30_000);
      second.child.stdin.write('quit\n');
      assert.equal(await second.exit, 6, why(second));
      assert.doesNotMatch(first.stdout + second.stdout, /stdin-ended/, 'the first client leaving did not end stdin');
    } finally {
      for (const client of clients) stopClient(client);
      await removeContainer(id);
    }
  });

  it('refuses kata-runtime exec with KATA_ERR_DEBUG_CONSOLE when the debug console is off (the default)', async () => {
    const id = 'noconsole';
    const r = await c().ctr(['run', '-d', '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sleep', '1000'], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, why(r));
    try {
      const bin = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');
      const exec = spawnSync(process.execPath, [bin, 'exec', id], { encoding: 'utf8', input: '', env: { ...process.env, KATA_TS_SBS_ROOT: path.join(tmp.path, 'sbs') } });
      assert.equal(exec.status, 1, exec.stderr);
      assert.match(exec.stderr, /the debug console is off/);
      assert.match(exec.stderr, /code: KATA_ERR_DEBUG_CONSOLE/);
    } finally {
      await c().ctr(['task', 'kill', '-s', 'SIGKILL', id]);
      await until('the task to stop', async () => !new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm').test((await c().ctr(['task', 'ls'])).stdout));
      await c().ctr(['task', 'rm', id]);
      await c().ctr(['container', 'rm', id]);
    }
    await until('the management socket to go', () => !existsSync(path.join(tmp.path, 'sbs', id)), 30_000);
  });

  describe('terminals, through a real pty (tmux)', () => {
    let tmux: string;
    /** A detached tmux session of `cols`x`rows` running `argv`, then `EXIT=<status>`; its own server socket. */
    const session = (name: string, cols: number, rows: number, argv: string[]) => {
      const r = spawnSync('tmux', ['-S', tmux, 'new-session', '-d', '-s', name, '-x', String(cols), '-y', String(rows), 'sh', '-c', '"$@"; echo "EXIT=$?"; sleep 600', 'sh', ...argv], { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
    };
    const screen = (name: string) => spawnSync('tmux', ['-S', tmux, 'capture-pane', '-p', '-t', name], { encoding: 'utf8' }).stdout;
    const ctrArgs = (args: string[]) => ['ctr', '-a', c().socket, '-n', c().namespace, ...args];
    // Sizes as the process sees them, once the client's has arrived (ResizePty comes right after Start).
    const waitSize = (rows: number, cols: number) => `i=0; while [ "$(stty size)" != "${rows} ${cols}" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done`;
    const probe = 'echo "pts=$(readlink /proc/self/fd/0)"; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo fds=tty; echo "term=$TERM"';

    before(function () {
      if (spawnSync('tmux', ['-V']).error) this.skip();
      tmux = path.join(tmp.path, 'tmux.sock');
    });
    after(() => {
      spawnSync('tmux', ['-S', tmux, 'kill-server']);
    });

    it('ctr run -t: the process is on /dev/pts/N with TERM, its size follows the client\'s and its changes, the exit code comes back', async () => {
      const script = `${probe}; ${waitSize(33, 91)}; echo "size1=$(stty size)"; ${waitSize(50, 132)}; echo "size2=$(stty size)"; exit 7`;
      session('run', 91, 33, ctrArgs(['run', '-t', '--rm', '--fifo-dir', c().fifoDir, '--runtime', RUNTIME, BUSYBOX_IMAGE, 'tty1', 'sh', '-c', script]));
      await until('the first size', () => /size1=/.test(screen('run')), 120_000);
      assert.match(screen('run'), /size1=33 91/, screen('run'));
      assert.equal(spawnSync('tmux', ['-S', tmux, 'resize-window', '-t', 'run', '-x', '132', '-y', '50']).status, 0);
      await until('the exit', () => /EXIT=/.test(screen('run')), 60_000);
      const out = screen('run');
      assert.match(out, /^pts=\/dev\/pts\/\d+$/m, out);
      assert.match(out, /^fds=tty$/m, out);
      assert.match(out, /^term=xterm$/m, out);
      assert.match(out, /^size2=50 132$/m, out);
      assert.match(out, /^EXIT=7$/m, out);
      await until('the VM to go', () => processesUnder(sandboxDir('tty1')).length === 0, 30_000);
    });

    it('ctr run -d -t, then ctr task attach: typed input reaches the container and its output comes back, attaching again after the client was killed, the exit code', async () => {
      const id = 'ttyattach';
      const loop = 'while read -r line; do [ "$line" = quit ] && exit 6; echo "got=$line"; done; echo stdin-ended; exit 9';
      session('start', 80, 24, ctrArgs(['run', '-d', '-t', '--fifo-dir', c().fifoDir, '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sh', '-c', loop]));
      try {
        await until('ctr run -d -t to return', () => /EXIT=/.test(screen('start')), 120_000);
        assert.match(screen('start'), /^EXIT=0$/m, screen('start'));
        /** Starts `ctr task attach` in a tmux session; resolves with its pid once it holds the stdin FIFO. */
        const attach = async (name: string) => {
          session(name, 80, 24, ctrArgs(['task', 'attach', id]));
          const pane = Number(spawnSync('tmux', ['-S', tmux, 'list-panes', '-t', name, '-F', '#{pane_pid}'], { encoding: 'utf8' }).stdout.trim());
          let pid = 0;
          await until(`ctr task attach (${name}) to open the stdin FIFO`, () => {
            pid = liveProcesses().find((p) => p.ppid === pane && p.comm === 'ctr')?.pid ?? 0;
            return pid > 0 && stdinFifoFds(pid, id).length > 0;
          }, 30_000);
          return pid;
        };
        const type = (name: string, keys: string) => assert.equal(spawnSync('tmux', ['-S', tmux, 'send-keys', '-t', name, keys, 'Enter']).status, 0);
        const first = await attach('attach1');
        type('attach1', 'one');
        await until('the first line echoed', () => /^got=one$/m.test(screen('attach1')), 30_000);
        process.kill(first, 'SIGKILL'); // the client goes away: no CloseIO
        await until('the first client to end', () => /EXIT=/.test(screen('attach1')), 30_000);
        await attach('attach2');
        type('attach2', 'two');
        await until('the second line echoed', () => /^got=two$/m.test(screen('attach2')), 30_000);
        type('attach2', 'quit');
        await until('the exit', () => /EXIT=/.test(screen('attach2')), 60_000);
        const out = screen('attach2');
        assert.match(out, /^two$/m, `the terminal echoes the input: ${out}`);
        assert.match(out, /^EXIT=6$/m, out);
        assert.doesNotMatch(screen('attach1') + out, /stdin-ended/, 'the first client leaving did not end stdin');
      } finally {
        for (const name of ['start', 'attach1', 'attach2']) spawnSync('tmux', ['-S', tmux, 'kill-session', '-t', name]);
        await removeContainer(id);
      }
    });

    it('ctr task exec -t: a terminal of the client\'s size in a running container, input echoed and read, the exit code', async () => {
      const id = 'ttyexec';
      const r = await c().ctr(['run', '-d', '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sleep', '1000'], { timeoutMs: 120_000 });
      assert.equal(r.code, 0, why(r));
      try {
        const script = `${probe}; ${waitSize(20, 70)}; echo "size=$(stty size)"; read -r line; echo "got=$line"; exit 5`;
        session('exec', 70, 20, ctrArgs(['task', 'exec', '-t', '--fifo-dir', c().fifoDir, '--exec-id', 'te1', id, 'sh', '-c', script]));
        await until('the size', () => /size=/.test(screen('exec')), 60_000);
        assert.equal(spawnSync('tmux', ['-S', tmux, 'send-keys', '-t', 'exec', 'typed-in', 'Enter']).status, 0);
        await until('the exit', () => /EXIT=/.test(screen('exec')), 60_000);
        const out = screen('exec');
        assert.match(out, /^pts=\/dev\/pts\/\d+$/m, out);
        assert.match(out, /^fds=tty$/m, out);
        assert.match(out, /^size=20 70$/m, out);
        assert.match(out, /^typed-in$/m, `the terminal echoes the input: ${out}`);
        assert.match(out, /^got=typed-in$/m, out);
        assert.match(out, /^EXIT=5$/m, out);
      } finally {
        await c().ctr(['task', 'kill', '-s', 'SIGKILL', id]);
        await until('the task to stop', async () => !new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm').test((await c().ctr(['task', 'ls'])).stdout));
        await c().ctr(['task', 'rm', id]);
        await c().ctr(['container', 'rm', id]);
      }
    });
  });

  it('publishes TaskOOM when the guest OOM-kills a container process, and the task exits with 137', async () => {
    const events = spawn('ctr', ['-a', c().socket, 'events'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let seen = '';
    events.stdout.on('data', (d: Buffer) => (seen += d.toString()));
    try {
      await new Promise((r) => setTimeout(r, 500));
      const r = await c().run('oom', ['sh', '-c', 'a=xxxxxxxxxxxxxxxx; while true; do a=$a$a; done'], { runtime: RUNTIME, timeoutMs: 120_000 });
      assert.equal(r.code, 137, why(r));
      await until('the delete event', () => /\/tasks\/delete.*"oom"/.test(seen), 10_000);
    } finally {
      events.kill();
    }
    const mine = seen.split('\n').filter((l) => l.includes(`${c().namespace} /tasks/`) && l.includes('"oom"'));
    const at = (topic: string) => mine.findIndex((l) => l.includes(` ${topic} `));
    assert.ok(at('/tasks/oom') >= 0, `no /tasks/oom event:\n${seen}`);
    assert.match(mine[at('/tasks/oom')]!, /"container_id":"oom"/);
    assert.ok(at('/tasks/oom') < at('/tasks/exit'), `the OOM event comes before the exit:\n${mine.join('\n')}`);
  });

  describe('a long-running task', () => {
    const id = 'long';
    before(async () => {
      const r = await c().ctr(['run', '-d', '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sh', '-c', 'trap "exit 143" TERM; sleep 1000 & wait'], { timeoutMs: 120_000 });
      assert.equal(r.code, 0, why(r));
    });

    it('is RUNNING in ctr task ls', async () => {
      const r = await c().ctr(['task', 'ls']);
      assert.match(r.stdout, new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm'), why(r));
    });

    it('survives `kata-runtime cleanup`: the live shim owns its run directory', async () => {
      const bin = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');
      const r = spawnSync(process.execPath, [bin, 'cleanup', '--json'], { encoding: 'utf8', env: { ...process.env, KATA_TS_RUN_ROOT: runRoot } });
      assert.equal(r.status, 0, r.stderr);
      const report = JSON.parse(r.stdout) as { removed: string[]; kept: { dir: string; reason: string }[] };
      assert.deepEqual(report.removed, []);
      assert.match(report.kept.find((k) => k.dir === sandboxDir(id))?.reason ?? '', /is running/);
      assert.ok(existsSync(path.join(sandboxDir(id), 'qmp.sock')));
      assert.notDeepEqual(processesUnder(sandboxDir(id)), [], 'its VM still runs');
    });

    it('runs a second process with ctr task exec, with its own exit code', async () => {
      const r = await c().ctr(['task', 'exec', '--exec-id', 'e1', id, 'sh', '-c', 'echo from-exec; ls /proc/1/cmdline >/dev/null; exit 5']);
      assert.equal(r.code, 5, why(r));
      assert.equal(r.stdout, 'from-exec\n', why(r));
    });

    it('ends an exec reading to EOF once ctr task exec\'s stdin ends; the shim holds its stdin FIFO (reader and own writer) only while it runs', async () => {
      const shim = shimPid(id);
      const exec = ctrClient(['task', 'exec', '--fifo-dir', c().fifoDir, '--exec-id', 'cat1', id, 'cat']);
      try {
        exec.child.stdin.write('to-exec\n');
        await until('the exec\'s output', () => exec.stdout === 'to-exec\n', 30_000);
        assert.equal(stdinFifoFds(shim, 'cat1').length, 2, 'the shim\'s read end and its own write end');
        exec.child.stdin.end();
        assert.equal(await within(exec.exit, 'ctr task exec to end', 30_000), 0, why(exec));
        await until('the shim to close its ends of the exec\'s stdin FIFO', () => stdinFifoFds(shim, 'cat1').length === 0, 10_000);
      } finally {
        stopClient(exec);
      }
    });

    // runc fails the exec's Start at once ("exec: ... no such file or directory"); so must we.
    for (const [what, execId, flags, args, message] of [
      ['a missing binary', 'bad1', [], ['/nonexistent-binary'], /nonexistent-binary.*executable file not found/],
      ['a cwd above the root', 'bad2', ['--cwd', '/../..'], ['true'], /process cwd "\/\.\.\/\.\." must not contain "\.\."/],
    ] as const) {
      it(`fails an exec of ${what} promptly with the agent's message, leaving no FIFO or exec record`, async () => {
        const fifosBefore = readdirSync(c().fifoDir).sort();
        const t0 = Date.now();
        const r = await c().ctr(['task', 'exec', '--exec-id', execId, ...flags, id, ...args], { timeoutMs: 60_000 });
        const took = Date.now() - t0;
        assert.equal(r.timedOut, false, why(r));
        assert.ok(took < 10_000, `ctr answered after ${took} ms\n${why(r)}`);
        assert.notEqual(r.code, 0, why(r));
        assert.match(r.stderr, message, why(r));
        assert.match(r.stderr, /INVALID_ARGUMENT|invalid argument/i, why(r));
        assert.deepEqual(readdirSync(c().fifoDir).sort(), fifosBefore, 'ctr removed the exec\'s FIFO directory');
        assert.match((await c().ctr(['task', 'ls'])).stdout, new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm'), 'the container keeps running');
        // The same exec id is free again: the shim kept no record of the failed exec.
        const again = await c().ctr(['task', 'exec', '--exec-id', execId, id, 'echo', 'reused']);
        assert.equal(again.code, 0, why(again));
        assert.equal(again.stdout, 'reused\n', why(again));
      });
    }

    it('pauses and resumes (the whole VM)', async () => {
      assert.equal((await c().ctr(['task', 'pause', id])).code, 0);
      assert.match((await c().ctr(['task', 'ls'])).stdout, new RegExp(`^${id}\\s+\\d+\\s+PAUSED`, 'm'));
      assert.equal((await c().ctr(['task', 'resume', id])).code, 0);
      const r = await c().ctr(['task', 'exec', '--exec-id', 'e2', id, 'echo', 'awake']);
      assert.equal(r.stdout, 'awake\n', why(r));
    });

    it('ends on ctr task kill (SIGTERM, which it traps: 143) and can then be removed', async () => {
      const k = await c().ctr(['task', 'kill', id]);
      assert.equal(k.code, 0, why(k));
      await until('the task to stop', async () => /STOPPED/.test((await c().ctr(['task', 'ls'])).stdout));
      const ls = await c().ctr(['task', 'ls']);
      assert.match(ls.stdout, new RegExp(`^${id}\\s+\\d+\\s+STOPPED`, 'm'));
      const rm = await c().ctr(['task', 'rm', id]);
      assert.equal(rm.code, 0, why(rm));
      assert.match(rm.stderr + rm.stdout, /143/, 'ctr reports the exit code');
      assert.equal((await c().ctr(['container', 'rm', id])).code, 0);
      await until('the VM to go', () => processesUnder(sandboxDir(id)).length === 0, 30_000);
    });
  });

  it('fails ctr run of a missing binary with the agent\'s message, and leaves no VM', async () => {
    const id = 'nobin';
    const r = await c().run(id, ['/nonexistent'], { runtime: RUNTIME, timeoutMs: 120_000 });
    assert.equal(r.timedOut, false, why(r));
    assert.notEqual(r.code, 0, why(r));
    assert.match(r.stderr, /"\/nonexistent": executable file not found/, why(r));
    assert.match(r.stderr, /INVALID_ARGUMENT|invalid argument/i, why(r));
    await until('the VM to go', () => processesUnder(sandboxDir(id)).length === 0 && !existsSync(sandboxDir(id)), 30_000);
    await c().ctr(['container', 'rm', id]);
  });

  it('refuses a bind mount whose options carry a shell payload, and the payload does not run', async () => {
    const id = 'inject';
    const vol = path.join(tmp.path, 'vol-inject');
    mkdirSync(vol);
    // Before the fix the agent pasted the options into a root shell script in the guest; the
    // payload then wrote this file into the volume, i.e. onto the host.
    const marker = path.join(vol, 'pwned');
    // ctr splits options at ':' and fields at ',': the payload has neither.
    const payload = `rbind:nosuid;/bin/busybox touch /run/kata-containers/shared/containers/${id}/volumes/0/pwned;true`;
    const r = await c().run(id, ['true'], { runtime: RUNTIME, timeoutMs: 120_000, flags: ['--mount', `type=bind,src=${vol},dst=/data,options=${payload}`] });
    assert.equal(r.timedOut, false, why(r));
    assert.notEqual(r.code, 0, why(r));
    assert.match(r.stderr, /option "nosuid;\/bin\/busybox touch [^"]*" is not supported/, why(r));
    assert.match(r.stderr, /INVALID_ARGUMENT|invalid argument/i, why(r));
    assert.equal(existsSync(marker), false, 'the payload did not run');
    await until('the VM to go', () => processesUnder(sandboxDir(id)).length === 0 && !existsSync(sandboxDir(id)), 30_000);
    await c().ctr(['container', 'rm', id]);
  });

  it('reports the task as exited when its VM is killed', async () => {
    const id = 'vmdies';
    const ctr = spawn('ctr', ['-a', c().socket, '-n', c().namespace, 'run', '--rm', '--fifo-dir', c().fifoDir, '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sleep', '1000'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    ctr.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => ctr.once('exit', (code) => resolve(code)));
    const vmDir = sandboxDir(id);
    try {
      await until('the VM and the task to run', async () => processesUnder(vmDir).length > 0 && /RUNNING/.test((await c().ctr(['task', 'ls'])).stdout), 120_000);
      for (const p of processesUnder(vmDir)) process.kill(Number(p.split(':')[0]), 'SIGKILL');
      const code = await Promise.race([exited, new Promise<'hung'>((r) => setTimeout(() => r('hung'), 30_000))]);
      assert.equal(code, 255, `ctr run should end with the lost-VM status; stderr: ${stderr}\n${c().logTail(30)}`);
    } finally {
      if (ctr.exitCode === null) ctr.kill('SIGKILL');
    }
    await until('the run directory to go', () => !existsSync(vmDir), 30_000);
  });

  it('runs the containers of a pod in one VM (CRI annotations)', async () => {
    const pod = ['--annotation', 'io.kubernetes.cri.sandbox-id=pod1'];
    const s = await c().ctr(['run', '-d', '--runtime', RUNTIME, '--annotation', 'io.kubernetes.cri.container-type=sandbox', ...pod, BUSYBOX_IMAGE, 'pod1', 'sleep', '1000'], { timeoutMs: 120_000 });
    assert.equal(s.code, 0, why(s));
    const t0 = Date.now();
    const r = await c().run('pod1-app', ['sh', '-c', 'echo in-pod'], { runtime: RUNTIME, flags: ['--annotation', 'io.kubernetes.cri.container-type=container', ...pod] });
    assert.equal(r.code, 0, why(r));
    assert.equal(r.stdout, 'in-pod\n');
    assert.ok(Date.now() - t0 < 30_000, 'the second container joins the running VM instead of booting one');
    assert.equal(processesUnder(sandboxDir('pod1')).filter((p) => p.includes('qemu')).length, 1, 'one VM for the pod');
    assert.equal((await c().ctr(['task', 'kill', '-s', 'SIGKILL', 'pod1'])).code, 0);
    await until('the pod sandbox to stop', async () => /pod1\s+\d+\s+STOPPED/.test((await c().ctr(['task', 'ls'])).stdout));
    assert.equal((await c().ctr(['task', 'rm', 'pod1'])).code, 0);
    assert.equal((await c().ctr(['container', 'rm', 'pod1'])).code, 0);
    await until('the pod VM to go', () => processesUnder(sandboxDir('pod1')).length === 0, 30_000);
  });

  it('shares volumes (bind mounts) with the guest: read-only, read-write and a single file', async () => {
    const ro = path.join(tmp.path, 'vol-ro');
    const rw = path.join(tmp.path, 'vol-rw');
    mkdirSync(ro);
    mkdirSync(rw);
    writeFileSync(path.join(ro, 'hello.txt'), 'from the host\n');
    const motd = tmp.file('motd', 'a single file\n');
    const r = await c().run(
      'volumes',
      ['sh', '-c', 'cat /data/hello.txt /etc/motd; echo written > /out/new.txt; if echo x > /data/nope 2>/dev/null; then echo ro-writable; fi'],
      {
        runtime: RUNTIME,
        timeoutMs: 120_000,
        flags: ['--mount', `type=bind,src=${ro},dst=/data,options=rbind:ro`, '--mount', `type=bind,src=${rw},dst=/out,options=rbind:rw`, '--mount', `type=bind,src=${motd},dst=/etc/motd,options=bind:ro`],
      },
    );
    assert.equal(r.code, 0, why(r));
    assert.equal(r.stdout, 'from the host\na single file\n', why(r));
    assert.equal(readFileSync(path.join(rw, 'new.txt'), 'utf8'), 'written\n', 'the write reached the host');
    assert.equal(existsSync(path.join(ro, 'nope')), false, 'nothing was written through the read-only volume');
    assert.equal(readFileSync(path.join(ro, 'hello.txt'), 'utf8'), 'from the host\n', 'the volume is intact after the container is gone');
  });

  /** The test configuration with `edit` applied, as `<dir>/<name>` (dir relative to the temp dir). */
  const configAt = (rel: string, edit: (text: string) => string = (t) => t) => tmp.file(rel, edit(readFileSync(config, 'utf8')));
  const withMarker = (marker: string) => (t: string) => t.replace(/^kernel_params = "(.*)"$/m, `kernel_params = "$1 kata_ts_marker=${marker}"`);
  /** An administrator's configuration that lets pods choose among the standard directories' configurations. */
  const enablingConfigPath = (t: string) => t.replace(/^enable_annotations = \[\]$/m, 'enable_annotations = ["config_path"]');
  const standardDir = () => path.join(sysroot, 'usr/share/defaults/kata-containers');
  const inStandardDir = (name: string, edit: (text: string) => string) => configAt(path.relative(tmp.path, path.join(standardDir(), name)), edit);
  /** A hostile plugin: imported, it leaves `marker` behind (as root, anywhere it likes). */
  const evilPlugin = (dir: string, marker: string) => {
    const file = tmp.file(`${dir}/evil.mjs`, `import { writeFileSync } from 'node:fs';\nwriteFileSync(${JSON.stringify(marker)}, 'imported as uid ' + process.getuid());\nexport default {};\n`);
    return file;
  };
  const namingPlugin = (plugin: string) => (t: string) => t.replace(/^\[runtime\]$/m, `[runtime]\nplugins = [${JSON.stringify(plugin)}]`);
  /** What must hold after a refused pod: no sandbox directory, no process under it, the container record removable. */
  const nothingLeft = async (id: string) => {
    assert.equal(existsSync(sandboxDir(id)), false, `${sandboxDir(id)} left behind`);
    assert.deepEqual(processesUnder(sandboxDir(id)), []);
    await c().ctr(['container', 'rm', id]);
  };

  it("runs a container under Kata 2.4.0's QEMU block settings (block devices on, virtio-scsi): the guest has the virtio-scsi controller", async () => {
    const kata240 = configAt('configuration-kata240-block.toml', (t) =>
      t.replace(/^disable_block_device_use = .*$/m, 'disable_block_device_use = false').replace(/^block_device_driver = .*$/m, 'block_device_driver = "virtio-scsi"').replace(/^hotplug_root_ports = .*$/m, ''),
    );
    assert.match(readFileSync(kata240, 'utf8'), /^block_device_driver = "virtio-scsi"$/m);
    const r = await c().run('scsi-240', ['sh', '-c', 'cat /sys/class/scsi_host/*/proc_name'], { runtime: RUNTIME, timeoutMs: 120_000, flags: ['--runtime-config-path', kata240] });
    assert.equal(r.code, 0, why(r));
    assert.deepEqual(r.stdout.trim().split('\n'), ['virtio_scsi'], why(r));
  });

  it("takes its configuration from ctr --runtime-config-path, then the config_path annotation where that configuration enables it (Kata's precedence, restricted)", async () => {
    const byOption = await c().run('cfg-option', ['cat', '/proc/cmdline'], { runtime: RUNTIME, timeoutMs: 120_000, flags: ['--runtime-config-path', configAt('configuration-option.toml', withMarker('option'))] });
    assert.match(byOption.stdout, /kata_ts_marker=option/, why(byOption));
    const admin = configAt('configuration-option2.toml', (t) => enablingConfigPath(withMarker('option2')(t)));
    const chosen = inStandardDir('configuration-annotation.toml', withMarker('annotation'));
    const byAnnotation = await c().run('cfg-annotation', ['cat', '/proc/cmdline'], {
      runtime: RUNTIME,
      timeoutMs: 120_000,
      flags: ['--runtime-config-path', admin, '--annotation', `io.katacontainers.config_path=${chosen}`],
    });
    assert.match(byAnnotation.stdout, /kata_ts_marker=annotation/, why(byAnnotation));
  });

  it("refuses the config_path annotation when the administrator's configuration does not enable it: the plugin it names is never imported, no VM starts", async () => {
    const marker = path.join(tmp.path, 'evil-imported-1');
    const evilToml = configAt('x1/evil.toml', namingPlugin(evilPlugin('x1', marker)));
    const r = await c().run('cfg-evil', ['true'], { runtime: RUNTIME, flags: ['--annotation', `io.katacontainers.config_path=${evilToml}`] });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /io\.katacontainers\.config_path.*not enabled.*KATA_ERR_ANNOTATION/s, why(r));
    assert.equal(existsSync(marker), false, 'the plugin named by the pod ran as root');
    await nothingLeft('cfg-evil');
    // The same when the file is in a standard directory: the administrator did not enable the annotation.
    const placed = inStandardDir('configuration-placed.toml', (t) => t);
    const r2 = await c().run('cfg-placed', ['true'], { runtime: RUNTIME, flags: ['--annotation', `io.katacontainers.config_path=${placed}`] });
    assert.match(r2.stderr, /KATA_ERR_ANNOTATION/, why(r2));
    await nothingLeft('cfg-placed');
  });

  it('refuses, even where enabled, a config_path outside the standard directories, relative (../../..) or missing: no fall-back, no import', async () => {
    const admin = configAt('configuration-enabling.toml', enablingConfigPath);
    const marker = path.join(tmp.path, 'evil-imported-2');
    const evilToml = configAt('x2/evil.toml', namingPlugin(evilPlugin('x2', marker)));
    const cases: [string, string, RegExp][] = [
      ['cfg-outside', evilToml, /config_path.*path not allowed: it is not directly inside.*KATA_ERR_ANNOTATION/s],
      // Relative to the bundle (containerd's state dir under the temp dir), this would reach evil.toml.
      ['cfg-relative', `../../../../../../../../..${evilToml}`, /config_path.*path not allowed: it is not absolute.*KATA_ERR_ANNOTATION/s],
      ['cfg-dotdot', `${standardDir()}/../../../../../x2/evil.toml`, /config_path.*path not allowed.*"\.\." segment.*KATA_ERR_ANNOTATION/s],
      ['cfg-missing', path.join(standardDir(), 'configuration-missing.toml'), /configuration-missing\.toml" named by annotation io\.katacontainers\.config_path does not exist.*KATA_ERR_CONFIG_NOT_FOUND/s],
    ];
    for (const [id, value, expected] of cases) {
      const r = await c().run(id, ['true'], { runtime: RUNTIME, flags: ['--runtime-config-path', admin, '--annotation', `io.katacontainers.config_path=${value}`] });
      assert.notEqual(r.code, 0, `${id}: ${why(r)}`);
      assert.match(r.stderr, expected, `${id}: ${why(r)}`);
      await nothingLeft(id);
    }
    assert.equal(existsSync(marker), false, 'the plugin named by the pod ran as root');
  });

  it('refuses, as root, a plugin or a hypervisor binary in a world-writable directory, before either runs', async () => {
    const admin = configAt('configuration-enabling2.toml', enablingConfigPath);
    const open = path.join(tmp.path, 'open');
    mkdirSync(open, { mode: 0o777 });
    chmodSync(open, 0o777);
    const marker = path.join(tmp.path, 'evil-imported-3');
    const byPlugin = inStandardDir('configuration-untrusted-plugin.toml', namingPlugin(evilPlugin('open', marker)));
    const r = await c().run('cfg-untrusted-plugin', ['true'], { runtime: RUNTIME, flags: ['--runtime-config-path', admin, '--annotation', `io.katacontainers.config_path=${byPlugin}`] });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /plugin module ".*\/open\/evil\.mjs".*its directory ".*\/open" is writable by group or others and has no sticky bit.*KATA_ERR_UNTRUSTED_PATH/s, why(r));
    assert.equal(existsSync(marker), false, 'the untrusted plugin ran as root');
    await nothingLeft('cfg-untrusted-plugin');

    const ranMarker = path.join(tmp.path, 'fake-qemu-ran');
    const fakeQemu = tmp.file('open/qemu-system-x86_64', `#!/bin/sh\necho "$(id -u)" > ${ranMarker}\nexec /usr/bin/qemu-system-x86_64 "$@"\n`);
    chmodSync(fakeQemu, 0o755);
    const useFake = (t: string) => t.replace(/^path = ".*"$/m, `path = "${fakeQemu}"`).replace(/^valid_hypervisor_paths = .*$/m, `valid_hypervisor_paths = ["${fakeQemu}"]`);
    const byBinary = inStandardDir('configuration-untrusted-qemu.toml', useFake);
    const r2 = await c().run('cfg-untrusted-qemu', ['true'], { runtime: RUNTIME, timeoutMs: 120_000, flags: ['--runtime-config-path', admin, '--annotation', `io.katacontainers.config_path=${byBinary}`] });
    assert.notEqual(r2.code, 0);
    assert.match(r2.stderr, /the hypervisor binary ".*\/open\/qemu-system-x86_64".*KATA_ERR_UNTRUSTED_PATH/s, why(r2));
    assert.equal(existsSync(ranMarker), false, 'the untrusted hypervisor binary ran as root');
    await nothingLeft('cfg-untrusted-qemu');
  });

  it('refuses a hypervisor annotation the configuration does not enable, and starts no VM', async () => {
    const r = await c().run('evil', ['true'], { runtime: RUNTIME, flags: ['--annotation', 'io.katacontainers.config.hypervisor.path=/tmp/evil-qemu'] });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /io\.katacontainers\.config\.hypervisor\.path.*KATA_ERR_ANNOTATION/s, why(r));
    assert.equal(existsSync(sandboxDir('evil')), false);
    await c().ctr(['container', 'rm', 'evil']);
  });

  it('publishes the task events containerd and CRI rely on', async () => {
    const events = spawn('ctr', ['-a', c().socket, 'events'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let seen = '';
    events.stdout.on('data', (d: Buffer) => (seen += d.toString()));
    try {
      await new Promise((r) => setTimeout(r, 500));
      const r = await c().run('events', ['sh', '-c', 'exit 7'], { runtime: RUNTIME, timeoutMs: 120_000 });
      assert.equal(r.code, 7, why(r));
      await until('the delete event', () => /\/tasks\/delete/.test(seen), 10_000);
    } finally {
      events.kill();
    }
    // containerd publishes some task events itself as well (TaskDelete from its task service), so
    // check that ours came and in their order, not that nothing else did.
    const topics = seen
      .split('\n')
      .filter((l) => l.includes(`${c().namespace} /tasks/`) && l.includes('"events"'))
      .map((l) => /(\/tasks\/[a-z-]+)/.exec(l)?.[1]);
    const first = (t: string) => topics.indexOf(t);
    for (const t of ['/tasks/create', '/tasks/start', '/tasks/exit', '/tasks/delete']) assert.ok(first(t) >= 0, `${t} missing:\n${seen}`);
    assert.ok(first('/tasks/create') < first('/tasks/start') && first('/tasks/start') < first('/tasks/exit') && first('/tasks/exit') < first('/tasks/delete'), seen);
    assert.match(seen, /\/tasks\/exit.*"exit_status":7/, seen);
  });

  // Mocha runs a suite's own tests before its nested suites: this one goes in a suite of its own,
  // defined last, so that it runs after everything else.
  describe('at the end', () => {
   it('leaves no shim, VM, mount, FIFO or run directory after 10 runs', async function () {
    this.timeout(600_000);
    for (let i = 0; i < 10; i++) {
      const r = await c().run(`cycle${i}`, ['sh', '-c', `echo cycle ${i}`], { runtime: RUNTIME, timeoutMs: 120_000 });
      assert.equal(r.stdout, `cycle ${i}\n`, why(r));
    }
    assert.deepEqual(processesUnder(runRoot), []);
    const nsRoot = path.join(runRoot, c().namespace);
    assert.deepEqual(existsSync(nsRoot) ? readdirSync(nsRoot) : [], []);
    const left = await c().stop();
    assert.deepEqual(left, NO_LEFTOVERS);
   });
  });
});
