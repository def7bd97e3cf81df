/**
 * From a Kata SCSI address (a `scsi` Storage's source, `"<scsi id>:<lun>"`, e.g. `0:3`) to the
 * guest block device (`/dev/sdb`), as kata-agent's `scsi` storage driver does.
 *
 * The host hot-plugs a scsi-hd onto the VM's virtio-scsi controller at target `<scsi id>`, LUN
 * `<lun>`, channel 0. virtio-scsi tells the guest (a hot-plug event), sd_mod attaches the disk and
 * sysfs shows it as `/sys/class/scsi_disk/<host>:0:<id>:<lun>/device/block/sdX`. Only hosts whose
 * driver is virtio_scsi count (q35's AHCI controller is a SCSI host too, when its driver is
 * loaded). kata-agent also asks for a scan of the address; so does this, once, in case the event
 * was missed. Hot-plug is asynchronous, so {@link waitForScsiBlockDevice} polls, bounded.
 */
import { readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { deadlineExceeded, invalidArgument } from './errors.js';
import { lstatOrUndefined, sleep } from './sys.js';

export interface ScsiAddress {
  /** SCSI target id, 0..255 (QEMU's virtio-scsi limit). */
  readonly id: number;
  /** 0..16383 (QEMU's virtio-scsi limit). */
  readonly lun: number;
}

/** Parses `"<id>:<lun>"` in decimal; INVALID_ARGUMENT on anything else. */
export function parseScsiAddress(text: string): ScsiAddress {
  const m = /^(\d{1,3}):(\d{1,5})$/.exec(text);
  const bad = (why: string) => invalidArgument(`SCSI address ${JSON.stringify(text)}: ${why} (expected "<scsi id>:<lun>" in decimal, e.g. "0:1")`);
  if (!m) throw bad('malformed');
  const id = Number(m[1]);
  const lun = Number(m[2]);
  if (id > 255) throw bad(`scsi id ${id} is above 255`);
  if (lun > 16383) throw bad(`lun ${lun} is above 16383`);
  return { id, lun };
}

/** The SCSI host numbers (`hostN`) whose driver is virtio_scsi. */
export async function virtioScsiHosts(sysfsRoot = '/sys'): Promise<number[]> {
  const dir = path.join(sysfsRoot, 'class', 'scsi_host');
  let entries: string[];
  try {
    entries = await readdir(dir);
  } catch {
    return [];
  }
  const out: number[] = [];
  for (const e of entries) {
    const m = /^host(\d+)$/.exec(e);
    if (!m) continue;
    const name = await readFile(path.join(dir, e, 'proc_name'), 'utf8').catch(() => '');
    if (name.trim() === 'virtio_scsi') out.push(Number(m[1]));
  }
  return out.sort((a, b) => a - b);
}

/** The block device name (`sdb`) of the disk at `addr` on a virtio-scsi host, if there is one yet. */
export async function scsiBlockDeviceName(addr: ScsiAddress, sysfsRoot = '/sys'): Promise<string | undefined> {
  for (const host of await virtioScsiHosts(sysfsRoot)) {
    const blockDir = path.join(sysfsRoot, 'class', 'scsi_disk', `${host}:0:${addr.id}:${addr.lun}`, 'device', 'block');
    try {
      const names = (await readdir(blockDir)).sort();
      if (names[0]) return names[0];
    } catch {
      // not on this host (yet)
    }
  }
  return undefined;
}

/** Asks every virtio-scsi host to scan channel 0, target `id`, LUN `lun` (what kata-agent does); errors ignored. */
export async function scanScsiAddress(addr: ScsiAddress, sysfsRoot = '/sys'): Promise<void> {
  for (const host of await virtioScsiHosts(sysfsRoot)) {
    await writeFile(path.join(sysfsRoot, 'class', 'scsi_host', `host${host}`, 'scan'), `0 ${addr.id} ${addr.lun}`).catch(() => undefined);
  }
}

export interface ScsiWaitOptions {
  readonly timeoutMs: number;
  readonly sysfsRoot?: string;
  readonly devRoot?: string;
  readonly pollMs?: number;
  readonly signal?: AbortSignal;
}

/**
 * Waits until the SCSI disk at `addr` exists with its /dev node and returns the node's path.
 * DEADLINE_EXCEEDED after `timeoutMs`, saying what was missing.
 */
export async function waitForScsiBlockDevice(addr: ScsiAddress, opts: ScsiWaitOptions): Promise<string> {
  const deadline = Date.now() + opts.timeoutMs;
  const devRoot = opts.devRoot ?? '/dev';
  const where = `${addr.id}:${addr.lun}`;
  let scanned = false;
  let last = 'nothing looked at yet';
  for (;;) {
    const name = await scsiBlockDeviceName(addr, opts.sysfsRoot);
    if (name === undefined) {
      const hosts = await virtioScsiHosts(opts.sysfsRoot);
      last = hosts.length === 0 ? 'no virtio_scsi host (is the virtio_scsi module loaded?)' : `no disk at <host>:0:${where} under /sys/class/scsi_disk on host(s) ${hosts.join(', ')}`;
      if (hosts.length > 0 && !scanned) {
        scanned = true;
        await scanScsiAddress(addr, opts.sysfsRoot);
        continue;
      }
    } else {
      const node = path.join(devRoot, name);
      if (await lstatOrUndefined(node)) return node;
      last = `${node} does not exist (yet)`;
    }
    if (Date.now() >= deadline) throw deadlineExceeded(`the SCSI disk ${where} did not appear within ${opts.timeoutMs} ms (${last})`);
    await sleep(opts.pollMs ?? 20, opts.signal);
  }
}
