/**
 * Block hot-plug into a running QEMU: a raw block node (`blockdev-add`) and a device on it
 * (`device_add`), and the reverse. The device is a `virtio-blk-pci` in one of the spec's reserved
 * pcie-root-ports, or, when the spec has a virtio-scsi controller (block_device_driver =
 * "virtio-scsi"), a `scsi-hd` on that controller's bus at a SCSI id/LUN numbered as Kata does.
 * Either way a disk holds one *slot* (a port, or a SCSI index) until QEMU confirms it gone.
 *
 * Every device-changing QMP command goes through one promise queue, so concurrent callers never
 * pick the same slot and QEMU never sees two half-done hot-plugs interleaved. Waiting for the guest
 * to release a disk (`DEVICE_DELETED`) happens outside the queue, since it needs the guest's
 * cooperation: other disks can come and go meanwhile, while the port stays taken.
 *
 * Whatever cannot be undone stays recorded under its id with its port taken; `unplug(id)` retries
 * the cleanup. A port is only handed out again once QEMU has confirmed it empty.
 */
import { stat } from 'node:fs/promises';
import { KataError, type BlockDeviceSpec, type HotpluggedBlock, type Logger } from '../../core/plugin-api.js';
import type { QemuLaunchSpec } from './launch-spec.js';
import { effectiveDevice, hotplugPortSlot } from './argv.js';
import { PLUGIN_NAME, SCSI_MAX_DISKS } from './config.js';
import { QmpError, type QmpClient } from './qmp.js';

export const HOTPLUG_DEFAULTS = Object.freeze({
  /**
   * How long to wait for DEVICE_DELETED. QEMU's q35 machines (6.1 and later) hot-plug into root
   * ports through ACPI, and the test guest releases a disk in about 0.1 s under TCG; with native
   * PCIe hot-plug Linux's pciehp waits 5 s after the attention button, so leave room for that.
   */
  unplugTimeoutMs: 10_000,
});

/** QEMU ids (`id_wellformed`), and block node names are at most 31 characters. */
const HOTPLUG_ID = /^[A-Za-z][A-Za-z0-9_.-]{0,30}$/;

/** The virtio-blk device's slot behind its root port: a root port has exactly one slot, 0. */
const DEVICE_SLOT = 0;

export { hotplugPortSlot };

/** Kata's PCI path of the disk in hot-plug port `index`: `<port slot>/<device slot>`, two hex digits each. */
export function hotplugPciPath(index: number): string {
  return [hotplugPortSlot(index), DEVICE_SLOT].map((n) => n.toString(16).padStart(2, '0')).join('/');
}

/** Kata's SCSI id and LUN of the disk with index `index` (virtcontainers' GetSCSIIdLun): 256 LUNs per id. */
export function scsiIdLun(index: number): { readonly scsiId: number; readonly lun: number } {
  return { scsiId: Math.floor(index / 256), lun: index % 256 };
}

/** The `scsi` Storage source the agent finds the disk with index `index` by: `<scsi id>:<lun>`. */
export function scsiAddress(index: number): string {
  const { scsiId, lun } = scsiIdLun(index);
  return `${scsiId}:${lun}`;
}

interface PluggedDisk {
  readonly id: string;
  readonly path: string;
  /** The slot it holds: a port index (virtio-blk) or a SCSI index (virtio-scsi). */
  readonly port: number;
  /** Where the guest finds it: a PCI path or a SCSI address. */
  readonly where: HotpluggedBlock;
  /** QEMU reported the device gone (or never had it); only the block node may remain. */
  deviceGone: boolean;
  unplugging: Promise<void> | undefined;
}

export interface BlockHotplugOptions {
  readonly unplugTimeoutMs?: number;
}

export class BlockHotplug {
  readonly #qmp: QmpClient;
  readonly #ports: readonly string[];
  /** The virtio-scsi controller disks go on, or undefined for virtio-blk into `#ports`. */
  readonly #scsiController: string | undefined;
  readonly #virtioIommuPlatform: boolean;
  readonly #log: Logger;
  readonly #unplugTimeoutMs: number;
  /** Slot (port index, or SCSI index) → id of the disk holding it. */
  readonly #portOwner: (string | undefined)[];
  readonly #disks = new Map<string, PluggedDisk>();
  readonly #unsubscribe: () => void;
  #queue: Promise<unknown> = Promise.resolve();

