/**
 * QEMU's side of the plan: what a QEMU VM looks like as neutral intents for a configuration
 * ({@link describeQemuVm}, at STAGE.HYPERVISOR), and the rendering of the finished intents into
 * QEMU's own structured launch description ({@link renderQemuLaunchSpec}, at STAGE.FINALIZE), which
 * argv.ts turns into an argv. Pure: the host's CPU count and memory are an argument (defaulting to
 * this host's), and every run-directory path is written with the SANDBOX_DIR token.
 *
 * Other plugins never see the QemuLaunchSpec: virtiofs adds a vhost-user-fs intent and asks for
 * shared memory, tdx sets the confidential intent; this file turns those into vhost-user-fs-pci, a
 * memfd RAM backend, the TDX machine options, `-bios` and `iommu_platform=on`.
 */
import os from 'node:os';
import {
  AGENT_CHANNEL_NAME,
  DEBUG_CONSOLE_CHANNEL_NAME,
  DEBUG_CONSOLE_KERNEL_PARAM,
  type DebugConsoleIntent,
  KataError,
  type AgentChannelIntent,
  type ConsoleIntent,
  type DeviceIntent,
  type KataConfig,
  type NetIntent,
  type ReadonlyCapabilities,
  type VmDescription,
} from '../../core/plugin-api.js';
import { escapeOptionValue } from './argv.js';
import {
  DEFAULT_MEMORY_MIB,
  DEFAULT_MEMORY_SLOTS,
  IMAGE_SIZE,
  MAX_VCPUS,
  MIN_MEMORY_MIB,
  NVDIMM_RESERVE_MIB,
  PLUGIN_NAME,
  QEMU_IDS,
  SANDBOX_PATHS,
  SHARED_MOUNT_TAG,
  qemuSection,
  type QemuConfig,
} from './config.js';

export type QemuPropValue = string | number | boolean;

/** One `-object`, `-device`, `-chardev` … option: a driver/type followed by key=value pairs. */
export interface QemuOption {
  /** The first, unnamed value (device driver, object type, chardev backend). */
  type: string;
  id?: string;
  props: Record<string, QemuPropValue>;
}

/** QEMU's structured launch description, rendered from the plan's intents; argv.ts renders it to argv. */
export interface QemuLaunchSpec {
  readonly hypervisor: 'qemu';
  binary: string;
  machine: { type: string; options: Record<string, QemuPropValue> };
  /** `auto` is resolved when the VM starts: KVM when it can run a standard guest, else TCG. */
  accelerator: 'auto' | 'kvm' | 'tcg';
  /** TCG's translation buffer, MiB (`-accel tcg,tb-size=N`) when the VM runs under TCG; absent or 0: QEMU's default. */
  tcgTbSizeMiB?: number;
  cpu: { model: string; features: string };
  smp: { cpus: number; maxcpus: number };
  memory: {
    sizeMiB: number;
    slots: number;
    maxMiB: number;
    shared: boolean;
    /** Guest RAM in this file (VM templating, template.ts): mapped shared by the template, privately by a clone. */
    file?: { path: string; share: boolean };
  };
  kernel?: string;
  initrd?: string;
  append: string;
  /** Firmware given with `-bios`. */
  bios?: string;
  objects: QemuOption[];
  chardevs: QemuOption[];
  devices: QemuOption[];
  fsdevs: QemuOption[];
  /** Ids of the pcie-root-ports reserved for hot-plug, in order. */
  hotplugPorts: string[];
  /**
   * The virtio-scsi controller disks are hot-plugged onto as scsi-hd (block_device_driver =
   * "virtio-scsi"); absent when disks are hot-plugged as virtio-blk-pci into `hotplugPorts`.
   */
  scsiController?: string;
  /** Set virtio `iommu_platform=on` on every virtio-pci device, including hot-plugged ones (TDX). */
  virtioIommuPlatform: boolean;
  /** Extra raw arguments appended last. */
  extraArgs: string[];
  /** The argv, binary first (as `plan.vm.launch`). */
  launch?: string[];
}

