/**
 * A VM template on disk (Kata's VM factory, `[factory] enable_template`): where its files are, the
 * fingerprint of the configuration it was made for, and whether it can be used now. No process
 * is started here (core/template.ts makes and removes templates).
 *
 *   <template_path>/          a tmpfs mounted by `kata-runtime factory init`
 *     memory                  the template VM's RAM (the template maps it shared, clones privately)
 *     state                   its device state (the hypervisor's migration stream without the RAM)
 *     template.json           written last: the fingerprint and what the template was made from
 *
 * A template is usable only when all three files are there, the memory file has the VM's memory
 * size and the fingerprint matches the configuration's now: anything that shapes the VM (the
 * whole neutral VM description with the hypervisor's launch description, and the identity of the
 * hypervisor binary, kernel, initrd, image and firmware files) is in it.
 */
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, realpathSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { TEMPLATE_PATH } from './config/rules.js';
import { KataError } from './errors.js';
import { trustCheckApplies, trustProblem } from './trusted-path.js';
import type { SandboxPlan } from './plan.js';
import type { KataConfig } from './config/types.js';
import type { VmTemplateFiles } from './vm.js';

/** The capability a hypervisor plugin declares when its VMs can be saved as a template and cloned. */
export const TEMPLATE_CAPABILITY = 'vm:template';

/**
 * Bumped when the layout, the fingerprint's inputs or the template VM's devices change: older
 * templates are then stale. 2: no free-page-reporting balloon in a template or a clone. 3: the
 * qemu plugin records the accelerator a template was saved under (plugins/qemu/template.ts).
 */
export const TEMPLATE_FORMAT = 3;

/** What `template.json` holds. */
export interface TemplateMeta {
  readonly format: number;
  readonly fingerprint: string;
  readonly hypervisor: string;
  readonly memoryMiB: number;
  readonly createdAt: string;
  /** The files the fingerprint covers, as they were (path, size, mtime). */
  readonly inputs: readonly FileIdentity[];
  /** The hypervisor's own version string, when the plugin reported one (informational). */
  readonly hypervisorVersion?: string;
}

export interface FileIdentity {
  readonly path: string;
  readonly size: number;
  readonly mtimeMs: number;
}

export interface TemplateLayout extends VmTemplateFiles {
  readonly metaFile: string;
}

/**
 * The template directory as the kernel names it: `template_path` with its existing ancestors'
 * symlinks resolved (`/var/run/…` is `/run/…` on most hosts), so that it matches the mount table
 * and every process finds the same lock. Throws KATA_ERR_TEMPLATE (key factory.template_path) when
 * the path, or what it resolves to, is not a plain absolute path.
 */
export function resolveTemplateDir(dir: string): string {
  const plain = (p: string) => TEMPLATE_PATH.test(p);
  if (!plain(dir)) {
    throw new KataError('KATA_ERR_TEMPLATE', `template_path "${dir}" is not a plain absolute path`, { key: 'factory.template_path', value: dir, fix: 'use a plain absolute directory such as /run/vc/vm/template' });
  }
  let existing = dir;
  while (!existsSync(existing) && existing !== '/') existing = path.dirname(existing);
  const resolved = path.join(realpathSync(existing), path.relative(existing, dir));
  if (!plain(resolved)) {
    throw new KataError('KATA_ERR_TEMPLATE', `template_path "${dir}" resolves to "${resolved}", which is not a plain absolute path`, { key: 'factory.template_path', value: dir, fix: 'point template_path at a directory whose real path holds only letters, digits and /._-' });
  }
  return resolved;
}

/**
 * Why the template's files cannot be trusted by a root runtime, or undefined: each must be a
 * regular file (not a symlink) owned by root and writable by nobody else, in directories only root
 * can change (core/trusted-path.ts), or another user could plant the guest memory every sandbox
 * starts from. Judged only when this process runs as root, as the plugin and binary paths are.
 */
function untrustedTemplate(files: TemplateLayout): string | undefined {
  if (!trustCheckApplies()) return undefined;
  for (const f of [files.metaFile, files.stateFile, files.memoryFile]) {
    try {
      if (lstatSync(f).isSymbolicLink()) return `${f} is a symlink`;
      const p = trustProblem(f);
      if (p) return `${p.offender === p.realPath ? p.realPath : `the directory ${p.offender} of ${p.realPath}`} ${p.why} (owner uid ${p.uid}, mode ${p.mode.toString(8).padStart(4, '0')})`;
    } catch (e) {
      return `${f} cannot be checked (${(e as NodeJS.ErrnoException).code ?? String(e)})`;
    }
  }
  return undefined;
}

