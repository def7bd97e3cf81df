/**
 * vCPU and memory hot-plug into a running QEMU (the VM handle's resizeVcpus / resizeMemory).
 *
 * vCPUs: `query-hotpluggable-cpus` lists every possible CPU of `-smp …,maxcpus=N` with the driver
 * and topology properties `device_add` needs; those without a `qom-path` are free. Unplug is
 * `device_del` of a CPU this driver added, then DEVICE_DELETED once the guest has ejected it
 * (Linux offlines and ejects an ACPI CPU by itself), waited for with a bound, one CPU at a time
 * (a second request while the guest handles the first took it over 30 s under TCG).
 *
 * Memory: a RAM backend (`object-add memory-backend-ram`, or `memory-backend-memfd,share=on` when
 * guest RAM must be shareable with vhost-user daemons) and a `pc-dimm` on it, in one of the
 * `-m …,slots=N,maxmem=M` slots. Debian's kernel has ACPI memory hot-plug built in but does not
 * online new memory itself (CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE unset), so the agent onlines it.
 * DIMMs are not unplugged: the guest's kernel may have put unmovable pages on them.
 *
 * Every change goes through one queue; a failed step undoes the steps before it.
 */
import { KataError, type Logger } from '../../core/plugin-api.js';
import { PLUGIN_NAME } from './config.js';
import { hotplugError, reason } from './hotplug.js';
import type { QemuLaunchSpec } from './launch-spec.js';
import { QmpError, type QmpClient, type QmpEvent } from './qmp.js';

export const RESIZE_DEFAULTS = Object.freeze({
  /** How long the guest gets to eject a vCPU after device_del. */
  cpuUnplugTimeoutMs: 10_000,
});

/** x86-64 Linux adds hot-plugged memory in sections of 128 MiB (SECTION_SIZE_BITS = 27). */
const GUEST_MEMORY_SECTION = 128 * 1024 * 1024;

/** An entry of QMP's query-memory-devices (pc-dimm, nvdimm, …): where it sits in the guest's address space. */
interface MemoryDeviceInfo {
  type: string;
  data?: { addr?: number; size?: number };
}

/**
 * Why hot-plugged vCPUs stay under TCG. With QEMU 7.2 (Debian 12) and TCG, a vCPU unplug the guest
 * completes leaves QEMU's heap corrupted: the next PCI device unplug (a container's disk) aborts it
 * with "double free or corruption" or SIGSEGV (seen in test/integration/sandbox-resize.test.ts's
 * first runs). KVM does not run vCPUs through TCG's per-CPU structures. One TCG thread
 * (`thread=single`, which argv.ts renders where vCPUs may be hot-plugged) does not avoid it: with
 * unplug forced on, QEMU aborted at the next disk unplug in every run.
 */
export const CPU_UNPLUG_UNSAFE = 'QEMU under TCG corrupts its heap after a vCPU unplug (a later device unplug then crashes it), so vCPUs are only unplugged with KVM';

/** One entry of `query-hotpluggable-cpus`. */
interface HotpluggableCpu {
  readonly type: string;
  readonly 'vcpus-count': number;
  readonly props: Record<string, number>;
  readonly 'qom-path'?: string;
}

const MIB = 1024 * 1024;

export class CpuMemoryHotplug {
  readonly #qmp: QmpClient;
  readonly #log: Logger;
  readonly #bootCpus: number;
  readonly #maxCpus: number;
  readonly #bootMiB: number;
  /** The most memory the VM may reach by DIMMs, MiB (the plan's ceiling: maxmem also covers an NVDIMM image's room). */
  readonly #maxMiB: number;
  readonly #slots: number;
  readonly #sharedMemory: boolean;
  readonly #cpuUnplugTimeoutMs: number;
  /** False under TCG: see {@link CPU_UNPLUG_UNSAFE}. */
  readonly #cpuUnplug: boolean;
  #unplugRefusalLogged = false;
  /** vCPUs this driver hot-plugged, in order: device id. */
  readonly #cpus: string[] = [];
  readonly #dimms: { id: string; mib: number }[] = [];
  #serialNo = 0;
  #queue: Promise<unknown> = Promise.resolve();

