/**
 * BlockHotplug's virtio-scsi numbering and slot bookkeeping (plugins/qemu/hotplug.ts) against a
 * recording stand-in for the QMP client: which QMP commands go out, with which arguments. What
 * QEMU and the guest make of them is in test/integration/qemu-scsi.test.ts.
 */
import assert from 'node:assert/strict';
import { silentLogger } from '../../../core/logger.js';
import { KataError } from '../../../core/errors.js';
import { SCSI_MAX_DISKS } from '../../../plugins/qemu/config.js';
import { BlockHotplug, scsiAddress, scsiIdLun } from '../../../plugins/qemu/hotplug.js';
import type { QmpClient, QmpEvent } from '../../../plugins/qemu/qmp.js';
import { TempDir } from '../../helpers/tmp.js';

interface Sent {
  readonly command: string;
  readonly args: Record<string, unknown> | undefined;
}

/** Answers every command with {} and emits DEVICE_DELETED right after a device_del, as QEMU does for scsi-hd. */
function recordingQmp(): { qmp: QmpClient; sent: Sent[] } {
  const sent: Sent[] = [];
  const listeners: ((e: QmpEvent) => void)[] = [];
  let cursor = 0;
  const qmp = {
    get eventCursor() {
      return cursor;
    },
    async execute(command: string, args?: Record<string, unknown>) {
      sent.push({ command, args });
      if (command === 'device_del') {
        cursor++;
        for (const l of listeners) l({ event: 'DEVICE_DELETED', data: { device: args?.id } } as unknown as QmpEvent);
      }
      return {};
    },
    onEvent(l: (e: QmpEvent) => void) {
      listeners.push(l);
      return () => undefined;
    },
    async waitForEvent() {
      return { event: 'DEVICE_DELETED', data: {} } as unknown as QmpEvent;
    },
  };
  return { qmp: qmp as unknown as QmpClient, sent };
}

describe('qemu BlockHotplug on a virtio-scsi controller', () => {
  let tmp: TempDir;
  let img: string;
  beforeEach(() => {
    tmp = new TempDir('kata-ts-scsi-hp-');
    img = tmp.file('disk.img', '');
  });
  afterEach(() => tmp.cleanup());

  it("numbers disks as Kata's GetSCSIIdLun does: 256 LUNs per SCSI id", () => {
    assert.deepEqual(scsiIdLun(0), { scsiId: 0, lun: 0 });
    assert.deepEqual(scsiIdLun(255), { scsiId: 0, lun: 255 });
    assert.deepEqual(scsiIdLun(256), { scsiId: 1, lun: 0 });
    assert.equal(scsiAddress(257), '1:1');
  });

  it('adds a scsi-hd on the controller at its id and LUN, without iommu_platform (the controller carries it)', async () => {
    const { qmp, sent } = recordingQmp();
    const hp = new BlockHotplug(qmp, { hotplugPorts: ['rp0'], virtioIommuPlatform: true, scsiController: 'scsi0' }, silentLogger());
    assert.deepEqual(await hp.plug({ id: 'a', path: img }), { id: 'a', scsiAddr: '0:0' });
    assert.deepEqual(await hp.plug({ id: 'b', path: img, readonly: true }), { id: 'b', scsiAddr: '0:1' });
    assert.deepEqual(
      sent.filter((s) => s.command === 'device_add').map((s) => s.args),
      [
        { driver: 'scsi-hd', id: 'a', drive: 'a', bus: 'scsi0.0', 'scsi-id': 0, lun: 0 },
        { driver: 'scsi-hd', id: 'b', drive: 'b', bus: 'scsi0.0', 'scsi-id': 0, lun: 1 },
      ],
    );
    assert.deepEqual(hp.disks, [
      { id: 'a', scsiAddr: '0:0' },
      { id: 'b', scsiAddr: '0:1' },
    ]);
    // Unplugged, the lowest address is free again; the root ports were never used.
    await hp.unplug('a');
    assert.deepEqual(await hp.plug({ id: 'c', path: img }), { id: 'c', scsiAddr: '0:0' });
    assert.ok(!sent.some((s) => s.args?.bus === 'rp0'));
  });

  it(`refuses the disk after ${SCSI_MAX_DISKS} with KATA_ERR_HOTPLUG_NO_SLOT, before any QMP command for it`, async () => {
    const { qmp, sent } = recordingQmp();
    const hp = new BlockHotplug(qmp, { hotplugPorts: [], virtioIommuPlatform: false, scsiController: 'scsi0' }, silentLogger());
    const all = await Promise.all(Array.from({ length: SCSI_MAX_DISKS }, (_, i) => hp.plug({ id: `d${i}`, path: img })));
    assert.equal(all.at(-1)?.scsiAddr, scsiAddress(SCSI_MAX_DISKS - 1));
    const before = sent.length;
    await assert.rejects(hp.plug({ id: 'over', path: img }), (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_HOTPLUG_NO_SLOT' && e.plugin === 'qemu');
    assert.equal(sent.length, before);
  });
});
