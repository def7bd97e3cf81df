/** The builder's agent archive (guest/image/agent-payload.ts) and the initramfs reader (guest/image/cpio.ts). */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { parseLdd } from '../../../guest/image/agent-payload.js';
import { CpioGzWriter, CpioWriter, gzipMemberLength, readInitramfs } from '../../../guest/image/cpio.js';
import { TempDir } from '../../helpers/tmp.js';

describe('guest image: the agent archive', () => {
  it('takes every library ldd lists, the loader included, but not the vDSO', () => {
    const out = `\tlinux-vdso.so.1 (0x00007ffd)\n\tlibdl.so.2 => /lib/x86_64-linux-gnu/libdl.so.2 (0x00007f1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n`;
    assert.deepEqual(parseLdd(out), ['/lib/x86_64-linux-gnu/libdl.so.2', '/lib/x86_64-linux-gnu/libc.so.6', '/lib64/ld-linux-x86-64.so.2']);
    assert.deepEqual(parseLdd('\tnot a dynamic executable\n'), []);
    assert.throws(() => parseLdd('\tlibfoo.so.1 => not found\n'), /libfoo\.so\.1 not found/);
  });

  it('reads an initramfs of a gzip archive, padding and a plain archive, later entries winning', async () => {
    const tmp = new TempDir('kata-ts-cpio-');
    try {
      const base = path.join(tmp.path, 'base.gz');
      const w1 = new CpioGzWriter(base);
      await w1.add({ kind: 'dir', path: 'agent', mode: 0o755 });
      await w1.add({ kind: 'file', path: 'init', mode: 0o755, data: Buffer.from('#!/bin/sh\n') });
      await w1.add({ kind: 'file', path: 'agent/start', mode: 0o644, data: Buffer.from('old') });
      await w1.finish();
      const plain = path.join(tmp.path, 'agent.cpio');
      const w2 = new CpioWriter(plain, { gzip: false });
      await w2.add({ kind: 'file', path: 'agent/start', mode: 0o755, data: Buffer.from('new') });
      await w2.add({ kind: 'symlink', path: 'agent/link', target: 'start' });
      await w2.finish();
      const b = readFileSync(base);
      assert.equal(gzipMemberLength(b), b.length);
      const whole = Buffer.concat([b, Buffer.alloc((4 - (b.length % 4)) % 4), readFileSync(plain)]);
      writeFileSync(path.join(tmp.path, 'initrd'), whole);
      const files = readInitramfs(whole);
      assert.equal(files.get('init')?.data.toString(), '#!/bin/sh\n');
      assert.equal(files.get('agent/start')?.data.toString(), 'new');
      assert.equal((files.get('agent/start')?.mode ?? 0) & 0o777, 0o755);
      assert.equal(files.get('agent/link')?.data.toString(), 'start');
      assert.equal(readFileSync(plain).subarray(0, 6).toString(), '070701', 'the agent archive is not compressed');
      assert.equal(gzipMemberLength(Buffer.concat([gzipSync('x'), Buffer.from('070701')])), gzipSync('x').length);
    } finally {
      tmp.cleanup();
    }
  });
});
