/**
 * PCI path → block device, against a fake sysfs laid out as a q35 guest's is (checked in a real
 * guest): a pcie-root-port at 00:05.0 whose secondary bus 01 holds a hot-plugged virtio-blk.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { blockDeviceIn, formatPciPath, parsePciPath, resolvePciPath, waitForPciBlockDevice } from '../../../guest/agent/pci.js';
import { TempDir } from '../../helpers/tmp.js';

const hasCode = (code: number) => (e: unknown) => e instanceof TtrpcError && e.code === code;

describe('guest agent: PCI paths', () => {
  let tmp: TempDir;
  let sys: string;
  let dev: string;
  const rootPort = () => path.join(sys, 'devices', 'pci0000:00', '0000:00:05.0');

  beforeEach(() => {
    tmp = new TempDir('kata-ts-pci-');
    sys = path.join(tmp.path, 'sys');
    dev = path.join(tmp.path, 'dev');
    mkdirSync(dev);
    mkdirSync(path.join(rootPort(), 'pci_bus', '0000:01'), { recursive: true });
    mkdirSync(path.join(sys, 'devices', 'pci0000:00', '0000:00:01.0', 'virtio0', 'virtio-ports', 'vport0p1'), { recursive: true });
  });
  afterEach(() => tmp.cleanup());

  /** What hot-plugging a virtio-blk into the root port leaves in sysfs and devtmpfs. */
  function plugDisk(name = 'vda', virtio = 'virtio3'): void {
    mkdirSync(path.join(rootPort(), '0000:01:00.0', virtio, 'block', name), { recursive: true });
    writeFileSync(path.join(dev, name), '');
  }

  it('parses slots in hex, with optional functions, and prints them back', () => {
    assert.deepEqual(parsePciPath('05/00'), [
      { slot: 5, fn: 0 },
      { slot: 0, fn: 0 },
    ]);
    assert.deepEqual(parsePciPath('1f.7'), [{ slot: 0x1f, fn: 7 }]);
    assert.equal(formatPciPath(parsePciPath('5/0.1')), '05/00.1');
  });

  it('refuses malformed paths with INVALID_ARGUMENT', () => {
    for (const bad of ['', 'zz/00', '20/00', '05//00', '05/00.8', '/05', '05/', '123']) {
      assert.throws(() => parsePciPath(bad), hasCode(GrpcCode.INVALID_ARGUMENT), bad);
    }
  });

  it('walks from the root bus through the bridge to the device', async () => {
    plugDisk();
    const r = await resolvePciPath(parsePciPath('05/00'), sys);
    assert.deepEqual(r, { found: true, sysfsDir: path.join(rootPort(), '0000:01:00.0') });
  });

  it('follows the bus number the bridge reports, not the depth', async () => {
    mkdirSync(path.join(sys, 'devices', 'pci0000:00', '0000:00:02.0', 'pci_bus', '0000:07'), { recursive: true });
    mkdirSync(path.join(sys, 'devices', 'pci0000:00', '0000:00:02.0', '0000:07:03.0', 'virtio1', 'block', 'vdb'), { recursive: true });
    const r = await resolvePciPath(parsePciPath('02/03'), sys);
    assert.ok(r.found);
    assert.equal(await blockDeviceIn(r.sysfsDir), 'vdb');
  });

  it('says which step is missing before the device is plugged in', async () => {
    const r = await resolvePciPath(parsePciPath('05/00'), sys);
    assert.equal(r.found, false);
    assert.ok(!r.found && r.missing.endsWith('0000:00:05.0/0000:01:00.0'));
    const notBridge = await resolvePciPath(parsePciPath('01/00'), sys);
    assert.ok(!notBridge.found && /not a PCI bridge/.test(notBridge.why));
  });

  it('finds the block device a virtio driver registered under the PCI device', async () => {
    plugDisk('vdc', 'virtio7');
    assert.equal(await blockDeviceIn(path.join(rootPort(), '0000:01:00.0')), 'vdc');
    assert.equal(await blockDeviceIn(path.join(sys, 'devices', 'pci0000:00', '0000:00:01.0')), undefined, 'a virtio-serial device has no block device');
  });

  it('waits for a device hot-plugged after the call and returns its /dev node', async () => {
    setTimeout(() => plugDisk(), 60);
    const t0 = Date.now();
    assert.equal(await waitForPciBlockDevice(parsePciPath('05/00'), { timeoutMs: 5000, sysfsRoot: sys, devRoot: dev, pollMs: 5 }), path.join(dev, 'vda'));
    assert.ok(Date.now() - t0 >= 50);
  });

  it('gives up with DEADLINE_EXCEEDED naming what never appeared', async () => {
    await assert.rejects(waitForPciBlockDevice(parsePciPath('05/00'), { timeoutMs: 50, sysfsRoot: sys, devRoot: dev, pollMs: 5 }), (e: unknown) => {
      assert.ok(hasCode(GrpcCode.DEADLINE_EXCEEDED)(e));
      assert.match((e as Error).message, /05\/00 did not appear within 50 ms \(no PCI device 0000:01:00\.0\)/);
      return true;
    });
  });
});
