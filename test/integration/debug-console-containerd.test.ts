/**
 * `kata-runtime exec <sandbox-id>` against a sandbox started by the real containerd (a private one,
 * test/helpers/containerd.ts) through containerd-shim-kata-v2, with `debug_console_enabled = true`
 * in the shipped QEMU configuration; the CLI runs in a real pty (tmux), as an operator runs it. The
 * shims' management sockets live under a temp sbs root (KATA_TS_SBS_ROOT) instead of /run/vc/sbs.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { BUSYBOX_IMAGE, NO_LEFTOVERS, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { ensureGuestImage } from '../helpers/guest.js';
import { processesMentioning } from '../helpers/procs.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';
import { TempDir } from '../helpers/tmp.js';
import { until } from '../helpers/wait.js';

const RUNTIME = 'io.containerd.kata.v2';
const BIN = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');

describe('kata-runtime exec (guest debug console) with the real containerd @integration', function () {
  this.timeout(300_000);
  let tmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let runRoot: string;
  let sbsRoot: string;
  let tmux: string;

  before(async function () {
    this.timeout(600_000);
    if (spawnSync('tmux', ['-V']).error) this.skip();
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-debug-console-e2e-');
    runRoot = path.join(tmp.path, 'run');
    sbsRoot = path.join(tmp.path, 'sbs');
    tmux = path.join(tmp.path, 'tmux.sock');
    const config = shimConfig(tmp, image);
    writeFileSync(config, readFileSync(config, 'utf8').replace(/^\[agent\.kata\]$/m, '[agent.kata]\ndebug_console_enabled = true'));
    assert.match(readFileSync(config, 'utf8'), /^debug_console_enabled = true$/m);
    ctrd = await startContainerd(this, { pathPrefix: [shimBinDir(tmp)], env: { KATA_CONF_FILE: config, KATA_TS_RUN_ROOT: runRoot, KATA_TS_SBS_ROOT: sbsRoot } });
  });

  after(async () => {
    if (tmux) spawnSync('tmux', ['-S', tmux, 'kill-server']);
    await ctrd?.stop();
    tmp?.cleanup();
  });

  const c = () => ctrd!;
  const env = () => ({ ...process.env, KATA_TS_SBS_ROOT: sbsRoot });
  const exec = (id: string) => spawnSync(process.execPath, [BIN, 'exec', id], { encoding: 'utf8', env: env(), input: '' });
  const tmuxOut = (...args: string[]) => spawnSync('tmux', ['-S', tmux, ...args], { encoding: 'utf8' }).stdout;
  const screen = (name: string) => tmuxOut('capture-pane', '-p', '-J', '-t', name);
  const waitFor = (name: string, re: RegExp, ms = 60_000) => until(`${re} on the screen`, () => re.test(screen(name)), ms, 200).catch(() => assert.match(screen(name), re));
  const localModes = (name: string) => spawnSync('stty', ['-a', '-F', tmuxOut('display', '-p', '-t', name, '#{pane_tty}').trim()], { encoding: 'utf8' }).stdout;

  it('attaches the local terminal to a root shell in the guest, in raw mode, and detaches with Ctrl-], restoring the terminal', async () => {
    const id = 'dbg1';
    const r = await c().ctr(['run', '-d', '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sleep', '1000'], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, `${r.stderr}\n${c().logTail(40)}`);
    try {
      const sock = path.join(sbsRoot, id, 'shim-monitor.sock');
      assert.equal(statSync(sock).mode & 0o777, 0o600);
      const after = 'echo "EXIT=$?"; echo "modes=$(stty -a | tr " ;" "\\n\\n" | grep -x -e icanon -e -icanon -e echo -e -echo | tr "\\n" " ")"; sleep 600';
      const s = spawnSync('tmux', ['-S', tmux, 'new-session', '-d', '-s', 'dc', '-x', '100', '-y', '40', 'sh', '-c', `"$@"; ${after}`, 'sh', process.execPath, BIN, 'exec', id], { encoding: 'utf8', env: env() });
      assert.equal(s.status, 0, s.stderr);
      await waitFor('dc', /Ctrl-\] detaches/);
      assert.match(localModes('dc'), /(^|\s)-icanon(\s|$)/, 'our terminal is raw while attached');
      // The guest's root filesystem (the agent's bundle is there; a container's busybox rootfs has none), as root.
      assert.equal(spawnSync('tmux', ['-S', tmux, 'send-keys', '-t', 'dc', 'echo "uid=$(id -u) v=$((6*7))"; [ -e /agent/agent.mjs ] && echo in-guest-root', 'Enter']).status, 0);
      await waitFor('dc', /^in-guest-root$/m, 120_000);
      assert.match(screen('dc'), /^uid=0 v=42$/m);
      assert.equal(spawnSync('tmux', ['-S', tmux, 'send-keys', '-t', 'dc', 'C-]']).status, 0);
      await waitFor('dc', /modes=/);
      const out = screen('dc');
      assert.match(out, /^EXIT=0$/m, out);
      assert.match(out, /^modes=icanon echo $/m, `our terminal is restored: ${out}`);
      // A second exec refused while another is attached is covered by the unit tests; the container itself was untouched.
      assert.match((await c().ctr(['task', 'ls'])).stdout, new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm'));
    } finally {
      await c().ctr(['task', 'kill', '-s', 'SIGKILL', id]);
      await until('the task to stop', async () => !new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm').test((await c().ctr(['task', 'ls'])).stdout), 60_000, 200);
      await c().ctr(['task', 'rm', id]);
      await c().ctr(['container', 'rm', id]);
    }
    await until('the shim to remove its management socket', () => !existsSync(path.join(sbsRoot, id)), 60_000, 200);
    assert.deepEqual(processesMentioning(`${runRoot}/`).map((p) => p.pid), [], 'no QEMU left');
  });

  it('refuses an unknown sandbox and an id that is no containerd identifier with coded errors', () => {
    const unknown = exec('nosuch');
    assert.equal(unknown.status, 1);
    assert.match(unknown.stderr, /code: KATA_ERR_DEBUG_CONSOLE/);
    const hostile = exec('../../etc');
    assert.equal(hostile.status, 1);
    assert.match(hostile.stderr, /code: KATA_ERR_INVALID_ID/);
  });

  it('leaves nothing behind', async () => {
    assert.deepEqual(await ctrd!.stop(), NO_LEFTOVERS, ctrd!.logTail());
    assert.deepEqual(existsSync(sbsRoot) ? readdirSync(sbsRoot) : [], []);
  });
});
