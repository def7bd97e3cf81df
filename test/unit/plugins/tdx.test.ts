import assert from 'node:assert/strict';
import { judge, runLifecycle } from '../../../core/testing.js';

const FIRMWARE = '/usr/share/ovmf/OVMF.inteltdx.fd';

/** A TDX sandbox on QEMU as the tdx plugin accepts it; `lines` replace or add keys of the section. */
function tdxConfig(lines = '', agent = ''): string {
  const keys = new Map<string, string>([
    ['kernel', '"/k"'],
    ['initrd', '"/i"'],
    ['firmware', `"${FIRMWARE}"`],
    ['confidential_guest', 'true'],
    ['shared_fs', '"none"'],
    ['disable_block_device_use', 'false'],
    ['block_device_driver', '"virtio-blk"'],
  ]);
  for (const l of lines.split('\n').filter(Boolean)) {
    const [k, v] = l.split(' = ') as [string, string | undefined];
    if (v === undefined) keys.delete(k);
    else keys.set(k, v);
  }
  // A TD is sized at boot (the plugin vetoes hot-plug sizing: configuration case qemu-tdx-hotplug-sizing-vetoed).
  return `[hypervisor.qemu]\n${[...keys].map(([k, v]) => `${k} = ${v}`).join('\n')}\n\n[agent.kata]\n${agent}\n\n[runtime]\nstatic_sandbox_resource_mgmt = true\n`;
}

describe('the tdx plugin, through the test kit', () => {
  it('accepts a TDX sandbox with a block rootfs and plans a fixed-size trust domain', async () => {
    const r = await judge(tdxConfig());
    assert.equal(r.valid, true, JSON.stringify(r.problems));
    assert.ok(r.plugins.some((p) => p.name === 'tdx' && p.builtin));
    assert.deepEqual(r.plan?.confidential, { tee: 'tdx', firmware: FIRMWARE });
    assert.deepEqual(r.removedCapabilities.filter((c) => c.by === 'tdx').map((c) => c.name).sort(), ['balloon', 'cpu-hotplug', 'memory-hotplug', 'nvdimm-image']);
    assert.deepEqual(r.plan?.rootfs, ['block-hotplug']);
  });

  for (const [what, lines, agent, key] of [
    ['virtio-9p', 'shared_fs = "virtio-9p"', '', 'hypervisor.qemu.shared_fs'],
    ['a missing firmware', 'firmware', '', 'hypervisor.qemu.firmware'],
    ['virtio-mmio', 'block_device_driver = "virtio-mmio"', '', 'hypervisor.qemu.block_device_driver'],
    ['the debug console', '', 'debug_console_enabled = true', 'agent.kata.debug_console_enabled'],
  ] as const) {
    it(`vetoes ${what}, as validate --json reports it`, async () => {
      const r = await judge(tdxConfig(lines, agent));
      assert.equal(r.valid, false);
      const mine = r.problems.filter((p) => p.plugin === 'tdx' && p.code === 'KATA_ERR_CONFIG_VETO');
      assert.deepEqual(mine.map((p) => [p.hook, p.key]), [['validate', key]]);
      assert.ok(mine[0]!.fix.length > 0);
    });
  }

  it('hands the hypervisor driver a confidential VM without hot-plug or balloon, and hot-plugs the container rootfs', async () => {
    const r = await runLifecycle(tdxConfig(), { containers: [{ id: 'c1', rootfs: { kind: 'block', path: '/dev/mapper/c1-snap', fstype: 'ext4' } }] });
    assert.equal(r.error, undefined, r.error?.message);
    const vm = r.plan!.vm;
    assert.deepEqual(vm.confidential, { tee: 'tdx', firmware: FIRMWARE, accessPlatform: true });
    assert.equal(vm.cpus.hotplug, false);
    assert.equal(vm.cpus.max, vm.cpus.boot);
    assert.equal(vm.memory.maxMiB, vm.memory.bootMiB);
    assert.deepEqual(vm.devices.filter((d) => d.kind === 'balloon'), []);
    assert.deepEqual(r.hotplugged.map((d) => d.path), ['/dev/mapper/c1-snap']);
    assert.deepEqual(r.unplugged, r.hotplugged.map((d) => d.id));
  });
});
