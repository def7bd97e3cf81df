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
 * Both get a `vmgenid` device: every QEMU process has its own generation ID, and Linux reseeds its
 * CRNG when the ID changes under it, i.e. as soon as a clone resumes.
 *
 * QEMU runs an `exec:` URI with /bin/sh -c: the paths are checked to hold only plain characters
 * before they are put in one (and the core's config rule allows no other template_path).
 */
import { setTimeout as delay } from 'node:timers/promises';
import { KataError, type VmTemplateFiles, type VmTemplateRole } from '../../core/plugin-api.js';
import { PLUGIN_NAME } from './config.js';
import type { QemuLaunchSpec } from './launch-spec.js';
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
