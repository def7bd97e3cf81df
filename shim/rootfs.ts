/**
 * The container's root filesystem as containerd hands it over (CreateTaskRequest.rootfs) turned
 * into what the sandbox delivers to the guest:
 *
 * - mounts a plugin takes as they are (the sandbox's `classifyRootfs`: the devmapper plugin takes
 *   one mount of a block device, from the devmapper snapshotter) → handed over unmounted, to be
 *   hot-plugged into the VM (virtio-blk), as Kata does;
 * - overlay / bind mounts (overlayfs and native snapshotters) → mounted on `<bundle>/rootfs` and
 *   shared with the guest as a directory;
 * - no mounts (`ctr run --rootfs DIR`) → config.json's root.path, as it is.
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { KataError } from '../core/errors.js';
import { unmount } from '../core/mounts.js';
import type { RootfsMount, RootfsSource } from '../core/vm.js';
import type { Mount } from '../wire/containerd/proto.gen.js';

const run = promisify(execFile);

/** The kernel copies at most a page of mount options (NUL included). */
const MOUNT_DATA_LIMIT = 4096;

/**
 * Overlay options that fit in the kernel's page of mount data. An image with many layers gives a
 * `lowerdir=` list longer than that; as containerd does, the layers are then named relative to
 * their common parent directory and mount(8) runs there. Returns the options unchanged when they
 * fit or cannot be shortened this way.
 */
export function compactOverlayOptions(options: readonly string[]): { options: string[]; cwd?: string } {
  const joined = options.join(',');
  const i = options.findIndex((o) => o.startsWith('lowerdir='));
  if (joined.length < MOUNT_DATA_LIMIT || i < 0) return { options: [...options] };
  const dirs = options[i]!.slice('lowerdir='.length).split(':');
  if (dirs.length < 2 || !dirs.every((d) => path.isAbsolute(d))) return { options: [...options] };
  let common = path.dirname(dirs[0]!);
  while (common !== '/' && !dirs.every((d) => d.startsWith(`${common}/`))) common = path.dirname(common);
  if (common === '/') return { options: [...options] };
  const compacted = [...options];
  compacted[i] = `lowerdir=${dirs.map((d) => path.relative(common, d)).join(':')}`;
  return { options: compacted, cwd: common };
}

export interface PreparedRootfs {
  readonly source: RootfsSource;
  /** Unmounts what prepare mounted; idempotent. */
  release(): Promise<void>;
}

/** Asks the sandbox's plugins whether they take the mounts as they are (Sandbox.classifyRootfs). */
export type RootfsClassifier = (mounts: readonly RootfsMount[]) => RootfsSource | undefined;

export async function prepareRootfs(mounts: readonly Mount[], target: string, specRoot: string, classify: RootfsClassifier = () => undefined): Promise<PreparedRootfs> {
  const none = { release: async () => undefined };
  if (mounts.length === 0) return { source: { kind: 'dir', path: specRoot }, ...none };
  const taken = classify(mounts);
  if (taken) return { source: taken, ...none };
  const mounted: string[] = [];
  try {
    for (const m of mounts) {
      const options = m.options.filter((o) => o !== '');
      const isBind = m.type === 'bind' || options.includes('bind') || options.includes('rbind');
      const compact = m.type === 'overlay' ? compactOverlayOptions(options) : { options };
      const opts = compact.options;
      const args = isBind ? ['-o', opts.join(',') || 'rbind', m.source, target] : ['-t', m.type, ...(opts.length ? ['-o', opts.join(',')] : []), m.source, target];
      try {
        await run('mount', args, compact.cwd ? { cwd: compact.cwd } : {});
      } catch (e) {
        throw new KataError('KATA_ERR_ROOTFS', `cannot mount the container rootfs (${m.type} from ${m.source}) on ${target}: ${(e as { stderr?: string }).stderr?.trim() || (e as Error).message}`, {
          fix: 'check the snapshotter (overlayfs needs the overlay module) and that the shim runs as root',
          cause: e,
        });
      }
      mounted.push(target);
    }
  } catch (e) {
    for (let i = 0; i < mounted.length; i++) await unmount(target).catch(() => undefined);
    throw e;
  }
  let released = false;
  return {
    source: { kind: 'dir', path: target },
    release: async () => {
      if (released) return;
      released = true;
      for (let i = 0; i < mounted.length; i++) await unmount(target);
    },
  };
}
