/**
 * The tdx plugin's manifest, apart from its code: the runtime judges the activation on it before
 * it imports the plugin (plugins/builtin.ts), so a plugin the configuration does not need costs
 * nothing at start-up.
 */
import type { PluginManifest } from '../../core/plugin-api.js';

export const PLUGIN_NAME = 'tdx';

export const MANIFEST = Object.freeze({
  name: PLUGIN_NAME,
  version: '1.0.0',
  runtime: '^1.0.0',
  description: 'Intel TDX confidential guests: no virtio-fs, block-device rootfs by hot-plug',
  provides: ['confidential-guest:tdx'],
  requires: ['hypervisor'],
  // confidential_guest with sev_snp_guest asks for SEV-SNP, which is not TDX.
  activation: { when: [{ key: 'hypervisor.*.confidential_guest', in: [true] }], unless: [{ key: 'hypervisor.*.sev_snp_guest', in: [true] }] },
}) satisfies PluginManifest;
