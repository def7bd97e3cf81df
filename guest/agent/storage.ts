/**
 * Storages: what CreateSandbox and CreateContainer ask the agent to mount before anything runs
 * (the shared filesystem, a container's block-device rootfs, tmpfs volumes). Driver names are
 * kata-agent's:
 *
 * | driver | source | mounted as |
 * |---|---|---|
 * | `blk` | PCI path of a virtio-blk device (`05/00`), waited for (hot-plug is asynchronous) | `fstype` (e.g. ext4) |
 * | `scsi` | SCSI address `<id>:<lun>` of a disk on the virtio-scsi controller, waited for under /sys/class/scsi_disk | `fstype` |
 * | `mmioblk` | the device node (`/dev/vdb`) | `fstype` |
 * | `9p` | the 9p mount tag (`kataShared`) | 9p, `trans=virtio,version=9p2000.L` unless the options say otherwise |
 * | `virtio-fs` | the virtio-fs tag | virtiofs |
 * | `ephemeral` | ignored | tmpfs |
 * | `local` | ignored | nothing: a directory is created (`mode=` option honoured) |
 *
 * Mount points are reference counted: several containers may name the same storage (the shared
 * filesystem, one rootfs for several containers); the last release unmounts it.
 */
import { mkdir, rmdir } from 'node:fs/promises';
import path from 'node:path';
import type { Storage } from '../../wire/agent/proto.gen.js';
import { internal, invalidArgument } from './errors.js';
import { log } from './log.js';
import { parsePciPath, waitForPciBlockDevice } from './pci.js';
import { parseScsiAddress, waitForScsiBlockDevice } from './scsi.js';
import { busybox, busyboxOk, lstatOrUndefined, sleep } from './sys.js';

export const STORAGE_DRIVERS = Object.freeze(['blk', 'scsi', 'mmioblk', '9p', 'virtio-fs', 'ephemeral', 'local'] as const);
export type StorageDriver = (typeof STORAGE_DRIVERS)[number];

/** The mount a storage turns into: `mount -t fstype -o options source target`, or a directory only. */
export type MountPlan =
  | { readonly kind: 'mount'; readonly source: string; readonly target: string; readonly fstype: string; readonly options: readonly string[] }
  | { readonly kind: 'dir'; readonly target: string; readonly mode: number };

/** An absolute path without `..`, normalised; INVALID_ARGUMENT otherwise. */
export function checkGuestPath(p: string, what: string): string {
  if (!p.startsWith('/')) throw invalidArgument(`${what} ${JSON.stringify(p)} must be an absolute path`);
  if (p.split('/').includes('..')) throw invalidArgument(`${what} ${JSON.stringify(p)} must not contain ".."`);
  const n = path.posix.normalize(p);
  return n.length > 1 ? n.replace(/\/+$/, '') : n;
}

/**
 * A value that goes to a busybox applet as an operand (a mount source, a hostname): it must not
 * start with `-`, which the applet would read as an option (`hostname -F FILE`, `mount -o …`).
 * INVALID_ARGUMENT otherwise; returns the value.
 */
export function checkOperand(value: string, what: string): string {
  if (value === '' || value.startsWith('-')) throw invalidArgument(`${what} ${JSON.stringify(value)} must not be empty or start with "-"`);
  return value;
}

/** A filesystem type: a plain word. INVALID_ARGUMENT otherwise. */
export function checkFsType(value: string, what: string): string {
  if (!/^[a-z0-9][a-z0-9._-]*$/i.test(value)) throw invalidArgument(`${what} ${JSON.stringify(value)} is not a filesystem type`);
  return value;
}

/** Finds the /dev node of a hot-plugged disk: `blk` by PCI path, `scsi` by `<id>:<lun>`. */
export type DeviceLookup = (driver: 'blk' | 'scsi', source: string) => Promise<string>;

/**
 * The mount for a storage, with the device (for `blk` and `scsi`) still to be found: `device`
 * resolves the source to a /dev node. Pure apart from that callback. INVALID_ARGUMENT for an
 * unknown driver or a malformed source.
 */
