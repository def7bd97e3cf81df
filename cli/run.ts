/**
 * `kata-runtime [--config F] run [--rootfs PATH] [-i] [--timings] -- CMD [ARG...]` (ours; Kata 2.x
 * has no such command): boots a sandbox, runs one container process with its stdin, stdout and
 * stderr connected to ours, exits with the process's exit status (128+signal when killed), and
 * tears everything down, also on Ctrl-C. Operators use it to try a configuration without containerd.
 *
 * The rootfs: a block device or a filesystem image file is hot-plugged as a virtio-blk disk (the
 * devmapper / TDX data path); a directory is shared through the configured shared filesystem.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, openSync, readSync, closeSync, statSync } from 'node:fs';
import path from 'node:path';
import { KataError } from '../core/errors.js';
import { SHIPPED_QEMU_CONFIG } from '../core/paths.js';
import { loadValidatedConfig } from '../core/runtime.js';
import { Sandbox } from '../core/sandbox.js';
import type { RootfsSource } from '../core/vm.js';
import { DEFAULT_RUN_ROOT } from '../core/vm-lifecycle.js';
import { usageError, type CommandContext } from './main.js';

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
  readonly timings: boolean;
  readonly runRoot?: string | undefined;
}

export async function runCommand(ctx: CommandContext, flags: RunFlags): Promise<number> {
  if (ctx.args.length === 0) throw usageError('run needs a command: kata-runtime run [--rootfs PATH] [-i] -- CMD [ARG...]');
  const t0 = performance.now();
  const marks: [string, number][] = [];
  const mark = (what: string) => marks.push([what, performance.now()]);

  let file: string;
  try {
    file = ctx.locate().path;
  } catch (e) {
    if (!(e instanceof KataError && e.code === 'KATA_ERR_CONFIG_NOT_FOUND' && !ctx.flags.config && !ctx.io.env.KATA_CONF_FILE)) throw e;
    file = SHIPPED_QEMU_CONFIG;
    ctx.log.info({ path: file }, 'no configuration installed; using the one the project ships for QEMU');
  }
  const validated = await loadValidatedConfig({ file, log: ctx.log });
  mark('configuration validated');

  const rootfs = flags.rootfs ? rootfsFrom(flags.rootfs) : defaultRootfs(validated.config.hypervisor.initrd);
  const sandboxId = `run-${randomBytes(6).toString('hex')}`;
  const sandbox = await Sandbox.create(validated, { sandboxId, runRoot: flags.runRoot ?? ctx.io.env.KATA_TS_RUN_ROOT ?? DEFAULT_RUN_ROOT, log: ctx.log });
  mark('VM started, agent ready');

  let interrupted: NodeJS.Signals | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    interrupted = sig;
    void sandbox.stop();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const container = await sandbox.createContainer({ id: 'run', rootfs, process: { args: ctx.args, cwd: '/' } });
    mark(`container created (rootfs ${rootfs.kind === 'block' ? 'hot-plugged' : 'shared'})`);
    const outDone = pipeTo(container.stdout, process.stdout);
    const errDone = pipeTo(container.stderr, process.stderr);
    await container.start();
    if (flags.interactive) process.stdin.pipe(container.stdin);
    else container.stdin.end();
    const status = await container.wait();
    // On Ctrl-C the sandbox is torn down under the process: report the interrupt, as shells do.
    if (interrupted) return 128 + (interrupted === 'SIGINT' ? 2 : 15);
    await Promise.all([outDone, errDone]);
    mark('process exited');
    process.stdin.unpipe(container.stdin);
    process.stdin.pause();
    return status;
  } catch (e) {
    if (interrupted) return 128 + (interrupted === 'SIGINT' ? 2 : 15);
    throw e;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await sandbox.stop();
    mark('sandbox stopped');
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
