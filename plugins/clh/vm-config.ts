/**
 * The Cloud Hypervisor `vm.create` body (`VmConfig` in Cloud Hypervisor's OpenAPI spec) for a
 * configuration, as a pure function: the plan hook uses it, and so will the driver.
 *
 * What Kata's Cloud Hypervisor driver (`clh.go` CreateVM/launchClh) does is the model; where this
 * differs, the comment says why.
 */
import { availableParallelism } from 'node:os';
import type { ReadonlyCapabilities } from '../../core/capabilities.js';
import type { HypervisorSection, KataConfig } from '../../core/config/types.js';
import type { ClhSection as GeneratedClhSection } from '../../core/config/schema-types.js';
import { SANDBOX_DIR, type ClhVmConfig } from '../../core/plan.js';

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
/** Kata's per-call Cloud Hypervisor API timeout (the tdx plugin raises it for a TD). */
export const CLH_API_TIMEOUT_MS = 1000;

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
  const params: string[] = [];
  if (hasText(hv.image)) params.push(...rootParams(hv.rootfs_type));
  params.push(...BASE_KERNEL_PARAMS);
  if (hv.enable_iommu) params.push('iommu=pt');
  if (hv.enable_debug) {
    // A TD's guest kernel has no serial port: its debug output goes to the virtio console.
    if (hv.confidential_guest) params.push('console=hvc0');
    else params.push(host.arch === 'arm64' ? 'console=ttyAMA0,115200n8' : 'console=ttyS0,115200n8');
    params.push('systemd.log_target=console');
  } else {
    params.push('quiet');
  }
  const extra = hv.kernel_params.trim();
  if (extra) params.push(extra);
  return params.join(' ');
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

/**
 * Builds the `vm.create` body. Devices other plugins own (virtio-fs, hot-plugged disks, TDX
 * platform settings) are added by them through the plan hook, not here.
 */
export function buildVmConfig(cfg: Pick<KataConfig, 'hypervisor'>, caps: ReadonlyCapabilities, host: HostInfo = currentHost()): ClhVmConfig {
  const hv = cfg.hypervisor as ClhSection;
  const iommu = hv.enable_iommu;
  const onIommu = iommu ? { iommu: true } : {};

  const payload: ClhVmConfig['payload'] = { kernel: hv.kernel, cmdline: kernelCmdline(hv, host) };
  if (hasText(hv.initrd)) payload.initramfs = hv.initrd;

  const memory: NonNullable<ClhVmConfig['memory']> = {
    size: hv.default_memory * MIB,
    // vhost-user devices (virtiofsd) map guest RAM, so it must be shared; so must hugepages (Kata).
    shared: hv.shared_fs !== 'none' || hv.enable_hugepages,
    hugepages: hv.enable_hugepages,
  };
  // Cloud Hypervisor's hotplug_size is what may be added on top of `size`; Kata's
  // default_maxmemory is the ceiling of the total. (0 means "host memory" to Kata: no ceiling is
  // known without asking the host, so no hot-plug region is reserved.)
  if (caps.has('memory-hotplug') && hv.default_maxmemory > hv.default_memory) {
    memory.hotplug_size = (hv.default_maxmemory - hv.default_memory) * MIB;
  }

  const vmConfig: ClhVmConfig = {
    payload,
    cpus: vcpuCounts(hv, caps, host),
    memory,
    rng: { src: hv.entropy_source, ...onIommu },
    ...consoles(hv),
    vsock: { cid: GUEST_VSOCK_CID, socket: VSOCK_SOCKET, ...onIommu },
    iommu,
  };
  if (vmConfig.console && iommu) vmConfig.console.iommu = true;

  if (hasText(hv.image)) {
    // Always a read-only virtio-blk disk, never pmem (Kata forces disable_image_nvdimm for
    // Cloud Hypervisor). The type is given so Cloud Hypervisor does not probe the image.
    vmConfig.disks = [{ path: hv.image, readonly: true, image_type: 'Raw', id: IMAGE_DISK_ID, ...onIommu }];
  }

  // Free-page reporting returns memory the guest freed to the host (Kata: a zero-sized balloon).
  if (hv.reclaim_guest_freed_memory && caps.has('balloon')) vmConfig.balloon = { size: 0, free_page_reporting: true };

  return vmConfig;
}

/**
 * Serial port (legacy UART, ttyS0) and virtio console (hvc0), as Kata sets them: both off unless
 * `enable_debug`, which turns on the one the guest kernel writes to (the console of a TD, whose
 * kernel has no serial port; the serial port otherwise, which works from the first boot
 * message). `Tty` sends the guest output to the VMM's stdout, which the driver collects; neither
 * `Pty` nor `File` is needed, since nobody reads the console interactively.
 */
function consoles(hv: ClhSection): Pick<ClhVmConfig, 'serial' | 'console'> {
  const debug = hv.enable_debug;
  if (hv.confidential_guest) return { serial: { mode: 'Off' }, console: { mode: debug ? 'Tty' : 'Off' } };
  return { serial: { mode: debug ? 'Tty' : 'Off' }, console: { mode: 'Off' } };
}

function hasText(v: unknown): v is string {
  return typeof v === 'string' && v.length > 0;
}