/** True when `native` (a plan's `vm.native`) is a QEMU launch description. */
export function isQemuSpec(native: unknown): native is QemuLaunchSpec {
  return typeof native === 'object' && native !== null && (native as { hypervisor?: unknown }).hypervisor === 'qemu';
}

/** Device kinds this plugin renders; each is declared as a `render:device:<kind>` capability. */
export const QEMU_DEVICE_KINDS = Object.freeze(['disk', 'vhost-user-fs', '9p', 'agent-channel', 'console', 'rng', 'scsi-controller', 'net', 'debug-console', 'balloon'] as const);

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

/** A QEMU VM for this configuration alone (no other plugin's intents), rendered: for tests and benchmarks. */
export function buildQemuLaunchSpec(cfg: KataConfig, caps: ReadonlyCapabilities, host: HostResources = hostResources()): BuiltSpec {
  const { vm, notes } = describeQemuVm(cfg, caps, host);
  return { spec: renderQemuLaunchSpec(vm, cfg, caps), notes };
}

export interface DescribedVm {
  readonly vm: VmDescription;
  /** Decisions worth showing in `validate` (clamped values, fallbacks). */
  readonly notes: SpecNote[];
}

/**
 * The neutral VM description for `[hypervisor.qemu]`: QEMU's limits and Kata's QEMU rules applied
 * to vCPUs and memory, the kernel, the image, and the devices QEMU itself brings (console, agent
 * channel on virtio-serial, rng, the 9p share it serves).
 */
export function describeQemuVm(cfg: KataConfig, caps: ReadonlyCapabilities, host: HostResources = hostResources()): DescribedVm {
  const hv = qemuSection(cfg);
  const notes: SpecNote[] = [];
  const smp = smpFor(hv, caps, host, notes);
  const mem = memoryFor(hv, caps, host, notes);
  const devices: DeviceIntent[] = [
    { kind: 'console', socket: SANDBOX_PATHS.consoleSocket, logFile: SANDBOX_PATHS.consoleLog },
    // No vhost-vsock needed on the host: a virtio-serial port the guest finds by name.
    { kind: 'agent-channel', transport: 'virtio-serial', socket: SANDBOX_PATHS.agentSocket, name: AGENT_CHANNEL_NAME },
  ];
  if (nonEmpty(hv.entropy_source)) devices.push({ kind: 'rng', source: hv.entropy_source });
  // Kata: agent.debug_console on the kernel command line; here a second port on the agent's virtio-serial bus.
  if (cfg.agent.debug_console_enabled) devices.push({ kind: 'debug-console', transport: 'virtio-serial', socket: SANDBOX_PATHS.debugConsoleSocket, name: DEBUG_CONSOLE_CHANNEL_NAME });
  // Kata's reclaim_guest_freed_memory: a balloon that is never inflated, whose free-page reporting
  // hands the pages the guest frees (the initramfs once unpacked, exited containers) back to the host.
  if (hv.reclaim_guest_freed_memory && caps.has('balloon')) devices.push({ kind: 'balloon', freePageReporting: true });
  if (hv.shared_fs === 'virtio-9p') devices.push({ kind: '9p', path: SANDBOX_PATHS.sharedDir, tag: SHARED_MOUNT_TAG });
  // Kata's virtio-scsi: one controller from boot; disks come and go on it as scsi-hd.
  if (caps.has('block-device-hotplug') && hv.block_device_driver === 'virtio-scsi') devices.push({ kind: 'scsi-controller', id: QEMU_IDS.scsiController });
  const vm: VmDescription = {
    hypervisor: 'qemu',
    binary: hv.path as string,
    accelerator: hv.accelerator,
    cpus: { boot: smp.cpus, max: smp.maxcpus, hotplug: caps.has('cpu-hotplug') },
    memory: { bootMiB: mem.bootMiB, maxMiB: mem.maxMiB, hotplug: caps.has('memory-hotplug'), shared: false },
    kernelParams: hv.kernel_params.trim() ? [hv.kernel_params.trim()] : [],
    confidential: null,
    devices,
  };
  if (cfg.agent.debug_console_enabled) vm.kernelParams.push(DEBUG_CONSOLE_KERNEL_PARAM);
  if (hv.kernel !== undefined) vm.kernel = hv.kernel;
  if (nonEmpty(hv.initrd)) vm.initrd = hv.initrd;
  if (nonEmpty(hv.image)) vm.image = { path: hv.image, fstype: hv.rootfs_type };
  if (nonEmpty(hv.firmware)) vm.firmware = hv.firmware;
  return { vm, notes };
}

