/**
 * Cloud Hypervisor's side of the plan, as pure functions: the neutral VM description for a
 * `[hypervisor.clh]` section ({@link describeClhVm}, at STAGE.HYPERVISOR), and the rendering of the
 * finished description, whoever wrote its intents, into the `vm.create` body (`VmConfig` in Cloud
 * Hypervisor's OpenAPI spec) and the launch description the driver runs ({@link renderClhLaunchSpec},
 * at STAGE.FINALIZE).
 *
 * What Kata's Cloud Hypervisor driver (`clh.go` CreateVM/launchClh) does is the model; where this
 * differs, the comment says why.
 */
import { availableParallelism } from 'node:os';
import type { ClhSection as GeneratedClhSection } from '../../core/config/schema-types.js';
import {
  AGENT_VSOCK_PORT,
  KataError,
  SANDBOX_DIR,
  DEBUG_CONSOLE_CHANNEL_NAME,
  type DeviceIntent,
  type HypervisorSection,
  type KataConfig,
  type NetIntent,
  type ReadonlyCapabilities,
  type VmDescription,
} from '../../core/plugin-api.js';

// The vm.create body. Only the fields the runtime sets are typed; the tests validate whole bodies
// against the published spec.

export interface ClhPayloadConfig {
  kernel?: string;
  cmdline?: string;
  initramfs?: string;
  firmware?: string;
}
export interface ClhDiskConfig {
  path: string;
  readonly?: boolean;
  direct?: boolean;
  iommu?: boolean;
  num_queues?: number;
  queue_size?: number;
  id?: string;
  image_type?: 'Raw' | 'Qcow2' | 'FixedVhd' | 'Vhdx' | 'Unknown';
  pci_segment?: number;
}
export interface ClhFsConfig {
  tag: string;
  socket: string;
  num_queues: number;
  queue_size: number;
  id?: string;
  pci_segment?: number;
}
export interface ClhNetConfig {
  tap: string;
  mac: string;
  mtu?: number;
  iommu?: boolean;
  id?: string;
}
export interface ClhVmConfig {
  payload: ClhPayloadConfig;
  cpus?: { boot_vcpus: number; max_vcpus: number };
  memory?: { size: number; hotplug_size?: number; shared?: boolean; hugepages?: boolean; hotplug_method?: 'Acpi' | 'VirtioMem' };
  disks?: ClhDiskConfig[];
  fs?: ClhFsConfig[];
  net?: ClhNetConfig[];
  pmem?: { file: string; discard_writes?: boolean }[];
  rng?: { src: string; iommu?: boolean };
  serial?: { mode: 'Off' | 'Pty' | 'Tty' | 'File' | 'Socket' | 'Null'; file?: string; socket?: string };
  console?: { mode: 'Off' | 'Pty' | 'Tty' | 'File' | 'Socket' | 'Null'; file?: string; socket?: string; iommu?: boolean };
  vsock?: { cid: number; socket: string; iommu?: boolean; id?: string };
  iommu?: boolean;
  platform?: { num_pci_segments?: number; iommu_segments?: number[]; tdx?: boolean; sev_snp?: boolean };
  watchdog?: boolean;
  [field: string]: unknown;
}

/** What the driver runs: rendered from the plan at STAGE.FINALIZE, kept in `plan.vm.native`. */
export interface ClhLaunchSpec {
  readonly hypervisor: 'clh';
  binary: string;
  /** Extra `cloud-hypervisor` command-line arguments (besides `--api-socket`). */
  args: string[];
  vmConfig: ClhVmConfig;
  /** Per-call API timeout; confidential guests need longer (Kata: 1 s normally, 20 s for TDX). */
  apiTimeoutMs: number;
  /** The launch artefact shown by `validate --json` under `vm` (as `plan.vm.launch`): a copy of the vm.create body. */
  launch?: ClhVmConfig;
}

/** True when `native` (a plan's `vm.native`) is a Cloud Hypervisor launch description. */
export function isClhSpec(native: unknown): native is ClhLaunchSpec {
  return typeof native === 'object' && native !== null && (native as { hypervisor?: unknown }).hypervisor === 'clh';
}

/** Device kinds this plugin renders; each is declared as a `render:device:<kind>` capability. */
export const CLH_DEVICE_KINDS = Object.freeze(['disk', 'vhost-user-fs', 'agent-channel', 'console', 'rng', 'balloon', 'net'] as const);

/** The `[hypervisor.clh]` section after the shape check: the common keys plus those of clh.schema.json. */
export type ClhSection = HypervisorSection & Readonly<GeneratedClhSection>;

