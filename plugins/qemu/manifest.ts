/**
 * The qemu plugin's manifest, apart from its code: the runtime judges the activation on it before
 * it imports the plugin (plugins/builtin.ts), so a plugin the configuration does not need costs
 * nothing at start-up.
 */
import type { PluginManifest } from '../../core/plugin-api.js';

export const PLUGIN_NAME = 'qemu';

export const MANIFEST = Object.freeze({
  name: PLUGIN_NAME,
  version: '1.0.0',
  runtime: '^1.0.0',
  description: 'QEMU (q35) hypervisor: capabilities, value rules and the qemu-system-x86_64 command line; serves virtio-9p shares',
  provides: ['hypervisor', 'hypervisor:qemu', 'shared-fs:virtio-9p'],
  config: { table: 'hypervisor.qemu', schema: 'qemu.schema.json' },
  activation: { hypervisor: 'qemu' },
}) satisfies PluginManifest;
