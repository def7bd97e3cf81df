import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { MAX_RESEED_BYTES, reseedRandomDev, setGuestDateTime } from '../../../guest/agent/clone.js';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TempDir } from '../../helpers/tmp.js';

describe('guest agent: what a clone needs (ReseedRandomDev, SetGuestDateTime)', () => {
  let tmp: TempDir;
  let paths: { random: string; urandom: string; machineId: string };
  beforeEach(() => {
    tmp = new TempDir('kata-agent-clone-');
    paths = { random: path.join(tmp.path, 'random'), urandom: '/dev/urandom', machineId: path.join(tmp.path, 'machine-id') };
    writeFileSync(paths.random, '');
  });
  afterEach(() => tmp.cleanup());

  it('writes the host bytes to the random device and gives the guest a new machine id each time', async () => {
    const data = Buffer.from('host entropy');
    const first = await reseedRandomDev(data, paths);
    assert.deepEqual(readFileSync(paths.random), data);
    assert.equal(readFileSync(paths.machineId, 'utf8'), `${first}\n`);
    assert.match(first, /^[0-9a-f]{32}$/);
    const second = await reseedRandomDev(data, paths);
    assert.notEqual(second, first);
  });

  it('refuses an empty or oversized request as INVALID_ARGUMENT, writing nothing', async () => {
    for (const data of [Buffer.alloc(0), Buffer.alloc(MAX_RESEED_BYTES + 1)]) {
      await assert.rejects(reseedRandomDev(data, paths), (e: { code?: number }) => e.code === GrpcCode.INVALID_ARGUMENT);
    }
    assert.equal(readFileSync(paths.random).length, 0);
  });

  it('refuses a time before 2000 as INVALID_ARGUMENT', async () => {
    await assert.rejects(setGuestDateTime(12n), (e: { code?: number }) => e.code === GrpcCode.INVALID_ARGUMENT);
  });
});
