/**
 * The VM contract between the core and hypervisor drivers. The core never talks to a hypervisor
 * itself: it calls the `createVm` hook with the plan, and the hypervisor plugin whose launch spec
 * it is answers with a {@link VmHandle}. Everything the sandbox lifecycle does to a VM afterwards
 * goes through that handle.
 */
import type { KataConfig } from './config/types.js';
import type { KataError } from './errors.js';
import type { Logger } from './logger.js';
import type { NetIntent, SandboxPlan } from './plan.js';
import type { ProcessExit } from './supervised.js';

/** An address of a guest interface. */
export interface GuestIpAddress {
  readonly family: 'v4' | 'v6';
  readonly address: string;
  readonly prefixLength: number;
}

/** An interface the guest agent configures (kata-agent's `types.Interface`), found by its MAC. */
export interface GuestInterface {
  /** The name the guest gives it (the pod interface's, e.g. eth0). */
  readonly name: string;
  readonly mac: string;
  readonly mtu: number;
  readonly addresses: readonly GuestIpAddress[];
}

/** A route the guest agent installs (kata-agent's `types.Route`). */
export interface GuestRoute {
  readonly family: 'v4' | 'v6';
  /** A prefix, or '' for the default route. */
  readonly dest: string;
  readonly gateway: string;
  /** The guest interface name. */
  readonly device: string;
  readonly source: string;
  /** 0 universe, 253 link, 254 host (rtnetlink scopes). */
  readonly scope: number;
}

/** A permanent neighbour of the pod's namespace the guest agent adds (kata-agent's `types.ARPNeighbor`). */
export interface GuestNeighbor {
  readonly family: 'v4' | 'v6';
  readonly address: string;
  /** The guest interface name. */
  readonly device: string;
  readonly mac: string;
  /** NTF_ROUTER (an IPv6 router), as Kata passes the neighbour's flags. */
  readonly router: boolean;
}

/**
 * The sandbox's network, filled at sandbox start by the plugin that reads the pod's network
 * namespace (in `beforeVmStart`): the devices the hypervisor adds to the VM, and what the core
 * asks the guest agent to configure once it answers (UpdateInterface, UpdateRoutes, AddARPNeighbors).
 */
export interface SandboxNetwork {
  readonly devices: NetIntent[];
  readonly interfaces: GuestInterface[];
  readonly routes: GuestRoute[];
  /** The namespace's permanent neighbours on mirrored interfaces (Kata's AddARPNeighbors). */
  readonly neighbors: GuestNeighbor[];
  /**
   * Milliseconds spent: `host` by the plugin that wired the network (scan, taps, filters), `guest`
   * by the core's agent calls (UpdateInterface, UpdateRoutes, AddARPNeighbors). For the sandbox benchmark.
   */
  readonly timings: { host: number; guest: number };
}

/** What `createVm` handlers receive. */
export interface VmContext {
  /** Sandbox id; also names the run directory. */
  readonly sandboxId: string;
  /** The per-sandbox run directory (created by the core, removed after the VM stops). */
  readonly runDir: string;
  readonly plan: SandboxPlan;
  readonly config: KataConfig;
  readonly log: Logger;
  /**
   * The pod's network namespace (a path: `/var/run/netns/x`, `/proc/<pid>/ns/net`), from the OCI
   * spec's `linux.namespaces`; absent when the sandbox has none of its own. The hypervisor runs
   * inside it (its control sockets stay on the host filesystem).
   */
  readonly netns?: string;
  /** Filled in `beforeVmStart`; empty without a network. */
  readonly network: SandboxNetwork;
  /**
   * VM templating (core/template.ts): boot as the template whose memory and device state are
   * saved (`save`), or start as a clone restored from them (`clone`). Absent: a cold boot.
   * Only set for a hypervisor plugin that declares the `vm:template` capability.
   */
  readonly template?: VmTemplateRole;
}

/** The files of one VM template, all under its directory (`[factory] template_path`). */
export interface VmTemplateFiles {
  readonly dir: string;
  /** The guest RAM: the template maps it shared, each clone privately (copy-on-write). */
  readonly memoryFile: string;
  /** The device state (the hypervisor's migration stream without the RAM). */
  readonly stateFile: string;
}

/** What the core asks of the hypervisor for VM templating. */
export interface VmTemplateRole {
  readonly role: 'save' | 'clone';
  readonly files: VmTemplateFiles;
}

/** A disk to hot-plug: a regular file (raw image) or a block device node. */
export interface BlockDeviceSpec {
  /** Unique within the VM; names the block node and the device. */
  readonly id: string;
  readonly path: string;
  readonly readonly?: boolean;
}

/** A disk hot-plugged as a PCI device (virtio-blk-pci); the agent's `blk` Storage takes `pciPath`. */
export interface PciHotpluggedBlock {
  readonly id: string;
  /**
   * Where the guest finds the device, in Kata's PCI path form: slots from the root bus down, two
   * hex digits each, e.g. `02/00` (root port at slot 2, the disk at slot 0 behind it). The agent's
   * `blk` Storage takes this as its source.
   */
  readonly pciPath: string;
  readonly scsiAddr?: undefined;
}

