/**
 * Sandbox sizing: how many vCPUs and how much memory a VM needs for its containers' limits (Kata's
 * rule), and the bookkeeping that grows and shrinks a running VM through the neutral
 * {@link VmHandle} resize calls as containers come, change and go.
 *
 * Kata's rule (virtcontainers `Sandbox.updateResources`): the VM has `default_vcpus` plus the sum of
 * its containers' CPU limits (quota / period, summed, then rounded up once; when no container has a
 * quota, the size of their cpusets), capped at `default_maxvcpus`; and `default_memory` plus the sum
 * of their memory limits, capped at `default_maxmemory`. With `static_sandbox_resource_mgmt` the VM
 * is sized once at boot from the pod's sandbox annotations instead ({@link staticSandboxSizing}) and
 * never hot-plugs.
 *
 * Nothing here knows a hypervisor: the hypervisor plugin's driver resizes, the guest agent onlines.
 */
import { KataError } from './errors.js';
import { silentLogger, type Logger } from './logger.js';

/** A container's CPU and memory limits, as the OCI spec's `linux.resources` gives them. */
export interface ResourceDemand {
  /** CFS quota in µs per period; absent, 0 or negative: no CPU limit. */
  readonly cpuQuota?: number;
  /** CFS period in µs. */
  readonly cpuPeriod?: number;
  /** The cpuset (`0-1,3`); counts only when no container of the sandbox has a quota (Kata). */
  readonly cpus?: string;
  /** Memory limit in bytes; absent, 0 or negative: none. */
  readonly memoryLimitBytes?: number;
}

/** The bounds a VM's size moves within. */
export interface SizingLimits {
  /** vCPUs the VM boots with (`default_vcpus`). */
  readonly bootVcpus: number;
  /** The most vCPUs it may reach (`default_maxvcpus`); `bootVcpus` when vCPUs cannot be hot-plugged. */
  readonly maxVcpus: number;
  /** Memory it boots with, MiB (`default_memory`). */
  readonly bootMiB: number;
  /** The most memory it may reach, MiB (`default_maxmemory`); `bootMiB` when memory cannot be hot-plugged. */
  readonly maxMiB: number;
}

/** What the containers ask for, and what the VM gets within its limits. */
export interface SandboxSize {
  /** Boot vCPUs plus the containers' CPU limits, uncapped. */
  readonly wantedVcpus: number;
  /** Boot memory plus the containers' memory limits (MiB), uncapped. */
  readonly wantedMiB: number;
  /** `wantedVcpus` capped at the maximum. */
  readonly vcpus: number;
  /** `wantedMiB` capped at the maximum. */
  readonly memoryMiB: number;
}

const MIB = 1024 * 1024;

/** Kata's annotations (containerd's CRI) with the pod's summed limits, set on the sandbox container. */
export const SANDBOX_CPU_QUOTA_ANNOTATION = 'io.kubernetes.cri.sandbox-cpu-quota';
export const SANDBOX_CPU_PERIOD_ANNOTATION = 'io.kubernetes.cri.sandbox-cpu-period';
export const SANDBOX_MEMORY_ANNOTATION = 'io.kubernetes.cri.sandbox-memory';

/** CPUs of a quota: quota / period, or 0 without a limit. */
export function cpusOfQuota(d: ResourceDemand): number {
  const { cpuQuota: q, cpuPeriod: p } = d;
  return q !== undefined && p !== undefined && q > 0 && p > 0 ? q / p : 0;
}

/** The number of CPUs in a cpuset list (`0-3,6` → 5); 0 for none or a malformed one. */
export function cpusetSize(cpus: string | undefined): number {
  if (!cpus || !cpus.trim()) return 0;
  const seen = new Set<number>();
  for (const part of cpus.split(',')) {
    const m = /^\s*(\d{1,4})\s*(?:-\s*(\d{1,4})\s*)?$/.exec(part);
    if (!m) return 0;
    const a = Number(m[1]);
    const b = m[2] !== undefined ? Number(m[2]) : a;
    if (b < a) return 0;
    for (let i = a; i <= b; i++) seen.add(i);
  }
  return seen.size;
}