export async function planStorage(s: Storage, device: DeviceLookup): Promise<MountPlan> {
  const target = checkGuestPath(s.mountPoint, 'storage mount_point');
  const driver = s.driver as StorageDriver;
  switch (driver) {
    case 'blk':
    case 'scsi': {
      if (!s.fstype) throw invalidArgument(`storage ${target}: driver "${driver}" needs an fstype`);
      checkFsType(s.fstype, `storage ${target}: fstype`);
      // reject a bad source before waiting for it
      if (driver === 'blk') parsePciPath(s.source);
      else parseScsiAddress(s.source);
      return { kind: 'mount', source: await device(driver, s.source), target, fstype: s.fstype, options: s.options };
    }
    case 'mmioblk':
      if (!s.fstype) throw invalidArgument(`storage ${target}: driver "mmioblk" needs an fstype`);
      return { kind: 'mount', source: checkGuestPath(s.source, 'storage source'), target, fstype: checkFsType(s.fstype, `storage ${target}: fstype`), options: s.options };
    case '9p': {
      if (!s.source) throw invalidArgument(`storage ${target}: driver "9p" needs the mount tag as its source`);
      const options = [...s.options];
      if (!options.some((o) => o.startsWith('trans='))) options.unshift('trans=virtio');
      if (!options.some((o) => o.startsWith('version='))) options.push('version=9p2000.L');
      return { kind: 'mount', source: checkOperand(s.source, `storage ${target}: source`), target, fstype: checkFsType(s.fstype || '9p', `storage ${target}: fstype`), options };
    }
    case 'virtio-fs':
      if (!s.source) throw invalidArgument(`storage ${target}: driver "virtio-fs" needs the tag as its source`);
      return { kind: 'mount', source: checkOperand(s.source, `storage ${target}: source`), target, fstype: checkFsType(s.fstype || 'virtiofs', `storage ${target}: fstype`), options: s.options };
    case 'ephemeral':
      return { kind: 'mount', source: 'tmpfs', target, fstype: 'tmpfs', options: s.options };
    case 'local': {
      const mode = s.options.map((o) => /^mode=([0-7]{3,4})$/.exec(o)?.[1]).find((m) => m !== undefined);
      return { kind: 'dir', target, mode: mode ? Number.parseInt(mode, 8) : 0o777 };
    }
    default:
      throw invalidArgument(`storage ${target}: unknown driver ${JSON.stringify(s.driver)} (this agent handles ${STORAGE_DRIVERS.join(', ')})`);
  }
}

/** `mount` arguments for a plan: `-t fstype [-o a,b] source target`. */
export function mountArgs(plan: Extract<MountPlan, { kind: 'mount' }>): string[] {
  return ['-t', plan.fstype, ...(plan.options.length ? ['-o', plan.options.join(',')] : []), plan.source, plan.target];
}

interface Mounted {
  refs: number;
  readonly plan: MountPlan;
  /** We made the mount point, so we remove it once unmounted. */
  readonly createdDir: boolean;
}

export interface StorageOptions {
  /** How long a `blk` or `scsi` device may take to appear. */
  readonly hotplugTimeoutMs: number;
}

/** The storages mounted in the guest, by mount point. */
export class StorageManager {
  private readonly mounted = new Map<string, Mounted>();

  constructor(private readonly opts: StorageOptions) {}

  /** Mount points currently held, in mount order. */
  list(): string[] {
    return [...this.mounted.keys()];
  }

  /** Mounts `s` (or takes another reference to it) and returns its mount point. */
  async acquire(s: Storage, signal?: AbortSignal): Promise<string> {
    const target = checkGuestPath(s.mountPoint, 'storage mount_point');
    const held = this.mounted.get(target);
    if (held) {
      held.refs++;
      return target;
    }
    const wait = { timeoutMs: this.opts.hotplugTimeoutMs, signal };
    const plan = await planStorage(s, (driver, source) =>
      driver === 'scsi' ? waitForScsiBlockDevice(parseScsiAddress(source), wait) : waitForPciBlockDevice(parsePciPath(source), wait),
    );
    const createdDir = !(await lstatOrUndefined(target));
    try {
      await mkdir(target, { recursive: true, mode: plan.kind === 'dir' ? plan.mode : 0o755 });
    } catch (e) {
      throw internal(`storage ${target}: cannot create the mount point: ${(e as Error).message}`, e);
    }
    if (plan.kind === 'mount') {
      const r = await busybox('mount', mountArgs(plan));
      if (r.code !== 0) {
        if (createdDir) await rmdir(target).catch(() => undefined);
        throw internal(`storage ${target}: mount ${mountArgs(plan).join(' ')} failed: ${r.stderr.trim() || `exit ${r.code}`}`);
      }
      log(`mounted ${plan.source} (${plan.fstype}) on ${target}`);
    }
    this.mounted.set(target, { refs: 1, plan, createdDir });
    return target;
  }

  /** Drops one reference; the last one unmounts (lazily if it stays busy) and removes a mount point we made. */
  async release(target: string): Promise<void> {
    const held = this.mounted.get(target);
    if (!held) return;
    if (--held.refs > 0) return;
    this.mounted.delete(target);
    if (held.plan.kind === 'mount') await unmount(target);
    if (held.createdDir) await rmdir(target).catch(() => undefined);
  }

  /** Releases everything, last mounted first. */
  async releaseAll(): Promise<void> {
    for (const target of this.list().reverse()) {
      const held = this.mounted.get(target);
      if (held) held.refs = 1;
      await this.release(target);
    }
  }
}

/** umount, retried while busy (processes still exiting), then detached (`umount -l`) as a last resort. */
export async function unmount(target: string): Promise<void> {
  let last = '';
  for (let i = 0; i < 20; i++) {
    const r = await busybox('umount', [target]);
    if (r.code === 0) {
      log(`unmounted ${target}`);
      return;
    }
    last = r.stderr.trim();
    // Not (or no longer) a mount point: nothing to undo.
    if (/Invalid argument|not mounted|No such file/i.test(last)) return;
    if (!/busy/i.test(last)) break;
    await sleep(50);
  }
  try {
    await busyboxOk('umount', ['-l', target]);
    log(`unmounted ${target} lazily (${last})`);
  } catch (e) {
    throw internal(`cannot unmount ${target}: ${last || (e as Error).message}`, e);
  }
}
