/**
 * Helpers for the tests that run the real qemu-system-x86_64: finding the binary, a synthetic
 * kernel for paused (-S) VMs, QEMU configurations, the guest console, and the check that a test
 * left no QEMU process behind.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { processesMentioning } from './procs.js';

export const QEMU_BINARY = 'qemu-system-x86_64';

/** The binary's path, or undefined when it is not installed (the tests then skip). */
export function qemuBinary(): string | undefined {
  const r = spawnSync('sh', ['-c', `command -v ${QEMU_BINARY}`], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.trim() ? r.stdout.trim() : undefined;
}

/**
 * The smallest file QEMU's x86 loader takes for a Linux bzImage: setup sectors and the "HdrS"
 * header. Enough for a VM started paused (-S): no guest code ever runs.
 */
export function fakeBzImage(): Buffer {
  const b = Buffer.alloc(16 * 1024);
  b[0x1f1] = 4; // setup sectors
  b.write('HdrS', 0x202, 'latin1');
  b.writeUInt16LE(0x020f, 0x206); // boot protocol 2.15
  b[0x211] = 0x01; // LOADED_HIGH
  b.writeUInt32LE(0x37ffffff, 0x22c); // initrd_addr_max
  b.writeUInt32LE(2048, 0x238); // cmdline_size
  return b;
}

/** Writes `vmlinuz` (synthetic) and `initrd` (zeros) into `dir`; returns their paths. */
export function fakeGuest(dir: string): { kernel: string; initrd: string } {
  const kernel = path.join(dir, 'vmlinuz');
  const initrd = path.join(dir, 'initrd');
  writeFileSync(kernel, fakeBzImage());
  writeFileSync(initrd, Buffer.alloc(4096));
  return { kernel, initrd };
}

/** A `[hypervisor.qemu]` configuration with block hot-plug (virtio-blk) and no shared fs. */
export function qemuConfigText(opts: { binary: string; kernel: string; initrd: string; extra?: string; blockDriver?: string }): string {
  return `[hypervisor.qemu]
path = "${opts.binary}"
kernel = "${opts.kernel}"
initrd = "${opts.initrd}"
default_memory = 512
default_maxvcpus = 1
shared_fs = "none"
disable_block_device_use = false
block_device_driver = "${opts.blockDriver ?? 'virtio-blk'}"
${opts.extra ?? ''}
`;
}

/**
 * A whole sandbox's `[hypervisor.qemu]` configuration on the guest image (the installed QEMU, one
 * vCPU, 512 MiB): `hypervisor` lines are added to that section, `agent` lines to `[agent.kata]`,
 * whose dial timeout suits a guest booting under TCG.
 */
export function sandboxConfigText(image: { kernel: string; initrd: string }, hypervisor = '', agent = ''): string {
  return `[hypervisor.qemu]
path = "${qemuBinary() ?? '/usr/bin/qemu-system-x86_64'}"
kernel = "${image.kernel}"
initrd = "${image.initrd}"
default_memory = 512
default_vcpus = 1
${hypervisor}

[agent.kata]
dial_timeout = 120
${agent}
`;
}

/** pids of live QEMU processes whose command line mentions `needle` (a test's temp dir). */
export function qemuProcessesMentioning(needle: string): number[] {
  return processesMentioning(needle)
    .filter((p) => p.argv[0]?.includes(QEMU_BINARY))
    .map((p) => p.pid);
}

/** Polls until no QEMU mentioning `needle` is alive (a killed process takes a moment); returns the survivors. */
export async function qemuLeftBehind(needle: string, waitMs = 2000): Promise<number[]> {
  const until = Date.now() + waitMs;
  for (;;) {
    const pids = qemuProcessesMentioning(needle);
    if (pids.length === 0 || Date.now() > until) return pids;
    await delay(20);
  }
}

/** Kills whatever `qemuProcessesMentioning(needle)` finds (after a failed test, so the next one starts clean). */
export function killQemuMentioning(needle: string): void {
  for (const pid of qemuProcessesMentioning(needle)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

/**
 * Waits until the console log has a line matching `re` after byte `from`; returns the match and
 * the offset after its line. Rejects after `timeoutMs` with the log's tail.
 */
export async function waitForConsole(file: string, re: RegExp, timeoutMs: number, from = 0): Promise<{ match: RegExpMatchArray; end: number }> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const text = existsSync(file) ? readFileSync(file, 'latin1') : '';
    const rest = text.slice(from);
    let offset = from;
    for (const line of rest.split('\n')) {
      const end = offset + line.length + 1;
      const m = line.replace(/\r$/, '').match(re);
      if (m && end <= text.length) return { match: m, end };
      offset = end;
    }
    if (Date.now() > until) throw new Error(`no console line matching ${re} within ${timeoutMs} ms; console tail:\n${text.slice(-1500)}`);
    await delay(50);
  }
}

/** A QEMU started paused (-S) with a QMP socket and two hot-plug ports, for QMP tests. */
export interface PausedQemu {
  readonly child: ChildProcess;
  readonly qmpSocket: string;
  /** SIGKILL and wait for the exit. */
  kill(): Promise<void>;
}

export async function startPausedQemu(binary: string, dir: string): Promise<PausedQemu> {
  const { kernel } = fakeGuest(dir);
  const qmpSocket = path.join(dir, 'qmp.sock');
  const child = spawn(
    binary,
    [
      '-S', '-nodefaults', '-no-user-config', '-display', 'none', '-machine', 'q35', '-accel', 'tcg', '-m', '128', '-kernel', kernel,
      '-chardev', `socket,id=qmp,path=${qmpSocket},server=on,wait=off`, '-mon', 'chardev=qmp,mode=control',
      '-device', 'pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1,io-reserve=0',
      '-device', 'pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=2,io-reserve=0',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'], cwd: dir },
  );
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  const until = Date.now() + 10_000;
  while (!existsSync(qmpSocket)) {
    if (child.exitCode !== null || Date.now() > until) throw new Error(`QEMU did not create ${qmpSocket}: ${stderr}`);
    await delay(10);
  }
  return {
    child,
    qmpSocket,
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

/** The guest's `name:sectors` block list (as the guest's /init reports it) as a record. */
export function blockList(text: string): Record<string, number> {
  return Object.fromEntries(
    text
      .trim()
      .split(/\s+/)
      .filter(Boolean)
      .map((e) => {
        const [name, size] = e.split(':');
        return [name as string, Number(size)];
      }),
  );
}

/** Loop devices can be made here (root, /dev/loop-control, losetup). */
export function losetupAvailable(): boolean {
  return process.getuid?.() === 0 && existsSync('/dev/loop-control') && spawnSync('losetup', ['--version']).status === 0;
}

/** A sparse file of `bytes` (a raw disk image for hot-plug). */
export function sparseFile(file: string, bytes: number): string {
  writeFileSync(file, '');
  truncateSync(file, bytes);
  return file;
}
