/**
 * The qemu plugin's view of `[hypervisor.qemu]`: the common keys plus those of
 * schemas/qemu.schema.json, and the names the launch description and the (later) driver share.
 */
import { SANDBOX_DIR, SANDBOX_SHARED_DIR, type HypervisorSection, type KataConfig } from '../../core/plugin-api.js';

export { PLUGIN_NAME };

/** Keys of schemas/qemu.schema.json after the shape check (generated from the schema). */
export type { QemuSection } from '../../core/config/schema-types.js';
import type { QemuSection } from '../../core/config/schema-types.js';
import { PLUGIN_NAME } from './manifest.js';

export type QemuConfig = HypervisorSection & QemuSection;

export function qemuSection(cfg: KataConfig): QemuConfig {
  return cfg.hypervisor as QemuConfig;
}

/** The only machine type the plugin drives: hot-plug uses pcie-root-ports and every device is virtio-pci. */
export const SUPPORTED_MACHINE = 'q35';

/** Kata's limit for x86_64 QEMU guests (govmm `MaxQemuVCPUs`). */
export const MAX_VCPUS = 240;

/** Kata's smallest accepted guest memory, MiB; smaller values fall back to {@link DEFAULT_MEMORY_MIB}. */
export const MIN_MEMORY_MIB = 256;
export const DEFAULT_MEMORY_MIB = 2048;

/** Kata's memory_slots when the key is 0. */
export const DEFAULT_MEMORY_SLOTS = 10;

/** Address space Kata reserves above maxmem for the guest image's NVDIMM, MiB (plus memory_offset). */
export const NVDIMM_RESERVE_MIB = 1024;

/** msize_9p bounds for virtio-9p (Kata runtime-rs); the lower bound is also in the common schema. */
export const MSIZE_9P_MIN = 4096;
export const MSIZE_9P_MAX = 8 * 1024 * 1024;

/** The 9p mount tag the Kata agent mounts the shared directory by. */
export const SHARED_MOUNT_TAG = 'kataShared';

/** Run-directory paths the launch description uses; the driver substitutes SANDBOX_DIR. */
export const SANDBOX_PATHS = Object.freeze({
  agentSocket: `${SANDBOX_DIR}/agent.sock`,
  qmpSocket: `${SANDBOX_DIR}/qmp.sock`,
  consoleSocket: `${SANDBOX_DIR}/console.sock`,
  consoleLog: `${SANDBOX_DIR}/console.log`,
  /** The host end of the debug console's virtio-serial port (only with debug_console_enabled). */
  debugConsoleSocket: `${SANDBOX_DIR}/debug-console.sock`,
  /** The host directory served over virtio-9p; the driver creates it before starting QEMU. */
  sharedDir: SANDBOX_SHARED_DIR,
});

/**
 * Size in bytes of the guest image file. QEMU needs it for the NVDIMM's memory backend, and the plan
 * does no I/O, so the plan carries this token and the driver substitutes the file's size.
 */
export const IMAGE_SIZE = '{image_size}';

/** Ids in the launch description that the driver addresses (QMP, hot-plug). */
export const QEMU_IDS = Object.freeze({
  agentChardev: 'agent',
  agentPort: 'agent-port',
  debugConsoleChardev: 'debug-console',
  debugConsolePort: 'debug-console-port',
  virtioSerial: 'virtio-serial0',
  qmpChardev: 'qmp',
  consoleChardev: 'console',
  consoleSerial: 'serial0',
  rngObject: 'rng0',
  rngDevice: 'rng-device0',
  sharedFsdev: 'fs-kataShared',
  sharedDevice: 'virtio-9p-kataShared',
  imageNode: 'image',
  imageDisk: 'image-disk',
  imageMemory: 'image-mem',
  imageNvdimm: 'image-nvdimm',
  /** The first vhost-user-fs share: its chardev, and the device id prefix (virtio-fs0 …). */
  virtiofsChardev: 'virtiofsd-char',
  virtiofsDevicePrefix: 'virtio-fs',
  vsockDevice: 'vsock0',
  /** Guest RAM backend when memory is shared. */
  ramBackend: 'guest-ram',
  /** The virtio-balloon device (free-page reporting, reclaim_guest_freed_memory). */
  balloon: 'balloon0',
  /** Prefix of the hot-plug root ports: rp0, rp1, … */
  hotplugPortPrefix: 'rp',
  /** The virtio-scsi controller hot-plugged SCSI disks go on (its bus is `scsi0.0`). */
  scsiController: 'scsi0',
});

/**
 * Hot-plugged SCSI disks per VM. Kata numbers SCSI disks by index, id = index / 256 and
 * lun = index % 256 (virtcontainers' GetSCSIIdLun); this plugin keeps Kata's numbering and bounds
 * the index (Kata allows 65535), so that a runaway caller hits a coded error, not QEMU's limits.
 */
export const SCSI_MAX_DISKS = 1024;

/** The accelerator `auto` resolves to in a plan (the real choice is made when the VM starts). */
export const PLAN_ACCELERATOR: 'kvm' = 'kvm';