export function templateLayout(dir: string): TemplateLayout {
  return { dir, memoryFile: path.join(dir, 'memory'), stateFile: path.join(dir, 'state'), metaFile: path.join(dir, 'template.json') };
}

/** The files whose content shapes the guest: a changed kernel makes every template stale. */
async function inputFiles(plan: SandboxPlan): Promise<FileIdentity[]> {
  const vm = plan.vm;
  const paths = [vm.binary, vm.kernel, vm.initrd, vm.image?.path, vm.firmware].filter((p): p is string => typeof p === 'string' && p.length > 0);
  return Promise.all(
    paths.map(async (p) => {
      const st = await stat(p).catch(() => undefined);
      return { path: p, size: st?.size ?? -1, mtimeMs: st ? Math.trunc(st.mtimeMs) : -1 };
    }),
  );
}

/** The fingerprint of what shapes the VM for this configuration, and the file identities in it. */
export async function templateFingerprint(plan: SandboxPlan): Promise<{ fingerprint: string; inputs: FileIdentity[] }> {
  const inputs = await inputFiles(plan);
  const h = createHash('sha256');
  h.update(JSON.stringify({ format: TEMPLATE_FORMAT, vm: plan.vm, inputs }));
  return { fingerprint: h.digest('hex'), inputs };
}

export interface TemplateStatus {
  readonly enabled: boolean;
  readonly path: string;
  /** Some template file is there (complete or not). */
  readonly exists: boolean;
  /** Complete and made for this configuration: sandboxes clone it. */
  readonly usable: boolean;
  /** Why it is not usable. */
  readonly reason?: string;
  /** This configuration's fingerprint. */
  readonly fingerprint: string;
  readonly meta?: TemplateMeta;
}

/** Whether the template under `[factory] template_path` exists and matches this configuration. */
export async function templateStatus(config: KataConfig, plan: SandboxPlan): Promise<TemplateStatus> {
  const enabled = config.factory.enable_template;
  const { fingerprint } = await templateFingerprint(plan);
  let dir: string;
  try {
    dir = resolveTemplateDir(config.factory.template_path);
  } catch (e) {
    return { enabled, path: config.factory.template_path, fingerprint, exists: false, usable: false, reason: (e as Error).message };
  }
  const files = templateLayout(dir);
  const base = { enabled, path: dir, fingerprint };
  const [memory, state, metaText] = await Promise.all([
    stat(files.memoryFile).catch(() => undefined),
    stat(files.stateFile).catch(() => undefined),
    readFile(files.metaFile, 'utf8').catch(() => undefined),
  ]);
  const exists = memory !== undefined || state !== undefined || metaText !== undefined;
  if (!exists) return { ...base, exists, usable: false, reason: `no template at ${dir} (run \`kata-runtime factory init\`)` };
  let meta: TemplateMeta | undefined;
  try {
    meta = metaText === undefined ? undefined : (JSON.parse(metaText) as TemplateMeta);
  } catch {
    meta = undefined;
  }
  const unusable = (reason: string): TemplateStatus => ({ ...base, exists, usable: false, reason, ...(meta ? { meta } : {}) });
  if (!meta || typeof meta.fingerprint !== 'string') return unusable(`the template at ${dir} is incomplete (no readable template.json): it was never finished`);
  if (!memory?.isFile()) return unusable(`the template's memory file ${files.memoryFile} is missing`);
  if (!state?.isFile() || state.size === 0) return unusable(`the template's device state ${files.stateFile} is missing or empty`);
  if (memory.size !== plan.vm.memory.bootMiB * 1024 * 1024) return unusable(`the template's memory file is ${memory.size} bytes, not the ${plan.vm.memory.bootMiB} MiB this configuration boots with`);
  if (meta.fingerprint !== fingerprint) {
    return unusable(`the template was made for another configuration or other guest files (fingerprint ${meta.fingerprint.slice(0, 12)}, now ${fingerprint.slice(0, 12)}): run \`kata-runtime factory destroy\` and \`factory init\``);
  }
  const untrusted = untrustedTemplate(files);
  if (untrusted) return unusable(`the template's files cannot be trusted: ${untrusted} (\`kata-runtime factory init\` makes them root's, on a tmpfs only root can write)`);
  return { ...base, exists, usable: true, meta };
}