  constructor(qmp: QmpClient, spec: Pick<QemuLaunchSpec, 'smp' | 'memory'>, log: Logger, opts: { cpuUnplugTimeoutMs?: number; slotsTaken?: number; maxMiB?: number; cpuUnplug?: boolean } = {}) {
    this.#qmp = qmp;
    this.#log = log;
    this.#bootCpus = spec.smp.cpus;
    this.#maxCpus = Math.max(spec.smp.cpus, spec.smp.maxcpus);
    this.#bootMiB = spec.memory.sizeMiB;
    this.#maxMiB = Math.min(spec.memory.maxMiB, opts.maxMiB ?? spec.memory.maxMiB);
    this.#slots = Math.max(0, (spec.memory.maxMiB > spec.memory.sizeMiB ? spec.memory.slots : 0) - (opts.slotsTaken ?? 0));
    this.#sharedMemory = spec.memory.shared;
    this.#cpuUnplugTimeoutMs = opts.cpuUnplugTimeoutMs ?? RESIZE_DEFAULTS.cpuUnplugTimeoutMs;
    this.#cpuUnplug = opts.cpuUnplug ?? true;
  }

  /** vCPUs the VM has: the boot ones plus those hot-plugged. */
  get vcpus(): number {
    return this.#bootCpus + this.#cpus.length;
  }

  /** Memory the VM has, MiB: boot plus the DIMMs. */
  get memoryMiB(): number {
    return this.#bootMiB + this.#dimms.reduce((s, d) => s + d.mib, 0);
  }

