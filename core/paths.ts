import { fileURLToPath } from 'node:url';
import path from 'node:path';

/**
 * The package root (where package.json, schemas/ and examples/ are). Compiled code lives in
 * dist/<same path>, so the root is two levels up from dist/core/paths.js.
 */
export const PACKAGE_ROOT: string = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Directory of the compiled code (dist/). */
export const DIST_ROOT: string = path.join(PACKAGE_ROOT, 'dist');

/** The QEMU configuration the project ships: the fall-back when no configuration is named or installed. */
export const SHIPPED_QEMU_CONFIG: string = path.join(PACKAGE_ROOT, 'configs', 'configuration-qemu.toml');