/**
 * Renders the whole VM description into QEMU's launch description. QEMU-only settings (machine,
 * accelerator, CPU model, memory slots, hot-plug ports, IOMMU platform) come from `[hypervisor.qemu]`;
 * everything else from the intents. The order of options is fixed by kind, so the argv is the same
 * whichever plugin added an intent first.
 */
export function renderQemuLaunchSpec(vm: VmDescription, cfg: KataConfig, caps: ReadonlyCapabilities): QemuLaunchSpec {
  const hv = qemuSection(cfg);
  const image = vm.image;
  const nvdimmImage = image !== undefined && caps.has('nvdimm-image');
  const tdx = vm.confidential?.tee === 'tdx' ? vm.confidential : undefined;

  const machineOptions = parseMachineAccelerators(hv.machine_accelerators);
  if (nvdimmImage) machineOptions.nvdimm = true;
  if (tdx) {
    machineOptions['confidential-guest-support'] = 'tdx';
    machineOptions['kernel-irqchip'] = 'split';
  }

  const spec: QemuLaunchSpec = {
    hypervisor: 'qemu',
    binary: vm.binary,
    machine: { type: hv.machine_type, options: machineOptions },
    // A TD needs KVM with TDX; no software emulation.
    accelerator: tdx ? 'kvm' : hv.accelerator,
    tcgTbSizeMiB: hv.tcg_tb_size,
    // `host` is Kata's model; the renderer turns it into `max` under TCG, where `host` does not exist.
    cpu: { model: 'host', features: hv.cpu_features },
    smp: { cpus: vm.cpus.boot, maxcpus: vm.cpus.hotplug ? vm.cpus.max : vm.cpus.boot },
    memory: renderMemory(hv, vm, nvdimmImage),
    kernel: vm.kernel,
    append: appendLine(hv, image && (nvdimmImage ? 'nvdimm' : 'virtio-blk'), image?.fstype ?? hv.rootfs_type, [...noBounceBuffer(vm), ...vm.kernelParams]),
    objects: [],
    chardevs: [],
    devices: [],
    fsdevs: [],
    // Root ports serve virtio-blk hot-plug only; SCSI disks go on the controller.
    hotplugPorts: caps.has('block-device-hotplug') && hv.block_device_driver === 'virtio-blk' ? hotplugPortIds(hv.hotplug_root_ports) : [],
    virtioIommuPlatform: hv.enable_iommu_platform || vm.confidential?.accessPlatform === true,
    extraArgs: [],
  };
  if (vm.initrd !== undefined) spec.initrd = vm.initrd;
  const firmware = tdx?.firmware ?? vm.firmware;
  if (firmware !== undefined && firmware !== '') spec.bios = firmware;

  // QMP: a chardev (so that its path is escaped like any other) and a control monitor on it.
  spec.chardevs.push(unixServer(QEMU_IDS.qmpChardev, SANDBOX_PATHS.qmpSocket));
  spec.extraArgs.push('-mon', `chardev=${QEMU_IDS.qmpChardev},mode=control`);

  const of = <K extends DeviceIntent['kind']>(kind: K) => vm.devices.filter((d): d is Extract<DeviceIntent, { kind: K }> => d.kind === kind);

  // Guest console on the first serial port (console=ttyS0): a socket the driver may read live,
  // and a log file that keeps everything from the first byte, connected or not.
  for (const c of of('console').slice(0, 1)) renderConsole(spec, c);
  for (const a of of('agent-channel').slice(0, 1)) renderAgentChannel(spec, a);
  for (const d of of('debug-console').slice(0, 1)) renderDebugConsole(spec, d);
  for (const b of of('balloon').slice(0, 1)) {
    spec.devices.push({ type: 'virtio-balloon-pci', id: QEMU_IDS.balloon, props: b.freePageReporting ? { 'free-page-reporting': true } : {} });
  }
  for (const [i, r] of of('rng').entries()) {
    const suffix = i === 0 ? '' : String(i);
    spec.objects.push({ type: 'rng-random', id: `${QEMU_IDS.rngObject}${suffix}`, props: { filename: r.source } });
    spec.devices.push({ type: 'virtio-rng-pci', id: `${QEMU_IDS.rngDevice}${suffix}`, props: { rng: `${QEMU_IDS.rngObject}${suffix}` } });
  }

  if (image !== undefined && nvdimmImage) {
    // share=on although read-only: the pages are the host page cache's either way, and VM
    // templating's x-ignore-shared leaves a shared RAM block out of the migration stream (a
    // private one would be written into a clone's read-only mapping).
    spec.objects.push({ type: 'memory-backend-file', id: QEMU_IDS.imageMemory, props: { 'mem-path': image.path, size: IMAGE_SIZE, readonly: true, share: true } });
    spec.devices.push({ type: 'nvdimm', id: QEMU_IDS.imageNvdimm, props: { memdev: QEMU_IDS.imageMemory, unarmed: true } });
  } else if (image !== undefined) {
    spec.extraArgs.push('-blockdev', rawBlockdev(QEMU_IDS.imageNode, image.path, true));
    spec.devices.push({ type: 'virtio-blk-pci', id: QEMU_IDS.imageDisk, props: { drive: QEMU_IDS.imageNode } });
  }
  if (tdx) spec.objects.push({ type: 'tdx-guest', id: 'tdx', props: {} });
  for (const d of of('disk')) {
    // The spec has no block-node list, so the node behind the disk is a raw -blockdev.
    spec.extraArgs.push('-blockdev', rawBlockdev(`${d.id}-node`, d.path, d.readonly));
    spec.devices.push({ type: 'virtio-blk-pci', id: d.id, props: { drive: `${d.id}-node` } });
  }

  // The first controller takes the hot-plugged SCSI disks; iommu_platform comes with effectiveDevice under TDX.
  for (const c of of('scsi-controller')) {
    spec.devices.push({ type: 'virtio-scsi-pci', id: c.id, props: {} });
    spec.scsiController ??= c.id;
  }

  for (const [i, share] of of('9p').entries()) {
    const fsdev = i === 0 ? QEMU_IDS.sharedFsdev : `fs-${share.tag}${i}`;
    spec.fsdevs.push({ type: 'local', id: fsdev, props: { path: share.path, security_model: 'none', multidevs: 'remap' } });
    spec.devices.push({ type: 'virtio-9p-pci', id: i === 0 ? QEMU_IDS.sharedDevice : `virtio-9p-${share.tag}${i}`, props: { fsdev, mount_tag: share.tag } });
  }

  for (const [i, fs] of of('vhost-user-fs').entries()) {
    // vhost-user needs the guest RAM in a shared memory backend that the daemon can map
    // (vm.memory.shared, asked for by the plugin that added the share).
    const chardev = i === 0 ? QEMU_IDS.virtiofsChardev : `${QEMU_IDS.virtiofsChardev}${i}`;
    spec.chardevs.push({ type: 'socket', id: chardev, props: { path: fs.socket } });
    spec.devices.push({ type: 'vhost-user-fs-pci', id: `${QEMU_IDS.virtiofsDevicePrefix}${i}`, props: { chardev, tag: fs.tag, 'queue-size': fs.queueSize } });
  }
  renderNetDevices(spec, of('net'));
  return spec;
}

