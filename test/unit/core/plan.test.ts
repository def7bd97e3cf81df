import assert from 'node:assert/strict';
import type { ReadonlyCapabilities } from '../../../core/capabilities.js';
import type { KataConfig } from '../../../core/config/types.js';
import { baseVmDescription, unrenderableIntents, type VmDescription } from '../../../core/plan.js';

function caps(...names: string[]): ReadonlyCapabilities {
  return { has: (n) => names.includes(n), list: () => names };
}

const config = (over: Record<string, unknown> = {}) =>
  ({
    hypervisorName: 'vmm',
    hypervisor: { path: '/bin/vmm', kernel: '/k', initrd: '', image: '/img', rootfs_type: 'xfs', firmware: '', kernel_params: '  a=1 b  ', default_vcpus: 1.5, default_maxvcpus: 0, default_memory: 512, default_maxmemory: 2048, ...over },
  }) as unknown as KataConfig;

describe('baseVmDescription', () => {
  it('describes the VM from the common hypervisor keys, with no devices and no TEE', () => {
    assert.deepEqual(baseVmDescription(config(), caps('cpu-hotplug', 'memory-hotplug'), 8), {
      hypervisor: 'vmm',
      binary: '/bin/vmm',
      cpus: { boot: 2, max: 8, hotplug: true },
      memory: { bootMiB: 512, maxMiB: 2048, hotplug: true, shared: false },
      kernel: '/k',
      image: { path: '/img', fstype: 'xfs' },
      kernelParams: ['a=1 b'],
      confidential: null,
      devices: [],
    });
  });

  it('pins vCPUs and memory to their boot values without the hot-plug capabilities', () => {
    const vm = baseVmDescription(config({ default_maxvcpus: 6 }), caps(), 8);
    assert.deepEqual([vm.cpus, vm.memory.maxMiB], [{ boot: 2, max: 2, hotplug: false }, 512]);
  });
});

describe('unrenderableIntents', () => {
  const vm = (extra: Partial<VmDescription>): VmDescription => ({ ...baseVmDescription(config(), caps(), 1), ...extra });

  it('names each device kind, TEE and access-platform the capabilities lack, once', () => {
    const v = vm({
      devices: [
        { kind: 'rng', source: '/dev/urandom' },
        { kind: 'vhost-user-fs', socket: '/s', tag: 't', queues: 1, queueSize: 128, cacheSizeMiB: 0 },
        { kind: 'vhost-user-fs', socket: '/s2', tag: 't2', queues: 1, queueSize: 128, cacheSizeMiB: 0 },
      ],
      confidential: { tee: 'tdx', firmware: '/fw', accessPlatform: true },
    });
    assert.deepEqual(unrenderableIntents(v, caps('render:device:rng')).map((u) => u.capability), ['render:device:vhost-user-fs', 'render:tee:tdx', 'render:access-platform']);
    assert.deepEqual(unrenderableIntents(v, caps('render:device:rng', 'render:device:vhost-user-fs', 'render:tee:tdx', 'render:access-platform')), []);
  });
});
