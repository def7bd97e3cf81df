/**
 * Benchmark for the QEMU driver (issue 3), against the real qemu-system-x86_64 and the project's
 * guest (Debian generic kernel + busybox initramfs, built into the cache if needed), under TCG
 * here:
 *
 * 1. Boot: from the launchVm() call to the guest's `KATA-TS-GUEST: ready` console line, split into
 *    our code before QEMU is spawned, QEMU spawn → QMP negotiated, and QMP → guest ready.
 * 2. Hot-plug latency, for virtio-blk (virtio-blk-pci into a pcie-root-port) and, on a second VM
 *    with block_device_driver = "virtio-scsi", for virtio-scsi (scsi-hd on the virtio-scsi-pci
 *    controller): hotplugBlock() from call to resolved (stat, queue, blockdev-add, device_add,
 *    bookkeeping, logging at info) against the same two QMP commands sent by a bare client over its
 *    own QMP monitor socket on the same VM. Alternating, 20+ of each, everything unplugged between
 *    rounds; the driver's unplugs (device_del, DEVICE_DELETED, blockdev-del) are timed one by one.
 *    Target: the driver's overhead (difference of medians) under 5 ms per hot-plug, for each.
 *
 * Exits 1 when a target is missed. Run with `npm run bench:qemu`.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Targets, median, ms } from './stats.js';
import { performance } from 'node:perf_hooks';
import { setTimeout as delay } from 'node:timers/promises';
import { createLogger } from '../core/logger.js';
import { SANDBOX_DIR } from '../core/plan.js';
import { loadValidatedConfig, type ValidatedConfig } from '../core/runtime.js';
import { launchVm, type RunningVm } from '../core/vm-lifecycle.js';
import { buildGuestImage } from '../guest/image/build-image.js';
import { SANDBOX_PATHS } from '../plugins/qemu/config.js';
import { QemuVm } from '../plugins/qemu/driver.js';
import type { QemuLaunchSpec } from '../plugins/qemu/launch-spec.js';
import { QEMU_IDS } from '../plugins/qemu/config.js';
import { useBuiltinPlugins } from '../core/plugin-loader.js';
import { BUILTIN_PLUGINS } from '../plugins/builtin.js';

useBuiltinPlugins(BUILTIN_PLUGINS);

const BOOTS = 3;
const ROUNDS = 6;
/**
 * Disks per client per round: with virtio-blk the driver takes rp0–rp3, the bare client rp4–rp7;
 * with virtio-scsi the driver takes SCSI id 0 (LUNs 0–3), the bare client SCSI id 1.
 */
const PER_ROUND = 4;
const OVERHEAD_TARGET_MS = 5;
const BENCH_QMP = 'bench-qmp.sock';

const targets = new Targets();
const verdict = (ok: boolean, target: string) => targets.verdict(ok, target);

/** The smallest QMP client that can hot-plug: one command at a time (callers do not overlap), events collected. */
class BareQmp {
  readonly #socket: net.Socket;
  #buf = '';
  #reply: ((m: Record<string, unknown>) => void) | undefined;
  readonly #deleted = new Set<string>();
  #onDeleted: (() => void)[] = [];

  private constructor(socket: net.Socket) {
    this.#socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.#buf += d;
      let nl: number;
      while ((nl = this.#buf.indexOf('\n')) >= 0) {
        const m = JSON.parse(this.#buf.slice(0, nl)) as Record<string, unknown>;
        this.#buf = this.#buf.slice(nl + 1);
        if (m.event === 'DEVICE_DELETED') {
          const dev = (m.data as { device?: string }).device;
          if (dev) this.#deleted.add(dev);
          for (const wake of this.#onDeleted.splice(0)) wake();
        } else if (!m.event) {
          const r = this.#reply;
          this.#reply = undefined;
          r?.(m);
        }
      }
    });
  }

  static async connect(socketPath: string): Promise<BareQmp> {
    const socket = net.connect(socketPath);
    const q = new BareQmp(socket);
    await new Promise<Record<string, unknown>>((resolve) => (q.#reply = resolve)); // greeting
    await q.cmd('qmp_capabilities');
    return q;
  }

  cmd(execute: string, args?: object): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.#reply = (m) => (m.error ? reject(new Error(`${execute}: ${JSON.stringify(m.error)}`)) : resolve(m.return));
      this.#socket.write(`${JSON.stringify(args ? { execute, arguments: args } : { execute })}\n`);
    });
  }

