/**
 * OOM kills from the kernel log (guest/agent/oom.ts): kmsg records and the OOM killer's lines as
 * the guest's Debian 6.1 kernel writes them, the event queue behind GetOOMEvent, and the watcher
 * reading a record stream.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, constants, openSync, writeSync } from 'node:fs';
import path from 'node:path';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { OomEvents, OomWatcher, parseKmsgRecord, parseOomKill, type OomKill } from '../../../guest/agent/oom.js';
import { Sandbox } from '../../../guest/agent/sandbox.js';
import { TempDir } from '../../helpers/tmp.js';

/**
 * Read from /dev/kmsg in a guest of this project (kernel 6.1.0-56-amd64, 512 MiB) while a
 * container's `sh` doubled a string until the OOM killer took it: a few records of the report.
 */
const REAL_RECORDS = [
  '4,525,11839611,-;sh invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0, oom_score_adj=0\n',
  '4,532,11843564,-; oom_kill_process.cold+0xb/0x10\n',
  '6,576,11846216,-;[  pid  ]   uid  tgid total_vm      rss pgtables_bytes swapents oom_score_adj name\n',
  '6,581,11846498,-;oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/,task=sh,pid=143,uid=0\n',
  '3,582,11847567,-;Out of memory: Killed process 143 (sh) total-vm:395484kB, anon-rss:260544kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:560kB oom_score_adj:0\n',
];

/** mm/oom_kill.c's other kill messages, in its format (`%s: Killed process %d (%s) total-vm:…`). */
const OTHER_KILLS: [string, OomKill][] = [
  ['Memory cgroup out of memory: Killed process 4021 (java) total-vm:4108092kB, anon-rss:2096764kB, file-rss:18220kB, shmem-rss:0kB, UID:1000 pgtables:4636kB oom_score_adj:999', { pid: 4021, comm: 'java' }],
  ['Out of memory (oom_kill_allocating_task): Killed process 77 (stress-ng-vm) total-vm:1056kB, anon-rss:4kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:44kB oom_score_adj:0', { pid: 77, comm: 'stress-ng-vm' }],
  ['Out of memory: Killed process 912 (tmux: server) total-vm:8000kB, anon-rss:10kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:40kB oom_score_adj:0', { pid: 912, comm: 'tmux: server' }],
  ['Out of memory: Killed process 913 ((sd-pam)) total-vm:8000kB, anon-rss:10kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:40kB oom_score_adj:0', { pid: 913, comm: '(sd-pam)' }],
];

function code(c: number) {
  return (e: unknown) => {
    assert.ok(e instanceof TtrpcError, String(e));
    assert.equal(e.code, c);
    return true;
  };
}

