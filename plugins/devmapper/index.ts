/**
 * devmapper: container rootfs as a block device (the containerd devmapper snapshotter), hot-plugged
 * into the VM as virtio-blk or virtio-scsi (the hypervisor's block_device_driver). Loaded when
 * block devices are enabled (`disable_block_device_use` is false). This is how a rootfs reaches a
 * confidential guest, which cannot use virtio-fs.
 */
import { createHash } from 'node:crypto';
import { definePlugin, GUEST_CONTAINERS_DIR, guestBlockSource, hvKey, STAGE, type GuestStorage } from '../../core/plugin-api.js';
import { blockRootfsSource } from './block-rootfs.js';
import { MANIFEST, PLUGIN_NAME } from './manifest.js';

export { blockRootfsSource, detectBlockRootfs, type BlockRootfs, type RootfsMount } from './block-rootfs.js';

/** The disk's id in the VM: hypervisor ids are short (QEMU: 31 characters), containerd's ids are 64 hex digits. */
function diskId(containerId: string): string {
  return `rootfs-${createHash('sha256').update(containerId).digest('hex').slice(0, 16)}`;
}

export default definePlugin({
  manifest: MANIFEST,
  apply({ hooks }) {
    hooks.validate.tap(PLUGIN_NAME, (cfg, verdict) => {
      verdict.require('block-device-hotplug', 'a block-device rootfs is hot-plugged into the running VM when its container is created', {
        key: hvKey(cfg, 'block_device_driver'),
        fix: 'set block_device_driver to a driver the hypervisor plugin hot-plugs (qemu on q35: "virtio-scsi", or "virtio-blk" with hotplug_root_ports > 0; clh: "virtio-blk"), or disable_block_device_use = true to not use block devices',
      });
    });

    hooks.plan.tap({ stage: STAGE.DEVICES }, (plan, cfg, caps) => {
      if (!caps.has('block-device-hotplug')) return plan;
      if (!plan.rootfs.includes('block-hotplug')) plan.rootfs.unshift('block-hotplug');
      plan.blockDriver ??= cfg.hypervisor.block_device_driver ?? null;
      return plan;
    });

    // A front end asks before mounting a rootfs: one mount of a block device is ours, unmounted.
    hooks.classifyRootfs.tap(PLUGIN_NAME, (mounts, plan) => (plan.rootfs.includes('block-hotplug') ? blockRootfsSource(mounts) : undefined));

    // Run time: a block-device rootfs is hot-plugged and mounted by the agent from its PCI path.
    hooks.attachRootfs.tapPromise(PLUGIN_NAME, async (ctx) => {
      if (ctx.rootfs.kind !== 'block' || !ctx.sandbox.plan.rootfs.includes('block-hotplug')) return undefined;
      const id = diskId(ctx.containerId);
      const plugged = await ctx.vm.hotplugBlock({ id, path: ctx.rootfs.path, readonly: false });
      const mountPoint = `${GUEST_CONTAINERS_DIR}/${ctx.containerId}/rootfs`;
      // Kata's Storage for a block rootfs: driver "blk" with the PCI path (virtio-blk), or driver
      // "scsi" with "<id>:<lun>" (virtio-scsi), as the hypervisor driver reports the disk.
      const { driver, source } = guestBlockSource(plugged);
      const storage: GuestStorage = { driver, source, fstype: ctx.rootfs.fstype, options: ctx.rootfs.fstype === 'xfs' ? ['nouuid'] : [], mountPoint };
      ctx.sandbox.log.info({ container: ctx.containerId, device: ctx.rootfs.path, driver, source }, 'rootfs hot-plugged');
      return { storages: [storage], guestPath: mountPoint, detach: () => ctx.vm.unplugBlock(id) };
    });
  },
});
