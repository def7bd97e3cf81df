/**
 * The host's mount table, read from /proc/self/mountinfo, and unmounting: one place for the shim's
 * rootfs, the sandbox's shares and the shim's clean-up after a dead shim.
 */
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** The mount points of a mountinfo text, in mount order; its octal escapes (`\040` for a space) undone. */
function mountPointsIn(table: string): string[] {
  return table
    .split('\n')
    .map((line) => line.split(' ')[4])
    .filter((m): m is string => !!m)
    .map((m) => m.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8))));
}

async function mountPoints(): Promise<string[]> {
  return mountPointsIn(await readFile('/proc/self/mountinfo', 'utf8'));
}

export async function isMountPoint(target: string): Promise<boolean> {
  return (await mountPoints()).includes(target);
}

/** What a mountinfo text has mounted at `dir` or below it, deepest first (the order to unmount in). */
export function mountsUnderIn(table: string, dir: string): string[] {
  return mountPointsIn(table)
    .filter((m) => m === dir || m.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length);
}

/** What is mounted at `dir` or below it, deepest first (the order to unmount in). */
export async function mountsUnder(dir: string): Promise<string[]> {
  return mountsUnderIn(await readFile('/proc/self/mountinfo', 'utf8'), dir);
}

/**
 * Unmounts `target` with whatever is mounted below it; nothing to do when it is not a mount point.
 * A mount still busy (a process holding a file) is detached: gone from the tree at once, freed by
 * the kernel when released.
 */
export async function unmount(target: string): Promise<void> {
  if (!(await isMountPoint(target))) return;
  await run('umount', ['-R', target]).catch(() => run('umount', ['-l', target]));
}
