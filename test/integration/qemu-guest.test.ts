/**
 * The QEMU driver with a real guest: Debian's generic kernel and the project's busybox initramfs
 * (guest/, built once into the cache by ensureGuestImage), booted under TCG through the core
 * (loadValidatedConfig → launchVm). The guest's /init reports on the serial console, which QEMU
 * logs to <run dir>/console.log:
 *
 *   KATA-TS-GUEST: ready kernel=<version>         once its modules are loaded
 *   KATA-TS-BLOCK: vda:2048 vdb:8192 …           whenever its block devices change (512-byte sectors)
 *
 * Two boots (a few seconds each under TCG): one for hot-plug, unplug and an exit nobody asked for,
 * one for the graceful stop.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { KataError } from '../../core/errors.js';
import { chooseAccelerator, detectHost } from '../../core/host.js';
import { createLogger } from '../../core/logger.js';
import { SANDBOX_DIR } from '../../core/plan.js';
import { loadValidatedConfig } from '../../core/runtime.js';
import { launchVm, type RunningVm } from '../../core/vm-lifecycle.js';
import { SANDBOX_PATHS } from '../../plugins/qemu/config.js';
import { QemuVm, type QemuVmExit } from '../../plugins/qemu/driver.js';
import type { QmpEvent } from '../../plugins/qemu/qmp.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { blockList, killQemuMentioning, losetupAvailable, sparseFile, qemuBinary, qemuConfigText, qemuLeftBehind, qemuProcessesMentioning, waitForConsole } from '../helpers/qemu.js';
import { TempDir } from '../helpers/tmp.js';

const BOOT_TIMEOUT_MS = 90_000;
const GUEST_SEES_TIMEOUT_MS = 20_000;
const READY = /^KATA-TS-GUEST: ready kernel=(\S+)$/;
const BLOCK = /^KATA-TS-BLOCK: ?(.*)$/;

interface PciDevice {
  qdev_id: string;
  slot: number;
  pci_bridge?: { devices?: PciDevice[] };
}

interface LogLine {
  level: number;
  msg: string;
}

/** `vda:2048 vdb:8192` → { vda: 2048, vdb: 8192 } */
describe('QEMU driver with a booted guest (TCG) @integration', function () {
  this.timeout(BOOT_TIMEOUT_MS + 60_000);
  let binary: string | undefined;
  let image: GuestImage;
  let tmp: TempDir;

  before(async function () {
    binary = qemuBinary();
    if (!binary) this.skip();
    this.timeout(600_000); // a cold guest build downloads the kernel package
    image = await ensureGuestImage();
    tmp = new TempDir('kata-ts-qemu-guest-');
  });

  after(async () => {
    if (!tmp) return;
    const left = await qemuLeftBehind(tmp.path);
    killQemuMentioning(tmp.path);
    tmp.cleanup();
    assert.deepEqual(left, [], 'a QEMU process was left running');
  });

  const disk = (name: string, bytes: number): string => sparseFile(path.join(tmp.path, name), bytes);

  async function boot(sandboxId: string, extra = '', logs: LogLine[] = []): Promise<{ running: RunningVm; vm: QemuVm; console: string; readyAt: number; kernel: string }> {
    const validated = await loadValidatedConfig({ text: qemuConfigText({ binary: binary as string, kernel: image.kernel, initrd: image.initrd, extra }) });
    const log = createLogger({ level: 'info', stream: { write: (l: string) => logs.push(JSON.parse(l) as LogLine) } });
    const running = await launchVm(validated, { sandboxId, runRoot: path.join(tmp.path, 'run'), log });
    assert.ok(running.vm instanceof QemuVm);
    const console = SANDBOX_PATHS.consoleLog.replace(SANDBOX_DIR, running.ctx.runDir);
    try {
      const ready = await waitForConsole(console, READY, BOOT_TIMEOUT_MS);
      return { running, vm: running.vm, console, readyAt: ready.end, kernel: ready.match[1] as string };
    } catch (e) {
      await running.stop();
      throw e;
    }
  }

  /** Waits for the guest's next block-device report that satisfies `want`. */
  async function guestBlocks(console: string, from: number, want: (devs: Record<string, number>) => boolean): Promise<{ devs: Record<string, number>; end: number }> {
    let offset = from;
    const until = Date.now() + GUEST_SEES_TIMEOUT_MS;
    for (;;) {
      const { match, end } = await waitForConsole(console, BLOCK, Math.max(1, until - Date.now()), offset);
      const devs = blockList(match[1] ?? '');
      if (want(devs)) return { devs, end };
      offset = end;
    }
  }

  describe('hot-plug, unplug, and QEMU killed from outside', () => {
    let running: RunningVm;
    let vm: QemuVm;
    let console: string;
    let offset: number;
    let loop: string | undefined;
    const logs: LogLine[] = [];

    before(async () => {
      // +vmx: QEMU under TCG warns about it on stderr, so a killed QEMU has a stderr tail to report.
      ({ running, vm, console, readyAt: offset } = await boot('hotplug', 'cpu_features = "+vmx"', logs));
    });

    after(async () => {
      await running?.stop();
      if (loop) execFileSync('losetup', ['-d', loop]);
    });

    it('boots the guest kernel to its /init', async () => {
      assert.equal(vm.accelerator?.accelerator, chooseAccelerator(detectHost(), 'auto').accelerator);
      const { match } = await waitForConsole(console, READY, 1000);
      assert.equal(match[1], image.kernelVersion);
      // No disks yet: the first report is empty.
      const { devs } = await guestBlocks(console, 0, () => true);
      assert.deepEqual(devs, {});
    });

    it('hot-plugs a raw image file that the guest sees with its size, at the PCI path QEMU reports', async () => {
      const plugged = await vm.hotplugBlock({ id: 'image1', path: disk('image1.img', 1024 * 1024) });
      assert.deepEqual(plugged, { id: 'image1', pciPath: '01/00' });
      const seen = await guestBlocks(console, offset, (d) => Object.keys(d).length > 0);
      assert.deepEqual(seen.devs, { vda: 2048 });
      offset = seen.end;
      // The firmware has numbered the buses by now, so query-pci shows the disk behind its port.
      const buses = (await vm.qmp?.execute<{ devices: PciDevice[] }[]>('query-pci')) ?? [];
      const hex = (n: number) => n.toString(16).padStart(2, '0');
      const paths = buses[0]?.devices.flatMap((port) => (port.pci_bridge?.devices ?? []).map((d) => [d.qdev_id, `${hex(port.slot)}/${hex(d.slot)}`])) ?? [];
      assert.deepEqual(Object.fromEntries(paths), { image1: '01/00' });
    });

    it('hot-plugs a loop device as host_device, which the guest sees with its size', async function () {
      if (!losetupAvailable()) this.skip();
      loop = execFileSync('losetup', ['-f', '--show', disk('loop.img', 4 * 1024 * 1024)], { encoding: 'utf8' }).trim();
      const plugged = await vm.hotplugBlock({ id: 'loop1', path: loop });
      assert.equal(plugged.pciPath, '02/00');
      const nodes = (await vm.qmp?.execute<{ 'node-name': string; drv: string; file: string }[]>('query-named-block-nodes', { flat: true })) ?? [];
      assert.ok(nodes.some((n) => n.drv === 'host_device' && n.file === loop), JSON.stringify(nodes));
      const seen = await guestBlocks(console, offset, (d) => Object.keys(d).length === 2);
      assert.deepEqual(seen.devs, { vda: 2048, vdb: 8192 });
      offset = seen.end;
    });

    it('unplugs the disks, and the guest no longer has them', async () => {
      const t = performance.now();
      assert.deepEqual(vm.disks.map((d) => d.id), loop ? ['image1', 'loop1'] : ['image1']);
      await Promise.all(vm.disks.map((d) => running.unplugBlock(d.id)));
      const took = performance.now() - t;
      const seen = await guestBlocks(console, offset, (d) => Object.keys(d).length === 0);
      assert.deepEqual(seen.devs, {});
      offset = seen.end;
      const nodes = (await vm.qmp?.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true })) ?? [];
      assert.deepEqual(nodes.filter((n) => /^(image1|loop1)$/.test(n['node-name'])), []);
      assert.ok(took < 10_000, `unplug took ${took} ms`);
      // The ports are free again: the next disk takes the first one.
      assert.equal((await vm.hotplugBlock({ id: 'again', path: disk('again.img', 512 * 1024) })).pciPath, '01/00');
      const again = await guestBlocks(console, offset, (d) => Object.keys(d).length === 1);
      assert.deepEqual(Object.values(again.devs), [1024]);
      offset = again.end;
    });

    it('reports QEMU killed mid-run as an unexpected exit with its stderr tail, and stop still cleans up', async () => {
      const pid = vm.pid as number;
      process.kill(pid, 'SIGKILL');
      const exit = await vm.exited;
      assert.equal(exit.expected, false);
      assert.equal(exit.signal, 'SIGKILL');
      assert.equal(exit.error?.code, 'KATA_ERR_VM_EXITED');
      assert.ok(exit.stderrTail.some((l) => /vmx/.test(l)), `stderr tail: ${JSON.stringify(exit.stderrTail)}`);
      assert.equal(logs.filter((l) => l.msg === 'QEMU exited unexpectedly' && l.level === 50).length, 1);
      await assert.rejects(running.hotplugBlock({ id: 'late', path: disk('late.img', 4096) }), (e: KataError) => e.code === 'KATA_ERR_HOTPLUG');

      const stopped = await running.stop();
      assert.equal(stopped.expected, false);
      assert.equal(existsSync(running.ctx.runDir), false);
      assert.deepEqual(await qemuLeftBehind(running.ctx.runDir), []);
    });
  });

  describe('stop', () => {
    it('powers the guest off through ACPI, with a disk still attached, and leaves no process, socket, pid file or run directory', async () => {
      const { running, vm, console, readyAt } = await boot('graceful');
      try {
        await vm.hotplugBlock({ id: 'attached', path: disk('attached.img', 1024 * 1024) });
        await guestBlocks(console, readyAt, (d) => d.vda === 2048);
        const shutdowns: QmpEvent[] = [];
        vm.qmp?.onEvent((e) => e.event === 'SHUTDOWN' && shutdowns.push(e));
        const pid = vm.pid as number;
        const runDir = running.ctx.runDir;

        const exit = await running.stop();
        assert.equal(exit.expected, true);
        assert.equal(exit.code, 0);
        assert.equal(exit.signal, null);
        assert.equal((exit as QemuVmExit).error, undefined);
        // The guest powered itself off (ACPI power button → acpid → poweroff), no quit was needed.
        assert.equal(shutdowns[0]?.data.reason, 'guest-shutdown');
        assert.equal(existsSync(`/proc/${pid}/cmdline`) && qemuProcessesMentioning(runDir).length > 0, false);
        assert.equal(existsSync(runDir), false);
      } finally {
        await running.stop();
      }
    });
  });
});
