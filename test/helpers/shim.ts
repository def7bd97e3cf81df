/**
 * What a test or benchmark needs to put our shim under a containerd: the built shim, a directory
 * to put first on containerd's PATH, and the configuration the project ships for QEMU pointed at
 * the guest image the tests built.
 */
import { mkdirSync, readFileSync, symlinkSync } from 'node:fs';
import path from 'node:path';
import { DIST_ROOT, PACKAGE_ROOT } from '../../core/paths.js';
import type { GuestImage } from './guest.js';
import type { TempDir } from './tmp.js';

/** The bundled shim (`npm run build` makes it). */
export const SHIM = path.join(DIST_ROOT, 'bundle', 'containerd-shim-kata-v2.mjs');

/** `<tmp>/bin` holding `containerd-shim-kata-v2` (a link to {@link SHIM}): where containerd looks for `io.containerd.kata.v2`. */
export function shimBinDir(tmp: TempDir): string {
  const bin = path.join(tmp.path, 'bin');
  mkdirSync(bin, { recursive: true });
  symlinkSync(SHIM, path.join(bin, 'containerd-shim-kata-v2'));
  return bin;
}

/**
 * `configs/configuration-qemu.toml` with the guest image's kernel, initrd and agent disk (`image`), written to
 * `<tmp>/configuration.toml`. Without an agent disk: the initramfs with the agent, and no `image`.
 */
export function shimConfig(tmp: TempDir, image: Pick<GuestImage, 'kernel' | 'initrd' | 'agentDisk'>): string {
  const shipped = readFileSync(path.join(PACKAGE_ROOT, 'configs', 'configuration-qemu.toml'), 'utf8');
  const disk = image.agentDisk;
  const text = shipped
    .replace(/^kernel = .*$/m, `kernel = "${image.kernel}"`)
    .replace(/^initrd = .*$/m, `initrd = "${disk ? disk.initrd : image.initrd}"`)
    .replace(/^image = .*\n/m, disk ? `image = "${disk.image}"\n` : '');
  return tmp.file('configuration.toml', text);
}
