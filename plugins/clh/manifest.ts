/**
 * The clh plugin's manifest, apart from its code: the runtime judges the activation on it before
 * it imports the plugin (plugins/builtin.ts), so a plugin the configuration does not need costs
 * nothing at start-up.
 */
import type { PluginManifest } from '../../core/plugin-api.js';

export const PLUGIN_NAME = 'clh';

export const MANIFEST = Object.freeze({
  name: PLUGIN_NAME,
  version: '1.0.0',
  runtime: '^1.0.0',
  description: 'Cloud Hypervisor VMs (REST API on a unix socket): capabilities, value rules, the vm.create body and the driver',
  provides: ['hypervisor', 'hypervisor:clh'],
  config: { table: 'hypervisor.clh', schema: 'clh.schema.json' },
  activation: { hypervisor: 'clh' },
}) satisfies PluginManifest;
