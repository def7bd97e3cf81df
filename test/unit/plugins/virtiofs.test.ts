import assert from 'node:assert/strict';
import { loadValidatedConfig } from '../../../core/runtime.js';
import { isQemuSpec } from '../../../core/plan.js';

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
    assert.ok(isQemuSpec(plan.vm));
    assert.equal(plan.vm.memory.shared, true);
    const dev = plan.vm.devices.find((d) => d.type === 'vhost-user-fs-pci');
    assert.deepEqual(dev?.props, { chardev: 'virtiofsd-char', tag: 'kataShared', 'queue-size': 512 });
    assert.deepEqual(plan.vm.chardevs.find((c) => c.id === 'virtiofsd-char')?.props, { path: '{sandbox_dir}/virtiofsd.sock' });
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
