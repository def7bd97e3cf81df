/**
 * Sandbox sizing (core/resources.ts): Kata's rule, the OCI and annotation readers, static sizing,
 * and the bookkeeping that drives a VM's resize calls, with a recording stand-in for the VM.
 */
import assert from 'node:assert/strict';
import {
  SandboxResources,
  cpusetSize,
  demandFromOciLinux,
  demandFromSandboxAnnotations,
  sandboxSizingAnnotations,
  sandboxSize,
  staticSandboxSizing,
  type ResizeTarget,
  type SizingLimits,
  type SizingMode,
} from '../../../core/resources.js';
import { KataError } from '../../../core/errors.js';
import { silentLogger } from '../../../core/logger.js';
import { loadValidatedConfig } from '../../../core/runtime.js';
import { sandboxResources } from '../../../core/sandbox.js';

const LIMITS: SizingLimits = { bootVcpus: 1, maxVcpus: 4, bootMiB: 512, maxMiB: 2048 };
const MIB = 1024 * 1024;
const cpu = (n: number) => ({ cpuQuota: n * 100_000, cpuPeriod: 100_000 });

/** A VM that records calls, does what it is asked (within its own failures), and onlines. */
class FakeVm implements ResizeTarget {
  vcpus = LIMITS.bootVcpus;
  memoryMiB = LIMITS.bootMiB;
  calls: string[] = [];
  failCpus = false;
  failMemory = false;
  failOnline = false;
  keepCpus = false;
  async resizeVcpus(n: number): Promise<number> {
    this.calls.push(`vcpus ${n}`);
    if (this.failCpus && n > this.vcpus) throw new KataError('KATA_ERR_HOTPLUG', 'device_add failed');
    if (!(this.keepCpus && n < this.vcpus)) this.vcpus = n;
    return this.vcpus;
  }
  async resizeMemory(mib: number): Promise<number> {
    this.calls.push(`memory ${mib}`);
    if (this.failMemory) throw new KataError('KATA_ERR_HOTPLUG', 'no slot');
    this.memoryMiB = Math.max(this.memoryMiB, mib);
    return this.memoryMiB;
  }
  async memoryBlockMiB(): Promise<number> {
    return 128;
  }
  async online(cpus: number, cpuOnly: boolean): Promise<void> {
    this.calls.push(`online ${cpus} ${cpuOnly ? 'cpu-only' : 'cpu+mem'}`);
    if (this.failOnline) throw new Error('guest said no');
  }
}

function resources(vm: ResizeTarget, mode: SizingMode = { kind: 'hotplug' }): SandboxResources {
  return new SandboxResources(vm, { limits: LIMITS, mode, keyPrefix: 'hypervisor.qemu' });
}

