/**
 * The built-in plugins, handed to the runtime by the executables (bin/): the core imports no
 * plugin. Each is offered with its manifest (`<name>/manifest.ts`), so the runtime judges its
 * `activation` first and imports the plugin's code only when the configuration needs it. The
 * imports are static so that the bundler sees them.
 */
import type { PluginSource } from '../core/plugin-api.js';
import { MANIFEST as CLH } from './clh/manifest.js';
import { MANIFEST as DEVMAPPER } from './devmapper/manifest.js';
import { MANIFEST as NETWORK } from './network/manifest.js';
import { MANIFEST as QEMU } from './qemu/manifest.js';
import { MANIFEST as TDX } from './tdx/manifest.js';
import { MANIFEST as VIRTIOFS } from './virtiofs/manifest.js';

export const BUILTIN_PLUGINS: readonly PluginSource[] = Object.freeze([
  { name: 'clh', manifest: CLH, load: () => import('./clh/index.js') },
  { name: 'qemu', manifest: QEMU, load: () => import('./qemu/index.js') },
  { name: 'virtiofs', manifest: VIRTIOFS, load: () => import('./virtiofs/index.js') },
  { name: 'devmapper', manifest: DEVMAPPER, load: () => import('./devmapper/index.js') },
  { name: 'tdx', manifest: TDX, load: () => import('./tdx/index.js') },
  { name: 'network', manifest: NETWORK, load: () => import('./network/index.js') },
]);
