/**
 * A streaming writer for the cpio "newc" format (the one the Linux kernel unpacks as an
 * initramfs), gzip-compressed with node:zlib or plain, and a reader for initramfs files made of
 * several such archives.
 *
 * Written here rather than piping `find | cpio -o -H newc` because the archive must not depend on
 * who runs the builder or when: every entry is owned by root, has a fixed mtime and comes in a
 * fixed order, and device nodes such as /dev/console can be written without being root. Same
 * inputs, same bytes, same sha256 in the manifest.
 */
import { createWriteStream } from 'node:fs';
import { lstat, open, readFile, readdir, readlink } from 'node:fs/promises';
import path from 'node:path';
import { once } from 'node:events';
import type { Writable } from 'node:stream';
import { createGzip, gunzipSync, inflateRawSync } from 'node:zlib';

export type CpioEntry =
  | { readonly kind: 'dir'; readonly path: string; readonly mode: number }
  /** `data` is the content, or the path of a file to read it from when the entry is written. */
  | { readonly kind: 'file'; readonly path: string; readonly mode: number; readonly data: Buffer | string }
  | { readonly kind: 'symlink'; readonly path: string; readonly target: string }
  | { readonly kind: 'char'; readonly path: string; readonly mode: number; readonly major: number; readonly minor: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;
const TRAILER = 'TRAILER!!!';

function hex8(n: number): string {
  return n.toString(16).padStart(8, '0');
}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

/** The 110-byte header and the NUL-terminated name, padded to a multiple of four. */
function header(name: string, fields: { ino: number; mode: number; nlink: number; mtime: number; size: number; rmajor?: number; rminor?: number }): Buffer {
  const nameBytes = Buffer.from(`${name}\0`, 'utf8');
  const text =
    '070701' +
    hex8(fields.ino) +
    hex8(fields.mode) +
    hex8(0) + // uid
    hex8(0) + // gid
    hex8(fields.nlink) +
    hex8(fields.mtime) +
    hex8(fields.size) +
    hex8(0) + // devmajor
    hex8(0) + // devminor
    hex8(fields.rmajor ?? 0) +
    hex8(fields.rminor ?? 0) +
    hex8(nameBytes.length) +
    hex8(0); // check
  const head = Buffer.from(text, 'ascii');
  return Buffer.concat([head, nameBytes, Buffer.alloc(pad4(head.length + nameBytes.length))]);
}

export interface CpioWriterOptions {
  /** gzip level 1–9, or `false` for a plain archive (a big payload boots faster that way: the kernel need not inflate it). Default 9. */
  readonly gzip?: number | false;
  /** mtime of every entry. Default 0. */
  readonly mtime?: number;
}

/** Writes newc entries into `file`, gzip-compressed unless told otherwise. Call {@link finish} once. */
export class CpioWriter {
  private readonly sink: Writable;
  private readonly done: Promise<void>;
  private readonly mtime: number;
  private ino = 1;
  private failed: Error | undefined;

  constructor(file: string, opts: CpioWriterOptions = {}) {
    this.mtime = opts.mtime ?? 0;
    const out = createWriteStream(file, { mode: 0o644 });
    const gzip = opts.gzip === false ? undefined : createGzip({ level: opts.gzip ?? 9 });
    if (gzip) gzip.pipe(out);
    this.sink = gzip ?? out;
    this.done = new Promise<void>((resolve, reject) => {
      const fail = (err: Error) => {
        this.failed = err;
        reject(err);
      };
      gzip?.on('error', fail);
      out.on('error', fail);
      out.on('close', () => resolve());
    });
    this.done.catch(() => undefined); // surfaced by write() or finish()
  }

  async add(entry: CpioEntry): Promise<void> {
    const name = entry.path.replace(/^\/+/, '');
    if (name === '' || name.split('/').includes('..')) throw new Error(`cpio: bad entry path "${entry.path}"`);
    const ino = this.ino++;
    switch (entry.kind) {
      case 'dir':
        return this.write(header(name, { ino, mode: S_IFDIR | (entry.mode & 0o7777), nlink: 2, mtime: this.mtime, size: 0 }));
      case 'file': {
        const data = typeof entry.data === 'string' ? await readFile(entry.data) : entry.data;
        await this.write(header(name, { ino, mode: S_IFREG | (entry.mode & 0o7777), nlink: 1, mtime: this.mtime, size: data.length }));
        await this.write(data);
        return this.write(Buffer.alloc(pad4(data.length)));
      }
      case 'symlink': {
        const target = Buffer.from(entry.target, 'utf8');
        await this.write(header(name, { ino, mode: S_IFLNK | 0o777, nlink: 1, mtime: this.mtime, size: target.length }));
        await this.write(target);
        return this.write(Buffer.alloc(pad4(target.length)));
      }
      case 'char':
        return this.write(
          header(name, { ino, mode: S_IFCHR | (entry.mode & 0o7777), nlink: 1, mtime: this.mtime, size: 0, rmajor: entry.major, rminor: entry.minor }),
        );
    }
  }

  /** Writes the trailer and waits until the file is closed. */
  async finish(): Promise<void> {
    await this.write(header(TRAILER, { ino: 0, mode: 0, nlink: 1, mtime: 0, size: 0 }));
    this.sink.end();
    await this.done;
  }

  private async write(buf: Buffer): Promise<void> {
    if (this.failed) throw this.failed;
    if (buf.length === 0) return;
    if (!this.sink.write(buf)) await Promise.race([once(this.sink, 'drain'), this.done]);
    if (this.failed) throw this.failed;
  }
}

/** {@link CpioWriter} with gzip -9 (the image's base archive). */
export class CpioGzWriter extends CpioWriter {
  constructor(file: string, mtime = 0) {
    super(file, { gzip: 9, mtime });
  }
}

export interface CpioMember {
  readonly name: string;
  /** st_mode: type and permission bits. */
  readonly mode: number;
  /** [major, minor] of a device node. */
  readonly rdev: readonly [number, number];
  /** File contents, or a symlink's target. */
  readonly data: Buffer;
}

/** The length of the gzip member at the start of `buf` (header, deflate stream, trailer). */
export function gzipMemberLength(buf: Buffer): number {
  if (buf[0] !== 0x1f || buf[1] !== 0x8b || buf[2] !== 8) throw new Error('cpio: not a gzip member');
  const flg = buf[3] as number;
  let off = 10;
  if (flg & 4) off += 2 + buf.readUInt16LE(off); // FEXTRA
  if (flg & 8) off = buf.indexOf(0, off) + 1; // FNAME
  if (flg & 16) off = buf.indexOf(0, off) + 1; // FCOMMENT
  if (flg & 2) off += 2; // FHCRC
  const r = inflateRawSync(buf.subarray(off), { info: true }) as unknown as { engine: { bytesWritten: number } };
  return off + r.engine.bytesWritten + 8;
}

/**
 * Reads an initramfs the way the kernel does: archives one after the other, each gzip-compressed
 * or plain, with NUL padding between them; a later entry replaces an earlier one of the same name.
 */
export function readInitramfs(buf: Buffer): Map<string, CpioMember> {
  const out = new Map<string, CpioMember>();
  let off = 0;
  while (off < buf.length) {
    if (buf[off] === 0) {
      off++;
      continue;
    }
    if (buf[off] === 0x1f && buf[off + 1] === 0x8b) {
      const len = gzipMemberLength(buf.subarray(off));
      readArchive(gunzipSync(buf.subarray(off, off + len)), out);
      off += len;
      continue;
    }
    off += readArchive(buf.subarray(off), out);
  }
  return out;
}

/** Reads one newc archive up to its trailer into `out`; returns the bytes it took (padded to 4). */
function readArchive(buf: Buffer, out: Map<string, CpioMember>): number {
  let off = 0;
  for (;;) {
    if (buf.toString('ascii', off, off + 6) !== '070701') throw new Error(`cpio: no newc magic at offset ${off}`);
    const field = (i: number) => Number.parseInt(buf.toString('ascii', off + 6 + i * 8, off + 14 + i * 8), 16);
    const mode = field(1);
    const size = field(6);
    const rdev: [number, number] = [field(9), field(10)];
    const nameSize = field(11);
    const name = buf.toString('utf8', off + 110, off + 110 + nameSize - 1);
    const dataStart = off + 110 + nameSize + pad4(110 + nameSize);
    off = dataStart + size + pad4(size);
    if (name === TRAILER) return off;
    out.set(name, { name, mode, rdev, data: buf.subarray(dataStart, dataStart + size) });
  }
}

/**
 * Every entry under `root`, parents before children, in byte order of their paths. Regular files
 * keep their permission bits; a file that starts with `#!` is made executable whatever the checkout
 * did to its mode.
 */
export async function collectTree(root: string): Promise<CpioEntry[]> {
  const out: CpioEntry[] = [];
  const walk = async (rel: string): Promise<void> => {
    const names = (await readdir(path.join(root, rel))).sort();
    for (const name of names) {
      const relPath = rel === '' ? name : `${rel}/${name}`;
      const abs = path.join(root, relPath);
      const st = await lstat(abs);
      if (st.isSymbolicLink()) out.push({ kind: 'symlink', path: relPath, target: await readlink(abs) });
      else if (st.isDirectory()) {
        out.push({ kind: 'dir', path: relPath, mode: 0o755 });
        await walk(relPath);
      } else if (st.isFile()) {
        const script = await startsWithShebang(abs, st.size);
        out.push({ kind: 'file', path: relPath, mode: script ? 0o755 : st.mode & 0o777, data: abs });
      } else {
        throw new Error(`cpio: ${abs} is neither a file, a directory nor a symlink`);
      }
    }
  };
  await walk('');
  return out;
}

async function startsWithShebang(file: string, size: number): Promise<boolean> {
  if (size < 2) return false;
  const fh = await open(file, 'r');
  try {
    const buf = Buffer.alloc(2);
    await fh.read(buf, 0, 2, 0);
    return buf.toString('latin1') === '#!';
  } finally {
    await fh.close();
  }
}
