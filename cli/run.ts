/**
 * `kata-runtime [--config F] run [--rootfs PATH] [--netns PATH] [-i] [-t] [--timings] -- CMD [ARG...]` (ours; Kata 2.x
 * has no such command): boots a sandbox, runs one container process with its stdin, stdout and
 * stderr connected to ours, exits with the process's exit status (128+signal when killed), and
 * tears everything down, also on Ctrl-C. Operators use it to try a configuration without containerd.
 * With -t the process runs on a terminal in the guest: ours is in raw mode meanwhile (see tty.ts),
 * our input goes to it (-t implies -i) and our window size follows it.
 *
 * The rootfs: a block device or a filesystem image file is hot-plugged as a disk of the configured
 * block_device_driver, virtio-blk or virtio-scsi (the devmapper / TDX data path); a directory is
 * shared through the configured shared filesystem.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { setTimeout as delay } from 'node:timers/promises';
import { existsSync, openSync, readSync, closeSync, statSync } from 'node:fs';
import path from 'node:path';
import type { ReadStream, WriteStream } from 'node:tty';
import { KataError, toKataError } from '../core/errors.js';
import { readConfigFile } from '../core/config/parse.js';
import type { RawConfig } from '../core/config/types.js';
import { reapStaleRunDirs } from '../core/run-dirs.js';
import { SHIPPED_QEMU_CONFIG } from '../core/paths.js';
import { loadValidatedConfig } from '../core/runtime.js';
import { Sandbox } from '../core/sandbox.js';
import type { RootfsSource } from '../core/vm.js';
import { DEFAULT_RUN_ROOT } from '../core/vm-lifecycle.js';
import { describeError } from './io.js';
import { LocalTerminal } from './tty.js';
import { RUN_EXIT, usageError, type CommandContext } from './main.js';

/** The configuration the project ships for QEMU: used when no other is found. */

/** The filesystem in an image or device, from its superblock; ext4 when unrecognised. */
export function detectFsType(file: string): string {
  const buf = Buffer.alloc(1084);
  const fd = openSync(file, 'r');
  try {
    readSync(fd, buf, 0, buf.length, 0);
  } finally {
    closeSync(fd);
  }
  if (buf.toString('latin1', 0, 4) === 'XFSB') return 'xfs';
  if (buf.readUInt16LE(1080) === 0xef53) return 'ext4';
  return 'ext4';
}

export function rootfsFrom(p: string): RootfsSource {
  let st;
  try {
    st = statSync(p);
  } catch {
    throw new KataError('KATA_ERR_USAGE', `--rootfs ${p} does not exist`, { fix: 'give a block device, a filesystem image file or a directory' });
  }
  const abs = path.resolve(p);
  if (st.isDirectory()) return { kind: 'dir', path: abs };
  if (st.isBlockDevice() || st.isFile()) return { kind: 'block', path: abs, fstype: detectFsType(abs) };
  throw new KataError('KATA_ERR_USAGE', `--rootfs ${p} is neither a block device, a file nor a directory`);
}

export interface RunFlags {
  readonly rootfs?: string | undefined;
  readonly interactive: boolean;
  /** Run on a terminal (-t): needs one on our stdin and stdout. */
  readonly tty?: boolean;
  readonly timings: boolean;
  /** A network namespace (path) whose interfaces the VM mirrors. */
  readonly netns?: string | undefined;
  readonly runRoot?: string | undefined;
}

const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
/** After an interrupt, how long the orderly stop (kill the process, delete the container) may take before the VM is stopped under it. */
const INTERRUPT_GRACE_MS = 10_000;

/** The prefix of the guest files in the shipped configurations (guest/README.md). */
export const SHIPPED_GUEST_DIR = '/var/cache/kata-ts/guest/';
const GUEST_FILE_KEYS = ['kernel', 'initrd', 'image'] as const;

/**
 * With KATA_TS_CACHE_DIR set, the guest files the configuration names at their shipped default
 * place (/var/cache/kata-ts/guest/...) are taken from <cache>/guest/ instead, where the guest image
 * builder put them for that cache. Other paths are the administrator's choice and stay as written.
 * Returns the configuration to use and what was moved.
 */