/** Host facts the body depends on; injectable so that the builder stays pure. */
export interface HostInfo {
  /** CPUs usable by this process: the max_vcpus when default_maxvcpus is 0. */
  readonly cpus: number;
  /** `process.arch`: chooses the serial console name for debug output. */
  readonly arch: string;
}

export function currentHost(): HostInfo {
  return { cpus: availableParallelism(), arch: process.arch };
}

/** Guest CID of the VM's vsock (Kata's default guest CID; 0-2 are reserved). */
export const GUEST_VSOCK_CID = 3;
/** Host side of Cloud Hypervisor's hybrid vsock, in the sandbox directory. */
export const VSOCK_SOCKET = `${SANDBOX_DIR}/clh.vsock`;
/** `id` of the guest image disk; stable so later requests (and people) can name it. */
export const IMAGE_DISK_ID = 'rootfs-image';
/** Kata's per-call Cloud Hypervisor API timeout. */
export const CLH_API_TIMEOUT_MS = 1000;
/** The API timeout for a TD: its calls take longer (Kata: 20 s instead of 1 s). */
export const CLH_TDX_API_TIMEOUT_MS = 20_000;
/** `id` of the first virtio-fs share. */
export const SHARED_FS_ID = 'kata-shared-fs';

const MIB = 1024 * 1024;

/** Kata's base parameters for Cloud Hypervisor guests. */
const BASE_KERNEL_PARAMS = ['panic=1', 'no_timer_check', 'noreplace-smp'];

/**
 * Root parameters for the guest image, which is always attached as the first virtio-blk disk
 * (`/dev/vda`, the rootfs on its first partition). No DAX: that needs the image on pmem, which Kata
 * no longer uses for Cloud Hypervisor.
 */
export function rootParams(rootfsType: string): string[] {
  const flags = rootfsType === 'erofs' ? 'ro' : 'data=ordered,errors=remount-ro ro';
  return ['root=/dev/vda1', `rootflags=${flags}`, `rootfstype=${rootfsType}`];
}

/** The guest kernel command line, in Kata's order; `kernel_params` come last so they win. */
export function kernelCmdline(hv: ClhSection, host: Pick<HostInfo, 'arch'>): string {
  const extra = hv.kernel_params.trim();
  return cmdline(hv, hasText(hv.image) ? hv.rootfs_type : undefined, extra ? [extra] : [], host);
}

/** Root parameters for an image of `imageFstype`, Kata's base parameters, the console, then `params`. */
function cmdline(hv: ClhSection, imageFstype: string | undefined, params: readonly string[], host: Pick<HostInfo, 'arch'>): string {
  const out: string[] = [];
  if (imageFstype !== undefined) out.push(...rootParams(imageFstype));
  out.push(...BASE_KERNEL_PARAMS);
  if (hv.enable_iommu) out.push('iommu=pt');
  if (hv.enable_debug) {
    // A TD's guest kernel has no serial port: its debug output goes to the virtio console.
    if (hv.confidential_guest) out.push('console=hvc0');
    else out.push(host.arch === 'arm64' ? 'console=ttyAMA0,115200n8' : 'console=ttyS0,115200n8');
    out.push('systemd.log_target=console');
  } else {
    out.push('quiet');
  }
  out.push(...params);
  return out.join(' ');
}

/** Extra `cloud-hypervisor` arguments besides `--api-socket` (which the driver adds). */
export function clhArgs(hv: ClhSection): string[] {
  const args: string[] = [];
  if (hv.enable_debug && hv.hypervisor_loglevel > 0) args.push(`-${'v'.repeat(hv.hypervisor_loglevel)}`);
  // Cloud Hypervisor's own seccomp filters stay on unless the user asks otherwise (for debugging).
  if (hv.disable_seccomp) args.push('--seccomp', 'false');
  return args;
}

/** `boot_vcpus` and `max_vcpus`: max stays above boot only when vCPUs can be hot-plugged. */
export function vcpuCounts(hv: ClhSection, caps: ReadonlyCapabilities, host: Pick<HostInfo, 'cpus'>): { boot_vcpus: number; max_vcpus: number } {
  const boot = Math.max(1, Math.ceil(hv.default_vcpus));
  if (!caps.has('cpu-hotplug')) return { boot_vcpus: boot, max_vcpus: boot };
  const max = hv.default_maxvcpus > 0 ? hv.default_maxvcpus : host.cpus;
  return { boot_vcpus: boot, max_vcpus: Math.max(boot, max) };
}

/** The `vm.create` body for this configuration alone (no other plugin's intents): for tests and tools. */
export function buildVmConfig(cfg: Pick<KataConfig, 'hypervisor'>, caps: ReadonlyCapabilities, host: HostInfo = currentHost()): ClhVmConfig {
  return renderVmConfig(describeClhVm(cfg, caps, host), cfg, host);
}