  resizeVcpus(n: number): Promise<number> {
    return this.#serial(async () => {
      if (!Number.isInteger(n) || n < 1) throw hotplugError(`cannot resize to ${n} vCPUs: not a positive integer`);
      if (n > this.#maxCpus) {
        throw hotplugError(`cannot hot-plug up to ${n} vCPUs: the VM was started with maxcpus=${this.#maxCpus} (default_maxvcpus)`, { fix: 'raise default_maxvcpus in [hypervisor.qemu]' });
      }
      if (n > this.vcpus) await this.#addCpus(n - this.vcpus);
      else if (n < this.vcpus) await this.#removeCpus(this.vcpus - Math.max(n, this.#bootCpus));
      return this.vcpus;
    });
  }

  resizeMemory(mib: number): Promise<number> {
    return this.#serial(async () => {
      if (!Number.isInteger(mib) || mib < 1) throw hotplugError(`cannot resize memory to ${mib} MiB: not a positive integer`);
      const add = mib - this.memoryMiB;
      if (add <= 0) return this.memoryMiB;
      if (this.memoryMiB + add > this.#maxMiB) {
        throw hotplugError(`cannot hot-plug ${add} MiB: the VM would have ${this.memoryMiB + add} MiB, above its maxmem of ${this.#maxMiB} MiB (default_maxmemory)`, { fix: 'raise default_maxmemory in [hypervisor.qemu]' });
      }
      if (this.#dimms.length >= this.#slots) {
        throw hotplugError(`cannot hot-plug ${add} MiB: all ${this.#slots} memory slots are in use (memory_slots)`, { fix: 'raise memory_slots in [hypervisor.qemu]' });
      }
      await this.#addDimm(add);
      return this.memoryMiB;
    });
  }

  async #addCpus(count: number): Promise<void> {
    const all = await this.#qmp.execute<HotpluggableCpu[]>('query-hotpluggable-cpus');
    const free = all.filter((c) => c['qom-path'] === undefined && c['vcpus-count'] === 1).sort((a, b) => compareTopology(a.props, b.props));
    if (free.length < count) throw hotplugError(`cannot hot-plug ${count} vCPUs: QEMU has ${free.length} free CPU slots`);
    const added: string[] = [];
    for (const cpu of free.slice(0, count)) {
      const id = `cpu-${Object.values(cpu.props).join('-')}`;
      try {
        await this.#qmp.execute('device_add', { driver: cpu.type, id, ...cpu.props });
      } catch (e) {
        if (this.#cpuUnplug) {
          for (const a of added.reverse()) await this.#unplugCpu(a).catch((err: unknown) => this.#log.error({ err, cpu: a }, 'could not unplug a vCPU of a failed hot-plug'));
        }
        const undone = added.length === 0 ? '' : this.#cpuUnplug ? `; the ${added.length} vCPU(s) added before it were unplugged again` : `; the ${added.length} vCPU(s) added before it stay, offline (${CPU_UNPLUG_UNSAFE})`;
        throw hotplugError(`device_add of vCPU ${id} failed: ${reason(e)}${undone}`, { cause: e });
      }
      added.push(id);
      this.#cpus.push(id);
    }
    this.#log.info({ added, vcpus: this.vcpus }, 'vCPUs hot-plugged');
  }

  async #removeCpus(count: number): Promise<void> {
    if (!this.#cpuUnplug) {
      if (!this.#unplugRefusalLogged) this.#log.info({ vcpus: this.vcpus }, `vCPUs are not given back: ${CPU_UNPLUG_UNSAFE}`);
      this.#unplugRefusalLogged = true;
      return;
    }
    const removed: string[] = [];
    for (let i = 0; i < count && this.#cpus.length > 0; i++) {
      const id = this.#cpus[this.#cpus.length - 1] as string;
      try {
        await this.#unplugCpu(id);
      } catch (err) {
        // The guest keeps it: report what the VM has instead of failing the caller.
        this.#log.warn({ err, cpu: id }, 'the guest did not give a vCPU back');
        break;
      }
      removed.push(id);
    }
    if (removed.length) this.#log.info({ removed, vcpus: this.vcpus }, 'vCPUs unplugged');
  }

  async #unplugCpu(id: string): Promise<void> {
    const since = this.#qmp.eventCursor;
    try {
      await this.#qmp.execute('device_del', { id });
    } catch (e) {
      if (!(e instanceof QmpError && e.class === 'DeviceNotFound')) throw e;
    }
    try {
      // QEMU 7.2 announces a CPU's removal only for its local APIC (`path`: …/<id>/lapic), not with `device`.
      const path = `/machine/peripheral/${id}`;
      const gone = (e: QmpEvent) => e.data.device === id || e.data.path === path || (typeof e.data.path === 'string' && e.data.path.startsWith(`${path}/`));
      await this.#qmp.waitForEvent('DEVICE_DELETED', gone, this.#cpuUnplugTimeoutMs, { since });
    } catch (e) {
      if (e instanceof KataError && e.code === 'KATA_ERR_QMP_TIMEOUT') {
        throw new KataError('KATA_ERR_UNPLUG_TIMEOUT', `the guest did not eject vCPU ${id} within ${this.#cpuUnplugTimeoutMs} ms`, { plugin: PLUGIN_NAME, cause: e });
      }
      throw e;
    }
    const at = this.#cpus.indexOf(id);
    if (at >= 0) this.#cpus.splice(at, 1);
  }

  async #addDimm(mib: number): Promise<void> {
    const n = this.#serialNo++;
    const mem = `hotmem${n}`;
    const dimm = `dimm${n}`;
    const backend = this.#sharedMemory ? { 'qom-type': 'memory-backend-memfd', share: true } : { 'qom-type': 'memory-backend-ram' };
    try {
      await this.#qmp.execute('object-add', { ...backend, id: mem, size: mib * MIB });
    } catch (e) {
      throw hotplugError(`cannot hot-plug ${mib} MiB: object-add of its memory backend failed: ${reason(e)}`, { cause: e });
    }
    const addr = await this.#nextDimmAddress();
    try {
      await this.#qmp.execute('device_add', { driver: 'pc-dimm', id: dimm, memdev: mem, ...(addr === undefined ? {} : { addr }) });
    } catch (e) {
      await this.#qmp.execute('object-del', { id: mem }).catch((err: unknown) => this.#log.error({ err, id: mem }, 'could not remove the memory backend of a failed DIMM'));
      throw hotplugError(`cannot hot-plug ${mib} MiB: device_add pc-dimm failed: ${reason(e)}; its memory backend was removed again`, { cause: e });
    }
    this.#dimms.push({ id: dimm, mib });
    this.#log.info({ dimm, mib, memoryMiB: this.memoryMiB, addr }, 'memory hot-plugged');
  }

  /**
   * Where the next DIMM goes: past every memory device, aligned to the guest's memory section
   * (128 MiB on x86-64). QEMU would put it right after the last one, and Linux cannot add memory
   * that starts inside a section: after an image NVDIMM whose size is no multiple of 128 MiB, the
   * DIMM was plugged but never appeared in the guest. Undefined (QEMU chooses) when there is no
   * device yet or QEMU does not say.
   */
  async #nextDimmAddress(): Promise<number | undefined> {
    const devices = await this.#qmp.execute<MemoryDeviceInfo[]>('query-memory-devices').catch(() => undefined);
    const ends = (Array.isArray(devices) ? devices : [])
      .map((d) => (typeof d.data?.addr === 'number' && typeof d.data.size === 'number' ? d.data.addr + d.data.size : undefined))
      .filter((e): e is number => e !== undefined && Number.isSafeInteger(e));
    if (ends.length === 0) return undefined;
    const end = Math.max(...ends);
    return Math.ceil(end / GUEST_MEMORY_SECTION) * GUEST_MEMORY_SECTION;
  }

  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => undefined);
    return run;
  }
}

/** Socket, die, core, thread order, so that vCPUs fill the topology from the start. */
function compareTopology(a: Record<string, number>, b: Record<string, number>): number {
  for (const k of ['node-id', 'socket-id', 'die-id', 'core-id', 'thread-id']) {
    const d = (a[k] ?? 0) - (b[k] ?? 0);
    if (d !== 0) return d;
  }
  return 0;
}
