import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseProcStat, parseProcStatus, parsePss, readProcessFigures } from '../../../shim/metrics-proc.js';
import { TempDir } from '../../helpers/tmp.js';

// A command name with spaces and parentheses, as a process may give itself.
const STAT = '4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 12 3 20 0 7 0 12345 1000000 500 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n';
const STATUS = ['Name:\tqemu', 'VmPeak:\t  200 kB', 'VmRSS:\t  100 kB', 'RssAnon:\t   60 kB', 'VmSwap:\t    0 kB', 'Threads:\t7', 'voluntary_ctxt_switches:\t12', 'nonvoluntary_ctxt_switches:\t3', 'Cpus_allowed:\tff'].join('\n');

describe('/proc readers (shim/metrics-proc.ts)', () => {
  it('reads CPU ticks and threads after the command name, whatever the name holds', () => {
    assert.deepEqual(parseProcStat(STAT), { utime: 250, stime: 75, cutime: 12, cstime: 3, numThreads: 7 });
    assert.equal(parseProcStat('garbage'), undefined);
    assert.equal(parseProcStat('1 (x) S 1 2'), undefined);
  });

  it("reads Kata's status items, sizes in bytes and counts as they are", () => {
    const s = parseProcStatus(STATUS);
    assert.equal(s.get('vmrss'), 100 * 1024);
    assert.equal(s.get('vmpeak'), 200 * 1024);
    assert.equal(s.get('rssanon'), 60 * 1024);
    assert.equal(s.get('vmswap'), 0);
    assert.equal(s.get('threads'), 7);
    assert.equal(s.get('voluntary_ctxt_switches'), 12);
    assert.equal(s.get('nonvoluntary_ctxt_switches'), 3);
    assert.equal(s.has('cpus_allowed'), false);
    assert.equal(s.has('name'), false);
  });

  it('reads PSS from smaps_rollup', () => {
    assert.equal(parsePss('55555000-7fff [rollup]\nRss:  900 kB\nPss:  321 kB\nPss_Anon: 1 kB\n'), 321 * 1024);
    assert.equal(parsePss('Rss: 1 kB\n'), undefined);
  });

  it('reads a process from a directory laid out like /proc, leaving out what is missing', async () => {
    const tmp = new TempDir('kata-proc-');
    try {
      const dir = path.join(tmp.path, '4242');
      mkdirSync(path.join(dir, 'fd'), { recursive: true });
      writeFileSync(path.join(dir, 'stat'), STAT);
      writeFileSync(path.join(dir, 'status'), STATUS);
      for (const fd of ['0', '1', '2', '7']) writeFileSync(path.join(dir, 'fd', fd), '');
      const f = await readProcessFigures(4242, tmp.path);
      assert.equal(f.stat?.utime, 250);
      assert.equal(f.status.get('vmrss'), 102400);
      assert.equal(f.fds, 4);
      assert.equal(f.pssBytes, undefined);
      const gone = await readProcessFigures(4243, tmp.path);
      assert.deepEqual(gone, { status: new Map() });
    } finally {
      tmp.cleanup();
    }
  });

  it('reads a real process: CPU, RSS, PSS, fds and threads are there and plausible', async () => {
    const child = spawn('sleep', ['30'], { stdio: 'ignore' });
    try {
      await new Promise((r) => child.once('spawn', r));
      const f = await readProcessFigures(child.pid!);
      assert.ok((f.status.get('vmrss') ?? 0) > 0, 'rss > 0');
      assert.ok((f.pssBytes ?? 0) > 0, 'pss > 0');
      assert.equal(f.stat?.numThreads, 1);
      assert.ok((f.fds ?? 0) >= 3, 'stdin, stdout, stderr');
      const self = await readProcessFigures(process.pid);
      assert.ok((self.stat?.utime ?? 0) + (self.stat?.stime ?? 0) > 0, 'this process has used CPU');
    } finally {
      child.kill('SIGKILL');
    }
  });
});
