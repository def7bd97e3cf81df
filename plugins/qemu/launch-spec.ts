/**
 * Builds the structured QEMU launch description (QemuLaunchSpec) for a validated configuration.
 * Pure: the host's CPU count and memory are an argument (defaulting to this host's), and every
 * run-directory path is written with the SANDBOX_DIR token.
 *
 * Other plugins edit the result through the plan hook: virtiofs adds vhost-user-fs-pci and sets
 * `memory.shared`; tdx sets machine options, objects, `bios` and `virtioIommuPlatform`.
 */
import os from 'node:os';
import type { KataConfig, QemuLaunchSpec, QemuOption, QemuPropValue, ReadonlyCapabilities } from '../../core/plugin-api.js';
import { escapeOptionValue } from './argv.js';
import {
  DEFAULT_MEMORY_MIB,
  DEFAULT_MEMORY_SLOTS,
  IMAGE_SIZE,
  MAX_VCPUS,
  MIN_MEMORY_MIB,
  NVDIMM_RESERVE_MIB,
  QEMU_IDS,
  SANDBOX_PATHS,
  SHARED_MOUNT_TAG,
  qemuSection,
  type QemuConfig,
} from './config.js';

export interface HostResources {
  readonly cpus: number;
  readonly memoryMiB: number;
}

/** This host's CPU count and memory, used where Kata's "0 = as much as the host has" applies. */
export function hostResources(): HostResources {
  return { cpus: os.availableParallelism(), memoryMiB: Math.floor(os.totalmem() / (1024 * 1024)) };
}

export interface SpecNote {
  readonly level: 'info' | 'warn';
  readonly message: string;
}

export interface BuiltSpec {
  readonly spec: QemuLaunchSpec;
  /** Decisions worth showing in `validate` (clamped values, fallbacks). */
  readonly notes: SpecNote[];
}

/** Guest kernel parameters for every QEMU guest: serial console, fast and quiet boot, reboot = exit. */
export const BASE_KERNEL_PARAMS: readonly string[] = Object.freeze([
  'console=ttyS0',
  'panic=1',
  'no_timer_check',
  'noreplace-smp',
  'reboot=k',
  'tsc=reliable',
  'rcupdate.rcu_expedited=1',
  // q35 still has a PS/2 controller: do not spend boot time probing it.
  'i8042.direct=1',
  'i8042.dumbkbd=1',
  'i8042.nopnp=1',
  'i8042.noaux=1',
  'cryptomgr.notests',
  'net.ifnames=0',
]);

