/**
 * The network plugin's manifest, apart from its code: the runtime judges the activation on it before
 * it imports the plugin (plugins/builtin.ts), so a plugin the configuration does not need costs
 * nothing at start-up.
 */
import type { PluginManifest } from '../../core/plugin-api.js';

export const PLUGIN_NAME = 'network';

export const MANIFEST = Object.freeze({
  name: PLUGIN_NAME,
  version: '1.0.0',
  runtime: '^1.0.0',
  description: "the pod's network namespace mirrored into the VM (tc-filter: a tap per interface, tc mirred both ways)",
  provides: ['network:tcfilter'],
  requires: ['hypervisor'],
  activation: {
    unless: [
      { key: 'runtime.internetworking_model', in: ['none'] },
      { key: 'runtime.disable_new_netns', in: [true] },
    ],
  },
}) satisfies PluginManifest;