  constructor(qmp: QmpClient, spec: Pick<QemuLaunchSpec, 'hotplugPorts' | 'virtioIommuPlatform' | 'scsiController'>, log: Logger, opts: BlockHotplugOptions = {}) {
    this.#qmp = qmp;
    this.#ports = [...spec.hotplugPorts];
    this.#scsiController = spec.scsiController;
    this.#virtioIommuPlatform = spec.virtioIommuPlatform;
    this.#log = log;
    this.#unplugTimeoutMs = opts.unplugTimeoutMs ?? HOTPLUG_DEFAULTS.unplugTimeoutMs;
    this.#portOwner = Array.from({ length: this.#scsiController !== undefined ? SCSI_MAX_DISKS : this.#ports.length }, () => undefined);
    // A DEVICE_DELETED that comes after an unplug timed out still counts: a retried unplug then
    // only has the block node left to delete.
    this.#unsubscribe = qmp.onEvent((e) => {
      if (e.event !== 'DEVICE_DELETED') return;
      const disk = typeof e.data.device === 'string' ? this.#disks.get(e.data.device) : undefined;
      if (disk) disk.deviceGone = true;
    });
  }

  /** The disks currently attached (or not fully detached), in slot order. */
  get disks(): readonly HotpluggedBlock[] {
    return [...this.#disks.values()].sort((a, b) => a.port - b.port).map(({ where }) => ({ ...where }));
  }

  /** Stops listening for events; the VM is going away. */
  dispose(): void {
    this.#unsubscribe();
  }

  async plug(dev: BlockDeviceSpec): Promise<HotpluggedBlock> {
    if (!HOTPLUG_ID.test(dev.id)) {
      throw hotplugError(`disk id "${dev.id}" is not usable as a QEMU id and node name`, {
        fix: 'Use a letter, then up to 30 letters, digits, "-", "." or "_".',
      });
    }
    // stat in parallel, but take a place in the queue now: ports go to callers in call order.
    const driver = backingDriver(dev.path);
    driver.catch(() => undefined); // awaited below; not an unhandled rejection meanwhile
    return this.#serial(async () => {
      const fileDriver = await driver;
      if (this.#disks.has(dev.id)) throw hotplugError(`a disk with id "${dev.id}" is already hot-plugged`, { fix: 'Give each disk of a sandbox its own id.' });
      const port = this.#portOwner.findIndex((owner) => owner === undefined);
      if (port < 0) {
        const all = this.#scsiController !== undefined ? `all ${this.#portOwner.length} SCSI addresses of controller ${this.#scsiController} are in use` : `all ${this.#ports.length} reserved pcie-root-ports are in use`;
        throw new KataError('KATA_ERR_HOTPLUG_NO_SLOT', `no free hot-plug slot for disk "${dev.id}": ${all}`, { plugin: PLUGIN_NAME });
      }
      const { device, bus, where } = this.#deviceFor(dev, port);
      const readOnly = dev.readonly === true;
      try {
        await this.#qmp.execute('blockdev-add', {
          driver: 'raw',
          'node-name': dev.id,
          'read-only': readOnly,
          file: { driver: fileDriver, filename: dev.path, 'read-only': readOnly },
        });
      } catch (e) {
        throw hotplugError(`disk "${dev.id}" (${dev.path}): blockdev-add failed: ${reason(e)}`, { cause: e });
      }
      try {
        await this.#qmp.execute('device_add', { driver: device.type, id: dev.id, ...device.props });
      } catch (e) {
        await this.#rollback(dev, port, e);
        throw hotplugError(`disk "${dev.id}" (${dev.path}): device_add on ${bus} failed: ${reason(e)}; its block node was removed again`, { cause: e });
      }
      this.#portOwner[port] = dev.id;
      this.#disks.set(dev.id, { id: dev.id, path: dev.path, port, where, deviceGone: false, unplugging: undefined });
      this.#log.info({ path: dev.path, driver: fileDriver, device: device.type, bus, ...where, readOnly }, 'disk hot-plugged');
      return { ...where };
    });
  }

  /** The device for disk `dev` in slot `slot`: its QEMU form, the bus it goes on, and where the guest finds it. */
  #deviceFor(dev: BlockDeviceSpec, slot: number): { device: { type: string; props: Record<string, string | number | boolean> }; bus: string; where: HotpluggedBlock } {
    if (this.#scsiController !== undefined) {
      // scsi-hd is not a virtio device: the controller carries iommu_platform under TDX.
      const { scsiId, lun } = scsiIdLun(slot);
      const bus = `${this.#scsiController}.0`;
      return { device: { type: 'scsi-hd', props: { drive: dev.id, bus, 'scsi-id': scsiId, lun } }, bus, where: { id: dev.id, scsiAddr: scsiAddress(slot) } };
    }
    const bus = this.#ports[slot] as string;
    const device = effectiveDevice({ type: 'virtio-blk-pci', id: dev.id, props: { drive: dev.id, bus, addr: String(DEVICE_SLOT) } }, { virtioIommuPlatform: this.#virtioIommuPlatform });
    return { device, bus, where: { id: dev.id, pciPath: hotplugPciPath(slot) } };
  }

  /** Detaches a disk: device_del, DEVICE_DELETED from the guest, blockdev-del. Concurrent calls for one id share the work. */
  unplug(id: string, opts: { timeoutMs?: number } = {}): Promise<void> {
    const disk = this.#disks.get(id);
    if (!disk) return Promise.reject(hotplugError(`no hot-plugged disk with id "${id}"`, { fix: 'Unplug only disks that hotplugBlock returned.' }));
    disk.unplugging ??= this.#unplug(disk, opts.timeoutMs ?? this.#unplugTimeoutMs).finally(() => (disk.unplugging = undefined));
    return disk.unplugging;
  }

  async #unplug(disk: PluggedDisk, timeoutMs: number): Promise<void> {
    if (!disk.deviceGone) {
      // The cursor is taken before device_del goes out, so an event that beats the reply counts.
      let since = 0;
      await this.#serial(async () => {
        since = this.#qmp.eventCursor;
        try {
          await this.#qmp.execute('device_del', { id: disk.id });
        } catch (e) {
          if (e instanceof QmpError && e.class === 'DeviceNotFound') disk.deviceGone = true;
          // A retry while QEMU still waits for the guest: the request stands, wait on.
          else if (!(e instanceof QmpError && /already in the process of unplug/i.test(e.desc))) {
            throw hotplugError(`disk "${disk.id}": device_del failed: ${reason(e)}`, { cause: e });
          }
        }
      });
      if (!disk.deviceGone) {
        try {
          await this.#qmp.waitForEvent('DEVICE_DELETED', (e) => e.data.device === disk.id, timeoutMs, { since });
        } catch (e) {
          if (e instanceof KataError && e.code === 'KATA_ERR_QMP_TIMEOUT') {
            throw new KataError('KATA_ERR_UNPLUG_TIMEOUT', `the guest did not release disk "${disk.id}" (${describeWhere(disk.where)}) within ${timeoutMs} ms; its slot stays taken`, {
              plugin: PLUGIN_NAME,
              cause: e,
            });
          }
          throw e;
        }
        disk.deviceGone = true;
      }
    }
    await this.#serial(async () => {
      try {
        await this.#qmp.execute('blockdev-del', { 'node-name': disk.id });
      } catch (e) {
        // The node is gone already (an earlier attempt got through): nothing left to undo.
        if (!(e instanceof QmpError && /failed to find node/i.test(e.desc))) {
          throw hotplugError(`disk "${disk.id}": the device is gone but blockdev-del failed: ${reason(e)}`, { cause: e });
        }
      }
      this.#disks.delete(disk.id);
      this.#portOwner[disk.port] = undefined;
      this.#log.info({ ...disk.where }, 'disk unplugged');
    });
  }

  /** After a failed device_add: delete the block node; if even that fails, keep the slot and id taken. */
  async #rollback(dev: BlockDeviceSpec, port: number, failure: unknown): Promise<void> {
    try {
      await this.#qmp.execute('blockdev-del', { 'node-name': dev.id });
    } catch (e) {
      // Only a QMP error reply proves the device was never created; after a timeout it may exist.
      const deviceGone = failure instanceof QmpError;
      this.#portOwner[port] = dev.id;
      this.#disks.set(dev.id, { id: dev.id, path: dev.path, port, where: this.#deviceFor(dev, port).where, deviceGone, unplugging: undefined });
      this.#log.error({ err: e, id: dev.id }, 'hot-plug rollback failed; the disk stays recorded until unplugBlock succeeds');
      throw hotplugError(`disk "${dev.id}": device_add failed (${reason(failure)}) and removing its block node failed too (${reason(e)}); unplugBlock("${dev.id}") retries`, {
        cause: failure,
      });
    }
  }

  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => undefined);
    return run;
  }
}

