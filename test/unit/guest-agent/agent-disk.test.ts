import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { DAX_HEADER, PARTITION_OFFSET, fletcher64, mbr, pfnInfoBlock, writeAgentDisk } from '../../../guest/image/agent-disk.js';
import { TempDir } from '../../helpers/tmp.js';

describe('agent disk (guest/image/agent-disk.ts)', () => {
  it('writes an MBR with one Linux partition at the given LBA and length', () => {
    const b = mbr(PARTITION_OFFSET, 8 * 1024 * 1024);
    assert.equal(b.length, 512);
    assert.equal(b[446 + 4], 0x83);
    assert.equal(b.readUInt32LE(446 + 8), 2048);
    assert.equal(b.readUInt32LE(446 + 12), 16384);
    assert.equal(b.readUInt16LE(510), 0xaa55);
    assert.throws(() => mbr(100, 512), RangeError);
  });

  it('computes Linux nd_fletcher64 over little-endian 32-bit words', () => {
    // words 1, 2, 3: lo = 1, 3, 6; hi = 1 + 3 + 6 = 10
    const b = Buffer.alloc(12);
    b.writeUInt32LE(1, 0);
    b.writeUInt32LE(2, 4);
    b.writeUInt32LE(3, 8);
    assert.equal(fletcher64(b), (10n << 32n) | 6n);
    // lo wraps at 32 bits
    const w = Buffer.alloc(8, 0xff);
    assert.equal(fletcher64(w) & 0xffff_ffffn, 0xffff_fffen);
  });

  it('writes an nd_pfn_sb (fsdax, page structs in RAM, data at 2 MiB) whose checksum Linux accepts', () => {
    const size = 64 * 1024 * 1024;
    const sb = pfnInfoBlock(size);
    assert.equal(sb.length, 4096);
    assert.equal(sb.toString('latin1', 0, 16), 'NVDIMM_PFN_INFO\0');
    assert.deepEqual(sb.subarray(32, 48), Buffer.alloc(16), 'a raw namespace has a zero parent uuid');
    assert.equal(sb.readBigUInt64LE(56), BigInt(DAX_HEADER));
    assert.equal(sb.readBigUInt64LE(64), BigInt((size - DAX_HEADER) / 4096));
    assert.equal(sb.readUInt32LE(72), 1, 'PFN_MODE_RAM');
    const stored = sb.readBigUInt64LE(4088);
    const zeroed = Buffer.from(sb);
    zeroed.writeBigUInt64LE(0n, 4088);
    assert.equal(fletcher64(zeroed), stored);
  });

  it('makes a 2 MiB-aligned image whose partition holds the tree as ext4 (read back with debugfs)', async function () {
    if (spawnSync('mke2fs', ['-V']).error || spawnSync('debugfs', ['-V']).error) this.skip();
    const tmp = new TempDir('kata-ts-agent-disk-unit-');
    try {
      tmp.file('tree/agent/start', '#!/bin/sh\necho hi\n');
      tmp.file('tree/lib/x86_64-linux-gnu/libz.so', 'not really a library');
      const out = path.join(tmp.path, 'agent.img');
      const bytes = await writeAgentDisk(path.join(tmp.path, 'tree'), out);
      assert.equal(statSync(out).size, bytes);
      assert.equal(bytes % (2 * 1024 * 1024), 0);
      const img = readFileSync(out);
      const start = img.readUInt32LE(446 + 8) * 512;
      assert.equal(start, DAX_HEADER + PARTITION_OFFSET);
      assert.equal(img.readUInt32LE(DAX_HEADER + 446 + 8) * 512, PARTITION_OFFSET);
      const r = spawnSync('debugfs', ['-R', 'cat /agent/start', `${out}?offset=${start}`], { encoding: 'utf8' });
      assert.equal(r.stdout, '#!/bin/sh\necho hi\n', r.stderr);
    } finally {
      tmp.cleanup();
    }
  });
});
