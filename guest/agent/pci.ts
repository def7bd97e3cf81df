/**
 * From a Kata PCI path (a `blk` Storage's source, e.g. `05/00`) to the guest block device
 * (`/dev/vda`).
 *
 * A PCI path names a device by the slots on the way to it: the first component is the slot on
 * the root bus (0000:00), each further one the slot on the bus behind the bridge (or PCIe root
 * port) named by the previous component. Each component is a hex slot with an optional `.function`.
 * On a q35 guest with `-device pcie-root-port,id=rp0,bus=pcie.0,addr=0x5` and a virtio-blk-pci
 * hot-plugged into rp0, the path is `05/00` and sysfs shows (checked in a real guest):
 *
 *   /sys/devices/pci0000:00/0000:00:05.0/pci_bus/0000:01            the root port's secondary bus
 *   /sys/devices/pci0000:00/0000:00:05.0/0000:01:00.0/virtio3/block/vda
 *
 * Hot-plug is asynchronous: the device directory, then the virtio driver's `virtioN/block/vdX`,
 * then the devtmpfs node appear one after the other, so {@link waitForPciBlockDevice} polls.
 */
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { deadlineExceeded, invalidArgument } from './errors.js';
import { lstatOrUndefined, sleep } from './sys.js';

export interface PciSlotFn {
  /** 0..0x1f */
  readonly slot: number;
  /** 0..7 */
  readonly fn: number;
}

/** Parses `05/00` or `02.1/00`; throws INVALID_ARGUMENT on anything else. */
export function parsePciPath(text: string): PciSlotFn[] {
  const bad = (why: string) => invalidArgument(`PCI path ${JSON.stringify(text)}: ${why} (expected slots in hex separated by "/", e.g. "02/00")`);
  if (text === '') throw bad('empty');
  const parts = text.split('/');
  if (parts.length > 256) throw bad('too many components');
  return parts.map((p) => {
    const m = /^([0-9a-fA-F]{1,2})(?:\.([0-7]))?$/.exec(p);
    if (!m) throw bad(`bad component ${JSON.stringify(p)}`);
    const slot = Number.parseInt(m[1] as string, 16);
    if (slot > 0x1f) throw bad(`slot 0x${slot.toString(16)} is above 0x1f`);
    return { slot, fn: m[2] === undefined ? 0 : Number(m[2]) };
  });
}

export function formatPciPath(p: readonly PciSlotFn[]): string {
  return p.map((c) => `${c.slot.toString(16).padStart(2, '0')}${c.fn ? `.${c.fn}` : ''}`).join('/');
}

/** `0000:01` + slot 0 fn 0 → `0000:01:00.0` */
function bdf(bus: string, c: PciSlotFn): string {
  return `${bus}:${c.slot.toString(16).padStart(2, '0')}.${c.fn}`;
}

export type PciResolution =
  | { readonly found: true; readonly sysfsDir: string }
  /** `missing`: the sysfs directory that does not exist (yet). */
  | { readonly found: false; readonly missing: string; readonly why: string };

/**
 * The sysfs directory of the device at `pciPath`, walking from the root bus through each bridge's
 * `pci_bus/<bus>` entry, or which step is missing (a device not plugged in yet, say).
 */
export async function resolvePciPath(pciPath: readonly PciSlotFn[], sysfsRoot = '/sys'): Promise<PciResolution> {
  let dir = path.join(sysfsRoot, 'devices', 'pci0000:00');
  let bus = '0000:00';
  for (let i = 0; i < pciPath.length; i++) {
    dir = path.join(dir, bdf(bus, pciPath[i] as PciSlotFn));
    if (!(await lstatOrUndefined(dir))) return { found: false, missing: dir, why: `no PCI device ${path.basename(dir)}` };
    if (i === pciPath.length - 1) break;
    let buses: string[];
    try {
      buses = await readdir(path.join(dir, 'pci_bus'));
    } catch {
      return { found: false, missing: path.join(dir, 'pci_bus'), why: `${path.basename(dir)} is not a PCI bridge (no pci_bus)` };
    }
    if (buses.length !== 1) return { found: false, missing: path.join(dir, 'pci_bus'), why: `${path.basename(dir)} has ${buses.length} secondary buses, expected 1` };
    bus = buses[0] as string;
  }
  return { found: true, sysfsDir: dir };
}

/** The block device name (`vda`) a PCI device's driver registered, if any yet: `virtio*\/block/*` or `block/*`. */
export async function blockDeviceIn(deviceDir: string): Promise<string | undefined> {
  let entries: string[];
  try {
    entries = (await readdir(deviceDir)).sort();
  } catch {
    return undefined;
  }
  const candidates = ['block', ...entries.filter((e) => /^virtio\d+$/.test(e)).map((e) => path.join(e, 'block'))];
  for (const c of candidates) {
    try {
      const names = (await readdir(path.join(deviceDir, c))).sort();
      if (names[0]) return names[0];
    } catch {
      // not this one
    }
  }
  return undefined;
}

export interface WaitOptions {
  readonly timeoutMs: number;
  readonly sysfsRoot?: string;
  readonly devRoot?: string;
  readonly pollMs?: number;
  readonly signal?: AbortSignal;
}

/**
 * Waits until the block device at `pciPath` exists with its /dev node and returns the node's path.
 * DEADLINE_EXCEEDED after `timeoutMs`, naming the step that never appeared.
 */
export async function waitForPciBlockDevice(pciPath: readonly PciSlotFn[], opts: WaitOptions): Promise<string> {
  const deadline = Date.now() + opts.timeoutMs;
  const devRoot = opts.devRoot ?? '/dev';
  let last = 'nothing looked at yet';
  for (;;) {
    const r = await resolvePciPath(pciPath, opts.sysfsRoot);
    if (!r.found) last = r.why;
    else {
      const name = await blockDeviceIn(r.sysfsDir);
      if (!name) last = `${r.sysfsDir} has no block device (yet)`;
      else {
        const node = path.join(devRoot, name);
        if (await lstatOrUndefined(node)) return node;
        last = `${node} does not exist (yet)`;
      }
    }
    if (Date.now() >= deadline) {
      throw deadlineExceeded(`the block device at PCI path ${formatPciPath(pciPath)} did not appear within ${opts.timeoutMs} ms (${last})`);
    }
    await sleep(opts.pollMs ?? 20, opts.signal);
  }
}