/** QEMU's protocol driver for the disk's backing: `file` for a regular file, `host_device` for a block device. */
async function backingDriver(path: string): Promise<'file' | 'host_device'> {
  let st;
  try {
    st = await stat(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw hotplugError(`disk ${path} cannot be used: ${code === 'ENOENT' ? 'it does not exist' : (code ?? String(e))}`, { cause: e });
  }
  if (st.isBlockDevice()) return 'host_device';
  if (st.isFile()) return 'file';
  throw hotplugError(`disk ${path} is neither a regular file nor a block device`);
}

function describeWhere(w: HotpluggedBlock): string {
  return w.scsiAddr !== undefined ? `SCSI ${w.scsiAddr}` : `PCI ${w.pciPath}`;
}

/** A KATA_ERR_HOTPLUG error of this plugin (disks here, vCPUs and memory in resize.ts). */
export function hotplugError(message: string, opts: { cause?: unknown; fix?: string } = {}): KataError {
  return new KataError('KATA_ERR_HOTPLUG', message, { plugin: PLUGIN_NAME, ...opts });
}

/** A failure as one line: QMP's error class and text, a KataError's text and code. */
export function reason(e: unknown): string {
  if (e instanceof QmpError) return `${e.class}: ${e.desc}`;
  if (e instanceof KataError) return `${e.text} [${e.code}]`;
  return e instanceof Error ? e.message : String(e);
}