  async unplug(id: string): Promise<void> {
    this.#deleted.delete(id);
    await this.cmd('device_del', { id });
    while (!this.#deleted.has(id)) await new Promise<void>((r) => this.#onDeleted.push(r));
    await this.cmd('blockdev-del', { 'node-name': id });
  }

  close(): void {
    this.#socket.destroy();
  }
}

async function waitForReady(consoleLog: string, timeoutMs: number): Promise<number> {
  const until = performance.now() + timeoutMs;
  let size = 0;
  for (;;) {
    const now = performance.now();
    const st = existsSync(consoleLog) ? statSync(consoleLog).size : 0;
    if (st !== size) {
      size = st;
      if (/KATA-TS-GUEST: ready/.test(readFileSync(consoleLog, 'latin1'))) return now;
    }
    if (now > until) throw new Error(`the guest did not print "KATA-TS-GUEST: ready" within ${timeoutMs} ms`);
    await delay(2);
  }
}

function qemuInstalled(): boolean {
  return spawnSync('sh', ['-c', 'command -v qemu-system-x86_64'], { encoding: 'utf8' }).status === 0;
}

async function main(): Promise<void> {
  if (!qemuInstalled()) {
    console.log('qemu-system-x86_64 is not installed: nothing to measure');
    return;
  }
  const image = await buildGuestImage({ log: (l) => process.stderr.write(`guest:build: ${l}\n`) });
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'kata-ts-bench-qemu-'));
  const runRoot = path.join(tmp, 'run');
  const log = createLogger({ level: 'info', stream: { write: () => undefined } }); // as a shim logs, to nowhere
  let running: RunningVm | undefined;
  let bare: BareQmp | undefined;
  try {
    const configText = (driver: string) => `[hypervisor.qemu]
path = "qemu-system-x86_64"
kernel = "${image.kernel}"
initrd = "${image.initrd}"
default_memory = 512
default_maxvcpus = 1
shared_fs = "none"
disable_block_device_use = false
block_device_driver = "${driver}"
`;
    // A second QMP monitor for the bare client: QEMU serves one client per monitor socket.
    const withBenchMonitor = (loaded: ValidatedConfig): ValidatedConfig => {
      const vmSpec = structuredClone(loaded.plan.vm.native) as QemuLaunchSpec;
      vmSpec.extraArgs.push('-chardev', `socket,id=bench-qmp,path=${SANDBOX_DIR}/${BENCH_QMP},server=on,wait=off`, '-mon', 'chardev=bench-qmp,mode=control');
      return { ...loaded, plan: { ...loaded.plan, vm: { ...loaded.plan.vm, native: vmSpec } } } as ValidatedConfig;
    };
    const validated = withBenchMonitor(await loadValidatedConfig({ text: configText('virtio-blk') }));

    // 1. Boot
    const phases: { before: number; qemu: number; guest: number; total: number }[] = [];
    for (let i = 0; i < BOOTS; i++) {
      const t0 = performance.now();
      running = await launchVm(validated, { sandboxId: `boot${i}`, runRoot, log });
      const ready = await waitForReady(SANDBOX_PATHS.consoleLog.replace(SANDBOX_DIR, running.ctx.runDir), 120_000);
      const tl = (running.vm as QemuVm).timeline;
      phases.push({ before: (tl.spawned as number) - t0, qemu: (tl.qmpReady as number) - (tl.spawned as number), guest: ready - (tl.qmpReady as number), total: ready - t0 });
      if (i < BOOTS - 1) {
        await running.stop();
        running = undefined;
      }
    }
    const p = (k: keyof (typeof phases)[number]) => median(phases.map((x) => x[k]));
    const total = p('total');
    console.log(`1. boot, launchVm() to "KATA-TS-GUEST: ready", ${BOOTS} boots under ${(running?.vm as QemuVm).accelerator?.accelerator}, medians`);
    console.log(`   our code before spawn     ${ms(p('before')).padStart(12)}   ${((100 * p('before')) / total).toFixed(2)}%`);
    console.log(`   QEMU spawn → QMP ready    ${ms(p('qemu')).padStart(12)}   ${((100 * p('qemu')) / total).toFixed(2)}%`);
    console.log(`   QMP ready → guest ready   ${ms(p('guest')).padStart(12)}   ${((100 * p('guest')) / total).toFixed(2)}%`);
    console.log(`   total                     ${ms(total).padStart(12)}`);

    const files = Array.from({ length: 2 * PER_ROUND }, (_, i) => {
      const f = path.join(tmp, `disk${i}.img`);
      writeFileSync(f, '');
      truncateSync(f, 1024 * 1024);
      return f;
    });

    /** Driver vs bare QMP hot-plugs, alternating on the running VM; the driver's unplugs timed one by one. */
    const measure = async (r: RunningVm, bareDevice: (id: string, k: number) => Record<string, unknown>): Promise<{ driverMs: number[]; bareMs: number[]; unplugMs: number[] }> => {
      const vm = r.vm as QemuVm;
      bare = await BareQmp.connect(path.join(r.ctx.runDir, BENCH_QMP));
      const b = bare;
      const driverMs: number[] = [];
      const bareMs: number[] = [];
      const unplugMs: number[] = [];
      const plugDriver = async (id: string, file: string, into: number[] | undefined) => {
        const t = performance.now();
        await vm.hotplugBlock({ id, path: file });
        into?.push(performance.now() - t);
      };
      const plugBare = async (id: string, file: string, k: number, into: number[] | undefined) => {
        const t = performance.now();
        await b.cmd('blockdev-add', { driver: 'raw', 'node-name': id, 'read-only': false, file: { driver: 'file', filename: file, 'read-only': false } });
        await b.cmd('device_add', { id, drive: id, ...bareDevice(id, k) });
        into?.push(performance.now() - t);
      };
      // Round 0 warms both paths up and is not counted.
      for (let round = 0; round <= ROUNDS; round++) {
        const count = round > 0;
        const ids: { driver: string[]; bare: string[] } = { driver: [], bare: [] };
        for (let k = 0; k < PER_ROUND; k++) {
          const d = `d${round}x${k}`;
          const q = `b${round}x${k}`;
          const driverFirst = (round + k) % 2 === 0;
          if (driverFirst) await plugDriver(d, files[k] as string, count ? driverMs : undefined);
          await plugBare(q, files[PER_ROUND + k] as string, k, count ? bareMs : undefined);
          if (!driverFirst) await plugDriver(d, files[k] as string, count ? driverMs : undefined);
          ids.driver.push(d);
          ids.bare.push(q);
        }
        for (const id of ids.bare) await b.unplug(id);
        for (const id of ids.driver) {
          const t = performance.now();
          await vm.unplugBlock(id);
          if (count) unplugMs.push(performance.now() - t);
        }
      }
      b.close();
      bare = undefined;
      return { driverMs, bareMs, unplugMs };
    };

    // 2. Hot-plug latency, virtio-blk on the booted VM, then virtio-scsi on a VM of its own.
    const blk = await measure(running as RunningVm, (_id, k) => ({ driver: 'virtio-blk-pci', bus: `rp${PER_ROUND + k}`, addr: '0' }));
    await running?.stop();
    running = undefined;
    const scsiValidated = withBenchMonitor(await loadValidatedConfig({ text: configText('virtio-scsi') }));
    running = await launchVm(scsiValidated, { sandboxId: 'scsi', runRoot, log });
    await waitForReady(SANDBOX_PATHS.consoleLog.replace(SANDBOX_DIR, running.ctx.runDir), 120_000);
    const scsi = await measure(running, (_id, k) => ({ driver: 'scsi-hd', bus: `${QEMU_IDS.scsiController}.0`, 'scsi-id': 1, lun: k }));

    console.log(`2. hot-plug latency (blockdev-add + device_add), ${blk.driverMs.length} each per driver, alternating, same VM, medians`);
    console.log(`   ${''.padEnd(40)} ${'virtio-blk'.padStart(10)}   ${'virtio-scsi'.padStart(11)}`);
    const row = (label: string, a: number, b2: number, extra = '') => console.log(`   ${label.padEnd(40)} ${ms(a).padStart(10)}   ${ms(b2).padStart(11)}${extra}`);
    const [blkDriver, blkBare, scsiDriver, scsiBare] = [median(blk.driverMs), median(blk.bareMs), median(scsi.driverMs), median(scsi.bareMs)];
    row('baseline  bare QMP client', blkBare, scsiBare);
    row('measured  QemuVm.hotplugBlock()', blkDriver, scsiDriver, `   ratio ${(blkDriver / blkBare).toFixed(2)}x / ${(scsiDriver / scsiBare).toFixed(2)}x`);
    row('unplugBlock() (until the guest let go)', median(blk.unplugMs), median(scsi.unplugMs));
    const blkOverhead = blkDriver - blkBare;
    const scsiOverhead = scsiDriver - scsiBare;
    row('driver overhead per hot-plug', blkOverhead, scsiOverhead);
    console.log(`   ${'virtio-blk overhead'.padEnd(40)} ${verdict(blkOverhead < OVERHEAD_TARGET_MS, `< ${OVERHEAD_TARGET_MS} ms`)}`);
    console.log(`   ${'virtio-scsi overhead'.padEnd(40)} ${verdict(scsiOverhead < OVERHEAD_TARGET_MS, `< ${OVERHEAD_TARGET_MS} ms`)}`);
  } finally {
    bare?.close();
    await running?.stop();
    rmSync(tmp, { recursive: true, force: true });
  }
}

await main();
if (targets.failed) {
  console.log('\nsome targets were missed');
  process.exitCode = 1;
}
