/**
 * devmapper: container rootfs as a block device (the containerd devmapper snapshotter), hot-plugged
 * into the VM as virtio-blk. Loaded when block devices are enabled (`disable_block_device_use` is
 * false). This is how a rootfs reaches a confidential guest, which cannot use virtio-fs.
 */
import { definePlugin, hvKey, STAGE } from '../../core/plugin-api.js';

const PLUGIN_NAME = 'devmapper';

export { detectBlockRootfs, type BlockRootfs, type RootfsMount } from './block-rootfs.js';

export default definePlugin({
  manifest: {
    name: PLUGIN_NAME,
    version: '1.0.0',
    runtime: '^1.0.0',
    description: 'block-device container rootfs (devmapper snapshotter), hot-plugged as virtio-blk',
    provides: ['block-rootfs'],
    requires: ['hypervisor'],
  },
  apply({ hooks }) {
    hooks.validate.tap(PLUGIN_NAME, (cfg, verdict) => {
      verdict.require('block-device-hotplug', 'a block-device rootfs is hot-plugged into the running VM when its container is created', {
        key: hvKey(cfg, 'block_device_driver'),
        fix: 'set block_device_driver = "virtio-blk" (the driver this runtime hot-plugs), or disable_block_device_use = true to not use block devices',
      });
    });

    hooks.plan.tap({ stage: STAGE.DEVICES }, (plan, cfg, caps) => {
      if (!caps.has('block-device-hotplug')) return plan;
      if (!plan.rootfs.includes('block-hotplug')) plan.rootfs.unshift('block-hotplug');
      plan.blockDriver ??= cfg.hypervisor.block_device_driver ?? null;
      return plan;
    });
  },
});