/** A disk hot-plugged as a SCSI disk (scsi-hd on a virtio-scsi controller); the agent's `scsi` Storage takes `scsiAddr`. */
export interface ScsiHotpluggedBlock {
  readonly id: string;
  /** Kata's SCSI address `<scsi id>:<lun>` on the VM's one virtio-scsi controller, e.g. `0:3`. */
  readonly scsiAddr: string;
  readonly pciPath?: undefined;
}

export type HotpluggedBlock = PciHotpluggedBlock | ScsiHotpluggedBlock;

/** The Kata Storage driver and source the guest agent finds a hot-plugged disk by: `blk` + PCI path, or `scsi` + `<id>:<lun>`. */
export function guestBlockSource(b: HotpluggedBlock): { readonly driver: 'blk' | 'scsi'; readonly source: string } {
  return b.scsiAddr !== undefined ? { driver: 'scsi', source: b.scsiAddr } : { driver: 'blk', source: b.pciPath };
}

/** How a VM process ended: a supervised process's exit (the hypervisor's last stderr lines included), with the error that explains it. */
export interface VmExit extends Omit<ProcessExit, 'spawnError'> {
  /** The coded error that explains an unexpected or forced end (KATA_ERR_VM_EXITED, KATA_ERR_VM_STOP). */
  readonly error?: KataError;
}

export interface UnplugOptions {
  /** How long the guest gets to release the device (the driver's default otherwise). */
  readonly timeoutMs?: number;
}

export interface VmHandle {
  readonly hypervisor: string;
  /** The hypervisor process, once started. */
  readonly pid: number | undefined;
  /** Boots the VM; resolves once the hypervisor is running the guest and its control channel answers. */
  start(): Promise<void>;
  /** Hot-plugs a disk into the running VM. */
  hotplugBlock(dev: BlockDeviceSpec): Promise<HotpluggedBlock>;
  /** Removes a hot-plugged disk; resolves once the guest has released it. */
  unplugBlock(id: string, opts?: UnplugOptions): Promise<void>;
  /**
   * Hot-plugs vCPUs up to `n`, or unplugs those it hot-plugged down to `n` (never below the boot
   * count); resolves with the vCPUs the VM has afterwards, which after an unplug the guest did not
   * allow may be more than `n`. A failed hot-plug removes what it added and rejects. The guest must
   * still online new vCPUs (the agent's OnlineCPUMem). Absent when the driver cannot hot-plug vCPUs.
   */
  resizeVcpus?(n: number): Promise<number>;
  /**
   * Hot-plugs memory so that the VM has at least `mib` MiB; resolves with the MiB it has afterwards
   * (a smaller `mib` changes nothing where the hypervisor cannot take memory back). A failed
   * hot-plug removes what it added and rejects. The guest must still online the new memory.
   * Absent when the driver cannot hot-plug memory.
   */
  resizeMemory?(mib: number): Promise<number>;
  /** Freezes every vCPU (the whole sandbox); absent when the driver cannot. */
  pause?(): Promise<void>;
  /** Lets a paused VM run again. */
  resume?(): Promise<void>;
  /**
   * Template role `save` only: pauses the VM and writes its device state to the template's state
   * file (its RAM is already in the memory file). The caller stops the VM afterwards.
   */
  saveTemplate?(): Promise<void>;
  /** Stops the VM (gracefully, then by force) and removes what the driver created in the run directory. */
  stop(): Promise<VmExit>;
  /** Settles when the hypervisor process ends, expected or not. */
  readonly exited: Promise<VmExit>;
}

/** One mount of a container rootfs as the container manager hands it over (containerd's `Mount`). */
export interface RootfsMount {
  readonly type: string;
  readonly source: string;
  readonly options: readonly string[];
}

/** A container's root filesystem on the host. */
export type RootfsSource =
  /** A block device, or a filesystem image file: hot-plugged as a disk (the devmapper / TDX path). */
  | { readonly kind: 'block'; readonly path: string; readonly fstype: string }
  /** A directory: shared through the sandbox's shared filesystem. */
  | { readonly kind: 'dir'; readonly path: string };

/** What `attachRootfs` handlers receive. */
export interface ContainerContext {
  readonly sandbox: VmContext;
  readonly vm: VmHandle;
  readonly containerId: string;
  readonly rootfs: RootfsSource;
}

/** A mount the guest agent performs (a Kata agent `Storage`). */
export interface GuestStorage {
  readonly driver: string;
  readonly source: string;
  readonly fstype: string;
  readonly options: readonly string[];
  readonly mountPoint: string;
}

/** How the guest finds a container's rootfs, and how to take it back. */
export interface RootfsAttachment {
  /** Mounts the agent performs before it creates the container. */
  readonly storages: readonly GuestStorage[];
  /** The rootfs path inside the guest (the OCI root.path). */
  readonly guestPath: string;
  /** Undoes the attachment after the container is removed. */
  detach(): Promise<void>;
}
