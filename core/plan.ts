/**
 * The sandbox plan: what the validated config phase decided, in a form the sandbox lifecycle (and
 * `kata-runtime validate`) can use without reading the configuration again.
 *
 * The VM part is hypervisor-neutral: a list of intents (vCPUs, memory, kernel, confidential
 * settings, devices). Plugins such as tdx, virtiofs and devmapper write intents only; each
 * hypervisor plugin renders the whole description into its own format inside its own folder, and
 * declares as `render:*` capabilities which intents it can render, so that an intent it cannot
 * render fails the validated config phase, not the VM start.
 */
import type { ReadonlyCapabilities } from './capabilities.js';
import type { KataConfig } from './config/types.js';

/**
 * Paths inside the per-sandbox run directory are written with this token in the plan; the sandbox
 * lifecycle substitutes the real directory when it creates the sandbox. `validate` shows it as is.
 */
export const SANDBOX_DIR = '{sandbox_dir}';

/** The host directory shared with the guest (virtio-fs or virtio-9p), inside the run directory. */
export const SANDBOX_SHARED_DIR = `${SANDBOX_DIR}/shared`;

/** Where the guest mounts the shared filesystem (Kata's path). */
export const GUEST_SHARED_DIR = '/run/kata-containers/shared/containers';

/** Where block-device rootfs are mounted in the guest: guest-local, outside the shared mount. */
export const GUEST_CONTAINERS_DIR = '/run/kata-containers/containers';

/** The name of the virtio-serial port the Kata agent looks for. */
export const AGENT_CHANNEL_NAME = 'agent.channel.0';

/** The name of the virtio-serial port the guest agent serves its debug console on (`agent.debug_console`). */
export const DEBUG_CONSOLE_CHANNEL_NAME = 'debug.console.0';

/** The kernel parameter that tells the guest agent to serve its debug console (Kata's name). */
export const DEBUG_CONSOLE_KERNEL_PARAM = 'agent.debug_console';

/** The vsock port the Kata agent listens on. */
export const AGENT_VSOCK_PORT = 1024;

/** Replaces the {@link SANDBOX_DIR} token with the sandbox's run directory. */
export function fillSandboxDir(value: string, runDir: string): string {
  return value.split(SANDBOX_DIR).join(runDir);
}

export type SharedFsKind = 'virtio-fs' | 'virtio-fs-nydus' | 'virtio-9p' | 'none';

/** How a container's root filesystem reaches the guest. */
export type RootfsDelivery =
  /** A block-device rootfs (devmapper snapshotter) is hot-plugged (virtio-blk or virtio-scsi, as `blockDriver` says). */
  | 'block-hotplug'
  /** The rootfs directory is shared through the shared filesystem. */
  | 'shared-fs';

/** A decision or warning a plugin (or the core) recorded while planning; shown by `validate`. */
export interface PlanNote {
  readonly by: string;
  readonly level: 'info' | 'warn';
  readonly message: string;
}

// ---------------------------------------------------------------------------------------------
// The VM, as intents. No hypervisor's format appears here: each hypervisor plugin renders the whole
// description into its own (QEMU argv, Cloud Hypervisor's vm.create body) at STAGE.FINALIZE.

/** vCPUs the guest boots with, and how many it may reach by hot-plug. */
export interface VcpuIntent {
  /** vCPUs at boot (at least 1). */
  boot: number;
  /** The most the VM may ever have; equals `boot` when `hotplug` is false. */
  max: number;
  /** Whether vCPUs may be added to the running VM. */
  hotplug: boolean;
}

/** Guest memory, in MiB. */
export interface MemoryIntent {
  /** Memory at boot. */
  bootMiB: number;
  /** The most the VM may ever have; equals `bootMiB` when `hotplug` is false. */
  maxMiB: number;
  /** Whether memory may be added to the running VM. */
  hotplug: boolean;
  /**
   * Guest RAM must be shareable with host processes (a vhost-user daemon such as virtiofsd maps
   * it). Set by whoever adds a device that needs it.
   */
  shared: boolean;
}

/** The guest root filesystem image, attached read-only; the renderer picks the device (virtio-blk, NVDIMM) and the root= parameters. */
export interface ImageIntent {
  path: string;
  /** `rootfs_type`: ext4, xfs or erofs. */
  fstype: string;
}

