/**
 * Tells whether a container rootfs is a block device, as the devmapper snapshotter delivers it.
 * Used at container creation: a block rootfs is hot-plugged into the VM (virtio-blk) instead of
 * being shared through the shared filesystem.
 */
import { statSync, type Stats } from 'node:fs';

/** One mount of a container rootfs, as containerd passes it (type, source, options). */
export interface RootfsMount {
  readonly type: string;
  readonly source: string;
  readonly options?: readonly string[];
}

export interface BlockRootfs {
  readonly block: boolean;
  /** The block device, when `block`. */
  readonly device?: string;
  readonly reason: string;
}

const DM_DEVICE = /^\/dev\/(mapper\/[^/]+|dm-\d+)$/;

/** Filesystems a block rootfs may carry (what the devmapper snapshotter formats, and Kata mounts). */
export const BLOCK_FSTYPES: ReadonlySet<string> = new Set(['ext4', 'ext3', 'ext2', 'xfs']);

/**
 * A rootfs is a block device when it is a single mount whose source is a block device node
 * (S_IFBLK: the devmapper snapshotter leaves it unmounted), or a mount of a device-mapper device
 * (`/dev/mapper/*`, `/dev/dm-*`). Overlay and bind mounts are not.
 */
export function detectBlockRootfs(mounts: readonly RootfsMount[], stat: (p: string) => Pick<Stats, 'isBlockDevice'> = statSync): BlockRootfs {
  if (mounts.length !== 1) return { block: false, reason: mounts.length === 0 ? 'no rootfs mount' : `${mounts.length} mounts (layered rootfs)` };
  const m = mounts[0] as RootfsMount;
  if (DM_DEVICE.test(m.source)) return { block: true, device: m.source, reason: 'device-mapper device' };
  let st: Pick<Stats, 'isBlockDevice'>;
  try {
    st = stat(m.source);
  } catch (e) {
    return { block: false, reason: `source ${m.source} cannot be examined (${(e as NodeJS.ErrnoException).code ?? String(e)})` };
  }
  return st.isBlockDevice() ? { block: true, device: m.source, reason: 'block device node' } : { block: false, reason: `${m.type} mount of a non-block source` };
}

/**
 * The rootfs source the devmapper plugin attaches for these mounts: one mount of a block device
 * (or device-mapper device) with a block filesystem type, handed over unmounted; else undefined.
 */
export function blockRootfsSource(mounts: readonly RootfsMount[], stat: (p: string) => Pick<Stats, 'isBlockDevice'> = statSync): { kind: 'block'; path: string; fstype: string } | undefined {
  const only = mounts.length === 1 ? mounts[0] : undefined;
  if (!only || !BLOCK_FSTYPES.has(only.type)) return undefined;
  const r = detectBlockRootfs(mounts, stat);
  return r.block && r.device ? { kind: 'block', path: r.device, fstype: only.type } : undefined;
}
