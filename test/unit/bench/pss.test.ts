import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { pssKiB, rollupField, splitQemuSmaps, ussKiB } from '../../../bench/pss.js';

/** One smaps entry: a header line and the fields the splitter reads. */
const entry = (range: string, perms: string, name: string, pssKiB: number) =>
  `${range} ${perms} 00000000 00:00 0 ${name}\nSize: 4 kB\nRss: ${pssKiB} kB\nPss: ${pssKiB} kB\nPss_Dirty: ${pssKiB} kB\n`;

describe('splitQemuSmaps', () => {
  it('files each mapping under guest RAM, TCG buffer, heap, files or other anonymous memory', () => {
    const text = [
      // 512 MiB of guest RAM (anonymous), a 1 GiB rwx TCG buffer, the heap, QEMU's binary, a memfd
      // RAM backend of 512 MiB, a 64 MiB malloc arena (not guest RAM: smaller than the guest).
      entry('7f0000000000-7f0020000000', 'rw-p', '', 200_000),
      entry('7f1000000000-7f1040000000', 'rwxp', '', 32_768),
      entry('55aa00000000-55aa00100000', 'rw-p', '[heap]', 5_000),
      entry('55bb00000000-55bb00400000', 'r-xp', '/usr/bin/qemu-system-x86_64', 2_600),
      entry('7f2000000000-7f2020000000', 'rw-s', '/memfd:guest-ram (deleted)', 1_000),
      entry('7f3000000000-7f3004000000', 'rw-p', '', 7_000),
    ].join('');
    assert.deepEqual(splitQemuSmaps(text, 512), { guestRam: 201_000, tcg: 32_768, heap: 5_000, files: 2_600, otherAnon: 7_000 });
  });

  it('counts a file-backed RAM backend as large as the guest as guest RAM', () => {
    const text = entry('7f0000000000-7f0020000000', 'rw-p', '/var/lib/kata/template/memory', 50_000);
    assert.equal(splitQemuSmaps(text, 512).guestRam, 50_000);
  });
});

describe('rollupField, pssKiB and ussKiB', () => {
  it('read a field of smaps_rollup, and this process has a PSS', () => {
    assert.equal(rollupField('Rss:  100 kB\nPss:   42 kB\n', 'Pss'), 42);
    assert.throws(() => rollupField('Rss: 1 kB\n', 'Pss'));
    assert.ok(pssKiB(process.pid) > 0);
  });

  it('ussKiB is this process\'s private pages: more than nothing, less than its RSS, and it grows with memory only it touches', () => {
    const rss = () => rollupField(readFileSync('/proc/self/smaps_rollup', 'utf8'), 'Rss');
    const before = ussKiB(process.pid);
    assert.ok(before > 0 && before <= rss(), `USS ${before} KiB, RSS ${rss()} KiB`);
    const held = Buffer.alloc(32 * 1024 * 1024, 1);
    const after = ussKiB(process.pid);
    assert.ok(after - before >= 30 * 1024, `USS grew by ${after - before} KiB for 32 MiB written`);
    assert.equal(held[held.length - 1], 1);
  });
});