describe('sandbox sizing (core/resources.ts)', () => {
  describe('sandboxSize', () => {
    it('adds the containers\' CPU limits to the boot vCPUs, rounding the sum up once', () => {
      const half = { cpuQuota: 50_000, cpuPeriod: 100_000 };
      assert.equal(sandboxSize(LIMITS, [half, half]).vcpus, 2);
      assert.equal(sandboxSize(LIMITS, [half, half, half]).vcpus, 3);
      assert.equal(sandboxSize(LIMITS, [cpu(2)]).vcpus, 3);
    });

    it('counts no vCPU for a container without a quota, and the cpusets only when nobody has a quota', () => {
      assert.equal(sandboxSize(LIMITS, [{ cpuQuota: -1, cpuPeriod: 100_000 }, {}]).vcpus, 1);
      assert.equal(sandboxSize(LIMITS, [{ cpus: '0-1' }]).vcpus, 3);
      assert.equal(sandboxSize(LIMITS, [{ cpus: '0-1' }, cpu(1)]).vcpus, 2);
    });

    it('adds the memory limits to the boot memory, in MiB rounded up', () => {
      assert.equal(sandboxSize(LIMITS, [{ memoryLimitBytes: 256 * MIB }, { memoryLimitBytes: 100 * MIB + 1 }]).memoryMiB, 512 + 256 + 101);
      assert.equal(sandboxSize(LIMITS, [{ memoryLimitBytes: -1 }]).memoryMiB, 512);
    });

    it('caps at the maxima and says what was wanted', () => {
      const s = sandboxSize(LIMITS, [cpu(8), { memoryLimitBytes: 4096 * MIB }]);
      assert.deepEqual(s, { wantedVcpus: 9, wantedMiB: 4608, vcpus: 4, memoryMiB: 2048 });
    });
  });

  describe('cpusetSize', () => {
    it('counts the CPUs of a list, and 0 for a malformed one', () => {
      assert.equal(cpusetSize('0-3,6'), 5);
      assert.equal(cpusetSize('1,1,2'), 2);
      assert.equal(cpusetSize(''), 0);
      assert.equal(cpusetSize('3-1'), 0);
      assert.equal(cpusetSize('0-1;rm -rf /'), 0);
    });
  });

  describe('demandFromOciLinux', () => {
    it('reads quota, period, cpus and the memory limit of linux.resources', () => {
      const d = demandFromOciLinux({ resources: { cpu: { quota: 200000, period: 100000, cpus: '0-1' }, memory: { limit: 268435456 } } });
      assert.deepEqual(d, { cpuQuota: 200000, cpuPeriod: 100000, cpus: '0-1', memoryLimitBytes: 268435456 });
    });

    it('ignores what is not a safe integer (hostile or absent values)', () => {
      assert.deepEqual(demandFromOciLinux(undefined), {});
      assert.deepEqual(demandFromOciLinux({ resources: [] }), {});
      assert.deepEqual(demandFromOciLinux({ resources: { cpu: { quota: '200000', period: 1e300 }, memory: { limit: 9223372036854775807 } } }), {});
    });
  });

  describe('demandFromSandboxAnnotations and staticSandboxSizing', () => {
    const ann = { 'io.kubernetes.cri.sandbox-cpu-quota': '150000', 'io.kubernetes.cri.sandbox-cpu-period': '100000', 'io.kubernetes.cri.sandbox-memory': String(1024 * MIB) };

    it('sizes the VM at boot from containerd\'s sandbox annotations', () => {
      assert.deepEqual(staticSandboxSizing({ default_vcpus: 1, default_memory: 512 }, ann), { vcpus: 3, memoryMiB: 1536 });
      assert.deepEqual(staticSandboxSizing({ default_vcpus: 1, default_memory: 512 }, {}), { vcpus: 1, memoryMiB: 512 });
    });

    it('gives a container that is its own sandbox (ctr run) its own limits as the sandbox annotations, and leaves a CRI pod\'s alone', () => {
      assert.deepEqual(sandboxSizingAnnotations({ a: 'b' }, { ...cpu(2), memoryLimitBytes: 1024 }), {
        a: 'b',
        'io.kubernetes.cri.sandbox-cpu-quota': '200000',
        'io.kubernetes.cri.sandbox-cpu-period': '100000',
        'io.kubernetes.cri.sandbox-memory': '1024',
      });
      const pod = { 'io.kubernetes.cri.container-type': 'sandbox', 'io.kubernetes.cri.sandbox-cpu-quota': '0' };
      assert.equal(sandboxSizingAnnotations(pod, cpu(2)), pod);
      assert.deepEqual(sandboxSizingAnnotations({}, {}), {});
    });

    it('refuses a malformed annotation with KATA_ERR_ANNOTATION naming it', () => {
      assert.throws(
        () => demandFromSandboxAnnotations({ 'io.kubernetes.cri.sandbox-memory': '1G; reboot' }),
        (e: KataError) => e.code === 'KATA_ERR_ANNOTATION' && e.key === 'io.kubernetes.cri.sandbox-memory',
      );
    });
  });

  describe('SandboxResources', () => {
    it('hot-plugs vCPUs and memory for a container and asks the guest to online them', async () => {
      const vm = new FakeVm();
      const r = resources(vm);
      await r.set('c1', { ...cpu(2), memoryLimitBytes: 200 * MIB });
      // 200 MiB above boot grows to whole 128 MiB blocks.
      assert.deepEqual(vm.calls, ['memory 768', 'vcpus 3', 'online 2 cpu+mem']);
      assert.deepEqual(r.current, { vcpus: 3, memoryMiB: 768 });
    });

    it('gives vCPUs back when the container goes, and keeps the memory', async () => {
      const vm = new FakeVm();
      const r = resources(vm);
      await r.set('c1', { ...cpu(2), memoryLimitBytes: 128 * MIB });
      vm.calls = [];
      await r.release('c1');
      assert.deepEqual(vm.calls, ['vcpus 1']);
      assert.deepEqual(r.current, { vcpus: 1, memoryMiB: 640 });
    });

    it('reports the vCPUs the guest kept when it does not give them back', async () => {
      const vm = new FakeVm();
      const r = resources(vm);
      await r.set('c1', cpu(1));
      vm.keepCpus = true;
      await r.release('c1');
      assert.equal(r.current.vcpus, 2);
    });

    it('caps at default_maxvcpus instead of failing', async () => {
      const vm = new FakeVm();
      const r = resources(vm);
      await r.set('c1', cpu(16));
      assert.equal(r.current.vcpus, 4);
    });

    it('resizes on an update of a container\'s limits, both ways', async () => {
      const vm = new FakeVm();
      const r = resources(vm);
      await r.set('c1', cpu(1));
      await r.set('c1', cpu(3));
      assert.equal(vm.vcpus, 4);
      await r.set('c1', cpu(1));
      assert.equal(vm.vcpus, 2);
    });

    it('hot-plugs memory before vCPUs, so a failed memory hot-plug changes nothing and records nothing', async () => {
      const vm = new FakeVm();
      vm.failMemory = true;
      const r = resources(vm);
      await assert.rejects(r.set('c1', { ...cpu(1), memoryLimitBytes: 256 * MIB }), (e: KataError) => e.code === 'KATA_ERR_RESIZE' && e.key === 'hypervisor.qemu.default_maxmemory');
      assert.deepEqual(vm.calls, ['memory 768']);
      assert.equal(vm.vcpus, 1);
      vm.failMemory = false;
      vm.calls = [];
      await r.set('c2', {});
      assert.deepEqual(vm.calls, [], 'the failed container left no demand behind');
    });

    it('fails with KATA_ERR_RESIZE naming default_maxvcpus when the vCPU hot-plug fails', async () => {
      const vm = new FakeVm();
      vm.failCpus = true;
      await assert.rejects(resources(vm).set('c1', cpu(1)), (e: KataError) => e.code === 'KATA_ERR_RESIZE' && e.key === 'hypervisor.qemu.default_maxvcpus' && /static_sandbox_resource_mgmt/.test(e.fix));
    });

    it('unplugs the vCPUs again when the guest cannot online them', async () => {
      const vm = new FakeVm();
      vm.failOnline = true;
      await assert.rejects(resources(vm).set('c1', cpu(2)), (e: KataError) => e.code === 'KATA_ERR_RESIZE');
      assert.equal(vm.vcpus, 1);
    });

    it('never resizes with static_sandbox_resource_mgmt', async () => {
      const vm = new FakeVm();
      const r = resources(vm, { kind: 'static' });
      await r.set('c1', { ...cpu(2), memoryLimitBytes: 1024 * MIB });
      await r.release('c1');
      assert.deepEqual(vm.calls, []);
    });

    it('refuses, before touching the VM, a container that needs a fixed-size VM (a TD) to grow', async () => {
      const vm = new FakeVm();
      const r = resources(vm, { kind: 'fixed', why: 'a TDX trust domain has a fixed size' });
      await assert.rejects(r.set('c1', cpu(1)), (e: KataError) => e.code === 'KATA_ERR_RESIZE_UNAVAILABLE' && e.key === 'hypervisor.qemu.default_vcpus');
      await assert.rejects(r.set('c1', { memoryLimitBytes: MIB }), (e: KataError) => e.code === 'KATA_ERR_RESIZE_UNAVAILABLE' && e.key === 'hypervisor.qemu.default_memory');
      await r.set('c2', {});
      assert.deepEqual(vm.calls, []);
    });

    it('serialises concurrent changes', async () => {
      const vm = new FakeVm();
      const r = resources(vm);
      await Promise.all([r.set('a', cpu(1)), r.set('b', cpu(1)), r.set('c', cpu(1))]);
      assert.deepEqual(vm.calls.filter((c) => c.startsWith('vcpus')), ['vcpus 2', 'vcpus 3', 'vcpus 4']);
    });
  });
});

