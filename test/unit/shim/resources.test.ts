/**
 * The shim's resource paths (shim/oci.ts parseResources/parseUpdateResources, shim/metrics.ts):
 * runtime-spec LinuxResources JSON → kata's LinuxResources, and the agent's StatsContainerResponse
 * → containerd's cgroup v2 Metrics in the Any containerd decodes.
 */
import assert from 'node:assert/strict';
import { KataError } from '../../../core/errors.js';
import { METRICS_TYPE_URL, metricsAny, metricsFromStats } from '../../../shim/task-metrics.js';
import { parseResources, parseUpdateResources } from '../../../shim/oci.js';
import { StatsContainerResponse } from '../../../wire/agent/proto.gen.js';
import { Metrics } from '../../../wire/containerd/proto.gen.js';

const SPEC_URL = 'types.containerd.io/opencontainers/runtime-spec/1/LinuxResources';

function specError(fn: () => unknown): void {
  assert.throws(fn, (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_OCI_SPEC');
}

describe('shim: linux.resources', () => {
  it('maps memory, cpu and pids to kata\'s LinuxResources, absent fields as 0', () => {
    assert.deepEqual(parseResources({ memory: { limit: 268435456, swap: -1 }, cpu: { quota: 200000, period: 100000, shares: 1024, cpus: '0-1' }, pids: { limit: 64 }, devices: [{ allow: false, access: 'rwm' }] }, 'x'), {
      Memory: { Limit: 268435456n, Reservation: 0n, Swap: -1n },
      CPU: { Shares: 1024n, Quota: 200000n, Period: 100000n, Cpus: '0-1', Mems: '' },
      Pids: { Limit: 64n },
    });
  });

  it('is undefined when nothing the agent applies is set', () => {
    assert.equal(parseResources(undefined, 'x'), undefined);
    assert.equal(parseResources({ devices: [{ allow: false, access: 'rwm' }] }, 'x'), undefined);
  });

  it('clamps numbers beyond int64 instead of wrapping them negative', () => {
    assert.equal(parseResources({ memory: { limit: 2 ** 64 } }, 'x')?.Memory?.Limit, (1n << 63n) - 1n);
  });

  it('refuses values of the wrong type or below range with KATA_ERR_OCI_SPEC', () => {
    specError(() => parseResources({ memory: { limit: '1G' } }, 'x'));
    specError(() => parseResources({ memory: { limit: 1.5 } }, 'x'));
    specError(() => parseResources({ memory: { limit: -2 } }, 'x'));
    specError(() => parseResources({ cpu: { shares: -1 } }, 'x'));
    specError(() => parseResources({ cpu: { cpus: 3 } }, 'x'));
    specError(() => parseResources([], 'x'));
  });

  it('reads an Update\'s resources from runtime-spec JSON in a typeurl Any', () => {
    const value = Buffer.from(JSON.stringify({ memory: { limit: 100 << 20 } }));
    assert.deepEqual(parseUpdateResources({ type_url: SPEC_URL, value }, 'c'), { Memory: { Limit: BigInt(100 << 20), Reservation: 0n, Swap: 0n } });
    specError(() => parseUpdateResources({ type_url: 'types.containerd.io/windows', value }, 'c'));
    specError(() => parseUpdateResources({ type_url: SPEC_URL, value: Buffer.from('{') }, 'c'));
    specError(() => parseUpdateResources(undefined, 'c'));
  });
});

describe('shim: metrics', () => {
  const stats = StatsContainerResponse.decode(
    StatsContainerResponse.encode({
      cgroupStats: {
        cpuStats: { cpuUsage: { totalUsage: 3_000_000n, usageInUsermode: 2_000_000n, usageInKernelmode: 1_000_000n }, throttlingData: { periods: 5n, throttledPeriods: 1n, throttledTime: 7000n } },
        memoryStats: { cache: 10n, usage: { usage: 8_000_000n, limit: 64n << 20n }, swapUsage: { usage: 0n, limit: 0n }, stats: { anon: 6_000_000n, inactive_file: 1000n, file: 2000n, nonsense_key: 5n } },
        pidsStats: { current: 3n, limit: 100n },
      },
    }),
  );

  it('turns the agent\'s CgroupStats into cgroup v2 Metrics (microseconds, memory.stat fields, limits)', () => {
    assert.deepEqual(metricsFromStats(stats), {
      pids: { current: 3n, limit: 100n },
      cpu: { usageUsec: 3000n, userUsec: 2000n, systemUsec: 1000n, nrPeriods: 5n, nrThrottled: 1n, throttledUsec: 7n },
      memory: { anon: 6_000_000n, file: 2000n, inactiveFile: 1000n, usage: 8_000_000n, usageLimit: 64n << 20n, swapUsage: 0n, swapLimit: 0n },
    });
  });

  it('answers in an Any of type io.containerd.cgroups.v2.Metrics that decodes back', () => {
    const any = metricsAny(stats);
    assert.equal(any.type_url, 'io.containerd.cgroups.v2.Metrics');
    assert.equal(METRICS_TYPE_URL, any.type_url);
    const m = Metrics.decode(any.value);
    assert.equal(m.cpu?.usageUsec, 3000n);
    assert.equal(m.memory?.usage, 8_000_000n);
    assert.equal(m.pids?.current, 3n);
  });
});
