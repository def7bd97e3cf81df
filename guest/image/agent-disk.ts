/**
 * The agent disk: the agent payload (node, its libraries, the agent bundle, node-pty, ip) as a
 * read-only ext4 file system in the first partition of a raw disk image, for the QEMU plugin's
 * `image =` (an NVDIMM the guest mounts with DAX, so node's pages are the host's page cache,
 * shared by every pod, instead of a copy unpacked into each guest's RAM).
 *
 * Layout: an MBR (written here: no sfdisk needed) with one Linux partition from 1 MiB to the end,
 * ext4 with 4 KiB blocks made by `mke2fs -d` straight into the partition (`-E offset`), the whole file a multiple of 2 MiB (NVDIMM backends are mapped in
 * page-aligned, hot-plug-aligned pieces). A minimal journal is kept only because the QEMU plugin
 * mounts ext4 roots with Kata's `data=ordered`, which ext4 refuses without one (never written:
 * read-only). The partition is what the plugin names as root
 * (`root=/dev/pmem0p1`); 1 MiB keeps it aligned for DAX.
 *
 * The first 2 MiB are a DAX header, as Kata's image builder writes (its nsdax tool): Linux maps a
 * raw NFIT namespace without struct pages, and DAX needs them, so at 4 KiB there is an
 * `nd_pfn_sb` ("NVDIMM_PFN_INFO", mode RAM: the page structs in guest RAM, the device being
 * read-only) that makes the guest claim the namespace in fsdax mode; /dev/pmem0 then starts at its
 * `dataoff`, 2 MiB, where the MBR above is. A second MBR at byte 0, its partition 2 MiB further,
 * keeps the same file usable as a virtio-blk disk (`/dev/vda1`, disable_image_nvdimm = true).
 */
import { open, rm, stat } from 'node:fs/promises';
import { KataError } from '../../core/errors.js';
import { findTool, run } from './debian.js';

export const PARTITION_OFFSET = 1024 * 1024;
/** Where /dev/pmem0 starts in the file: the nd_pfn_sb's dataoff. */
export const DAX_HEADER = 2 * 1024 * 1024;
const ALIGN = 2 * 1024 * 1024;
const SECTOR = 512;
const BLOCK = 4096;

/** The 512-byte MBR with one partition (type 0x83, Linux) at `startBytes`, `sizeBytes` long. */
export function mbr(startBytes: number, sizeBytes: number): Buffer {
  if (startBytes % SECTOR || sizeBytes % SECTOR) throw new RangeError('the partition must be sector-aligned');
  const b = Buffer.alloc(SECTOR);
  const e = 446;
  b[e] = 0x00; // not bootable
  b.set([0xfe, 0xff, 0xff], e + 1); // CHS unused (LBA only)
  b[e + 4] = 0x83;
  b.set([0xfe, 0xff, 0xff], e + 5);
  b.writeUInt32LE(startBytes / SECTOR, e + 8);
  b.writeUInt32LE(sizeBytes / SECTOR, e + 12);
  b[510] = 0x55;
  b[511] = 0xaa;
  return b;
}

/** Linux's nd_fletcher64 over 32-bit little-endian words (drivers/nvdimm/core.c). */
export function fletcher64(buf: Buffer): bigint {
  let lo = 0;
  let hi = 0n;
  for (let i = 0; i + 4 <= buf.length; i += 4) {
    lo = (lo + buf.readUInt32LE(i)) >>> 0;
    hi += BigInt(lo);
  }
  return ((hi << 32n) | BigInt(lo)) & 0xffff_ffff_ffff_ffffn;
}

/**
 * The 4 KiB `struct nd_pfn_sb` (drivers/nvdimm/pfn.h, version 1.4) for a namespace of
 * `namespaceBytes` whose data starts at {@link DAX_HEADER}, page structs in RAM (PFN_MODE_RAM = 1).
 */
