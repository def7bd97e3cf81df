/**
 * vCPU and memory hot-plug (plugins/qemu/resize.ts) against a stand-in for QMP that answers as
 * QEMU 7.2 does: query-hotpluggable-cpus, device_add, and a CPU's DEVICE_DELETED carrying only the
 * path of its local APIC. What the real QEMU and guest do is in test/integration/sandbox-resize.test.ts.
 */
import assert from 'node:assert/strict';
import { silentLogger } from '../../../core/logger.js';
import { KataError } from '../../../core/errors.js';
import { CpuMemoryHotplug } from '../../../plugins/qemu/resize.js';
import { QmpError, type QmpClient, type QmpEvent } from '../../../plugins/qemu/qmp.js';

interface Sent {
  readonly command: string;
  readonly args: Record<string, unknown> | undefined;
}

/**
 * A QEMU with `max` possible CPUs (one booted), which fails the commands named in `fail`;
 * query-memory-devices answers `memoryDevices` (QEMU's shape: type and data.addr/size).
 */
function fakeQemu(max: number, fail: Set<string> = new Set(), memoryDevices: unknown[] = []) {
  const sent: Sent[] = [];
  const present = new Set<string>(['cpu-0']);
  const backlog: QmpEvent[] = [];
  let seq = 0;
  const slot = (i: number) => ({ type: 'qemu64-x86_64-cpu', 'vcpus-count': 1, props: { 'socket-id': i, 'core-id': 0, 'thread-id': 0 } });
  const qmp = {
    get eventCursor() {
      return seq;
    },
    async execute(command: string, args?: Record<string, unknown>) {
      sent.push({ command, args });
      if (fail.has(command) || fail.has(`${command}:${String(args?.driver ?? args?.id)}`)) throw new QmpError(command, 'GenericError', `${command} refused`);
      if (command === 'query-hotpluggable-cpus') {
        // QEMU lists the highest socket first.
        return Array.from({ length: max }, (_, i) => slot(max - 1 - i)).map((c) => {
          const id = c.props['socket-id'] === 0 ? 'cpu-0' : `cpu-${c.props['socket-id']}-0-0`;
          return present.has(id) ? { ...c, 'qom-path': `/machine/peripheral/${id}` } : c;
        });
      }
      if (command === 'query-memory-devices') return memoryDevices;
      if (command === 'device_add' && typeof args?.driver === 'string' && args.driver.endsWith('-cpu')) present.add(String(args.id));
      if (command === 'device_del') {
        present.delete(String(args?.id));
        backlog.push({ event: 'DEVICE_DELETED', data: { path: `/machine/peripheral/${String(args?.id)}/lapic` }, seq: ++seq } as unknown as QmpEvent);
      }
      return {};
    },
    async waitForEvent(name: string, predicate: (e: QmpEvent) => boolean, _timeout: number, opts: { since?: number } = {}) {
      const e = backlog.find((x) => x.seq > (opts.since ?? 0) && x.event === name && predicate(x));
      if (!e) throw new KataError('KATA_ERR_QMP_TIMEOUT', `no ${name}`);
      return e;
    },
  };
  return { qmp: qmp as unknown as QmpClient, sent, present };
}

const SPEC = { smp: { cpus: 1, maxcpus: 4 }, memory: { sizeMiB: 512, slots: 2, maxMiB: 2048, shared: false } };