export function buildQemuLaunchSpec(cfg: KataConfig, caps: ReadonlyCapabilities, host: HostResources = hostResources()): BuiltSpec {
  const hv = qemuSection(cfg);
  const notes: SpecNote[] = [];
  const image = nonEmpty(hv.image) ? hv.image : undefined;
  const hasImage = image !== undefined;
  const nvdimmImage = hasImage && caps.has('nvdimm-image');

  const machineOptions = parseMachineAccelerators(hv.machine_accelerators);
  if (nvdimmImage) machineOptions.nvdimm = true;

  const spec: QemuLaunchSpec = {
    hypervisor: 'qemu',
    binary: hv.path,
    machine: { type: hv.machine_type, options: machineOptions },
    accelerator: hv.accelerator,
    // `host` is Kata's model; the renderer turns it into `max` under TCG, where `host` does not exist.
    cpu: { model: 'host', features: hv.cpu_features },
    smp: smpFor(hv, caps, host, notes),
    memory: memoryFor(hv, caps, host, nvdimmImage, notes),
    kernel: hv.kernel,
    append: kernelCommandLine(hv, hasImage ? (nvdimmImage ? 'nvdimm' : 'virtio-blk') : undefined),
    objects: [],
    chardevs: [],
    devices: [],
    fsdevs: [],
    hotplugPorts: caps.has('block-device-hotplug') ? hotplugPortIds(hv.hotplug_root_ports) : [],
    virtioIommuPlatform: hv.enable_iommu_platform,
    extraArgs: [],
  };
  if (nonEmpty(hv.initrd)) spec.initrd = hv.initrd;
  if (nonEmpty(hv.firmware)) spec.bios = hv.firmware;

  // QMP: a chardev (so that its path is escaped like any other) and a control monitor on it.
  spec.chardevs.push(unixServer(QEMU_IDS.qmpChardev, SANDBOX_PATHS.qmpSocket));
  spec.extraArgs.push('-mon', `chardev=${QEMU_IDS.qmpChardev},mode=control`);

  // Guest console on the first serial port (console=ttyS0): a socket the driver may read live,
  // and a log file that keeps everything from the first byte, connected or not.
  spec.chardevs.push(unixServer(QEMU_IDS.consoleChardev, SANDBOX_PATHS.consoleSocket, { logfile: SANDBOX_PATHS.consoleLog }));
  spec.devices.push({ type: 'isa-serial', id: QEMU_IDS.consoleSerial, props: { chardev: QEMU_IDS.consoleChardev } });

  // Agent channel: a virtio-serial port the guest finds by name (no vhost-vsock needed on the host).
  spec.chardevs.push(unixServer(QEMU_IDS.agentChardev, SANDBOX_PATHS.agentSocket));
  spec.devices.push({ type: 'virtio-serial-pci', id: QEMU_IDS.virtioSerial, props: {} });
  spec.devices.push({
    type: 'virtserialport',
    id: QEMU_IDS.agentPort,
    props: { bus: `${QEMU_IDS.virtioSerial}.0`, chardev: QEMU_IDS.agentChardev, name: 'agent.channel.0' },
  });

  if (nonEmpty(hv.entropy_source)) {
    spec.objects.push({ type: 'rng-random', id: QEMU_IDS.rngObject, props: { filename: hv.entropy_source } });
    spec.devices.push({ type: 'virtio-rng-pci', id: QEMU_IDS.rngDevice, props: { rng: QEMU_IDS.rngObject } });
  }

  if (image !== undefined && nvdimmImage) {
    spec.objects.push({ type: 'memory-backend-file', id: QEMU_IDS.imageMemory, props: { 'mem-path': image, size: IMAGE_SIZE, readonly: true, share: false } });
    spec.devices.push({ type: 'nvdimm', id: QEMU_IDS.imageNvdimm, props: { memdev: QEMU_IDS.imageMemory, unarmed: true } });
  } else if (image !== undefined) {
    // The spec has no block-node list, so the read-only node behind the disk is a raw -blockdev.
    spec.extraArgs.push(
      '-blockdev',
      `driver=raw,node-name=${QEMU_IDS.imageNode},read-only=on,file.driver=file,file.filename=${escapeOptionValue(image)},file.read-only=on`,
    );
    spec.devices.push({ type: 'virtio-blk-pci', id: QEMU_IDS.imageDisk, props: { drive: QEMU_IDS.imageNode } });
  }

  if (hv.shared_fs === 'virtio-9p') {
    spec.fsdevs.push({
      type: 'local',
      id: QEMU_IDS.sharedFsdev,
      props: { path: SANDBOX_PATHS.sharedDir, security_model: 'none', multidevs: 'remap' },
    });
    spec.devices.push({ type: 'virtio-9p-pci', id: QEMU_IDS.sharedDevice, props: { fsdev: QEMU_IDS.sharedFsdev, mount_tag: SHARED_MOUNT_TAG } });
  }
  return { spec, notes };
}

/**
 * machine_accelerators ("nosmm,smbus=off,…") as machine options. A bare `name` means name=on and
 * `noname` means name=off, which is how QEMU itself reads such short forms (now deprecated there).
 */
export function parseMachineAccelerators(value: string): Record<string, QemuPropValue> {
  const out: Record<string, QemuPropValue> = {};
  for (const raw of value.split(',')) {
    const item = raw.trim();
    if (item === '') continue;
    const eq = item.indexOf('=');
    if (eq > 0) out[item.slice(0, eq)] = item.slice(eq + 1);
    else if (item.startsWith('no') && item.length > 2) out[item.slice(2)] = false;
    else out[item] = true;
  }
  return out;
}

export function hotplugPortIds(count: number): string[] {
  return Array.from({ length: count }, (_, i) => `${QEMU_IDS.hotplugPortPrefix}${i}`);
}