/** Memory of a limit in MiB, rounded up; 0 without a limit. */
export function memoryMiBOf(d: ResourceDemand): number {
  const l = d.memoryLimitBytes;
  return l !== undefined && l > 0 ? Math.ceil(l / MIB) : 0;
}

/** Kata's rule over all the sandbox's containers (see the module comment). */
export function sandboxSize(limits: SizingLimits, demands: Iterable<ResourceDemand>): SandboxSize {
  let quotaCpus = 0;
  let cpusetCpus = 0;
  let memMiB = 0;
  for (const d of demands) {
    quotaCpus += cpusOfQuota(d);
    cpusetCpus += cpusetSize(d.cpus);
    memMiB += memoryMiBOf(d);
  }
  // Rounded once over the sum (Kata: milli-CPUs summed, then ceil), so two 0.5-CPU containers need one vCPU.
  const extra = quotaCpus > 0 ? Math.ceil(Math.round(quotaCpus * 1000) / 1000) : cpusetCpus;
  const wantedVcpus = limits.bootVcpus + extra;
  const wantedMiB = limits.bootMiB + memMiB;
  return {
    wantedVcpus,
    wantedMiB,
    vcpus: Math.min(wantedVcpus, Math.max(limits.bootVcpus, limits.maxVcpus)),
    memoryMiB: Math.min(wantedMiB, Math.max(limits.bootMiB, limits.maxMiB)),
  };
}

/** Reads `linux.resources` of an OCI spec's `linux` object (untrusted JSON): only well-formed numbers count. */
export function demandFromOciLinux(linux: unknown): ResourceDemand {
  const resources = field(linux, 'resources');
  const cpu = field(resources, 'cpu');
  const memory = field(resources, 'memory');
  const out: { -readonly [K in keyof ResourceDemand]: ResourceDemand[K] } = {};
  const quota = safeInt(cpu?.quota);
  const period = safeInt(cpu?.period);
  const limit = safeInt(memory?.limit);
  if (quota !== undefined) out.cpuQuota = quota;
  if (period !== undefined) out.cpuPeriod = period;
  if (typeof cpu?.cpus === 'string' && cpu.cpus.length <= 256) out.cpus = cpu.cpus;
  if (limit !== undefined) out.memoryLimitBytes = limit;
  return out;
}

/**
 * The pod's summed limits from the sandbox container's annotations (containerd's CRI sets them);
 * a malformed value is refused with KATA_ERR_ANNOTATION rather than sizing the VM wrongly.
 */
export function demandFromSandboxAnnotations(annotations: Readonly<Record<string, string>>): ResourceDemand {
  const num = (name: string): number | undefined => {
    const v = annotations[name];
    if (v === undefined || v === '') return undefined;
    if (!/^-?\d{1,19}$/.test(v.trim()) || !Number.isSafeInteger(Number(v))) {
      throw new KataError('KATA_ERR_ANNOTATION', `annotation ${name} = ${JSON.stringify(v.slice(0, 64))} is not an integer`, {
        key: name,
        fix: 'containerd sets it from the pod spec as a decimal integer; correct or remove the annotation',
      });
    }
    return Number(v);
  };
  const out: { -readonly [K in keyof ResourceDemand]: ResourceDemand[K] } = {};
  const quota = num(SANDBOX_CPU_QUOTA_ANNOTATION);
  const period = num(SANDBOX_CPU_PERIOD_ANNOTATION);
  const memory = num(SANDBOX_MEMORY_ANNOTATION);
  if (quota !== undefined) out.cpuQuota = quota;
  if (period !== undefined) out.cpuPeriod = period;
  if (memory !== undefined) out.memoryLimitBytes = memory;
  return out;
}

/**
 * `static_sandbox_resource_mgmt`: the boot size from the pod's annotations (Kata adds the pod's
 * CPUs and memory to `default_vcpus` and `default_memory`), with the maxima equal to it, so the VM
 * reserves no hot-plug room.
 */
