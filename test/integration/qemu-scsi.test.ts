/**
 * virtio-scsi block hot-plug (block_device_driver = "virtio-scsi", Kata's QEMU default) on a real
 * QEMU with the project's guest booted under TCG, through the core (loadValidatedConfig →
 * launchVm): the plan's scsi-controller intent becomes a virtio-scsi-pci controller, disks are
 * hot-plugged onto it as scsi-hd at Kata's `<id>:<lun>` addresses, and the guest's /init reports
 * the disks it sees on the console (`KATA-TS-BLOCK: sda:2048 …`, 512-byte sectors).
 *
 * One boot: plug a raw image and a loop device, a failing plug that must roll back, unplug, and
 * the released address handed out again.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { KataError } from '../../core/errors.js';
import { createLogger } from '../../core/logger.js';
import { SANDBOX_DIR } from '../../core/plan.js';
import { loadValidatedConfig } from '../../core/runtime.js';
import { launchVm, type RunningVm } from '../../core/vm-lifecycle.js';
import { QEMU_IDS, SANDBOX_PATHS } from '../../plugins/qemu/config.js';
import { QemuVm } from '../../plugins/qemu/driver.js';
import { QmpError } from '../../plugins/qemu/qmp.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { blockList, killQemuMentioning, losetupAvailable, sparseFile, qemuBinary, qemuConfigText, qemuLeftBehind, waitForConsole } from '../helpers/qemu.js';
import { TempDir } from '../helpers/tmp.js';

const BOOT_TIMEOUT_MS = 90_000;
const GUEST_SEES_TIMEOUT_MS = 20_000;
const READY = /^KATA-TS-GUEST: ready kernel=(\S+)$/;
const BLOCK = /^KATA-TS-BLOCK: ?(.*)$/;

interface PciDevice {
  qdev_id: string;
  class_info: { class: number };
  id: { device: number; vendor: number };
}

/** `sda:2048 sdb:8192` → { sda: 2048, sdb: 8192 } */
describe('QEMU virtio-scsi block hot-plug with a booted guest (TCG) @integration', function () {
  this.timeout(BOOT_TIMEOUT_MS + 60_000);
  let binary: string | undefined;
  let image: GuestImage;
  let tmp: TempDir;
  let running: RunningVm;
  let vm: QemuVm;
  let console: string;
  let offset = 0;
  let loop: string | undefined;

  before(async function () {
    binary = qemuBinary();
    if (!binary) this.skip();
    this.timeout(600_000); // a cold guest build downloads the kernel package
    image = await ensureGuestImage();
    tmp = new TempDir('kata-ts-qemu-scsi-');
    const validated = await loadValidatedConfig({ text: qemuConfigText({ binary, kernel: image.kernel, initrd: image.initrd, blockDriver: 'virtio-scsi' }) });
    running = await launchVm(validated, { sandboxId: 'scsi', runRoot: path.join(tmp.path, 'run'), log: createLogger({ level: 'silent' }) });
    assert.ok(running.vm instanceof QemuVm);
    vm = running.vm;
    console = SANDBOX_PATHS.consoleLog.replace(SANDBOX_DIR, running.ctx.runDir);
    offset = (await waitForConsole(console, READY, BOOT_TIMEOUT_MS)).end;
  });

  after(async () => {
    await running?.stop();
    if (loop) execFileSync('losetup', ['-d', loop]);
    if (!tmp) return;
    const left = await qemuLeftBehind(tmp.path);
    killQemuMentioning(tmp.path);
    tmp.cleanup();
    assert.deepEqual(left, [], 'a QEMU process was left running');
  });

  const disk = (name: string, bytes: number): string => sparseFile(path.join(tmp.path, name), bytes);

  /** Waits for the guest's next block-device report that satisfies `want`. */
  async function guestBlocks(want: (devs: Record<string, number>) => boolean): Promise<Record<string, number>> {
    const until = Date.now() + GUEST_SEES_TIMEOUT_MS;
    for (;;) {
      const { match, end } = await waitForConsole(console, BLOCK, Math.max(1, until - Date.now()), offset);
      offset = end;
      const devs = blockList(match[1] ?? '');
      if (want(devs)) return devs;
    }
  }

  async function blockNodeNames(): Promise<string[]> {
    return ((await vm.qmp?.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true })) ?? []).map((n) => n['node-name']);
  }

  async function scsiAddressInQemu(id: string): Promise<string> {
    const qmp = vm.qmp as NonNullable<QemuVm['qmp']>;
    const get = (property: string) => qmp.execute<number>('qom-get', { path: `/machine/peripheral/${id}`, property });
    return `${await get('scsi-id')}:${await get('lun')}`;
  }

  it('boots with a virtio-scsi-pci controller from the plan, and the guest sees no disk yet', async () => {
    assert.deepEqual(running.ctx.plan.vm.devices.filter((d) => d.kind === 'scsi-controller'), [{ kind: 'scsi-controller', id: QEMU_IDS.scsiController }]);
    const buses = (await vm.qmp?.execute<{ devices: PciDevice[] }[]>('query-pci')) ?? [];
    const controller = buses[0]?.devices.find((d) => d.qdev_id === QEMU_IDS.scsiController);
    // virtio-scsi: Red Hat's virtio vendor id, a SCSI storage controller (class 0x0100).
    assert.equal(controller?.id.vendor, 0x1af4);
    assert.equal(controller?.class_info.class, 0x0100);
    const cmdline = readFileSync(`/proc/${vm.pid}/cmdline`, 'latin1').split('\0');
    assert.ok(cmdline.includes(`virtio-scsi-pci,id=${QEMU_IDS.scsiController}`), cmdline.join(' '));
    assert.deepEqual(await guestBlocks(() => true), {});
  });

  it('hot-plugs a raw image as a SCSI disk at 0:0 that the guest sees with its size', async () => {
    const plugged = await vm.hotplugBlock({ id: 'image1', path: disk('image1.img', 1024 * 1024) });
    assert.deepEqual(plugged, { id: 'image1', scsiAddr: '0:0' });
    assert.equal(await scsiAddressInQemu('image1'), '0:0');
    assert.deepEqual(await guestBlocks((d) => Object.keys(d).length > 0), { sda: 2048 });
  });

  it('hot-plugs a loop device as host_device at the next LUN, which the guest sees with its size', async function () {
    if (!losetupAvailable()) this.skip();
    loop = execFileSync('losetup', ['-f', '--show', disk('loop.img', 4 * 1024 * 1024)], { encoding: 'utf8' }).trim();
    const plugged = await vm.hotplugBlock({ id: 'loop1', path: loop });
    assert.deepEqual(plugged, { id: 'loop1', scsiAddr: '0:1' });
    assert.equal(await scsiAddressInQemu('loop1'), '0:1');
    const nodes = (await vm.qmp?.execute<{ 'node-name': string; drv: string; file: string }[]>('query-named-block-nodes', { flat: true })) ?? [];
    assert.ok(nodes.some((n) => n.drv === 'host_device' && n.file === loop), JSON.stringify(nodes));
    assert.deepEqual(await guestBlocks((d) => Object.keys(d).length === 2), { sda: 2048, sdb: 8192 });
  });

  it('rolls back a plug whose device_add fails: no block node is left and no address is used up', async () => {
    const before = vm.disks;
    // The controller's own qdev id: blockdev-add accepts it as a node name, device_add refuses the duplicate id.
    const err = await vm.hotplugBlock({ id: QEMU_IDS.scsiController, path: disk('clash.img', 1024 * 1024) }).then(
      () => assert.fail('hot-plug succeeded'),
      (e: KataError) => e,
    );
    assert.equal(err.code, 'KATA_ERR_HOTPLUG');
    assert.equal(err.plugin, 'qemu');
    assert.ok(err.cause instanceof QmpError);
    assert.equal(err.cause.command, 'device_add');
    assert.ok(!(await blockNodeNames()).includes(QEMU_IDS.scsiController));
    assert.deepEqual(vm.disks, before);
    // The address the failed plug was given is the next one handed out.
    assert.deepEqual(await vm.hotplugBlock({ id: 'next', path: disk('next.img', 1024 * 1024) }), { id: 'next', scsiAddr: `0:${before.length}` });
    await vm.unplugBlock('next');
    assert.deepEqual(vm.disks, before);
  });

  it('unplugs the disks, the guest no longer has them, and the released address is handed out again', async () => {
    assert.deepEqual(vm.disks.map((d) => d.id), loop ? ['image1', 'loop1'] : ['image1']);
    await Promise.all(vm.disks.map((d) => running.unplugBlock(d.id)));
    assert.deepEqual(await guestBlocks((d) => Object.keys(d).length === 0), {});
    assert.deepEqual((await blockNodeNames()).filter((n) => /^(image1|loop1)$/.test(n)), []);
    assert.deepEqual(vm.disks, []);
    assert.deepEqual(await vm.hotplugBlock({ id: 'again', path: disk('again.img', 512 * 1024) }), { id: 'again', scsiAddr: '0:0' });
    const again = await guestBlocks((d) => Object.keys(d).length === 1);
    assert.deepEqual(Object.values(again), [1024]);
  });
});
