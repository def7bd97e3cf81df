/**
 * `kata-runtime run` as a process, as an operator runs it: the installed bin (the bundle), a
 * configuration pointing at the project's guest image, a hot-plugged ext4 rootfs.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { qemuBinary, qemuLeftBehind, qemuProcessesMentioning } from '../helpers/qemu.js';
import { STACK_FRAME } from '../helpers/cli.js';
import { TempDir } from '../helpers/tmp.js';
import { until } from '../helpers/wait.js';

const BIN = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');

describe('kata-runtime run @integration', function () {
  this.timeout(300_000);
  let image: GuestImage;
  let tmp: TempDir;
  let config: string;
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
    config = tmp.file(
      'configuration.toml',
      `[hypervisor.qemu]\npath = "${qemuBinary()}"\nkernel = "${image.kernel}"\ninitrd = "${image.initrd}"\ndefault_memory = 512\nshared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"\n[agent.kata]\ndial_timeout = 120\n`,
    );
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

  it('takes its VM down with it when it is SIGKILLed (no chance to clean up)', async () => {
    const child = spawn(process.execPath, [BIN, '--config', config, 'run', '--rootfs', rootfs(), '--', 'sh', '-c', 'echo started; sleep 1000'], { env: env(), stdio: ['ignore', 'pipe', 'ignore'] });
    await new Promise<void>((resolve) => child.stdout.on('data', (d: Buffer) => d.toString().includes('started') && resolve()));
    assert.notDeepEqual(qemuProcessesMentioning(runRoot()), [], 'the VM runs while the container does');
    child.kill('SIGKILL');
    await new Promise((resolve) => child.once('exit', resolve));
    await until('QEMU to die with the runtime', () => qemuProcessesMentioning(runRoot()).length === 0, 10_000, 100);
    // What the runtime could not remove itself (its run directory) a later cleanup can.
    rmSync(runRoot(), { recursive: true, force: true });
  });

  it('gives a coded error, no stack trace, for a missing rootfs', () => {
    const r = spawnSync(process.execPath, [BIN, '--config', config, 'run', '--rootfs', '/nonexistent.img', '--', 'true'], { encoding: 'utf8', env: env() });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /KATA_ERR_USAGE/);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  });
});