describe('qemu vCPU and memory hot-plug (CpuMemoryHotplug)', () => {
  it('hot-plugs vCPUs into the lowest free sockets with the driver and topology query-hotpluggable-cpus gives', async () => {
    const { qmp, sent } = fakeQemu(4);
    const hp = new CpuMemoryHotplug(qmp, SPEC, silentLogger());
    assert.equal(await hp.resizeVcpus(3), 3);
    assert.deepEqual(
      sent.filter((s) => s.command === 'device_add').map((s) => s.args),
      [
        { driver: 'qemu64-x86_64-cpu', id: 'cpu-1-0-0', 'socket-id': 1, 'core-id': 0, 'thread-id': 0 },
        { driver: 'qemu64-x86_64-cpu', id: 'cpu-2-0-0', 'socket-id': 2, 'core-id': 0, 'thread-id': 0 },
      ],
    );
  });

  it('unplugs the hot-plugged vCPUs, last first, one at a time, and counts one gone on its local APIC\'s DEVICE_DELETED', async () => {
    const { qmp, sent, present } = fakeQemu(4);
    const hp = new CpuMemoryHotplug(qmp, SPEC, silentLogger());
    await hp.resizeVcpus(4);
    assert.equal(await hp.resizeVcpus(2), 2);
    assert.deepEqual(sent.filter((s) => s.command === 'device_del').map((s) => s.args?.id), ['cpu-3-0-0', 'cpu-2-0-0']);
    assert.deepEqual([...present].sort(), ['cpu-0', 'cpu-1-0-0']);
    assert.equal(await hp.resizeVcpus(1), 1, 'never below the boot vCPUs');
  });

  it('keeps hot-plugged vCPUs when unplug is off (TCG) and says how many the VM still has', async () => {
    const { qmp, sent } = fakeQemu(4);
    const hp = new CpuMemoryHotplug(qmp, SPEC, silentLogger(), { cpuUnplug: false });
    await hp.resizeVcpus(3);
    assert.equal(await hp.resizeVcpus(1), 3);
    assert.equal(sent.filter((s) => s.command === 'device_del').length, 0);
  });

  it('refuses more vCPUs than maxcpus with a coded error naming default_maxvcpus, sending nothing', async () => {
    const { qmp, sent } = fakeQemu(4);
    const hp = new CpuMemoryHotplug(qmp, SPEC, silentLogger());
    await assert.rejects(hp.resizeVcpus(5), (e: KataError) => e.code === 'KATA_ERR_HOTPLUG' && e.plugin === 'qemu' && /default_maxvcpus/.test(e.fix));
    assert.deepEqual(sent, []);
  });

  it('hot-plugs memory as a RAM backend and a pc-dimm on it', async () => {
    const { qmp, sent } = fakeQemu(4);
    const hp = new CpuMemoryHotplug(qmp, SPEC, silentLogger());
    assert.equal(await hp.resizeMemory(768), 768);
    assert.equal(await hp.resizeMemory(640), 768, 'memory is not taken back');
    assert.deepEqual(sent, [
      { command: 'object-add', args: { 'qom-type': 'memory-backend-ram', id: 'hotmem0', size: 256 * 1024 * 1024 } },
      { command: 'query-memory-devices', args: undefined },
      { command: 'device_add', args: { driver: 'pc-dimm', id: 'dimm0', memdev: 'hotmem0' } },
    ]);
  });

  it('puts a DIMM at the next 128 MiB boundary past the memory devices (an image NVDIMM of 112 MiB): Linux adds whole sections only', async () => {
    const GiB = 1024 * 1024 * 1024;
    const nvdimm = { type: 'nvdimm', data: { id: 'nv0', addr: 4 * GiB, size: 112 * 1024 * 1024, slot: 0, node: 0, memdev: '/objects/mem0', hotplugged: false, hotpluggable: true } };
    const { qmp, sent } = fakeQemu(4, new Set(), [nvdimm]);
    await new CpuMemoryHotplug(qmp, SPEC, silentLogger(), { slotsTaken: 1 }).resizeMemory(640);
    assert.deepEqual(sent.find((s) => s.command === 'device_add')?.args, { driver: 'pc-dimm', id: 'dimm0', memdev: 'hotmem0', addr: 4 * GiB + 128 * 1024 * 1024 });
  });

  it('uses a shareable memfd backend when guest RAM is shared (vhost-user daemons map it)', async () => {
    const { qmp, sent } = fakeQemu(4);
    await new CpuMemoryHotplug(qmp, { ...SPEC, memory: { ...SPEC.memory, shared: true } }, silentLogger()).resizeMemory(640);
    assert.deepEqual(sent[0]?.args, { 'qom-type': 'memory-backend-memfd', share: true, id: 'hotmem0', size: 128 * 1024 * 1024 });
  });

  it('removes the backend again when the pc-dimm cannot be added', async () => {
    const { qmp, sent } = fakeQemu(4, new Set(['device_add:pc-dimm']));
    const hp = new CpuMemoryHotplug(qmp, SPEC, silentLogger());
    await assert.rejects(hp.resizeMemory(768), (e: KataError) => e.code === 'KATA_ERR_HOTPLUG' && /backend was removed again/.test(e.message));
    assert.deepEqual(sent.map((s) => s.command), ['object-add', 'query-memory-devices', 'device_add', 'object-del']);
    assert.equal(hp.memoryMiB, 512);
  });

  it('refuses memory beyond maxmem or the free slots with coded errors naming the key to raise', async () => {
    const { qmp } = fakeQemu(4);
    const hp = new CpuMemoryHotplug(qmp, SPEC, silentLogger());
    await assert.rejects(hp.resizeMemory(4096), (e: KataError) => /default_maxmemory/.test(e.fix));
    await hp.resizeMemory(640);
    await hp.resizeMemory(768);
    await assert.rejects(hp.resizeMemory(896), (e: KataError) => e.code === 'KATA_ERR_HOTPLUG' && /memory_slots/.test(e.fix));
  });
});