export function withCacheDir(raw: RawConfig, env: NodeJS.ProcessEnv): { raw: RawConfig; moved: { key: string; from: string; to: string }[] } {
  const cache = env.KATA_TS_CACHE_DIR;
  const hv = raw.hypervisor;
  if (!cache || hv === null || typeof hv !== 'object' || Array.isArray(hv)) return { raw, moved: [] };
  const moved: { key: string; from: string; to: string }[] = [];
  const hypervisor: Record<string, unknown> = { ...(hv as Record<string, unknown>) };
  for (const [name, section] of Object.entries(hypervisor)) {
    if (section === null || typeof section !== 'object' || Array.isArray(section)) continue;
    const copy: Record<string, unknown> = { ...(section as Record<string, unknown>) };
    for (const k of GUEST_FILE_KEYS) {
      const v = copy[k];
      if (typeof v !== 'string' || !v.startsWith(SHIPPED_GUEST_DIR)) continue;
      const to = path.join(cache, 'guest', v.slice(SHIPPED_GUEST_DIR.length));
      moved.push({ key: `hypervisor.${name}.${k}`, from: v, to });
      copy[k] = to;
    }
    hypervisor[name] = copy;
  }
  return moved.length === 0 ? { raw, moved } : { raw: { ...raw, hypervisor }, moved };
}

/** The exit status for a container process that could not be started, from the agent's answer. */
export function execFailureStatus(e: unknown): number | undefined {
  const message = e instanceof Error ? e.message : '';
  // The agent's answer to a process it cannot start begins with `exec: "<arg0>": `.
  if (!/\bexec: /.test(message)) return undefined;
  if (/executable file not found|no such file or directory/i.test(message)) return RUN_EXIT.NOT_FOUND;
  if (/permission denied|not executable/i.test(message)) return RUN_EXIT.CANNOT_EXECUTE;
  return undefined;
}

export async function runCommand(ctx: CommandContext, flags: RunFlags): Promise<number> {
  if (ctx.args.length === 0) throw usageError('run needs a command: kata-runtime run [--rootfs PATH] [-i] [-t] -- CMD [ARG...]');
  if (flags.tty && !(process.stdin.isTTY && process.stdout.isTTY)) {
    throw usageError('run -t needs a terminal on stdin and stdout (they are redirected); run without -t, with -i to pass stdin');
  }
  const local = flags.tty ? new LocalTerminal(process.stdin as ReadStream, process.stdout as WriteStream) : undefined;
  let stopResizes: (() => void) | undefined;
  const t0 = performance.now();
  const marks: [string, number][] = [];
  const mark = (what: string) => marks.push([what, performance.now()]);

  // Signals are ours from the first moment: an interrupt at any phase stops what was started and
  // removes the run directory. A second one stops the VM at once.
  const abort = new AbortController();
  let interrupted: NodeJS.Signals | undefined;
  let onInterrupt: (() => void) | undefined;
  let force: (() => void) | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    if (interrupted) {
      force?.();
      return;
    }
    interrupted = sig;
    ctx.log.info({ signal: sig }, 'interrupted: stopping the sandbox');
    abort.abort();
    onInterrupt?.();
  };
  for (const s of SIGNALS) process.on(s, onSignal);
  const interruptStatus = () => 128 + (os.constants.signals[interrupted as NodeJS.Signals] ?? 0);
  let sandbox: Sandbox | undefined;
  try {
    let file: string;
    try {
      file = ctx.locate().path;
    } catch (e) {
      if (!(e instanceof KataError && e.code === 'KATA_ERR_CONFIG_NOT_FOUND' && !ctx.flags.config && !ctx.io.env.KATA_CONF_FILE)) throw e;
      file = SHIPPED_QEMU_CONFIG;
      ctx.log.info({ path: file }, 'no configuration installed; using the one the project ships for QEMU');
    }
    const { raw, moved } = withCacheDir(readConfigFile(file), ctx.io.env);
    for (const m of moved) ctx.log.info({ key: m.key, configured: m.from, using: m.to }, `KATA_TS_CACHE_DIR is set: ${m.key} is taken from the cache`);
    const validated = await loadValidatedConfig({ file, raw, log: ctx.log });
    mark('configuration validated');

    const rootfs = flags.rootfs ? rootfsFrom(flags.rootfs) : defaultRootfs(validated.config.hypervisor.initrd);
    if (interrupted) return interruptStatus();
    const runRoot = flags.runRoot ?? (ctx.io.env.KATA_TS_RUN_ROOT || DEFAULT_RUN_ROOT);
    // What runs killed with SIGKILL left (their directories; their VMs died with them).
    await reapStaleRunDirs(runRoot, { log: ctx.log }).catch((err: unknown) => ctx.log.warn({ err }, 'could not look for stale run directories'));
    const sandboxId = `run-${randomBytes(6).toString('hex')}`;
    const netns = flags.netns ? path.resolve(flags.netns) : undefined;
    sandbox = await Sandbox.create(validated, { sandboxId, runRoot, log: ctx.log, signal: abort.signal, ...(netns ? { netns } : {}) });
    mark('VM started, agent ready');
    const sb = sandbox;
    force = () => void sb.stop();
    onInterrupt = () => setTimeout(() => void sb.stop(), INTERRUPT_GRACE_MS).unref();
    if (interrupted) return interruptStatus();

    let container;
    try {
      container = await sandbox.createContainer({ id: 'run', rootfs, process: { args: ctx.args, cwd: '/', ...(local ? { terminal: local.size() } : {}) } });
    } catch (e) {
      const status = interrupted ? undefined : execFailureStatus(e);
      if (status === undefined) throw e;
      ctx.io.err(describeError(toKataError(e)));
      return status;
    }
    mark(`container created (rootfs ${rootfs.kind === 'block' ? 'hot-plugged' : 'shared'})`);
    if (interrupted) return interruptStatus();
    const c = container;
    // Stop the process; the orderly path below then deletes the container and stops the VM.
    onInterrupt = () => {
      setTimeout(() => void sb.stop(), INTERRUPT_GRACE_MS).unref();
      c.signal(9).catch(() => void sb.stop());
    };
    // Read errors (the VM gone) are reported by wait(); these only end the copying.
    const outDone = pipeTo(container.stdout, process.stdout).catch(() => undefined);
    const errDone = pipeTo(container.stderr, process.stderr).catch(() => undefined);
    await container.start();
    if (interrupted) return interruptStatus();
    if (local) {
      local.enterRaw();
      // A size that changed since the create, then every change.
      stopResizes = local.onResize((size) => void c.resize(size).catch(() => undefined));
      void c.resize(local.size()).catch(() => undefined);
    }
    if (flags.interactive || local) process.stdin.pipe(container.stdin);
    else container.stdin.end();
    try {
      const status = await container.wait();
      if (interrupted) return interruptStatus();
      await Promise.all([outDone, errDone]);
      mark('process exited');
      return status;
    } finally {
      process.stdin.unpipe(container.stdin);
      process.stdin.pause();
    }
  } catch (e) {
    if (interrupted) return interruptStatus();
    throw await vmFailureOr(sandbox, e);
  } finally {
    stopResizes?.();
    local?.restore();
    try {
      if (sandbox) {
        await sandbox.stop();
        mark('sandbox stopped');
      }
    } finally {
      for (const s of SIGNALS) process.off(s, onSignal);
    }
    if (flags.timings) {
      let prev = t0;
      const lines = marks.map(([what, t]) => {
        const line = `  ${(t - prev).toFixed(0).padStart(6)} ms  ${what}`;
        prev = t;
        return line;
      });
      ctx.io.err(`timings:\n${lines.join('\n')}\n  ${(prev - t0).toFixed(0).padStart(6)} ms  total\n`);
    }
  }
}