/**
 * The neutral VM description for `[hypervisor.clh]`, with Kata's Cloud Hypervisor rules: the
 * devices Cloud Hypervisor itself brings (the agent on hybrid vsock, rng, a console with
 * `enable_debug`, a free-page-reporting balloon with `reclaim_guest_freed_memory`), and guest
 * memory shared whenever a filesystem is shared. No firmware: Kata's Cloud Hypervisor driver boots
 * one only for a TD, which the confidential intent carries.
 */
export function describeClhVm(cfg: Pick<KataConfig, 'hypervisor'> & { agent?: Pick<KataConfig['agent'], 'debug_console_enabled'> }, caps: ReadonlyCapabilities, host: Pick<HostInfo, 'cpus'> = currentHost()): VmDescription {
  const hv = cfg.hypervisor as ClhSection;
  const { boot_vcpus, max_vcpus } = vcpuCounts(hv, caps, host);
  const memHotplug = caps.has('memory-hotplug');
  // Cloud Hypervisor's hotplug_size is what may be added on top of `size`; Kata's
  // default_maxmemory is the ceiling of the total. (0 means "host memory" to Kata: no ceiling is
  // known without asking the host, so no hot-plug region is reserved.)
  const maxMiB = memHotplug && hv.default_maxmemory > hv.default_memory ? hv.default_maxmemory : hv.default_memory;
  const devices: DeviceIntent[] = [];
  if (hv.enable_debug) devices.push({ kind: 'console' });
  devices.push({ kind: 'agent-channel', transport: 'hybrid-vsock', socket: VSOCK_SOCKET, cid: GUEST_VSOCK_CID, port: AGENT_VSOCK_PORT });
  devices.push({ kind: 'rng', source: hv.entropy_source });
  // Not rendered here yet (it would be a hybrid-vsock port): asking for it fails the validated config phase instead of being ignored.
  if (cfg.agent?.debug_console_enabled) devices.push({ kind: 'debug-console', transport: 'virtio-serial', socket: `${SANDBOX_DIR}/debug-console.sock`, name: DEBUG_CONSOLE_CHANNEL_NAME });
  // Free-page reporting returns memory the guest freed to the host (Kata: a zero-sized balloon).
  if (hv.reclaim_guest_freed_memory && caps.has('balloon')) devices.push({ kind: 'balloon', freePageReporting: true });
  const extra = hv.kernel_params.trim();
  const vm: VmDescription = {
    hypervisor: 'clh',
    binary: hv.path as string,
    // Cloud Hypervisor has no software emulation.
    accelerator: 'kvm',
    cpus: { boot: boot_vcpus, max: max_vcpus, hotplug: caps.has('cpu-hotplug') },
    // vhost-user devices (virtiofsd) map guest RAM, so it must be shared.
    memory: { bootMiB: hv.default_memory, maxMiB, hotplug: memHotplug, shared: hv.shared_fs !== 'none' },
    kernel: hv.kernel as string,
    kernelParams: extra ? [extra] : [],
    confidential: null,
    devices,
  };
  if (hasText(hv.initrd)) vm.initrd = hv.initrd;
  if (hasText(hv.image)) vm.image = { path: hv.image, fstype: hv.rootfs_type };
  return vm;
}

/** What the driver runs for the finished plan, with its vm.create body. */
export function renderClhLaunchSpec(vm: VmDescription, cfg: Pick<KataConfig, 'hypervisor'>, host: Pick<HostInfo, 'arch'> = currentHost()): ClhLaunchSpec {
  const hv = cfg.hypervisor as ClhSection;
  const vmConfig = renderVmConfig(vm, cfg, host);
  return {
    hypervisor: 'clh',
    binary: vm.binary,
    args: clhArgs(hv),
    vmConfig,
    apiTimeoutMs: vm.confidential ? CLH_TDX_API_TIMEOUT_MS : CLH_API_TIMEOUT_MS,
    launch: structuredClone(vmConfig),
  };
}

/**
 * Renders the whole VM description into the `vm.create` body. Cloud Hypervisor-only settings
 * (`enable_iommu`, `enable_hugepages`, the debug console) come from `[hypervisor.clh]`; everything
 * else from the intents. A TD gets `platform.tdx`, which makes Cloud Hypervisor offer
 * VIRTIO_F_ACCESS_PLATFORM on every device itself, and its firmware as the payload.
 */