describe('guest agent: OOM kills from the kernel log', () => {
  describe('parsing', () => {
    it('splits a kmsg record into its sequence number and its text, without continuation lines', () => {
      assert.deepEqual(parseKmsgRecord(REAL_RECORDS[4]!), {
        seq: 582,
        message: 'Out of memory: Killed process 143 (sh) total-vm:395484kB, anon-rss:260544kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:560kB oom_score_adj:0',
      });
      assert.deepEqual(parseKmsgRecord('6,1021,5120931,-,caller=T1;virtio_blk virtio1: [vda] 49152 512-byte logical blocks\n SUBSYSTEM=virtio\n DEVICE=+virtio:virtio1\n'), {
        seq: 1021,
        message: 'virtio_blk virtio1: [vda] 49152 512-byte logical blocks',
      });
      assert.equal(parseKmsgRecord('no prefix here'), undefined);
      assert.equal(parseKmsgRecord('6,x,1,-;text\n'), undefined);
    });

    it("finds the victim in the OOM killer's kill line, and in no other line of its report", () => {
      const kills = REAL_RECORDS.map((r) => parseOomKill(parseKmsgRecord(r)!.message));
      assert.deepEqual(kills, [undefined, undefined, undefined, undefined, { pid: 143, comm: 'sh' }]);
      assert.equal(parseOomKill('oom_reaper: reaped process 143 (sh), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB'), undefined);
      assert.equal(parseOomKill('Out of memory: OOM victim 143 (sh) is already exiting. Skip killing the task'), undefined);
    });

    it('reads the memcg and allocating-task kill lines, and command names with spaces or parentheses', () => {
      for (const [line, kill] of OTHER_KILLS) assert.deepEqual(parseOomKill(line), kill, line);
    });
  });

  describe('the event queue behind GetOOMEvent', () => {
    it('answers from the queue in order, then makes the next call wait for the next event', async () => {
      const q = new OomEvents();
      q.push('c1');
      q.push('c2');
      assert.equal(await q.next(), 'c1');
      assert.equal(await q.next(), 'c2');
      const waiting = q.next();
      q.push('c3');
      assert.equal(await waiting, 'c3');
      assert.equal(q.queued, 0);
    });

    it('gives each event to one waiting call, first come first served', async () => {
      const q = new OomEvents();
      const a = q.next();
      const b = q.next();
      q.push('c1');
      q.push('c2');
      assert.deepEqual(await Promise.all([a, b]), ['c1', 'c2']);
    });

    it('rejects a cancelled call with CANCELLED, and the next event is queued rather than lost to it', async () => {
      const q = new OomEvents();
      const ac = new AbortController();
      const cancelledCall = q.next(ac.signal);
      ac.abort();
      await assert.rejects(cancelledCall, code(GrpcCode.CANCELLED));
      await assert.rejects(q.next(AbortSignal.abort()), code(GrpcCode.CANCELLED));
      q.push('c1');
      assert.equal(q.queued, 1);
      assert.equal(await q.next(), 'c1');
    });
  });

  describe('the watcher', () => {
    let tmp: TempDir;
    let logged: string[];
    const write = process.stderr.write.bind(process.stderr);
    beforeEach(() => {
      tmp = new TempDir('kata-ts-oom-');
      logged = [];
      process.stderr.write = ((chunk: string | Uint8Array) => (logged.push(String(chunk)), true)) as typeof process.stderr.write;
    });
    afterEach(() => {
      process.stderr.write = write;
      tmp.cleanup();
    });

    it('reports each kill once, in order, from a stream of records read a record at a time', () => {
      // A FIFO stands in for /dev/kmsg: written a record at a time and drained in between, each read gets one record.
      const fifo = path.join(tmp.path, 'kmsg');
      execFileSync('mkfifo', [fifo]);
      const kills: OomKill[] = [];
      const w = new OomWatcher((k) => kills.push(k), fifo);
      assert.equal(w.start(60_000), true);
      const writer = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
      try {
        for (const r of [...REAL_RECORDS, REAL_RECORDS[4]!, '3,600,20000000,-;Out of memory: Killed process 200 (sh) total-vm:1kB, anon-rss:1kB\n']) {
          writeSync(writer, r);
          w.drain();
        }
      } finally {
        closeSync(writer);
        w.stop();
      }
      assert.deepEqual(kills, [{ pid: 143, comm: 'sh' }, { pid: 200, comm: 'sh' }], 'the record with an old sequence number is skipped');
    });

    it('says so and reports nothing when the log cannot be opened', () => {
      const w = new OomWatcher(() => assert.fail('no kill expected'), path.join(tmp.path, 'missing'));
      assert.equal(w.start(), false);
      w.drain();
      assert.ok(logged.some((l) => /cannot read the kernel log .*missing.*: no OOM events/.test(l)), logged.join(''));
    });
  });

  it('queues no event for a pid of no container', () => {
    const logs: string[] = [];
    const write = process.stderr.write.bind(process.stderr);
    process.stderr.write = ((chunk: string | Uint8Array) => (logs.push(String(chunk)), true)) as typeof process.stderr.write;
    try {
      const s = new Sandbox();
      assert.equal(s.oomKilled({ pid: process.pid, comm: 'node' }), undefined);
      assert.equal(s.oomEvents.queued, 0);
    } finally {
      process.stderr.write = write;
    }
    assert.ok(logs.some((l) => l.includes(`killed pid ${process.pid} (node), which belongs to no container`)), logs.join(''));
  });
});
