/**
 * The sandbox plan: what the validated config phase decided, in a form the sandbox lifecycle (and
 * `kata-runtime validate`) can use without reading the configuration again.
 *
 * The VM part is hypervisor-specific but its types live here, in the core, because plugins never
 * import each other: the tdx plugin edits a Cloud Hypervisor `VmConfig` or a QEMU launch description
 * through the `plan` hook, knowing only these types.
 */

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

/** The vsock port the Kata agent listens on. */
export const AGENT_VSOCK_PORT = 1024;

/** Replaces the {@link SANDBOX_DIR} token with the sandbox's run directory. */
export function fillSandboxDir(value: string, runDir: string): string {
  return value.split(SANDBOX_DIR).join(runDir);
}

export type SharedFsKind = 'virtio-fs' | 'virtio-fs-nydus' | 'virtio-9p' | 'none';

/** How a container's root filesystem reaches the guest. */
export type RootfsDelivery =
  /** A block-device rootfs (devmapper snapshotter) is hot-plugged as virtio-blk. */
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
// Cloud Hypervisor: the vm.create body (VmConfig in Cloud Hypervisor's OpenAPI spec). Only the
// fields the runtime sets are typed; the tests validate whole bodies against the published spec.

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
export interface ClhVmConfig {
  payload: ClhPayloadConfig;
  cpus?: { boot_vcpus: number; max_vcpus: number };
  memory?: { size: number; hotplug_size?: number; shared?: boolean; hugepages?: boolean; hotplug_method?: 'Acpi' | 'VirtioMem' };
  disks?: ClhDiskConfig[];
  fs?: ClhFsConfig[];
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

export interface ClhLaunchSpec {
  readonly hypervisor: 'clh';
  binary: string;
  /** Extra `cloud-hypervisor` command-line arguments (besides `--api-socket`). */
  args: string[];
  vmConfig: ClhVmConfig;
  /** Per-call API timeout; confidential guests need longer (Kata: 1 s normally, 20 s for TDX). */
  apiTimeoutMs: number;
  /** The launch artefact shown by `validate --json` under `vm`: the vm.create body. */
  launch?: ClhVmConfig;
}

// ---------------------------------------------------------------------------------------------
// QEMU: a structured description, rendered to argv by the qemu plugin at the FINALIZE plan stage,
// so that other plugins (tdx) edit structure instead of strings.

export type QemuPropValue = string | number | boolean;

/** One `-object`, `-device`, `-chardev` … option: a driver/type followed by key=value pairs. */
export interface QemuOption {
  /** The first, unnamed value (device driver, object type, chardev backend). */
  type: string;
  id?: string;
  props: Record<string, QemuPropValue>;
}

export interface QemuLaunchSpec {
  readonly hypervisor: 'qemu';
  binary: string;
  machine: { type: string; options: Record<string, QemuPropValue> };
  /** `auto` is resolved when the VM starts: KVM when it can run a standard guest, else TCG. */
  accelerator: 'auto' | 'kvm' | 'tcg';
  cpu: { model: string; features: string };
  smp: { cpus: number; maxcpus: number };
  memory: { sizeMiB: number; slots: number; maxMiB: number; shared: boolean };
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
  /** Set virtio `iommu_platform=on` on every virtio-pci device, including hot-plugged ones (TDX). */
  virtioIommuPlatform: boolean;
  /** Extra raw arguments appended last. */
  extraArgs: string[];
  /** The launch artefact shown by `validate --json` under `vm`: the argv, binary first. */
  launch?: string[];
}

/** A launch description from a third-party hypervisor plugin. */
export interface OtherLaunchSpec {
  readonly hypervisor: string;
  launch?: unknown;
  [field: string]: unknown;
}

export type VmLaunchSpec = ClhLaunchSpec | QemuLaunchSpec | OtherLaunchSpec;

export function isClhSpec(vm: VmLaunchSpec): vm is ClhLaunchSpec {
  return vm.hypervisor === 'clh';
}
export function isQemuSpec(vm: VmLaunchSpec): vm is QemuLaunchSpec {
  return vm.hypervisor === 'qemu';
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
  /** The confidential-computing technology, or null. */
  confidential: { tee: 'tdx'; firmware: string } | null;
  vm: VmLaunchSpec;
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
  notes: PlanNote[];
}