const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
// Linux interface names: at most 15 bytes, no '/', ':', whitespace, and never an option.
const TAP_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$/;

/**
 * Adds one `-netdev tap` + `virtio-net-pci` per interface: the tap is opened by name in QEMU's
 * network namespace (no scripts: the network plugin made and wired it), the device carries the
 * pod interface's MAC and MTU. Plain tap: this host has no vhost-net. Under TDX the device gets
 * `iommu_platform=on` like every virtio-pci device (effectiveDevice). The driver calls this too,
 * for the interfaces found at sandbox start.
 */
export function renderNetDevices(spec: QemuLaunchSpec, nets: readonly NetIntent[]): void {
  for (const n of nets) {
    if (!TAP_NAME.test(n.tap)) throw new KataError('KATA_ERR_INTERNAL', `network device ${n.id}: "${n.tap}" is not a tap device name`, { plugin: PLUGIN_NAME });
    if (!MAC.test(n.mac)) throw new KataError('KATA_ERR_INTERNAL', `network device ${n.id}: "${n.mac}" is not a MAC address`, { plugin: PLUGIN_NAME });
    const netdev = `${n.id}-tap`;
    spec.extraArgs.push('-netdev', `tap,id=${netdev},ifname=${n.tap},script=no,downscript=no`);
    const props: Record<string, QemuPropValue> = { netdev, mac: n.mac };
    // QEMU's virtio-net takes host_mtu only from 68; 0 means "unknown" (leave the default).
    if (n.mtu >= 68) props.host_mtu = n.mtu;
    spec.devices.push({ type: 'virtio-net-pci', id: n.id, props });
  }
}

