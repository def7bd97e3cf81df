/** Storages to mounts (guest/agent/storage.ts), with the device lookup stubbed. */
import assert from 'node:assert/strict';
import type { Storage } from '../../../wire/agent/proto.gen.js';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { STORAGE_DRIVERS, checkGuestPath, mountArgs, planStorage } from '../../../guest/agent/storage.js';

const hasCode = (code: number) => (e: unknown) => e instanceof TtrpcError && e.code === code;
const storage = (s: Partial<Storage>): Storage => ({ driver: '', driverOptions: [], source: '', fstype: '', options: [], mountPoint: '/run/m', shared: false, ...s });
const devices: string[] = [];
const device = async (driver: 'blk' | 'scsi', source: string) => {
  devices.push(`${driver} ${source}`);
  return driver === 'scsi' ? '/dev/sda' : '/dev/vda';
};

describe('guest agent: storages', () => {
  beforeEach(() => (devices.length = 0));

  it('mounts a blk storage from the device its PCI path names', async () => {
    const plan = await planStorage(storage({ driver: 'blk', source: '05/00', fstype: 'ext4', options: ['ro'], mountPoint: '/run/kata-containers/shared/containers/c1/' }), device);
    assert.deepEqual(devices, ['blk 05/00']);
    assert.deepEqual(plan, { kind: 'mount', source: '/dev/vda', target: '/run/kata-containers/shared/containers/c1', fstype: 'ext4', options: ['ro'] });
    assert.deepEqual(mountArgs(plan as Extract<typeof plan, { kind: 'mount' }>), ['-t', 'ext4', '-o', 'ro', '/dev/vda', '/run/kata-containers/shared/containers/c1']);
  });

  it('mounts a scsi storage from the disk its "<id>:<lun>" address names', async () => {
    const plan = await planStorage(storage({ driver: 'scsi', source: '0:3', fstype: 'ext4', mountPoint: '/run/kata-containers/containers/c1/rootfs' }), device);
    assert.deepEqual(devices, ['scsi 0:3']);
    assert.deepEqual(plan, { kind: 'mount', source: '/dev/sda', target: '/run/kata-containers/containers/c1/rootfs', fstype: 'ext4', options: [] });
  });

  it('refuses a bad SCSI address, or no fstype, before waiting for any device', async () => {
    for (const source of ['', '0', '0:', ':1', '0:1:2', '256:0', '0:16384', '-1:0', '0x1:0', '0:1 ', '../0:1']) {
      await assert.rejects(planStorage(storage({ driver: 'scsi', source, fstype: 'ext4' }), device), hasCode(GrpcCode.INVALID_ARGUMENT), source);
    }
    await assert.rejects(planStorage(storage({ driver: 'scsi', source: '0:1' }), device), hasCode(GrpcCode.INVALID_ARGUMENT), 'no fstype');
    await assert.rejects(planStorage(storage({ driver: 'scsi', source: '0:1', fstype: 'ext4,exec' }), device), hasCode(GrpcCode.INVALID_ARGUMENT));
    assert.deepEqual(devices, []);
  });

  it('refuses a bad PCI path before waiting for any device', async () => {
    await assert.rejects(planStorage(storage({ driver: 'blk', source: 'zz', fstype: 'ext4' }), device), hasCode(GrpcCode.INVALID_ARGUMENT));
    await assert.rejects(planStorage(storage({ driver: 'blk', source: '05/00' }), device), hasCode(GrpcCode.INVALID_ARGUMENT), 'no fstype');
    assert.deepEqual(devices, []);
  });

  it('mounts the 9p share over virtio with 9P2000.L unless told otherwise', async () => {
    assert.deepEqual(await planStorage(storage({ driver: '9p', source: 'kataShared', options: ['nodev'] }), device), {
      kind: 'mount', source: 'kataShared', target: '/run/m', fstype: '9p', options: ['trans=virtio', 'nodev', 'version=9p2000.L'],
    });
    const own = await planStorage(storage({ driver: '9p', source: 'tag', options: ['trans=fd', 'version=9p2000.u'] }), device);
    assert.deepEqual(own.kind === 'mount' && own.options, ['trans=fd', 'version=9p2000.u']);
  });

  it('mounts virtio-fs, ephemeral tmpfs, and makes local directories', async () => {
    assert.deepEqual(await planStorage(storage({ driver: 'virtio-fs', source: 'kataShared' }), device), { kind: 'mount', source: 'kataShared', target: '/run/m', fstype: 'virtiofs', options: [] });
    assert.deepEqual(await planStorage(storage({ driver: 'ephemeral', options: ['size=1m'] }), device), { kind: 'mount', source: 'tmpfs', target: '/run/m', fstype: 'tmpfs', options: ['size=1m'] });
    assert.deepEqual(await planStorage(storage({ driver: 'local', options: ['mode=0750'] }), device), { kind: 'dir', target: '/run/m', mode: 0o750 });
  });

  it('refuses unknown drivers and relative or climbing mount points', async () => {
    await assert.rejects(planStorage(storage({ driver: 'nvdimm', source: '/dev/pmem1' }), device), (e: unknown) => hasCode(GrpcCode.INVALID_ARGUMENT)(e) && /unknown driver "nvdimm"/.test((e as Error).message));
    await assert.rejects(planStorage(storage({ driver: 'ephemeral', mountPoint: 'run/m' }), device), hasCode(GrpcCode.INVALID_ARGUMENT));
    assert.throws(() => checkGuestPath('/run/../etc', 'x'), hasCode(GrpcCode.INVALID_ARGUMENT));
    assert.equal(checkGuestPath('/run//a/./b/', 'x'), '/run/a/b');
    assert.equal(checkGuestPath('/', 'x'), '/');
  });

  it('refuses a source that busybox mount would read as an option, and a filesystem type that is not a word', async () => {
    for (const driver of ['9p', 'virtio-fs']) {
      await assert.rejects(planStorage(storage({ driver, source: '-oremount,exec' }), device), (e: unknown) => hasCode(GrpcCode.INVALID_ARGUMENT)(e) && /source "-oremount,exec" must not be empty or start with "-"/.test((e as Error).message), driver);
      await assert.rejects(planStorage(storage({ driver, source: 'tag', fstype: '9p -o exec' }), device), hasCode(GrpcCode.INVALID_ARGUMENT), driver);
    }
    await assert.rejects(planStorage(storage({ driver: 'mmioblk', source: '/dev/vdb', fstype: '-oexec' }), device), hasCode(GrpcCode.INVALID_ARGUMENT));
    await assert.rejects(planStorage(storage({ driver: 'blk', source: '05/00', fstype: 'ext4,exec' }), device), hasCode(GrpcCode.INVALID_ARGUMENT));
    assert.deepEqual(devices, []);
  });

  it('lists the drivers it handles, with kata-agent names', () => {
    assert.deepEqual([...STORAGE_DRIVERS], ['blk', 'scsi', 'mmioblk', '9p', 'virtio-fs', 'ephemeral', 'local']);
  });
});
