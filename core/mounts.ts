/**
 * The host's mount table, read from /proc/self/mountinfo, and unmounting: one place for the shim's
 * rootfs, the sandbox's shares and the shim's clean-up after a dead shim.
 */
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** Mount points, in mount order; mountinfo's octal escapes (`\040` for a space) undone. */
async function mountPoints(): Promise<string[]> {
  const table = await readFile('/proc/self/mountinfo', 'utf8');
  return table
    .split('\n')
    .map((line) => line.split(' ')[4])
    .filter((m): m is string => !!m)
    .map((m) => m.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8))));
}

export async function isMountPoint(target: string): Promise<boolean> {
  return (await mountPoints()).includes(target);
}

/** What is mounted at `dir` or below it, deepest first (the order to unmount in). */
export async function mountsUnder(dir: string): Promise<string[]> {
  return (await mountPoints()).filter((m) => m === dir || m.startsWith(`${dir}/`)).sort((a, b) => b.length - a.length);
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
