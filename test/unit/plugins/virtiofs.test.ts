import assert from 'node:assert/strict';
import { loadValidatedConfig } from '../../../core/runtime.js';
import { isQemuSpec } from '../../../plugins/qemu/launch-spec.js';
import { existsSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../../core/paths.js';
import { launchVm } from '../../../core/vm-lifecycle.js';
import type { KataError } from '../../../core/errors.js';
import { TempDir, fakeHypervisorSource } from '../../helpers/tmp.js';

const qemu = (extra: string) => `[hypervisor.qemu]
kernel = "/k"
image = "/i"
shared_fs = "virtio-fs"
virtio_fs_daemon = "/usr/libexec/virtiofsd"
disable_block_device_use = true
${extra}
`;

describe('virtiofs plugin', () => {
  it('plans virtiofsd with the cache mode and the extra arguments, in order', async () => {
    const { plan } = await loadValidatedConfig({ text: qemu('virtio_fs_cache = "never"\nvirtio_fs_extra_args = ["--thread-pool-size=1", "--announce-submounts"]') });
    assert.deepEqual(plan.daemons, [
      {
        by: 'virtiofs',
        name: 'virtiofsd',
        binary: '/usr/libexec/virtiofsd',
        args: ['--socket-path', '{sandbox_dir}/virtiofsd.sock', '--shared-dir', '{sandbox_dir}/shared', '--cache', 'never', '--thread-pool-size=1', '--announce-submounts'],
        socket: '{sandbox_dir}/virtiofsd.sock',
      },
    ]);
  });

  it('gives QEMU a vhost-user-fs device on the daemon socket and shared guest memory', async () => {
    const { plan } = await loadValidatedConfig({ text: qemu('virtio_fs_queue_size = 512') });
    const vm = plan.vm.native;
    assert.ok(isQemuSpec(vm));
    assert.equal(vm.memory.shared, true);
    const dev = vm.devices.find((d) => d.type === 'vhost-user-fs-pci');
    assert.deepEqual(dev?.props, { chardev: 'virtiofsd-char', tag: 'kataShared', 'queue-size': 512 });
    assert.deepEqual(vm.chardevs.find((c) => c.id === 'virtiofsd-char')?.props, { path: '{sandbox_dir}/virtiofsd.sock' });
  });

  it('warns that the DAX window is ignored', async () => {
    const { plan } = await loadValidatedConfig({ text: qemu('virtio_fs_cache_size = 1024') });
    assert.ok(plan.notes.some((n) => n.by === 'virtiofs' && n.level === 'warn' && n.message.includes('virtio_fs_cache_size')));
  });

  it('refuses virtio-fs-nydus, which is not built', async () => {
    await assert.rejects(loadValidatedConfig({ text: qemu('').replace('shared_fs = "virtio-fs"', 'shared_fs = "virtio-fs-nydus"') }), (e: { problems: { plugin?: string; key: string }[] }) =>
      e.problems.some((p) => p.plugin === 'virtiofs' && p.key === 'hypervisor.qemu.shared_fs'),
    );
  });
});

describe('virtiofs plugin: virtiofsd at run time (against a stand-in)', () => {
  const STANDIN = path.join(PACKAGE_ROOT, 'test', 'fixtures', 'standins', 'virtiofsd.mjs');
  let tmp: TempDir;
  let plugin: string;
  beforeEach(() => {
    tmp = new TempDir();
    plugin = tmp.file('fakevmm.mjs', fakeHypervisorSource('fakevmm', FAKE_VM));
  });
  afterEach(() => {
    delete process.env.STANDIN_ARGS_FILE;
    tmp.cleanup();
  });

  const config = (daemon: string, extra = '') => `[hypervisor.fakevmm]
kernel = "/k"
image = "/i"
shared_fs = "virtio-fs"
virtio_fs_daemon = "${daemon}"
virtio_fs_cache = "never"
disable_block_device_use = true
${extra}

[runtime]
plugins = ["${plugin}"]
`;

  it('starts virtiofsd with the planned arguments before the VM, and stops it after', async () => {
    process.env.STANDIN_ARGS_FILE = path.join(tmp.path, 'args.json');
    const running = await launchVm(await loadValidatedConfig({ text: config(STANDIN) }), { sandboxId: 'fs1', runRoot: path.join(tmp.path, 'run') });
    const runDir = running.ctx.runDir;
    assert.ok(statSync(path.join(runDir, 'virtiofsd.sock')).isSocket(), 'the daemon serves its socket before the VM starts');
    assert.deepEqual(JSON.parse(readFileSync(process.env.STANDIN_ARGS_FILE, 'utf8')), ['--socket-path', `${runDir}/virtiofsd.sock`, '--shared-dir', `${runDir}/shared`, '--cache', 'never']);
    await running.stop();
    assert.equal(existsSync(runDir), false);
  });

  it('fails the sandbox start with the daemon output when virtiofsd refuses its arguments, leaving nothing behind', async () => {
    const text = config(STANDIN, 'virtio_fs_extra_args = ["--no-such-flag"]');
    await assert.rejects(launchVm(await loadValidatedConfig({ text }), { sandboxId: 'fs2', runRoot: path.join(tmp.path, 'run') }), (e: KataError) => {
      assert.equal(e.code, 'KATA_ERR_DAEMON_START');
      assert.equal(e.plugin, 'virtiofs');
      assert.match(e.message, /unexpected argument '--no-such-flag'/);
      return true;
    });
    assert.equal(existsSync(path.join(tmp.path, 'run', 'fs2')), false);
  });

  it('fails the sandbox start when the daemon binary does not exist', async () => {
    await assert.rejects(launchVm(await loadValidatedConfig({ text: config('/nonexistent/virtiofsd') }), { sandboxId: 'fs3', runRoot: path.join(tmp.path, 'run') }), (e: KataError) => e.code === 'KATA_ERR_DAEMON_START' && /ENOENT/.test(e.message));
  });
});

/** A VM that does nothing: enough for the daemon's lifecycle around it. */
const FAKE_VM = `
    hooks.createVm.tapPromise('fakevmm', async () => {
      let done;
      const exited = new Promise((r) => (done = r));
      return { hypervisor: 'fakevmm', pid: undefined, exited, async start() {}, async hotplugBlock() { throw new Error('no'); }, async unplugBlock() {},
        async stop() { const e = { expected: true, code: 0, signal: null, stderrTail: [] }; done(e); return e; } };
    });
`;