export function pfnInfoBlock(namespaceBytes: number): Buffer {
  const sb = Buffer.alloc(4096);
  sb.write('NVDIMM_PFN_INFO\0', 0, 'latin1');
  // uuid (16..31): any non-zero value names the pfn device; parent_uuid (32..47) stays zero, as a raw namespace's is.
  Buffer.from('6b6174612d74732d6167656e74646178', 'hex').copy(sb, 16);
  sb.writeUInt32LE(0, 48); // flags
  sb.writeUInt16LE(1, 52); // version_major
  sb.writeUInt16LE(4, 54); // version_minor
  sb.writeBigUInt64LE(BigInt(DAX_HEADER), 56); // dataoff
  sb.writeBigUInt64LE(BigInt((namespaceBytes - DAX_HEADER) / 4096), 64); // npfns
  sb.writeUInt32LE(1, 72); // mode: PFN_MODE_RAM
  sb.writeUInt32LE(0, 76); // start_pad
  sb.writeUInt32LE(0, 80); // end_trunc
  sb.writeUInt32LE(ALIGN, 84); // align
  sb.writeUInt32LE(4096, 88); // page_size
  sb.writeUInt16LE(64, 92); // page_struct_size
  sb.writeBigUInt64LE(fletcher64(sb), 4088);
  return sb;
}

/** Sum of the file sizes under a tree, rounded up to blocks (what the file system must hold). */
async function treeBlocks(dir: string): Promise<{ blocks: number; inodes: number }> {
  const { readdir } = await import('node:fs/promises');
  let blocks = 0;
  let inodes = 0;
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    inodes++;
    if (e.isFile()) blocks += Math.ceil((await stat(`${e.parentPath ?? e.path}/${e.name}`)).size / BLOCK);
    else blocks++;
  }
  return { blocks, inodes };
}

/** Makes `out` from the directory `tree`; returns its size in bytes. */
export async function writeAgentDisk(tree: string, out: string): Promise<number> {
  const mke2fs = findTool('mke2fs');
  if (!mke2fs) throw new KataError('KATA_ERR_GUEST_IMAGE', 'mke2fs is not installed: the agent disk cannot be made', { fix: 'apt-get install e2fsprogs' });
  const { blocks, inodes } = await treeBlocks(tree);
  // Room for metadata (inode tables, bitmaps, directories): 10 % and 4 MiB, and the 4 MiB journal.
  const fsBytes = Math.ceil(((blocks * BLOCK) * 1.1 + 8 * 1024 * 1024) / ALIGN) * ALIGN;
  // DAX header, 1 MiB before the partition, the file system (1 MiB more, to end 2 MiB-aligned).
  const fsStart = DAX_HEADER + PARTITION_OFFSET;
  const total = fsStart + fsBytes + (ALIGN - PARTITION_OFFSET);
  await rm(out, { force: true });
  const fh = await open(out, 'w');
  try {
    await fh.truncate(total);
  } finally {
    await fh.close();
  }
  await run(mke2fs, [
    '-q', '-F', '-t', 'ext4', '-b', String(BLOCK), '-m', '0', '-N', String(inodes + 64), '-L', 'kata-agent',
    '-O', '^resize_inode', '-J', 'size=4', '-E', `offset=${fsStart},root_owner=0:0`,
    '-d', tree, out, `${(total - fsStart) / 1024}k`,
  ]);
  const size = (await stat(out)).size;
  if (size !== total) throw new KataError('KATA_ERR_GUEST_IMAGE', `mke2fs changed the agent disk's size (${total} → ${size} bytes)`);
  const w = await open(out, 'r+');
  try {
    await w.write(mbr(fsStart, total - fsStart), 0, SECTOR, 0); // the whole file as a disk (virtio-blk)
    await w.write(pfnInfoBlock(total), 0, 4096, 4096);
    await w.write(mbr(PARTITION_OFFSET, total - fsStart), 0, SECTOR, DAX_HEADER); // /dev/pmem0 (fsdax)
  } finally {
    await w.close();
  }
  return total;
}