function renderConsole(spec: QemuLaunchSpec, c: ConsoleIntent): void {
  const extra: Record<string, QemuPropValue> = c.logFile !== undefined ? { logfile: c.logFile } : {};
  spec.chardevs.push(unixServer(QEMU_IDS.consoleChardev, c.socket ?? SANDBOX_PATHS.consoleSocket, extra));
  spec.devices.push({ type: 'isa-serial', id: QEMU_IDS.consoleSerial, props: { chardev: QEMU_IDS.consoleChardev } });
}

function renderDebugConsole(spec: QemuLaunchSpec, d: DebugConsoleIntent): void {
  // A second port on the agent's virtio-serial bus (one guest reader each, no multiplexing).
  if (!spec.devices.some((x) => x.id === QEMU_IDS.virtioSerial)) spec.devices.push({ type: 'virtio-serial-pci', id: QEMU_IDS.virtioSerial, props: {} });
  spec.chardevs.push(unixServer(QEMU_IDS.debugConsoleChardev, d.socket));
  spec.devices.push({ type: 'virtserialport', id: QEMU_IDS.debugConsolePort, props: { bus: `${QEMU_IDS.virtioSerial}.0`, chardev: QEMU_IDS.debugConsoleChardev, name: d.name } });
}

function renderAgentChannel(spec: QemuLaunchSpec, a: AgentChannelIntent): void {
  if (a.transport === 'virtio-serial') {
    spec.chardevs.push(unixServer(QEMU_IDS.agentChardev, a.socket));
    spec.devices.push({ type: 'virtio-serial-pci', id: QEMU_IDS.virtioSerial, props: {} });
    spec.devices.push({ type: 'virtserialport', id: QEMU_IDS.agentPort, props: { bus: `${QEMU_IDS.virtioSerial}.0`, chardev: QEMU_IDS.agentChardev, name: a.name } });
  } else if (a.transport === 'vsock') {
    spec.devices.push({ type: 'vhost-vsock-pci', id: QEMU_IDS.vsockDevice, props: { 'guest-cid': a.cid } });
  } else {
    // The qemu plugin chooses the agent channel itself (describeQemuVm), so this is a plugin bug.
    throw new KataError('KATA_ERR_INTERNAL', `QEMU has no ${a.transport} agent channel: use virtio-serial or vsock`, { plugin: PLUGIN_NAME });
  }
}

