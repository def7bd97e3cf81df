/**
 * vCPU and memory hot-plug end to end: real QEMU (TCG), the project's guest image (Debian's kernel,
 * the agent onlining what is plugged), the core's Sandbox API sizing the VM by Kata's rule from the
 * containers' limits. What the guest sees is read inside containers (nproc, /proc/meminfo); what
 * QEMU has, through QMP (query-cpus-fast, query-memory-devices).
 */
import assert from 'node:assert/strict';
import { copyFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { text } from 'node:stream/consumers';
import { loadValidatedConfig } from '../../core/runtime.js';
import { Sandbox } from '../../core/sandbox.js';
import type { KataError } from '../../core/errors.js';
import type { ResourceDemand } from '../../core/resources.js';
import type { QemuVm } from '../../plugins/qemu/driver.js';
import { guestImageSuite } from '../helpers/guest.js';
import { qemuLeftBehind, sandboxConfigText } from '../helpers/qemu.js';

const MIB = 1024 * 1024;
const BLOCK = 'shared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"';
const cpus = (n: number): ResourceDemand => ({ cpuQuota: n * 100_000, cpuPeriod: 100_000 });

describe('sandbox vCPU and memory hot-plug @integration', function () {
  this.timeout(600_000);
  const suite = guestImageSuite('kata-resize-');


  async function boot(id: string, hypervisor: string): Promise<{ sandbox: Sandbox; runRoot: string }> {
    const runRoot = path.join(suite.tmp.path, `run-${id}`);
    const validated = await loadValidatedConfig({ text: sandboxConfigText(suite.image, `${BLOCK}\n${hypervisor}`) });
    return { sandbox: await Sandbox.create(validated, { sandboxId: id, runRoot }), runRoot };
  }

  async function stop(sandbox: Sandbox | undefined, runRoot: string, id: string): Promise<void> {
    await sandbox?.stop();
    assert.deepEqual(await qemuLeftBehind(runRoot), [], 'no QEMU left');
    assert.equal(existsSync(path.join(runRoot, id)), false, 'run dir removed');
  }

  /** Creates a container with these limits whose process prints what the guest has, and leaves it created for the caller to delete. */
  async function probe(sandbox: Sandbox, id: string, demand: ResourceDemand | undefined) {
    const rootfs = path.join(suite.tmp.path, `${id}.ext4`);
    copyFileSync(suite.image.busyboxRootfs as string, rootfs);
    const c = await sandbox.createContainer({
      id,
      rootfs: { kind: 'block', path: rootfs, fstype: 'ext4' },
      process: { args: ['sh', '-c', 'nproc; grep MemTotal /proc/meminfo'] },
      ...(demand ? { demand } : {}),
    });
    const out = text(c.stdout);
    await c.start();
    c.stdin.end();
    assert.equal(await c.wait(), 0);
    const [nproc, mem] = (await out).trim().split('\n');
    return { c, nproc: Number(nproc), memTotalKiB: Number(/MemTotal:\s+(\d+)/.exec(mem ?? '')?.[1]) };
  }

  const qmp = (s: Sandbox) => {
    const q = (s.running.vm as QemuVm).qmp;
    assert.ok(q, 'QMP is connected');
    return q;
  };
  const qemuCpus = async (s: Sandbox) => (await qmp(s).execute<unknown[]>('query-cpus-fast')).length;
  const qemuDimms = async (s: Sandbox) => (await qmp(s).execute<{ type: string; data: { size: number; id: string } }[]>('query-memory-devices')).filter((d) => d.type === 'dimm').map((d) => d.data.size / MIB);

  describe('a VM booted with 1 vCPU and 512 MiB (default_maxvcpus = 3, default_maxmemory = 1536)', () => {
    let sandbox: Sandbox;
    let runRoot: string;
    let bootMemKiB: number;
    before(async () => {
      ({ sandbox, runRoot } = await boot('sb-resize', 'default_maxvcpus = 3\ndefault_maxmemory = 1536\nmemory_slots = 2'));
    });
    after(() => stop(sandbox, runRoot, 'sb-resize'));

    it('shows 1 CPU to a container without limits, and QEMU runs 1 vCPU', async () => {
      const r = await probe(sandbox, 'plain', undefined);
      bootMemKiB = r.memTotalKiB;
      await r.c.delete();
      assert.equal(r.nproc, 1);
      assert.equal(await qemuCpus(sandbox), 1);
      assert.deepEqual(await qemuDimms(sandbox), []);
    });

    it('hot-plugs 2 vCPUs and a 384 MiB DIMM for a container limited to 2 CPUs and 300 MiB, which the guest onlines', async () => {
      const r = await probe(sandbox, 'limited', { ...cpus(2), memoryLimitBytes: 300 * MIB });
      try {
        assert.equal(r.nproc, 3, 'default_vcpus 1 + 2 CPUs of quota, online in the guest');
        assert.equal(await qemuCpus(sandbox), 3);
        // 300 MiB above boot memory, in whole 128 MiB memory blocks.
        assert.deepEqual(await qemuDimms(sandbox), [384]);
        assert.ok(r.memTotalKiB - bootMemKiB >= 300 * 1024, `MemTotal grew from ${bootMemKiB} to ${r.memTotalKiB} kB`);
        assert.deepEqual(sandbox.resources.current, { vcpus: 3, memoryMiB: 896 });
      } finally {
        await r.c.delete();
      }
    });

    it('gives the vCPUs back when the container is removed with KVM (the guest ejects them); under TCG they stay; the memory stays', async () => {
      const kvm = (sandbox.running.vm as QemuVm).accelerator?.accelerator === 'kvm';
      const left = kvm ? 1 : 3;
      assert.equal(await qemuCpus(sandbox), left);
      assert.deepEqual(sandbox.resources.current, { vcpus: left, memoryMiB: 896 }, 'the bookkeeping says what QEMU has');
      const r = await probe(sandbox, 'after', undefined);
      await r.c.delete();
      assert.equal(r.nproc, left);
    });

    it('caps the vCPUs at default_maxvcpus', async () => {
      const r = await probe(sandbox, 'greedy', cpus(8));
      await r.c.delete();
      assert.equal(r.nproc, 3);
      assert.equal(await qemuCpus(sandbox), 3);
    });

    it('refuses a container whose memory needs a third DIMM (memory_slots = 2) with KATA_ERR_RESIZE before adding a vCPU for it', async () => {
      const first = await probe(sandbox, 'mem2', { memoryLimitBytes: 500 * MIB });
      const before = await qemuCpus(sandbox);
      assert.deepEqual(await qemuDimms(sandbox), [384, 128]);
      await assert.rejects(probe(sandbox, 'mem3', { ...cpus(1), memoryLimitBytes: 600 * MIB }), (e: KataError) => {
        assert.equal(e.code, 'KATA_ERR_RESIZE');
        assert.equal(e.key, 'hypervisor.qemu.default_maxmemory');
        assert.match(e.message, /memory slots/);
        return true;
      });
      assert.equal(await qemuCpus(sandbox), before, 'no vCPU was hot-plugged for the refused container');
      assert.deepEqual(await qemuDimms(sandbox), [384, 128]);
      assert.equal(sandbox.container('mem3'), undefined);
      await first.c.delete();
    });
  });
});
