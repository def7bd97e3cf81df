/**
 * Capability registry. The hypervisor plugin declares what the VM can do *for this configuration*;
 * other plugins may add or remove capabilities, always under their own name, so the record of who
 * decided what is part of the validated config phase's output.
 */

/** Capabilities the built-in plugins understand. Third-party plugins may use other names. */
export const KNOWN_CAPABILITIES = Object.freeze({
  'block-device': 'The VM can be given block devices.',
  'block-device-hotplug': 'Block devices can be hot-plugged into the running VM (needed for a block-device container rootfs).',
  'virtio-blk': 'Block devices reach the guest as virtio-blk (PCI).',
  'virtio-scsi': 'Block devices reach the guest as SCSI disks on a virtio-scsi controller.',
  'fs-sharing': 'A host directory can be shared with the guest.',
  'fs-sharing:virtio-fs': 'Sharing uses virtio-fs (vhost-user-fs, served by virtiofsd).',
  'fs-sharing:virtio-9p': 'Sharing uses virtio-9p (served by QEMU itself).',
  'virtio-fs:access-platform': 'The virtio-fs device offers VIRTIO_F_ACCESS_PLATFORM, which a TDX guest requires of every device.',
  'multi-queue': 'Devices may use several queues.',
  'cpu-hotplug': 'vCPUs can be added to the running VM.',
  'memory-hotplug': 'Memory can be added to the running VM.',
  'nvdimm-image': 'The guest image may be attached as an NVDIMM/pmem device.',
  'balloon': 'A memory balloon device may be used.',
  'confidential-guest:tdx': 'The VM is an Intel TDX trust domain.',
  // What the hypervisor plugin can render from the plan's intents (core/plan.ts); a plan holding an
  // intent without its capability is refused in the validated config phase.
  'render:device:disk': 'The hypervisor plugin renders disks attached at boot.',
  'render:device:vhost-user-fs': 'The hypervisor plugin renders vhost-user-fs (virtio-fs) shares, with shared guest memory.',
  'render:device:9p': 'The hypervisor plugin renders virtio-9p shares it serves itself.',
  'render:device:agent-channel': 'The hypervisor plugin renders the agent channel it chose.',
  'render:device:console': 'The hypervisor plugin renders the guest console.',
  'render:device:debug-console': 'The hypervisor plugin renders the guest debug console channel (a second virtio-serial port).',
  'render:device:rng': 'The hypervisor plugin renders a virtio-rng device.',
  'render:device:balloon': 'The hypervisor plugin renders a memory balloon.',
  'render:tee:tdx': 'The hypervisor plugin launches Intel TDX trust domains (firmware, TD settings).',
  'render:access-platform': 'The hypervisor plugin makes every device offer VIRTIO_F_ACCESS_PLATFORM, hot-plugged ones included.',
} satisfies Record<string, string>);

export type KnownCapability = keyof typeof KNOWN_CAPABILITIES;
export type CapabilityName = KnownCapability | (string & {});

export interface CapabilityRecord {
  readonly name: CapabilityName;
  /** Plugin that added it. */
  readonly by: string;
  readonly note?: string;
}

export interface RemovedCapability {
  readonly name: CapabilityName;
  readonly by: string;
  readonly why: string;
}

/** The view of the set that a plugin's hook handler receives: every change is stamped with its name. */
export interface CapabilityView {
  has(name: CapabilityName): boolean;
  add(name: CapabilityName, note?: string): void;
  remove(name: CapabilityName, why: string): void;
  list(): readonly CapabilityName[];
}

/** Read-only view given to `validate` and `plan` handlers: the set is final by then. */
export interface ReadonlyCapabilities {
  has(name: CapabilityName): boolean;
  list(): readonly CapabilityName[];
}

const SCOPE = Symbol.for('kata.scopeForPlugin');

export class CapabilitySet {
  readonly #present = new Map<CapabilityName, CapabilityRecord>();
  readonly #removed: RemovedCapability[] = [];

  has(name: CapabilityName): boolean {
    return this.#present.has(name);
  }

  add(name: CapabilityName, by: string, note?: string): void {
    this.#present.set(name, note === undefined ? { name, by } : { name, by, note });
  }

  remove(name: CapabilityName, by: string, why: string): void {
    if (this.#present.delete(name)) this.#removed.push({ name, by, why });
  }

  list(): CapabilityName[] {
    return [...this.#present.keys()].sort();
  }

  records(): CapabilityRecord[] {
    // Plain code-unit order: localeCompare would load ICU collation, ~10 ms of a CLI start.
    return [...this.#present.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  removed(): readonly RemovedCapability[] {
    return this.#removed;
  }

  readonly(): ReadonlyCapabilities {
    return Object.freeze({ has: (n: CapabilityName) => this.has(n), list: () => this.list() });
  }

  /** A view whose changes are stamped with `plugin`. Used by the core's tap wrapper. */
  [SCOPE](plugin: string): CapabilityView {
    return {
      has: (n) => this.has(n),
      add: (n, note) => this.add(n, plugin, note),
      remove: (n, why) => this.remove(n, plugin, why),
      list: () => this.list(),
    };
  }
}

/** Objects that hand each plugin its own stamped view implement this symbol. */
export const SCOPE_FOR_PLUGIN: typeof SCOPE = SCOPE;