/** The confidential-computing settings of a trust domain. */
export interface ConfidentialIntent {
  readonly tee: 'tdx';
  /** The firmware the TD boots through (TDVF, td-shim). */
  firmware: string;
  /**
   * Every device must offer VIRTIO_F_ACCESS_PLATFORM (QEMU: `iommu_platform=on`), including those
   * hot-plugged later: a TD guest refuses any virtio device without it.
   */
  accessPlatform: true;
}

/** A disk attached at boot (a hot-plugged one goes through the VM handle instead). */
export interface DiskIntent {
  readonly kind: 'disk';
  /** Stable name, unique in the VM. */
  id: string;
  /** A raw image file or a block device node. */
  path: string;
  readonly: boolean;
}

/** A virtio-fs share: a vhost-user-fs device whose backend (virtiofsd) listens on `socket`. Needs shared guest memory. */
export interface VhostUserFsIntent {
  readonly kind: 'vhost-user-fs';
  socket: string;
  /** The mount tag the guest mounts. */
  tag: string;
  /** Request queues. */
  queues: number;
  /** Entries per queue. */
  queueSize: number;
  /** DAX window in MiB; 0 = none. */
  cacheSizeMiB: number;
}

/** A virtio-9p share served by the hypervisor itself from a host directory. */
export interface NinePShareIntent {
  readonly kind: '9p';
  /** The host directory. */
  path: string;
  /** The mount tag the guest mounts. */
  tag: string;
}

/** The channel the runtime reaches the guest agent through; `plan.agent.address` names its host end. */
export type AgentChannelIntent =
  /** A virtio-serial port the guest finds by `name`; the host end is a unix socket. */
  | { readonly kind: 'agent-channel'; readonly transport: 'virtio-serial'; socket: string; name: string }
  /** vhost-vsock: the guest's `cid`, the agent's `port`. */
  | { readonly kind: 'agent-channel'; readonly transport: 'vsock'; cid: number; port: number }
  /** Hybrid vsock (Cloud Hypervisor, Firecracker): a unix socket on the host, `CONNECT <port>` to reach the guest. */
  | { readonly kind: 'agent-channel'; readonly transport: 'hybrid-vsock'; socket: string; cid: number; port: number };

/**
 * The guest console the runtime collects: to a unix socket and/or a log file when given, else to
 * the hypervisor's own output.
 */
export interface ConsoleIntent {
  readonly kind: 'console';
  socket?: string;
  logFile?: string;
}

/**
 * The guest debug console (`[agent.kata] debug_console_enabled`): a byte channel to a root shell the
 * guest agent serves in the guest (not in a container). A virtio-serial port the guest finds by
 * `name`, whose host end is a unix socket the shim's management socket relays to.
 */
export interface DebugConsoleIntent {
  readonly kind: 'debug-console';
  readonly transport: 'virtio-serial';
  socket: string;
  name: string;
}

/** A virtio-rng device fed from a host entropy source. */
export interface RngIntent {
  readonly kind: 'rng';
  source: string;
}

/** A memory balloon. */
export interface BalloonIntent {
  readonly kind: 'balloon';
  /** The guest reports freed pages so the host can reclaim them. */
  freePageReporting: boolean;
}

/**
 * A SCSI controller (a virtio-scsi HBA) present from boot, so that disks can be hot-plugged onto it
 * as SCSI disks (Kata's `block_device_driver = "virtio-scsi"`). The disks get `<scsi id>:<lun>`
 * addresses on it; under a confidential intent it offers VIRTIO_F_ACCESS_PLATFORM like every device.
 */
export interface ScsiControllerIntent {
  readonly kind: 'scsi-controller';
  /** Stable name, unique in the VM; hot-plugged disks are attached to its bus. */
  id: string;
}

/**
 * A network interface: a tap device on the host (in the pod's network namespace, where the
 * hypervisor runs) that the guest sees as a virtio-net device with the pod interface's MAC.
 * The network plugin adds these at sandbox start ({@link SandboxNetwork}), once it has read the
 * pod's namespace; a hypervisor plugin renders them the same way whether they come from there or
 * from the plan.
 */