/**
 * When the VM died under the run (its hypervisor killed), the agent calls fail first with "closed";
 * report the VM's end instead, once the runtime has noticed it.
 */
async function vmFailureOr(sandbox: Sandbox | undefined, e: unknown): Promise<KataError> {
  const err = toKataError(e);
  if (!sandbox) return err;
  if (!sandbox.failure && (err.code === 'KATA_ERR_AGENT_CLOSED' || err.code === 'KATA_ERR_AGENT_CALL')) {
    await Promise.race([sandbox.running.exited, delay(2_000)]);
  }
  return sandbox.failure ?? err;
}

/** Without --rootfs: the busybox rootfs image the guest image builder makes next to the initrd. */
function defaultRootfs(initrd: string | undefined): RootfsSource {
  const image = initrd ? path.join(path.dirname(initrd), 'busybox-rootfs.ext4') : undefined;
  if (!image || !existsSync(image)) {
    throw new KataError('KATA_ERR_USAGE', `no --rootfs given and no busybox rootfs image at ${image ?? '(no initrd configured)'}`, {
      fix: 'run `npm run guest:build` (it builds the image), or give --rootfs',
    });
  }
  return { kind: 'block', path: image, fstype: 'ext4' };
}

function pipeTo(from: NodeJS.ReadableStream, to: NodeJS.WritableStream): Promise<void> {
  return new Promise((resolve, reject) => {
    from.on('data', (chunk: Buffer) => to.write(chunk));
    from.once('end', resolve);
    from.once('error', reject);
  });
}