describe('sandbox sizing from the validated configuration (static_sandbox_resource_mgmt, TDX)', () => {
  const POD = { 'io.kubernetes.cri.sandbox-cpu-quota': '200000', 'io.kubernetes.cri.sandbox-cpu-period': '100000', 'io.kubernetes.cri.sandbox-memory': String(256 * MIB) };
  const QEMU = '[hypervisor.qemu]\nkernel = "/k"\ninitrd = "/i"\nshared_fs = "none"\ndefault_vcpus = 1\ndefault_memory = 512\ndefault_maxvcpus = 4\ndefault_maxmemory = 2048\n';
  const TDX = 'firmware = "/usr/share/ovmf/OVMF.inteltdx.fd"\nconfidential_guest = true\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"\n';
  const agent = (calls: string[]) => ({
    onlineCpuMem: async (r: { nbCpus: number; cpuOnly: boolean }) => void calls.push(`online ${r.nbCpus}`),
    getGuestDetails: async () => ({ memBlockSizeBytes: 128n * 1048576n }) as never,
  });
  const vm = (calls: string[]) => ({
    resizeVcpus: async (n: number) => (calls.push(`vcpus ${n}`), n),
    resizeMemory: async (m: number) => (calls.push(`memory ${m}`), m),
  });

  it('boots a static sandbox with the pod\'s limits added, no hot-plug room, and never hot-plugs', async () => {
    const validated = await loadValidatedConfig({ text: `${QEMU}[runtime]\nstatic_sandbox_resource_mgmt = true\n`, annotations: POD });
    assert.deepEqual(validated.plan.staticSizing, { vcpus: 2, memoryMiB: 256 });
    const argv = validated.plan.vm.launch as string[];
    assert.equal(argv[argv.indexOf('-smp') + 1], 'cpus=3,maxcpus=3');
    assert.equal(argv[argv.indexOf('-m') + 1], '768M');
    const calls: string[] = [];
    const r = sandboxResources(vm(calls), agent(calls), validated, silentLogger());
    await r.set('c1', { ...cpu(4), memoryLimitBytes: 4096 * MIB });
    assert.deepEqual(calls, []);
    assert.deepEqual(r.current, { vcpus: 3, memoryMiB: 768 });
  });

  it('hot-plugs in a sandbox sized dynamically (the default)', async () => {
    const validated = await loadValidatedConfig({ text: QEMU, annotations: POD });
    assert.equal(validated.plan.staticSizing, undefined);
    const calls: string[] = [];
    await sandboxResources(vm(calls), agent(calls), validated, silentLogger()).set('c1', cpu(2));
    assert.deepEqual(calls, ['vcpus 3', 'online 2']);
  });

  it('refuses, with KATA_ERR_RESIZE_UNAVAILABLE and before any resize, a container a statically sized TD cannot fit', async () => {
    const validated = await loadValidatedConfig({ text: `${QEMU}${TDX}[runtime]\nstatic_sandbox_resource_mgmt = true\n`, annotations: POD });
    const calls: string[] = [];
    const r = sandboxResources(vm(calls), agent(calls), validated, silentLogger());
    // The pod's 2 CPUs and 256 MiB were added at boot: its containers fit.
    await r.set('a', { ...cpu(1), memoryLimitBytes: 128 * MIB });
    await r.set('b', { ...cpu(1), memoryLimitBytes: 128 * MIB });
    await assert.rejects(r.set('c', cpu(1)), (e: KataError) => e.code === 'KATA_ERR_RESIZE_UNAVAILABLE' && e.key === 'hypervisor.qemu.default_vcpus' && /static_sandbox_resource_mgmt/.test(e.fix));
    assert.deepEqual(calls, []);
  });
});