export interface NetIntent {
  readonly kind: 'net';
  /** Stable name, unique in the VM. */
  id: string;
  /** The tap device's name in the hypervisor's network namespace. */
  tap: string;
  /** The guest interface's MAC address (the pod interface's). */
  mac: string;
  mtu: number;
}

/**
 * A device the VM gets at boot. A new kind is added to this union; a hypervisor plugin declares
 * `render:device:<kind>` for each kind it can render, and the core refuses a plan holding a kind
 * its hypervisor plugin did not declare.
 */
export type DeviceIntent = DiskIntent | VhostUserFsIntent | NinePShareIntent | AgentChannelIntent | ConsoleIntent | RngIntent | BalloonIntent | ScsiControllerIntent | NetIntent | DebugConsoleIntent;

export type DeviceKind = DeviceIntent['kind'];

/** The capability a hypervisor plugin declares when it can render devices of `kind`. */
export function renderDeviceCapability(kind: string): string {
  return `render:device:${kind}`;
}

/** The capability a hypervisor plugin declares when it can launch a trust domain of `tee`. */
export function renderTeeCapability(tee: string): string {
  return `render:tee:${tee}`;
}

/** The capability a hypervisor plugin declares when it can make every device offer VIRTIO_F_ACCESS_PLATFORM. */
export const RENDER_ACCESS_PLATFORM = 'render:access-platform';

/**
 * The VM the sandbox needs, hypervisor-neutral. The core starts it from the common hypervisor keys;
 * the hypervisor plugin may replace it at STAGE.HYPERVISOR (applying its own limits and Kata's rules
 * for it), device plugins add devices, confidential plugins restrict it, and at STAGE.FINALIZE the
 * hypervisor plugin renders all of it into its own format.
 */
export interface VmDescription {
  /** The hypervisor plugin that renders and runs it (the `[hypervisor.<name>]` name). */
  readonly hypervisor: string;
  /** The hypervisor executable (`path`); `kata-runtime check` and `env` show it. */
  binary: string;
  /**
   * How the vCPUs run: `kvm` only (Cloud Hypervisor, a TEE), `tcg` only, or `auto` (KVM when the
   * host can run a standard guest, else TCG). Absent means `auto`. `check` and `env` judge the
   * host by it.
   */
  accelerator?: 'auto' | 'kvm' | 'tcg';
  cpus: VcpuIntent;
  memory: MemoryIntent;
  /** The guest kernel. */
  kernel?: string;
  initrd?: string;
  image?: ImageIntent;
  /**
   * Kernel parameters asked for by the configuration (`kernel_params`) and by plugins, appended in
   * order after the hypervisor's own; an entry may hold several, space-separated.
   */
  kernelParams: string[];
  /** Firmware to boot through, when the hypervisor plugin uses one. */
  firmware?: string;
  /** Set by a confidential-computing plugin; null for an ordinary VM. */
  confidential: ConfidentialIntent | null;
  devices: DeviceIntent[];
  /**
   * The launch artefact, rendered by the hypervisor plugin at STAGE.FINALIZE and shown by
   * `validate --json` under `vm`: QEMU's argv (binary first), Cloud Hypervisor's vm.create body.
   */
  launch?: unknown;
  /**
   * The hypervisor plugin's own launch description, rendered with `launch`, for its driver (a
   * structured form the driver fills the run directory into). Nobody else reads it.
   */
  native?: unknown;
}

/** A host-side daemon the sandbox needs (virtiofsd …), started by the plugin that planned it. */
export interface DaemonSpec {
  /** Plugin that starts and supervises it. */
  readonly by: string;
  readonly name: string;
  binary: string;
  args: string[];
  /** The socket the VM connects to. */
  socket: string;
}

