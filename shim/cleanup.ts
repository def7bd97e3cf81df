/**
 * The file and process actions of the shim's `start` and `delete` that a path from outside could
 * steer: the bundle's `address` file, the shim socket, and the processes a dead shim left. Each is
 * done so that it can only touch what is provably the shim's own:
 *
 * - a socket is removed only when it is a socket (lstat) directly in the shim socket directory
 *   (containerd's /run/containerd/s, resolved), whatever an `address` file names;
 * - the `address` file is read without following a symlink and replaced by rename, never written
 *   through a link;
 * - a process is killed only when a pid file in the sandbox's run directory names it, the process
 *   runs in that directory (/proc/<pid>/cwd, as the hypervisor and its daemons are started), and it
 *   started before the pid file was written (a recycled pid started after).
 */
import { closeSync, constants as fsc, fstatSync, openSync, readSync } from 'node:fs';
import { lstat, open, readdir, readFile, readlink, realpath, rename, unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { processStartTime } from '../core/run-dirs.js';

/** Where shim sockets live: containerd's own convention, whatever its state directory. */
export const SOCKET_DIR = '/run/containerd/s';

/** The shim socket directory: `KATA_TS_SHIM_SOCKET_DIR` (tests) or {@link SOCKET_DIR}. */
export function shimSocketDir(env: NodeJS.ProcessEnv): string {
  return env.KATA_TS_SHIM_SOCKET_DIR || SOCKET_DIR;
}

/**
 * `sock` as a path directly in the socket directory with no symlink on the way, when it is one;
 * undefined otherwise (outside, nested, `..`, or the directory does not exist).
 */
export async function inSocketDir(sock: string, socketDir: string): Promise<string | undefined> {
  const abs = path.resolve(sock);
  const name = path.basename(abs);
  if (name === '' || name === '.' || name === '..') return undefined;
  try {
    const [dir, want] = await Promise.all([realpath(path.dirname(abs)), realpath(socketDir)]);
    return dir === want ? path.join(want, name) : undefined;
  } catch {
    return undefined;
  }
}

/** Why `sock` will not be removed, or undefined when it is a shim socket that may be. */
export async function socketRefusal(sock: string, socketDir: string): Promise<string | undefined> {
  const real = await inSocketDir(sock, socketDir);
  if (!real) return `${sock} is not directly in the shim socket directory ${socketDir}`;
  const st = await lstat(real).catch(() => undefined);
  if (!st) return undefined;
  if (!st.isSocket()) return `${sock} is not a socket`;
  return undefined;
}

/** Removes a shim socket; anything that is not one (see {@link socketRefusal}) is left alone. Returns the refusal, if any. */
export async function removeShimSocket(sock: string, socketDir: string): Promise<string | undefined> {
  const refusal = await socketRefusal(sock, socketDir);
  if (refusal) return refusal;
  const real = (await inSocketDir(sock, socketDir))!;
  await unlink(real).catch(() => undefined);
  return undefined;
}

const ADDRESS_FILE = 'address';
const MAX_ADDRESS_BYTES = 4096;

/** The bundle's `address` file, when it is a regular file (not followed if a symlink); '' otherwise. */
export function readAddressFile(bundle: string): string {
  let fd: number;
  try {
    fd = openSync(path.join(bundle, ADDRESS_FILE), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch {
    return '';
  }
  try {
    if (!fstatSync(fd).isFile()) return '';
    const buf = Buffer.alloc(MAX_ADDRESS_BYTES);
    const n = readSync(fd, buf, 0, buf.length, 0);
    return buf.subarray(0, n).toString('utf8').trim();
  } catch {
    return '';
  } finally {
    closeSync(fd);
  }
}

/** Writes the bundle's `address` file by rename: a symlink or hard link there is replaced, never written through. */
export async function writeAddressFile(bundle: string, address: string): Promise<void> {
  const tmp = path.join(bundle, `.${ADDRESS_FILE}.${process.pid}.tmp`);
  await unlink(tmp).catch(() => undefined);
  const fh = await open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o644);
  try {
    await fh.writeFile(address);
  } finally {
    await fh.close();
  }
  await rename(tmp, path.join(bundle, ADDRESS_FILE));
}

/** Linux reports process start times in clock ticks of USER_HZ, 100 on every architecture it runs containers on. */
const USER_HZ = 100;

async function bootTimeMs(): Promise<number | undefined> {
  const m = /^btime (\d+)$/m.exec(await readFile('/proc/stat', 'utf8').catch(() => ''));
  return m ? Number(m[1]) * 1000 : undefined;
}

/** When a process started (epoch ms); undefined when it is gone or a zombie. */
function processStartMs(pid: number, bootMs: number): number | undefined {
  const ticks = processStartTime(pid);
  return ticks === undefined ? undefined : bootMs + (Number(ticks) * 1000) / USER_HZ;
}

/** A pid file's pid, read without following a symlink, only from a small regular file. */
async function readPidFile(file: string): Promise<{ pid: number; mtimeMs: number } | undefined> {
  let fh;
  try {
    fh = await open(file, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile() || st.size > 32) return undefined;
    const m = /^(\d{1,10})\n?$/.exec(await fh.readFile('utf8'));
    const pid = m ? Number(m[1]) : 0;
    return pid > 1 ? { pid, mtimeMs: st.mtimeMs } : undefined;
  } finally {
    await fh.close();
  }
}

/**
 * The processes a sandbox's run directory proves are its own: named by a `*.pid` file in it (the
 * hypervisor's `qemu.pid`, `clh.pid`), running in that directory, and started no later than the
 * pid file was written. Never this process.
 */
export async function sandboxProcesses(runDir: string): Promise<number[]> {
  const st = await lstat(runDir).catch(() => undefined);
  if (!st?.isDirectory()) return [];
  const real = await realpath(runDir);
  const bootMs = await bootTimeMs();
  if (bootMs === undefined) return [];
  const pids: number[] = [];
  for (const entry of await readdir(real, { withFileTypes: true })) {
    if (!entry.isFile() || !entry.name.endsWith('.pid')) continue;
    const rec = await readPidFile(path.join(real, entry.name));
    if (!rec || rec.pid === process.pid) continue;
    const cwd = await readlink(`/proc/${rec.pid}/cwd`).catch(() => undefined);
    if (cwd !== real) continue;
    const started = processStartMs(rec.pid, bootMs);
    // btime has whole seconds; a recycled pid started after the file was written, usually much later.
    if (started === undefined || started > rec.mtimeMs + 1000) continue;
    pids.push(rec.pid);
  }
  return pids;
}

/** Whether something accepts connections on the unix socket `sock` now (a live shim, a live monitor). */
export function canConnect(sock: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(sock);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
