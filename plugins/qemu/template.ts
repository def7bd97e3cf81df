/**
 * VM templating on QEMU (Kata's qemu.go BootToBeTemplate / BootFromTemplate), for the core's
 * template roles (core/vm.ts VmTemplateRole):
 *
 * - `save` (the template): guest RAM is `memory-backend-file,share=on` on the template's memory
 *   file, so the RAM is in that file as the guest writes it. Once the agent is up: `stop`, the
 *   `x-ignore-shared` migration capability (shared RAM blocks are left out of the stream), and
 *   `migrate` to `exec:cat > <state>`: only the device state is written.
 * - `clone`: the same machine and devices, RAM `memory-backend-file,share=off` on the same file
 *   (a private, copy-on-write mapping: the clone's writes never reach the file or another clone),
 *   `-S -incoming defer`, the same capability, `migrate-incoming exec:cat <state>`, then `cont`.
 *
 * A clone's network interfaces are not in the template: they are hot-plugged after the restore
 * (`netdev_add` tap + `device_add` virtio-net-pci into the last free hot-plug root ports, which the
 * disks then do not use), and the agent configures them by MAC as on a cold boot.
 *
 * Neither has the free-page-reporting balloon (see applyTemplateRole).
 *
 * Both get a `vmgenid` device: every QEMU process has its own generation ID, and Linux reseeds its
 * CRNG when the ID changes under it, i.e. as soon as a clone resumes.
 *
 * QEMU runs an `exec:` URI with /bin/sh -c: the paths are checked to hold only plain characters
 * before they are put in one (and the core's config rule allows no other template_path).
 */
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { KataError, type NetIntent, type VmTemplateFiles, type VmTemplateRole } from '../../core/plugin-api.js';
import { effectiveDevice } from './argv.js';
import { PLUGIN_NAME } from './config.js';
import { renderNetDevices, type QemuLaunchSpec } from './launch-spec.js';
import type { QmpClient } from './qmp.js';

/** Id of the VM generation ID device. */
export const VMGENID_ID = 'vmgenid0';

export const TEMPLATE_DEFAULTS = Object.freeze({
  /** Bound on saving or restoring the device state (a few hundred KiB; RAM is not copied). */
  migrationTimeoutMs: 30_000,
});

const PLAIN_PATH = /^\/[A-Za-z0-9._/-]+$/;

function shellSafe(p: string): string {
  if (!PLAIN_PATH.test(p) || p.split('/').some((c) => c === '..')) {
    throw new KataError('KATA_ERR_INTERNAL', `template file ${JSON.stringify(p)} is not a plain absolute path; it cannot go into QEMU's exec: migration URI`, { plugin: PLUGIN_NAME });
  }
  return p;
}

/** The launch description for a template role: RAM on the template's memory file, vmgenid, and `-S -incoming defer` for a clone. */
export function applyTemplateRole(spec: QemuLaunchSpec, role: VmTemplateRole): void {
  if (spec.memory.shared) {
    // vhost-user daemons need RAM they can map; a clone's RAM is a private mapping.
    throw new KataError('KATA_ERR_INTERNAL', 'a VM with shared guest memory (virtio-fs) cannot be a template or a clone', { plugin: PLUGIN_NAME });
  }
  spec.memory.file = { path: shellSafe(role.files.memoryFile), share: role.role === 'save' };
  // No balloon (reclaim_guest_freed_memory): QEMU (7.2 here, before 8.1) discards a reported free
  // page of file-backed RAM by punching a hole in the file even when the mapping is private, so a
  // clone's guest would zero pages of the template's memory file under every other clone (seen
  // with strace: fallocate(PUNCH_HOLE) on the file from a clone). Both roles drop it: the saved
  // device state must fit the clone's devices.
  spec.devices = spec.devices.filter((d) => d.type !== 'virtio-balloon-pci');
  spec.devices.push({ type: 'vmgenid', id: VMGENID_ID, props: { guid: 'auto' } });
  if (role.role === 'clone') spec.extraArgs.push('-S', '-incoming', 'defer');
}

const IGNORE_SHARED = { capabilities: [{ capability: 'x-ignore-shared', state: true }] };

interface MigrationInfo {
  status?: string;
  'error-desc'?: string;
}

async function waitForMigration(qmp: QmpClient, what: string, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  let pause = 5;
  for (;;) {
    const info = await qmp.execute<MigrationInfo>('query-migrate');
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') {
      throw new KataError('KATA_ERR_VM_START', `${what} failed: QEMU reports migration ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`, { plugin: PLUGIN_NAME });
    }
    if (performance.now() > deadline) throw new KataError('KATA_ERR_VM_START', `${what} did not complete within ${timeoutMs} ms (migration status "${info.status ?? '?'}")`, { plugin: PLUGIN_NAME });
    await delay(pause);
    pause = Math.min(pause * 2, 100);
  }
}