export interface SandboxPlan {
  readonly hypervisor: string;
  /** The shared filesystem the sandbox uses, `none` when sharing is off. */
  sharedFs: SharedFsKind;
  /** Ways the container rootfs may reach the guest, in order of preference; empty = none. */
  rootfs: RootfsDelivery[];
  /** Block-device driver used for hot-plugged disks, when block devices are in use. */
  blockDriver: string | null;
  /** The confidential-computing technology, or null (the VM's settings are in `vm.confidential`). */
  confidential: { tee: 'tdx'; firmware: string } | null;
  /** The VM, as intents, and (after STAGE.FINALIZE) its launch artefact. */
  vm: VmDescription;
  /**
   * How the runtime reaches the guest agent, set by the hypervisor plugin: `unix://<path>`
   * (virtio-serial through a QEMU chardev) or `hvsock://<path>:<port>` (Cloud Hypervisor's hybrid
   * vsock). Paths use {@link SANDBOX_DIR}.
   */
  agent: { address: string } | null;
  /**
   * The shared filesystem as the guest agent mounts it (a Kata `Storage` without its mount point,
   * which is {@link GUEST_SHARED_DIR}), set by the shared-fs plugin; null without sharing.
   */
  sharedFsMount: { driver: string; source: string; fstype: string; options: string[] } | null;
  /** Host-side daemons to start before the VM. */
  daemons: DaemonSpec[];
  /**
   * With static_sandbox_resource_mgmt: the part of the boot size added for the pod's limits (its
   * sandbox annotations), so that the sandbox can tell the configured defaults from it.
   */
  staticSizing?: { readonly vcpus: number; readonly memoryMiB: number };
  notes: PlanNote[];
}

/**
 * The VM description the core starts the plan with, from the common hypervisor keys: what a
 * hypervisor plugin gets when it does not build its own at STAGE.HYPERVISOR. vCPU and memory
 * ceilings apply only when the capabilities allow hot-plug; `default_maxvcpus = 0` means the host's
 * CPU count, `default_maxmemory` at or below `default_memory` means no hot-plug region.
 */
export function baseVmDescription(config: Pick<KataConfig, 'hypervisorName' | 'hypervisor'>, caps: ReadonlyCapabilities, hostCpus: number): VmDescription {
  const hv = config.hypervisor;
  const boot = Math.max(1, Math.ceil(hv.default_vcpus));
  const cpuHotplug = caps.has('cpu-hotplug');
  const memHotplug = caps.has('memory-hotplug');
  const maxCpus = cpuHotplug ? Math.max(boot, hv.default_maxvcpus > 0 ? hv.default_maxvcpus : hostCpus) : boot;
  const maxMiB = memHotplug ? Math.max(hv.default_memory, hv.default_maxmemory) : hv.default_memory;
  const vm: VmDescription = {
    hypervisor: config.hypervisorName,
    binary: hv.path ?? '',
    cpus: { boot, max: maxCpus, hotplug: cpuHotplug },
    memory: { bootMiB: hv.default_memory, maxMiB, hotplug: memHotplug, shared: false },
    kernelParams: hv.kernel_params.trim() ? [hv.kernel_params.trim()] : [],
    confidential: null,
    devices: [],
  };
  if (hv.kernel) vm.kernel = hv.kernel;
  if (hv.initrd) vm.initrd = hv.initrd;
  if (hv.image) vm.image = { path: hv.image, fstype: hv.rootfs_type };
  if (hv.firmware) vm.firmware = hv.firmware;
  return vm;
}

/** A plan intent the hypervisor plugin did not declare it can render. */
export interface UnrenderableIntent {
  /** What the plan asks for, e.g. `a vhost-user-fs device`. */
  readonly intent: string;
  /** The `render:*` capability that is missing. */
  readonly capability: string;
}

/** The intents of `vm` whose `render:*` capability is not in `caps`. */
export function unrenderableIntents(vm: VmDescription, caps: ReadonlyCapabilities): UnrenderableIntent[] {
  const out: UnrenderableIntent[] = [];
  const need = (intent: string, capability: string) => {
    if (!caps.has(capability) && !out.some((u) => u.capability === capability)) out.push({ intent, capability });
  };
  for (const d of vm.devices) need(`a ${d.kind} device`, renderDeviceCapability(d.kind));
  if (vm.confidential) {
    need(`a ${vm.confidential.tee} trust domain`, renderTeeCapability(vm.confidential.tee));
    if (vm.confidential.accessPlatform) need('VIRTIO_F_ACCESS_PLATFORM on every device', RENDER_ACCESS_PLATFORM);
  }
  return out;
}
