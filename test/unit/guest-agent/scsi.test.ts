/**
 * SCSI address → block device (guest/agent/scsi.ts), against a fake sysfs laid out as a q35
 * guest's: host0 is another SCSI host (AHCI), host2 the virtio-scsi controller, whose disk at
 * target 0, LUN 3 shows up as /sys/class/scsi_disk/2:0:0:3/device/block/sdb.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { parseScsiAddress, scsiBlockDeviceName, virtioScsiHosts, waitForScsiBlockDevice } from '../../../guest/agent/scsi.js';
import { TempDir } from '../../helpers/tmp.js';

const hasCode = (code: number) => (e: unknown) => e instanceof TtrpcError && e.code === code;

describe('guest agent: SCSI addresses', () => {
  let tmp: TempDir;
  let sys: string;
  let dev: string;

  function host(n: number, procName: string): void {
    const dir = path.join(sys, 'class', 'scsi_host', `host${n}`);
    mkdirSync(dir, { recursive: true });
    writeFileSync(path.join(dir, 'proc_name'), `${procName}\n`);
    writeFileSync(path.join(dir, 'scan'), '');
  }

  /** What sd_mod leaves in sysfs and devtmpfs for a disk at `<host>:0:<id>:<lun>`. */
  function plugDisk(hctl: string, name: string): void {
    mkdirSync(path.join(sys, 'class', 'scsi_disk', hctl, 'device', 'block', name), { recursive: true });
    writeFileSync(path.join(dev, name), '');
  }

  beforeEach(() => {
    tmp = new TempDir('kata-ts-scsi-');
    sys = path.join(tmp.path, 'sys');
    dev = path.join(tmp.path, 'dev');
    mkdirSync(dev);
    host(0, 'ahci');
    host(2, 'virtio_scsi');
    // The AHCI host's disk at the same id:lun must never be taken for the hot-plugged one.
    plugDisk('0:0:0:3', 'sda');
  });
  afterEach(() => tmp.cleanup());

  it('parses "<id>:<lun>" in decimal within virtio-scsi limits', () => {
    assert.deepEqual(parseScsiAddress('0:3'), { id: 0, lun: 3 });
    assert.deepEqual(parseScsiAddress('255:16383'), { id: 255, lun: 16383 });
    for (const bad of ['', '3', '0:', '256:0', '0:16384', 'a:1', '0:1/..', ' 0:1']) assert.throws(() => parseScsiAddress(bad), hasCode(GrpcCode.INVALID_ARGUMENT), bad);
  });

  it('looks only at hosts whose driver is virtio_scsi', async () => {
    assert.deepEqual(await virtioScsiHosts(sys), [2]);
    assert.equal(await scsiBlockDeviceName({ id: 0, lun: 3 }, sys), undefined);
    plugDisk('2:0:0:3', 'sdb');
    assert.equal(await scsiBlockDeviceName({ id: 0, lun: 3 }, sys), 'sdb');
    assert.equal(await scsiBlockDeviceName({ id: 0, lun: 4 }, sys), undefined);
  });

  it('waits for a disk that appears later, asking the virtio-scsi host to scan its address once', async () => {
    setTimeout(() => plugDisk('2:0:1:4', 'sdc'), 100);
    assert.equal(await waitForScsiBlockDevice({ id: 1, lun: 4 }, { timeoutMs: 5000, sysfsRoot: sys, devRoot: dev, pollMs: 10 }), path.join(dev, 'sdc'));
    assert.equal(readFileSync(path.join(sys, 'class', 'scsi_host', 'host2', 'scan'), 'utf8'), '0 1 4');
    assert.equal(readFileSync(path.join(sys, 'class', 'scsi_host', 'host0', 'scan'), 'utf8'), '', 'the AHCI host is not asked');
  });

  it('gives up after its deadline with DEADLINE_EXCEEDED, saying what is missing', async () => {
    const started = Date.now();
    await assert.rejects(
      waitForScsiBlockDevice({ id: 0, lun: 9 }, { timeoutMs: 150, sysfsRoot: sys, devRoot: dev, pollMs: 10 }),
      (e: unknown) => hasCode(GrpcCode.DEADLINE_EXCEEDED)(e) && /SCSI disk 0:9 did not appear within 150 ms \(no disk at <host>:0:0:9/.test((e as Error).message),
    );
    assert.ok(Date.now() - started < 2000);
  });

  it('says when there is no virtio_scsi host at all', async () => {
    writeFileSync(path.join(sys, 'class', 'scsi_host', 'host2', 'proc_name'), 'ata_piix\n');
    await assert.rejects(
      waitForScsiBlockDevice({ id: 0, lun: 0 }, { timeoutMs: 50, sysfsRoot: sys, devRoot: dev, pollMs: 10 }),
      (e: unknown) => hasCode(GrpcCode.DEADLINE_EXCEEDED)(e) && /no virtio_scsi host/.test((e as Error).message),
    );
  });
});