/** Pauses the template VM and writes its device state (its RAM is in the shared memory file already). */
export async function saveDeviceState(qmp: QmpClient, files: VmTemplateFiles, timeoutMs = TEMPLATE_DEFAULTS.migrationTimeoutMs): Promise<void> {
  const state = shellSafe(files.stateFile);
  await qmp.execute('stop');
  await qmp.execute('migrate-set-capabilities', IGNORE_SHARED);
  await qmp.execute('migrate', { uri: `exec:cat > ${state}` });
  await waitForMigration(qmp, 'saving the template VM state', timeoutMs);
}

/** Loads the template's device state into a clone started with `-S -incoming defer`, then lets it run. */
export async function restoreDeviceState(qmp: QmpClient, files: VmTemplateFiles, timeoutMs = TEMPLATE_DEFAULTS.migrationTimeoutMs): Promise<void> {
  const state = shellSafe(files.stateFile);
  await qmp.execute('migrate-set-capabilities', IGNORE_SHARED);
  await qmp.execute('migrate-incoming', { uri: `exec:cat ${state}` });
  await waitForMigration(qmp, `restoring the VM from the template state ${files.stateFile}`, timeoutMs);
  await qmp.execute('cont');
}

/**
 * The accelerator a template was saved under, in `<template dir>/qemu-accelerator`. It is not in
 * the configuration's fingerprint: `accelerator = "auto"` is resolved when QEMU starts (KVM when
 * /dev/kvm is usable), and it decides the CPU model (`host` or `max`), so a template saved under
 * TCG must not be restored under KVM, or the reverse.
 */
export function acceleratorFile(files: VmTemplateFiles): string {
  return path.join(files.dir, 'qemu-accelerator');
}

export async function recordTemplateAccelerator(files: VmTemplateFiles, accelerator: string): Promise<void> {
  await writeFile(acceleratorFile(files), `${accelerator}\n`, { mode: 0o600 });
}

/** Throws KATA_ERR_TEMPLATE (the core then boots cold, logging it) unless the template was saved under `accelerator`. */
export async function checkTemplateAccelerator(files: VmTemplateFiles, accelerator: string): Promise<void> {
  const saved = (await readFile(acceleratorFile(files), 'utf8').catch(() => '')).trim();
  if (saved !== accelerator) {
    throw new KataError('KATA_ERR_TEMPLATE', `the template in ${files.dir} was saved under ${saved ? `QEMU's ${saved}` : 'an unknown accelerator'}, and this VM runs under ${accelerator}: its CPU state does not fit`, {
      plugin: PLUGIN_NAME,
      key: 'hypervisor.qemu.accelerator',
      fix: 'run `kata-runtime factory destroy` and `factory init` on this host as it is now',
    });
  }
}

/**
 * The hot-plug root ports a clone's NICs take: the last `count` of the spec's, so that the disks
 * keep the first ones (and their PCI paths). Throws when there are not enough: the core then boots
 * the sandbox cold.
 */
export function reserveNicPorts(spec: Pick<QemuLaunchSpec, 'hotplugPorts'>, count: number): string[] {
  if (count === 0) return [];
  if (spec.hotplugPorts.length < count + 1) {
    throw new KataError('KATA_ERR_VM_START', `a clone hot-plugs its ${count} network interface(s) into pcie-root-ports, and only ${spec.hotplugPorts.length} are reserved (one more is kept for the rootfs disk)`, {
      plugin: PLUGIN_NAME,
      fix: 'raise hotplug_root_ports, or use block_device_driver = "virtio-blk" (virtio-scsi reserves no root port)',
    });
  }
  // The ports stay in the argv (the template has them); only the disks must not take them.
  return spec.hotplugPorts.slice(-count);
}

/** Hot-plugs the pod's interfaces into a running clone: a tap netdev opened by name in QEMU's namespace and a virtio-net-pci device on each port. */
export async function hotplugNetDevices(qmp: QmpClient, spec: Pick<QemuLaunchSpec, 'virtioIommuPlatform'>, nets: readonly NetIntent[], ports: readonly string[]): Promise<void> {
  // The cold-plug renderer checks the tap names and MACs and builds the device properties.
  const rendered = { extraArgs: [] as string[], devices: [] as QemuLaunchSpec['devices'] };
  renderNetDevices(rendered as unknown as QemuLaunchSpec, nets);
  for (const [i, n] of nets.entries()) {
    const device = rendered.devices[i];
    const port = ports[i];
    if (!device || port === undefined) throw new KataError('KATA_ERR_INTERNAL', `no device or port for network interface ${n.id}`, { plugin: PLUGIN_NAME });
    const netdev = String(device.props.netdev);
    await qmp.execute('netdev_add', { type: 'tap', id: netdev, ifname: n.tap, script: 'no', downscript: 'no' });
    const d = effectiveDevice(device, spec);
    await qmp.execute('device_add', { driver: d.type, id: d.id, bus: port, ...d.props });
  }
}