/** Base parameters, the root= parameters for a disk image, then the user's kernel_params (last, so they win). */
export function kernelCommandLine(hv: QemuConfig, image: 'nvdimm' | 'virtio-blk' | undefined): string {
  const params = [...BASE_KERNEL_PARAMS, hv.enable_debug ? 'debug' : 'quiet'];
  if (image !== undefined) params.push(...rootParams(image, hv.rootfs_type));
  const user = hv.kernel_params.trim();
  if (user) params.push(user);
  return params.join(' ');
}

function rootParams(image: 'nvdimm' | 'virtio-blk', fstype: QemuConfig['rootfs_type']): string[] {
  // The guest image's first partition; DAX when it is an NVDIMM (page cache bypassed).
  const root = image === 'nvdimm' ? '/dev/pmem0p1' : '/dev/vda1';
  const flags = [image === 'nvdimm' ? 'dax' : undefined, fstype === 'ext4' ? 'data=ordered,errors=remount-ro' : undefined].filter(Boolean);
  return [`root=${root}`, ...(flags.length > 0 ? [`rootflags=${flags.join(',')}`] : []), 'ro', `rootfstype=${fstype}`];
}

function smpFor(hv: QemuConfig, caps: ReadonlyCapabilities, host: HostResources, notes: SpecNote[]): QemuLaunchSpec['smp'] {
  let cpus = Math.max(1, Math.ceil(hv.default_vcpus));
  if (cpus > MAX_VCPUS) {
    notes.push({ level: 'warn', message: `default_vcpus = ${hv.default_vcpus} is above QEMU's ${MAX_VCPUS} vCPUs for x86_64 guests; using ${MAX_VCPUS}` });
    cpus = MAX_VCPUS;
  }
  if (!caps.has('cpu-hotplug')) return { cpus, maxcpus: cpus };
  let maxcpus = hv.default_maxvcpus === 0 ? host.cpus : hv.default_maxvcpus;
  if (maxcpus > MAX_VCPUS) {
    notes.push({ level: 'info', message: `maximum vCPUs capped at ${MAX_VCPUS} (QEMU's limit for x86_64 guests)` });
    maxcpus = MAX_VCPUS;
  }
  return { cpus, maxcpus: Math.max(cpus, maxcpus) };
}

function memoryFor(hv: QemuConfig, caps: ReadonlyCapabilities, host: HostResources, nvdimmImage: boolean, notes: SpecNote[]): QemuLaunchSpec['memory'] {
  let sizeMiB = hv.default_memory;
  if (sizeMiB < MIN_MEMORY_MIB) {
    // Kata's rule: less than 256 MiB means the default.
    notes.push({ level: 'warn', message: `default_memory = ${sizeMiB} is below ${MIN_MEMORY_MIB} MiB; using ${DEFAULT_MEMORY_MIB} MiB as Kata does` });
    sizeMiB = DEFAULT_MEMORY_MIB;
  }
  const hotplug = caps.has('memory-hotplug');
  if (!hotplug && !nvdimmImage) return { sizeMiB, slots: 0, maxMiB: sizeMiB, shared: false };
  let maxMiB = sizeMiB;
  if (hotplug) {
    const wanted = hv.default_maxmemory === 0 || hv.default_maxmemory > host.memoryMiB ? host.memoryMiB : hv.default_maxmemory;
    maxMiB = Math.max(sizeMiB, wanted);
  }
  // Address space above the RAM for the image NVDIMM (Kata reserves 1 GiB plus memory_offset).
  maxMiB += hv.memory_offset + (nvdimmImage ? NVDIMM_RESERVE_MIB : 0);
  return { sizeMiB, slots: hv.memory_slots === 0 ? DEFAULT_MEMORY_SLOTS : hv.memory_slots, maxMiB, shared: false };
}

function unixServer(id: string, path: string, extra: Record<string, QemuPropValue> = {}): QemuOption {
  return { type: 'socket', id, props: { path, server: true, wait: false, ...extra } };
}

function nonEmpty(v: unknown): v is string {
  return typeof v === 'string' && v.length > 0;
}
