/**
 * The devmapper plugin's manifest, apart from its code: the runtime judges the activation on it before
 * it imports the plugin (plugins/builtin.ts), so a plugin the configuration does not need costs
 * nothing at start-up.
 */
import type { PluginManifest } from '../../core/plugin-api.js';

export const PLUGIN_NAME = 'devmapper';

export const MANIFEST = Object.freeze({
  name: PLUGIN_NAME,
  version: '1.0.0',
  runtime: '^1.0.0',
  description: 'block-device container rootfs (devmapper snapshotter), hot-plugged as virtio-blk or virtio-scsi',
  provides: ['block-rootfs'],
  requires: ['hypervisor'],
  activation: { when: [{ key: 'hypervisor.*.disable_block_device_use', in: [false], default: false }] },
}) satisfies PluginManifest;
