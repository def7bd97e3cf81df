/**
 * The virtiofs plugin's manifest, apart from its code: the runtime judges the activation on it before
 * it imports the plugin (plugins/builtin.ts), so a plugin the configuration does not need costs
 * nothing at start-up.
 */
import type { PluginManifest } from '../../core/plugin-api.js';

export const PLUGIN_NAME = 'virtiofs';

export const MANIFEST = Object.freeze({
  name: PLUGIN_NAME,
  version: '1.0.0',
  runtime: '^1.0.0',
  description: 'virtio-fs shared filesystem (vhost-user-fs + virtiofsd)',
  provides: ['shared-fs:virtio-fs'],
  requires: ['hypervisor'],
  config: { table: 'hypervisor.*', schema: 'virtiofs.schema.json' },
  // Kata's default shared_fs is virtio-fs.
  activation: { when: [{ key: 'hypervisor.*.shared_fs', in: ['virtio-fs', 'virtio-fs-nydus'], default: 'virtio-fs' }] },
}) satisfies PluginManifest;