export function renderVmConfig(vm: VmDescription, cfg: Pick<KataConfig, 'hypervisor'>, host: Pick<HostInfo, 'arch'> = currentHost()): ClhVmConfig {
  const hv = cfg.hypervisor as ClhSection;
  const iommu = hv.enable_iommu;
  const onIommu = iommu ? { iommu: true } : {};
  const of = <K extends DeviceIntent['kind']>(kind: K) => vm.devices.filter((d): d is Extract<DeviceIntent, { kind: K }> => d.kind === kind);

  const payload: ClhPayloadConfig = { kernel: vm.kernel, cmdline: cmdline(hv, vm.image?.fstype, vm.kernelParams, host) };
  if (vm.initrd !== undefined) payload.initramfs = vm.initrd;
  if (vm.confidential) payload.firmware = vm.confidential.firmware;

  const memory: NonNullable<ClhVmConfig['memory']> = {
    size: vm.memory.bootMiB * MIB,
    // Hugepages must be shared too (Kata).
    shared: vm.memory.shared || hv.enable_hugepages,
    hugepages: hv.enable_hugepages,
  };
  if (vm.memory.hotplug && vm.memory.maxMiB > vm.memory.bootMiB) memory.hotplug_size = (vm.memory.maxMiB - vm.memory.bootMiB) * MIB;

  const vmConfig: ClhVmConfig = {
    payload,
    cpus: { boot_vcpus: vm.cpus.boot, max_vcpus: vm.cpus.hotplug ? vm.cpus.max : vm.cpus.boot },
    memory,
  };
  const rng = of('rng')[0];
  if (rng) vmConfig.rng = { src: rng.source, ...onIommu };
  Object.assign(vmConfig, consoles(hv, of('console').length > 0));
  const agent = of('agent-channel')[0];
  if (agent) {
    // Cloud Hypervisor's vsock is hybrid only; the clh plugin chooses the channel itself (describeClhVm).
    if (agent.transport !== 'hybrid-vsock') throw new KataError('KATA_ERR_INTERNAL', `Cloud Hypervisor has no ${agent.transport} agent channel: use hybrid-vsock`, { plugin: 'clh' });
    vmConfig.vsock = { cid: agent.cid, socket: agent.socket, ...onIommu };
  }
  vmConfig.iommu = iommu;
  if (vmConfig.console && iommu) vmConfig.console.iommu = true;

  // The guest image: always a read-only virtio-blk disk, never pmem (Kata forces
  // disable_image_nvdimm for Cloud Hypervisor). The type is given so Cloud Hypervisor does not probe it.
  const disks: ClhDiskConfig[] = [];
  if (vm.image) disks.push({ path: vm.image.path, readonly: true, image_type: 'Raw', id: IMAGE_DISK_ID, ...onIommu });
  for (const d of of('disk')) disks.push({ path: d.path, readonly: d.readonly, image_type: 'Raw', id: d.id, ...onIommu });
  if (disks.length > 0) vmConfig.disks = disks;

  const balloon = of('balloon')[0];
  if (balloon) vmConfig.balloon = { size: 0, free_page_reporting: balloon.freePageReporting };

  const shares = of('vhost-user-fs');
  if (shares.length > 0) {
    vmConfig.fs = shares.map((f, i) => ({ tag: f.tag, socket: f.socket, num_queues: f.queues, queue_size: f.queueSize, id: i === 0 ? SHARED_FS_ID : `${SHARED_FS_ID}${i}` }));
  }
  const nets = renderClhNets(of('net'), iommu);
  if (nets.length > 0) vmConfig.net = nets;
  if (vm.confidential?.tee === 'tdx') vmConfig.platform = { tdx: true };
  return vmConfig;
}

/**
 * `net` entries (NetConfig): the tap Cloud Hypervisor opens by name in its network namespace, the
 * pod interface's MAC and MTU. The driver adds those found at sandbox start the same way.
 */
export function renderClhNets(nets: readonly NetIntent[], iommu: boolean): ClhNetConfig[] {
  return nets.map((n) => ({ tap: n.tap, mac: n.mac, ...(n.mtu >= 68 ? { mtu: n.mtu } : {}), id: n.id, ...(iommu ? { iommu: true } : {}) }));
}

/**
 * Serial port (legacy UART, ttyS0) and virtio console (hvc0), as Kata sets them: both off unless
 * `enable_debug`, which turns on the one the guest kernel writes to (the console of a TD, whose
 * kernel has no serial port; the serial port otherwise, which works from the first boot
 * message). `Tty` sends the guest output to the VMM's stdout, which the driver collects; neither
 * `Pty` nor `File` is needed, since nobody reads the console interactively.
 */
function consoles(hv: ClhSection, debug: boolean): Pick<ClhVmConfig, 'serial' | 'console'> {
  if (hv.confidential_guest) return { serial: { mode: 'Off' }, console: { mode: debug ? 'Tty' : 'Off' } };
  return { serial: { mode: debug ? 'Tty' : 'Off' }, console: { mode: 'Off' } };
}

function hasText(v: unknown): v is string {
  return typeof v === 'string' && v.length > 0;
}
