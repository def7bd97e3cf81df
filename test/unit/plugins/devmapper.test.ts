import assert from 'node:assert/strict';
import { readdirSync, statSync } from 'node:fs';
import { blockRootfsSource, detectBlockRootfs } from '../../../plugins/devmapper/block-rootfs.js';
import { loadValidatedConfig } from '../../../core/runtime.js';
import { TempDir } from '../../helpers/tmp.js';

const statAs = (kind: 'block' | 'file') => () => ({ isBlockDevice: () => kind === 'block' });

/** The first block device node on this host, if any (loop devices usually exist). */
function someBlockDevice(): string | undefined {
  for (const name of readdirSync('/dev')) {
    try {
      if (statSync(`/dev/${name}`).isBlockDevice()) return `/dev/${name}`;
    } catch {
      // Nodes may vanish or be unreadable; look at the next one.
    }
  }
  return undefined;
}

describe('detectBlockRootfs', () => {
  it('takes a single mount of a block device node for a block rootfs', () => {
    assert.deepEqual(detectBlockRootfs([{ type: 'ext4', source: '/dev/whatever' }], statAs('block')), { block: true, device: '/dev/whatever', reason: 'block device node' });
  });

  it('takes a device-mapper device for a block rootfs without looking at it', () => {
    const neverCalled = () => assert.fail('stat must not be needed');
    assert.equal(detectBlockRootfs([{ type: 'ext4', source: '/dev/mapper/snap-42' }], neverCalled).block, true);
    assert.equal(detectBlockRootfs([{ type: 'xfs', source: '/dev/dm-3' }], neverCalled).block, true);
  });

  it('does not take an overlay or a directory for a block rootfs', () => {
    assert.equal(detectBlockRootfs([{ type: 'overlay', source: 'overlay', options: ['lowerdir=/a'] }], statAs('file')).block, false);
    const tmp = new TempDir();
    try {
      assert.equal(detectBlockRootfs([{ type: 'bind', source: tmp.path }]).block, false);
    } finally {
      tmp.cleanup();
    }
  });

  it('does not take several mounts for a block rootfs', () => {
    assert.equal(detectBlockRootfs([{ type: 'ext4', source: '/dev/dm-1' }, { type: 'bind', source: '/x' }]).block, false);
  });

  it('answers with a reason, not a throw, when the source cannot be examined', () => {
    const r = detectBlockRootfs([{ type: 'ext4', source: '/nonexistent/dev' }]);
    assert.equal(r.block, false);
    assert.match(r.reason, /ENOENT/);
  });

  it("recognises a real block device node of this host's", function () {
    const dev = someBlockDevice();
    if (!dev) this.skip();
    assert.deepEqual(detectBlockRootfs([{ type: 'ext4', source: dev as string }]), { block: true, device: dev, reason: 'block device node' });
  });
});

describe('devmapper classifyRootfs (the one block-rootfs decision)', () => {
  const dm = [{ type: 'ext4', source: '/dev/mapper/snap-1', options: [] }];
  const qemu = (extra: string) => `[hypervisor.qemu]\nkernel = "/k"\ninitrd = "/i"\nshared_fs = "virtio-9p"\nblock_device_driver = "virtio-blk"\n${extra}\n`;

  it('takes one mount of a block device, unmounted, when block devices are in use', async () => {
    const v = await loadValidatedConfig({ text: qemu('disable_block_device_use = false') });
    assert.deepEqual(v.hooks.classifyRootfs.call(dm, v.plan), { kind: 'block', path: '/dev/mapper/snap-1', fstype: 'ext4' });
    assert.equal(v.hooks.classifyRootfs.call([{ type: 'overlay', source: 'overlay', options: ['lowerdir=/a'] }], v.plan), undefined);
    assert.equal(v.hooks.classifyRootfs.call([{ type: 'bind', source: '/dev/mapper/snap-1', options: ['rbind'] }], v.plan), undefined);
  });

  it('takes nothing when block devices are disabled: the plugin does not apply', async () => {
    const v = await loadValidatedConfig({ text: qemu('disable_block_device_use = true') });
    assert.ok(!v.plugins.some((p) => p.manifest.name === 'devmapper'));
    assert.equal(v.hooks.classifyRootfs.call(dm, v.plan), undefined);
  });

  it('names block filesystem types only (blockRootfsSource)', () => {
    assert.deepEqual(blockRootfsSource([{ type: 'xfs', source: '/dev/sdz', options: [] }], statAs('block')), { kind: 'block', path: '/dev/sdz', fstype: 'xfs' });
    assert.equal(blockRootfsSource([{ type: 'ext4', source: '/tmp/file.img', options: [] }], statAs('file')), undefined);
    assert.equal(blockRootfsSource([...dm, ...dm]), undefined);
  });
});
