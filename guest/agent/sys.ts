/**
 * Small system helpers: running a busybox applet to completion, sleeping, the guest's uptime.
 * Node has no mount(2), sethostname(2), mknod(2) or namespaces: busybox (static, in the initramfs
 * at /bin/busybox) does those, one short-lived process each.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { lstat } from 'node:fs/promises';

export const BUSYBOX = '/bin/busybox';
/** The environment of every helper the agent starts (never the container's). */
export const HELPER_ENV: Readonly<Record<string, string>> = Object.freeze({ PATH: '/bin:/sbin:/usr/bin:/usr/sbin', HOME: '/' });

export interface RunResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `busybox <applet> args...` and collects its output; never rejects for a non-zero exit. */
export function busybox(applet: string, args: readonly string[]): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(BUSYBOX, [applet, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: HELPER_ENV, cwd: '/' });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.once('error', reject);
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

/** `busybox <applet> args...`, throwing an Error with its stderr when it fails. */
export async function busyboxOk(applet: string, args: readonly string[]): Promise<RunResult> {
  const r = await busybox(applet, args);
  if (r.code !== 0) {
    const why = r.stderr.trim().replace(/\s+/g, ' ') || (r.signal ? `killed by ${r.signal}` : `exit ${r.code}`);
    throw new Error(`${applet} ${args.join(' ')}: ${why}`);
  }
  return r;
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason as Error);
    const onAbort = (): void => {
      clearTimeout(t);
      reject(signal!.reason as Error);
    };
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Seconds since the guest kernel started (`/proc/uptime`), for the boot-time lines; NaN off Linux. */
export function uptime(): number {
  try {
    return Number.parseFloat(readFileSync('/proc/uptime', 'utf8'));
  } catch {
    return Number.NaN;
  }
}

/** lstat without throwing: undefined when the path does not exist. */
export async function lstatOrUndefined(p: string): Promise<import('node:fs').Stats | undefined> {
  try {
    return await lstat(p);
  } catch {
    return undefined;
  }
}
