/**
 * A small busybox container rootfs as an ext4 image, `<cache>/guest/busybox-rootfs.ext4`: what
 * `kata-runtime run` uses without --rootfs, and what the demo and the sandbox tests hot-plug. It is
 * made with `mkfs.ext4 -d` (no mount needed) from the busybox-static binary already in the guest
 * initramfs, and remade only when the initramfs changes.
 */
import { execFile } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readFile, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { KataError } from '../../core/errors.js';
import { readInitramfs } from './cpio.js';

const run = promisify(execFile);

export const BUSYBOX_ROOTFS = 'busybox-rootfs.ext4';
const SIZE = '24M';

/** Builds the image next to `initrd` unless it is newer than the initrd; returns its path. */
export async function ensureBusyboxRootfs(initrd: string, log: (line: string) => void = () => {}): Promise<string> {
  const out = path.join(path.dirname(initrd), BUSYBOX_ROOTFS);
  const [img, src] = await Promise.all([stat(out).catch(() => undefined), stat(initrd)]);
  if (img && img.mtimeMs >= src.mtimeMs) return out;
  const t = Date.now();
  const work = await mkdtemp(path.join(os.tmpdir(), 'kata-ts-rootfs-'));
  try {
    const busybox = readInitramfs(await readFile(initrd)).get('bin/busybox');
    if (!busybox) throw new KataError('KATA_ERR_GUEST_IMAGE', `${initrd} has no bin/busybox to build the container rootfs from`);
    const root = path.join(work, 'root');
    for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'proc', 'sys', 'dev', 'tmp', 'etc', 'root', 'run']) await mkdir(path.join(root, d), { recursive: true });
    await writeFile(path.join(root, 'bin', 'busybox'), busybox.data);
    await chmod(path.join(root, 'bin', 'busybox'), 0o755);
    await chmod(path.join(root, 'tmp'), 0o1777);
    const { stdout } = await run(path.join(root, 'bin', 'busybox'), ['--list-full']);
    for (const rel of stdout.split('\n').filter(Boolean)) {
      if (rel === 'bin/busybox') continue;
      await symlink('/bin/busybox', path.join(root, rel)).catch(() => undefined);
    }
    await writeFile(path.join(root, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n');
    await writeFile(path.join(root, 'etc', 'group'), 'root:x:0:\nnogroup:x:65534:\n');
    const tmpImage = path.join(work, BUSYBOX_ROOTFS);
    await run('mkfs.ext4', ['-q', '-F', '-L', 'kata-rootfs', '-E', 'root_owner=0:0', '-d', root, tmpImage, SIZE]).catch((e: { stderr?: string }) => {
      throw new KataError('KATA_ERR_GUEST_IMAGE', `mkfs.ext4 failed: ${e.stderr?.trim() ?? String(e)}`, { fix: 'install e2fsprogs (mkfs.ext4 with -d support)' });
    });
    await rename(tmpImage, out).catch(async () => {
      await writeFile(out, await readFile(tmpImage));
    });
    log(`busybox rootfs image ${out} (${SIZE}) in ${Date.now() - t} ms`);
    return out;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