export function staticSandboxSizing(hv: { default_vcpus: number; default_memory: number }, annotations: Readonly<Record<string, string>>): { vcpus: number; memoryMiB: number } {
  const d = demandFromSandboxAnnotations(annotations);
  const vcpus = Math.max(1, Math.ceil(hv.default_vcpus)) + Math.ceil(cpusOfQuota(d));
  return { vcpus, memoryMiB: hv.default_memory + memoryMiBOf(d) };
}

/**
 * The annotations static sizing reads for a sandbox: the pod's own when containerd's CRI set them;
 * for a container that is its own sandbox (`ctr run`, no CRI), its own limits in their place, as
 * Kata sizes a `single_container` from its spec's resources.
 */
export function sandboxSizingAnnotations(annotations: Readonly<Record<string, string>>, own: ResourceDemand): Readonly<Record<string, string>> {
  const cri = 'io.kubernetes.cri.container-type' in annotations || [SANDBOX_CPU_QUOTA_ANNOTATION, SANDBOX_CPU_PERIOD_ANNOTATION, SANDBOX_MEMORY_ANNOTATION].some((k) => k in annotations);
  if (cri) return annotations;
  const out: Record<string, string> = { ...annotations };
  if (own.cpuQuota !== undefined && own.cpuPeriod !== undefined) {
    out[SANDBOX_CPU_QUOTA_ANNOTATION] = String(own.cpuQuota);
    out[SANDBOX_CPU_PERIOD_ANNOTATION] = String(own.cpuPeriod);
  }
  if (own.memoryLimitBytes !== undefined) out[SANDBOX_MEMORY_ANNOTATION] = String(own.memoryLimitBytes);
  return out;
}

/** The part of a VM (and its guest) the bookkeeping drives. */
export interface ResizeTarget {
  /** Hot-plugs or unplugs vCPUs up or down to `n`; resolves with the count the VM has afterwards. */
  resizeVcpus?(n: number): Promise<number>;
  /** Hot-plugs memory up to `mib`; resolves with the MiB the VM has afterwards. */
  resizeMemory?(mib: number): Promise<number>;
  /** The guest's memory block size, MiB: hot-plugged memory comes in whole blocks. Asked once, before the first memory hot-plug. */
  memoryBlockMiB?(): Promise<number>;
  /** Asks the guest to online `cpus` new CPUs (0: none to wait for) and, unless `cpuOnly`, new memory. */
  online(cpus: number, cpuOnly: boolean): Promise<void>;
}

/** How the sandbox's size may change. */
export type SizingMode =
  /** Hot-plug as containers come and go. */
  | { readonly kind: 'hotplug' }
  /** static_sandbox_resource_mgmt: sized at boot; containers' limits never resize it. */
  | { readonly kind: 'static' }
  /** The VM cannot be resized at all (a confidential guest): a container needing more is refused. */
  | { readonly kind: 'fixed'; readonly why: string };

export interface SandboxResourcesOptions {
  readonly limits: SizingLimits;
  /** The VM's size at start when it is not the limits' boot size (static sizing added the pod's limits to it). */
  readonly initial?: { readonly vcpus: number; readonly memoryMiB: number };
  readonly mode: SizingMode;
  /** Configuration keys named in errors (`hypervisor.qemu.default_maxvcpus` …). */
  readonly keyPrefix?: string;
  readonly log?: Logger;
}

/**
 * The containers' demands of one sandbox and the VM size they led to. Changes are serialised; a
 * change whose resize fails is not recorded and leaves the VM as it was before it.
 */
export class SandboxResources {
  readonly #target: ResizeTarget;
  readonly #opts: SandboxResourcesOptions;
  readonly #log: Logger;
  readonly #demands = new Map<string, ResourceDemand>();
  #vcpus: number;
  #memoryMiB: number;
  #blockMiB: number | undefined;
  #queue: Promise<unknown> = Promise.resolve();

  constructor(target: ResizeTarget, opts: SandboxResourcesOptions) {
    this.#target = target;
    this.#opts = opts;
    this.#log = opts.log ?? silentLogger();
    this.#vcpus = opts.initial?.vcpus ?? opts.limits.bootVcpus;
    this.#memoryMiB = opts.initial?.memoryMiB ?? opts.limits.bootMiB;
  }

