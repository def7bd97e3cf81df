/**
 * Guest cgroups v2 (guest/agent/cgroups.ts): OCI resources → cgroup files with runc's and
 * kata-agent's conversions, hostile values refused, statistics read back from cgroup files (a
 * temporary directory laid out as a cgroup), the join wrapper and the OOM counter.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import {
  OomCounter,
  SANDBOX_CGROUP,
  applyWrites,
  containerCgroupDir,
  joinCgroupArgv,
  parseControllers,
  parseFlatKeyed,
  readCgroupStats,
  readOomKills,
  resourceWrites,
  sharesToWeight,
  swapToV2,
} from '../../../guest/agent/cgroups.js';
import { addMounts, Script } from '../../../guest/agent/oci.js';
import { TempDir } from '../../helpers/tmp.js';

const ALL = { controllers: new Set(['cpu', 'memory', 'pids', 'cpuset']), swap: true };

function invalid(fn: () => unknown): void {
  assert.throws(fn, (e: unknown) => e instanceof TtrpcError && e.code === GrpcCode.INVALID_ARGUMENT);
}

describe('guest cgroups: paths', () => {
  it('puts each container under the sandbox cgroup /sys/fs/cgroup/kata-ts', () => {
    assert.equal(SANDBOX_CGROUP, '/sys/fs/cgroup/kata-ts');
    assert.equal(containerCgroupDir('abc-1'), '/sys/fs/cgroup/kata-ts/abc-1');
  });

  it('refuses container ids that could leave the sandbox cgroup', () => {
    for (const id of ['..', '../x', 'a/b', '-x', '', '.hidden']) invalid(() => containerCgroupDir(id));
  });
});

describe('guest cgroups: conversions', () => {
  it('converts cpu shares to cpu.weight with runc\'s formula', () => {
    assert.equal(sharesToWeight(0n), 0n);
    assert.equal(sharesToWeight(2n), 1n);
    assert.equal(sharesToWeight(1024n), 39n);
    assert.equal(sharesToWeight(262144n), 10000n);
    invalid(() => sharesToWeight(1n));
    invalid(() => sharesToWeight(262145n));
  });

  it('turns OCI memory+swap into memory.swap.max as runc does', () => {
    assert.equal(swapToV2(0n, 100n), undefined);
    assert.equal(swapToV2(-1n, 100n), 'max');
    assert.equal(swapToV2(0n, -1n), 'max');
    assert.equal(swapToV2(300n, 100n), '200');
    assert.equal(swapToV2(100n, 100n), '0');
    invalid(() => swapToV2(50n, 100n));
    invalid(() => swapToV2(100n, 0n));
    invalid(() => swapToV2(-2n, 100n));
  });

  it('writes memory.max, memory.swap.max, cpu.max, cpu.weight, cpuset and pids.max', () => {
    const w = resourceWrites(
      {
        Memory: { Limit: 64n << 20n, Swap: 96n << 20n, Reservation: 16n << 20n },
        CPU: { Shares: 512n, Quota: 200000n, Period: 100000n, Cpus: '0-1', Mems: '0' },
        Pids: { Limit: 100n },
      },
      ALL,
    );
    assert.deepEqual(w, [
      ['cpuset.cpus', '0-1'],
      ['cpuset.mems', '0'],
      ['cpu.weight', String(1n + (510n * 9999n) / 262142n)],
      ['cpu.max', '200000 100000'],
      ['memory.max', String(64 << 20)],
      ['memory.swap.max', String(32 << 20)],
      ['memory.low', String(16 << 20)],
      ['pids.max', '100'],
    ]);
  });

  it('reads -1 as max and leaves 0 (unset) alone', () => {
    assert.deepEqual(resourceWrites({ Memory: { Limit: -1n }, CPU: { Quota: -1n }, Pids: { Limit: -1n } }, ALL), [
      ['cpu.max', 'max'],
      ['memory.max', 'max'],
      ['memory.swap.max', 'max'],
      ['pids.max', 'max'],
    ]);
    assert.deepEqual(resourceWrites({ Memory: { Limit: 0n, Swap: 0n }, CPU: { Shares: 0n, Quota: 0n, Period: 0n, Cpus: '' }, Pids: { Limit: 0n } }, ALL), []);
    assert.deepEqual(resourceWrites(undefined, ALL), []);
  });

  it('writes only the quota when the period is not given', () => {
    assert.deepEqual(resourceWrites({ CPU: { Quota: 50000n } }, ALL), [['cpu.max', '50000']]);
  });

  it('skips what the guest kernel lacks instead of failing, and says so', () => {
    const notes: string[] = [];
    assert.deepEqual(resourceWrites({ Memory: { Limit: 1n << 30n, Swap: 2n << 30n }, Pids: { Limit: 5n } }, { controllers: new Set(['memory']), swap: false }, (l) => notes.push(l)), [['memory.max', String(1 << 30)]]);
    assert.deepEqual(notes, ['memory swap limit ignored: the guest kernel does not account swap', 'pids limit ignored: the guest kernel has no pids controller']);
  });

  it('refuses hostile or out-of-range values before anything is written', () => {
    invalid(() => resourceWrites({ CPU: { Cpus: '0-1\nmax' } }, ALL));
    invalid(() => resourceWrites({ CPU: { Mems: '$(reboot)' } }, ALL));
    invalid(() => resourceWrites({ CPU: { Quota: 999n } }, ALL));
    invalid(() => resourceWrites({ CPU: { Quota: -5n } }, ALL));
    invalid(() => resourceWrites({ CPU: { Period: 10n } }, ALL));
    invalid(() => resourceWrites({ CPU: { Period: 2_000_000n } }, ALL));
    invalid(() => resourceWrites({ Memory: { Limit: -2n } }, ALL));
    invalid(() => resourceWrites({ Memory: { Limit: 100n, Swap: 50n } }, ALL));
  });
});

describe('guest cgroups: files', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir('kata-ts-cgroups-')));
  afterEach(() => tmp.cleanup());

  it('writes each value into its file under the cgroup', async () => {
    await applyWrites(tmp.path, [['memory.max', '1048576'], ['cpu.max', 'max 100000']]);
    assert.equal(readFileSync(path.join(tmp.path, 'memory.max'), 'utf8'), '1048576');
    assert.equal(readFileSync(path.join(tmp.path, 'cpu.max'), 'utf8'), 'max 100000');
  });

  it('reports a refused write as INVALID_ARGUMENT naming the file', async () => {
    await assert.rejects(applyWrites(path.join(tmp.path, 'missing'), [['memory.max', '1']]), (e: unknown) => e instanceof TtrpcError && e.code === GrpcCode.INVALID_ARGUMENT && e.message.includes('memory.max'));
  });

  it('reads statistics as kata-agent reports them for cgroup v2', () => {
    const files: Record<string, string> = {
      'cpu.stat': 'usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 7\nnr_throttled 2\nthrottled_usec 30\n',
      'memory.current': '4096000\n',
      'memory.max': 'max\n',
      'memory.peak': '5000000\n',
      'memory.stat': 'anon 1000\nfile 2000\ninactive_file 500\n',
      'memory.events': 'low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n',
      'memory.swap.current': '0\n',
      'memory.swap.max': '1048576\n',
      'pids.current': '4\n',
      'pids.max': 'max\n',
    };
    for (const [f, t] of Object.entries(files)) writeFileSync(path.join(tmp.path, f), t);
    const s = readCgroupStats(tmp.path);
    assert.deepEqual(s.cpuStats, {
      cpuUsage: { totalUsage: 1_500_000n, usageInUsermode: 1_000_000n, usageInKernelmode: 500_000n, percpuUsage: [] },
      throttlingData: { periods: 7n, throttledPeriods: 2n, throttledTime: 30_000n },
    });
    assert.equal(s.memoryStats?.usage?.usage, 4_096_000n);
    assert.equal(s.memoryStats?.usage?.limit, (1n << 64n) - 1n);
    assert.equal(s.memoryStats?.usage?.maxUsage, 5_000_000n);
    assert.equal(s.memoryStats?.usage?.failcnt, 3n);
    assert.equal(s.memoryStats?.cache, 2000n);
    assert.equal(s.memoryStats?.swapUsage?.limit, 1_048_576n);
    assert.deepEqual(s.memoryStats?.stats, { anon: 1000n, file: 2000n, inactive_file: 500n });
    assert.deepEqual(s.pidsStats, { current: 4n, limit: 0n });
    assert.equal(readOomKills(tmp.path), 1n);
  });

  it('parses controllers and flat-keyed files, skipping malformed lines', () => {
    assert.deepEqual([...parseControllers('cpuset cpu io memory hugetlb pids rdma misc\n')], ['cpuset', 'cpu', 'io', 'memory', 'hugetlb', 'pids', 'rdma', 'misc']);
    assert.deepEqual([...parseFlatKeyed('a 1\nbad\nb x\nc 18446744073709551615\n')], [['a', 1n], ['c', 18446744073709551615n]]);
  });

  it('reports each new oom_kill of memory.events once', () => {
    const events = path.join(tmp.path, 'memory.events');
    writeFileSync(events, 'oom 0\noom_kill 0\n');
    const seen: number[] = [];
    const c = new OomCounter(tmp.path, (n) => seen.push(n));
    try {
      c.check();
      writeFileSync(events, 'oom 1\noom_kill 1\n');
      c.check();
      c.check();
      writeFileSync(events, 'oom 3\noom_kill 3\n');
      c.check();
      assert.deepEqual(seen, [1, 2]);
    } finally {
      c.close();
    }
  });
});

describe('guest cgroups: joining', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir('kata-ts-cgjoin-')));
  afterEach(() => tmp.cleanup());

  it('writes its own pid to cgroup.procs, then execs the command as the same process', () => {
    const dir = path.join(tmp.path, 'evil $(touch pwned) "dir"');
    mkdirSync(dir);
    const argv = joinCgroupArgv(dir, ['/bin/sh', '-c', 'echo $$']);
    // Run with the host's sh in place of the guest's busybox.
    const out = execFileSync('/bin/sh', argv.slice(2), { encoding: 'utf8' }).trim();
    assert.equal(readFileSync(path.join(dir, 'cgroup.procs'), 'utf8').trim(), out);
    assert.ok(!argv[2]?.includes('pwned'));
    assert.equal(existsSync(path.join(tmp.path, 'pwned')) || existsSync('pwned'), false);
  });

  it('fails with status 125 when the cgroup cannot be joined', () => {
    const argv = joinCgroupArgv(path.join(tmp.path, 'gone'), ['/bin/true']);
    assert.throws(() => execFileSync('/bin/sh', argv.slice(2), { stdio: 'pipe' }), (e: { status?: number }) => e.status === 125);
  });
});

describe('guest cgroups: container view', () => {
  it('shows the container its own cgroup read-only where the spec mounts cgroup', () => {
    const s = new Script();
    const targets = new Map([['/sys/fs/cgroup', '/r/sys/fs/cgroup']]);
    addMounts(s, [{ destination: '/sys/fs/cgroup', type: 'cgroup', source: 'cgroup', options: ['ro', 'nosuid', 'noexec', 'nodev', 'relatime'] }], [], targets, '/sys/fs/cgroup/kata-ts/c1');
    const text = s.text(false);
    assert.match(text, /mount --bind/);
    assert.match(text, /remount,bind,ro,nosuid,nodev,noexec/);
    assert.ok(s.params.includes('/sys/fs/cgroup/kata-ts/c1'));
    assert.ok(!text.includes('/sys/fs/cgroup/kata-ts/c1'));
  });

  it('skips cgroup mounts when the container has no cgroup', () => {
    const s = new Script();
    addMounts(s, [{ destination: '/sys/fs/cgroup', type: 'cgroup', source: 'cgroup', options: ['ro'] }], [], new Map([['/sys/fs/cgroup', '/r/sys/fs/cgroup']]));
    assert.doesNotMatch(s.text(false), /mount/);
  });
});
