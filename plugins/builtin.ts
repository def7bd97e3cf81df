/**
 * The built-in plugins, handed to the runtime by the executables (bin/): the core imports no
 * plugin. Each applies to a configuration according to the `activation` in its manifest. The
 * imports are static so that the bundler sees them; a module is imported when the runtime first
 * judges a configuration.
 */
import type { PluginSource } from '../core/plugin-api.js';

export const BUILTIN_PLUGINS: readonly PluginSource[] = Object.freeze([
  { name: 'clh', load: () => import('./clh/index.js') },
  { name: 'qemu', load: () => import('./qemu/index.js') },
  { name: 'virtiofs', load: () => import('./virtiofs/index.js') },
  { name: 'devmapper', load: () => import('./devmapper/index.js') },
  { name: 'tdx', load: () => import('./tdx/index.js') },
  { name: 'network', load: () => import('./network/index.js') },
]);
