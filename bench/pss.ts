/**
 * Where a process's memory goes, from /proc: its proportional set size (PSS: private pages plus a
 * share of each page mapped by several processes, so that the PSS of every process on the host
 * adds up to the memory in use) in total, and, for QEMU, split by mapping kind.
 */
import { readFileSync } from 'node:fs';

/** PSS of one process, KiB, from `/proc/<pid>/smaps_rollup`. */
export function pssKiB(pid: number): number {
  return rollupField(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'), 'Pss');
}

/**
 * Unique set size of one process, KiB: its private pages (`Private_Clean` + `Private_Dirty` of
 * `/proc/<pid>/smaps_rollup`), the memory only it maps, which the host gets back when it exits.
 * Unlike PSS it does not depend on how many other processes share the rest: it is what one more
 * pod adds, however many run.
 */
export function ussKiB(pid: number): number {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  return rollupField(text, 'Private_Clean') + rollupField(text, 'Private_Dirty');
}

/** A field (`Pss`, `Rss`, `Anonymous` …) of an smaps_rollup text, KiB. */
export function rollupField(text: string, field: string): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text);
  if (!m) throw new Error(`no ${field} line in smaps_rollup`);
  return Number(m[1]);
}

/** QEMU's PSS by mapping kind, KiB. */
export interface QemuPssSplit {
  /** Anonymous (or memory-backend) mappings at least as large as the guest's RAM: what the guest touched. */
  guestRam: number;
  /** Anonymous executable mappings: TCG's translation buffer (`-accel tcg,tb-size`). */
  tcg: number;
  /** `[heap]`: QEMU's own allocations (device state, the TCG's per-page descriptors …). */
  heap: number;
  /** Mappings of files: QEMU's binary and shared libraries, the kernel/initrd if mapped, fonts … */
  files: number;
  /** Every other anonymous mapping: thread stacks, malloc arenas, ROMs, small RAM regions. */
  otherAnon: number;
}

const HEADER = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$/;

/**
 * Splits `/proc/<pid>/smaps` text by mapping kind. A mapping whose size is at least
 * `guestRamMiB` is guest RAM (QEMU allocates the boot RAM in one piece); executable anonymous
 * mappings are the TCG buffer (QEMU maps it read-write-execute, there is no other anonymous code).
 */
export function splitQemuSmaps(text: string, guestRamMiB: number): QemuPssSplit {
  const out: QemuPssSplit = { guestRam: 0, tcg: 0, heap: 0, files: 0, otherAnon: 0 };
  let kind: keyof QemuPssSplit = 'otherAnon';
  for (const line of text.split('\n')) {
    const h = HEADER.exec(line);
    if (h) {
      const sizeKiB = (parseInt(h[2]!, 16) - parseInt(h[1]!, 16)) / 1024;
      const perms = h[3]!;
      const name = h[4]!.trim();
      const anonymous = name === '' || name.startsWith('/memfd:') || name.startsWith('[anon');
      if (name === '[heap]') kind = 'heap';
      else if (sizeKiB >= guestRamMiB * 1024 && !perms.includes('x')) kind = 'guestRam';
      else if (anonymous && perms.includes('x')) kind = 'tcg';
      else if (name.startsWith('/')) kind = 'files';
      else kind = 'otherAnon';
      continue;
    }
    const pss = /^Pss:\s+(\d+) kB/.exec(line);
    if (pss) out[kind] += Number(pss[1]);
  }
  return out;
}

/** {@link splitQemuSmaps} of a live process. */
export function qemuPssSplit(pid: number, guestRamMiB: number): QemuPssSplit {
  return splitQemuSmaps(readFileSync(`/proc/${pid}/smaps`, 'utf8'), guestRamMiB);
}