  /** The VM's size as this bookkeeping last left it. */
  get current(): { readonly vcpus: number; readonly memoryMiB: number } {
    return { vcpus: this.#vcpus, memoryMiB: this.#memoryMiB };
  }

  get mode(): SizingMode {
    return this.#opts.mode;
  }

  /**
   * Records a container's limits (a new container, or an update of one) and grows or shrinks the VM
   * to match. Fails with a coded error, and records nothing, when the VM cannot be brought there.
   */
  set(containerId: string, demand: ResourceDemand): Promise<void> {
    return this.#serial(async () => {
      const next = new Map(this.#demands).set(containerId, demand);
      await this.#apply(next, containerId, false);
      this.#demands.set(containerId, demand);
    });
  }

  /** Forgets a removed container's limits and gives back what the hypervisor can take back; never fails. */
  release(containerId: string): Promise<void> {
    return this.#serial(async () => {
      if (!this.#demands.has(containerId)) return;
      this.#demands.delete(containerId);
      await this.#apply(this.#demands, containerId, true).catch((err: unknown) => this.#log.warn({ err, container: containerId }, 'could not give back the resources of a removed container'));
    });
  }

  async #apply(demands: ReadonlyMap<string, ResourceDemand>, containerId: string, releasing: boolean): Promise<void> {
    const { limits, mode } = this.#opts;
    const size = sandboxSize(limits, demands.values());
    const key = (k: string) => (this.#opts.keyPrefix ? `${this.#opts.keyPrefix}.${k}` : k);
    if (mode.kind === 'static') {
      if (!releasing && (size.wantedVcpus > this.#vcpus || size.wantedMiB > this.#memoryMiB)) {
        this.#log.info({ container: containerId, wantedVcpus: size.wantedVcpus, wantedMiB: size.wantedMiB, ...this.current }, 'static_sandbox_resource_mgmt: the VM keeps its boot size');
      }
      return;
    }
    if (mode.kind === 'fixed') {
      if (!releasing && (size.wantedVcpus > this.#vcpus || size.wantedMiB > this.#memoryMiB)) {
        const cpu = size.wantedVcpus > this.#vcpus ? `${size.wantedVcpus} vCPUs (it has ${this.#vcpus})` : '';
        const mem = size.wantedMiB > this.#memoryMiB ? `${size.wantedMiB} MiB of memory (it has ${this.#memoryMiB} MiB)` : '';
        throw new KataError('KATA_ERR_RESIZE_UNAVAILABLE', `container ${containerId}'s limits need the VM to grow to ${[cpu, mem].filter(Boolean).join(' and ')}, but ${mode.why}`, {
          key: key(size.wantedVcpus > this.#vcpus ? 'default_vcpus' : 'default_memory'),
          fix: 'size the VM at boot: static_sandbox_resource_mgmt = true with the pod\'s sandbox annotations (containerd\'s CRI sets them), or raise default_vcpus / default_memory',
        });
      }
      return;
    }
    if (size.vcpus < size.wantedVcpus) {
      this.#log.warn({ container: containerId, wanted: size.wantedVcpus, max: limits.maxVcpus }, `the containers' CPU limits need ${size.wantedVcpus} vCPUs; the VM is capped at default_maxvcpus = ${limits.maxVcpus}`);
    }
    if (size.memoryMiB < size.wantedMiB) {
      this.#log.warn({ container: containerId, wantedMiB: size.wantedMiB, maxMiB: limits.maxMiB }, `the containers' memory limits need ${size.wantedMiB} MiB; the VM is capped at default_maxmemory = ${limits.maxMiB}`);
    }
    const beforeVcpus = this.#vcpus;
    const beforeMiB = this.#memoryMiB;
    const target = this.#target;
    // Memory first: a memory hot-plug that fails (slots, maxmem) then leaves nothing to undo, and no
    // vCPU has to be unplugged again (which some hypervisors cannot do safely: QEMU 7.2 under TCG).
    // Memory goes up only (a pc-dimm or a resized region is not taken back); vCPUs up or down.
    let addedMemory = false;
    if (size.memoryMiB > beforeMiB && target.resizeMemory) {
      this.#blockMiB ??= (await target.memoryBlockMiB?.().catch(() => undefined)) ?? 1;
      const wantMiB = this.#aligned(size.memoryMiB);
      const got = await target.resizeMemory(wantMiB).catch((e: unknown) => {
        throw resizeError(`cannot hot-plug memory for container ${containerId} (${beforeMiB} → ${wantMiB} MiB)`, e, key('default_maxmemory'));
      });
      this.#memoryMiB = got;
      addedMemory = got > beforeMiB;
    }
    let addedCpus = 0;
    if (size.vcpus !== beforeVcpus && target.resizeVcpus) {
      try {
        this.#vcpus = await target.resizeVcpus(size.vcpus);
      } catch (e) {
        // The memory stays, offline (never onlined, so the guest does not use it).
        throw resizeError(`cannot ${size.vcpus > beforeVcpus ? 'hot-plug' : 'unplug'} vCPUs for container ${containerId} (${beforeVcpus} → ${size.vcpus})${addedMemory ? `; the ${this.#memoryMiB - beforeMiB} MiB hot-plugged for it stay offline` : ''}`, e, key('default_maxvcpus'));
      }
      addedCpus = Math.max(0, this.#vcpus - beforeVcpus);
    }
    if (addedCpus > 0 || addedMemory) {
      try {
        await target.online(addedCpus, !addedMemory);
      } catch (e) {
        // vCPUs go back where the hypervisor can unplug them; memory stays (not unplugged here).
        await this.#undoCpus(beforeVcpus);
        throw resizeError(`the guest could not online the ${addedCpus} vCPU(s)${addedMemory ? ' and the memory' : ''} hot-plugged for container ${containerId}`, e, key('default_maxvcpus'));
      }
    }
    if (this.#vcpus !== beforeVcpus || this.#memoryMiB !== beforeMiB) {
      this.#log.info({ container: containerId, vcpus: `${beforeVcpus} → ${this.#vcpus}`, memoryMiB: `${beforeMiB} → ${this.#memoryMiB}` }, 'VM resized for the containers\' limits');
    }
  }

  /** `mib` with the part above boot memory grown to whole memory blocks, but not past the maximum (then shrunk to whole blocks). */
  #aligned(mib: number): number {
    const block = this.#blockMiB ?? 1;
    const base = this.#opts.limits.bootMiB;
    if (mib <= base || block <= 1) return mib;
    const up = base + Math.ceil((mib - base) / block) * block;
    return up <= Math.max(this.#opts.limits.maxMiB, base) ? up : base + Math.floor((mib - base) / block) * block;
  }

  async #undoCpus(to: number): Promise<void> {
    if (this.#vcpus === to || !this.#target.resizeVcpus) return;
    try {
      this.#vcpus = await this.#target.resizeVcpus(to);
    } catch (err) {
      this.#log.error({ err, vcpus: this.#vcpus, wanted: to }, 'could not unplug the vCPUs of a failed resize');
    }
  }

  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => undefined);
    return run;
  }
}

function resizeError(what: string, cause: unknown, key: string): KataError {
  const why = cause instanceof KataError ? `${cause.text} [${cause.code}]` : cause instanceof Error ? cause.message : String(cause);
  return new KataError('KATA_ERR_RESIZE', `${what}: ${why}; the VM was left as it was`, {
    key,
    fix: `lower the container's limits, or raise ${key} (and memory_slots for memory) so the VM may grow; static_sandbox_resource_mgmt = true sizes the VM at boot instead`,
    cause,
  });
}

function field(v: unknown, name: string | undefined): Record<string, unknown> | undefined {
  const o = v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  if (name === undefined) return o;
  const f = o?.[name];
  return f !== null && typeof f === 'object' && !Array.isArray(f) ? (f as Record<string, unknown>) : undefined;
}

function safeInt(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isSafeInteger(v) ? v : undefined;
}