function rawBlockdev(node: string, file: string, readonly: boolean): string {
  const ro = readonly ? ',read-only=on' : '';
  return `driver=raw,node-name=${node}${ro},file.driver=file,file.filename=${escapeOptionValue(file)}${ro ? ',file.read-only=on' : ''}`;
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

/**
 * `swiotlb=noforce` unless the guest needs bounce buffers. With memory hot-plug (maxmem above 4 GiB)
 * the guest kernel sets up the 64 MiB swiotlb and zeroes it at boot, so the host backs it for the
 * VM's lifetime; virtio devices never bounce. A confidential guest (TDX) bounces every DMA through
 * it, and a swiotlb= of the configuration's kernel_params is the user's choice.
 */
export function noBounceBuffer(vm: Pick<VmDescription, 'confidential' | 'kernelParams'>): string[] {
  if (vm.confidential !== null) return [];
  if (vm.kernelParams.some((p) => /(^|\s)swiotlb=/.test(p))) return [];
  return ['swiotlb=noforce'];
}

/** Base parameters, the root= parameters for a disk image, then the user's kernel_params (last, so they win). */
export function kernelCommandLine(hv: QemuConfig, image: 'nvdimm' | 'virtio-blk' | undefined): string {
  const user = hv.kernel_params.trim();
  return appendLine(hv, image, hv.rootfs_type, user ? [user] : []);
}

/** Base parameters, the root= parameters for a disk image, then the plan's parameters (last, so they win). */
function appendLine(hv: QemuConfig, image: 'nvdimm' | 'virtio-blk' | undefined, fstype: string, params: readonly string[]): string {
  const out = [...BASE_KERNEL_PARAMS, hv.enable_debug ? 'debug' : 'quiet'];
  if (image !== undefined) out.push(...rootParams(image, fstype));
  out.push(...params);
  return out.join(' ');
}

function rootParams(image: 'nvdimm' | 'virtio-blk', fstype: string): string[] {
  // The guest image's first partition; DAX when it is an NVDIMM (page cache bypassed).
  const root = image === 'nvdimm' ? '/dev/pmem0p1' : '/dev/vda1';
  const flags = [image === 'nvdimm' ? 'dax' : undefined, fstype === 'ext4' ? 'data=ordered,errors=remount-ro' : undefined].filter(Boolean);
  return [`root=${root}`, ...(flags.length > 0 ? [`rootflags=${flags.join(',')}`] : []), 'ro', `rootfstype=${fstype}`];
}

function smpFor(hv: QemuConfig, caps: ReadonlyCapabilities, host: HostResources, notes: SpecNote[]): { cpus: number; maxcpus: number } {
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

/** Boot memory (Kata's minimum applied) and the hot-plug ceiling (0 or above the host = the host's memory). */
function memoryFor(hv: QemuConfig, caps: ReadonlyCapabilities, host: HostResources, notes: SpecNote[]): { bootMiB: number; maxMiB: number } {
  let sizeMiB = hv.default_memory;
  if (sizeMiB < MIN_MEMORY_MIB) {
    // Kata's rule: less than 256 MiB means the default.
    notes.push({ level: 'warn', message: `default_memory = ${sizeMiB} is below ${MIN_MEMORY_MIB} MiB; using ${DEFAULT_MEMORY_MIB} MiB as Kata does` });
    sizeMiB = DEFAULT_MEMORY_MIB;
  }
  if (!caps.has('memory-hotplug')) return { bootMiB: sizeMiB, maxMiB: sizeMiB };
  const wanted = hv.default_maxmemory === 0 || hv.default_maxmemory > host.memoryMiB ? host.memoryMiB : hv.default_maxmemory;
  return { bootMiB: sizeMiB, maxMiB: Math.max(sizeMiB, wanted) };
}

/** `-m`: hot-plug slots and maxmem only when memory may be hot-plugged or the image is an NVDIMM. */
function renderMemory(hv: QemuConfig, vm: VmDescription, nvdimmImage: boolean): QemuLaunchSpec['memory'] {
  const sizeMiB = vm.memory.bootMiB;
  const shared = vm.memory.shared;
  if (!vm.memory.hotplug && !nvdimmImage) return { sizeMiB, slots: 0, maxMiB: sizeMiB, shared };
  let maxMiB = vm.memory.hotplug ? Math.max(sizeMiB, vm.memory.maxMiB) : sizeMiB;
  // Address space above the RAM for the image NVDIMM (Kata reserves 1 GiB plus memory_offset).
  maxMiB += hv.memory_offset + (nvdimmImage ? NVDIMM_RESERVE_MIB : 0);
  return { sizeMiB, slots: hv.memory_slots === 0 ? DEFAULT_MEMORY_SLOTS : hv.memory_slots, maxMiB, shared };
}

function unixServer(id: string, path: string, extra: Record<string, QemuPropValue> = {}): QemuOption {
  return { type: 'socket', id, props: { path, server: true, wait: false, ...extra } };
}

function nonEmpty(v: unknown): v is string {
  return typeof v === 'string' && v.length > 0;
}
