/**
 * Making and removing a VM template (`kata-runtime factory init | destroy`), as Kata's VM factory
 * does it: mount a tmpfs at `[factory] template_path`, boot a VM whose RAM is a file there mapped
 * shared, wait for its agent, let go of the agent connection, then have the hypervisor plugin
 * pause the VM and save its device state (VmHandle.saveTemplate), stop the VM, and write
 * template.json last. Sandboxes then start as clones (core/vm-lifecycle.ts).
 *
 * A failure at any step removes everything made so far: the VM, its run directory, the files and
 * the tmpfs.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile, rename, rm, rmdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import { setTimeout as delay } from 'node:timers/promises';
import { connectAgent } from './agent/client.js';
import { KataError, errorText } from './errors.js';
import { silentLogger, type Logger } from './logger.js';
import { isMountPoint, unmount } from './mounts.js';
import { processStartTime } from './run-dirs.js';
import { fillSandboxDir } from './plan.js';
import type { ValidatedConfig } from './runtime.js';
import { TEMPLATE_CAPABILITY, TEMPLATE_FORMAT, resolveTemplateDir, templateFingerprint, templateLayout, templateStatus, type TemplateMeta, type TemplateStatus } from './template-files.js';
import { interruptedError, launchVm, untilAborted } from './vm-lifecycle.js';

const run = promisify(execFile);

/** Room on the tmpfs beside the guest RAM, for the device state (a few hundred KiB) and template.json. */
const TMPFS_SLACK_MIB = 64;

export interface TemplateOptions {
  /** Parent of the template VM's run directory. */
  readonly runRoot?: string;
  readonly log?: Logger;
  /**
   * Aborts `init` (Ctrl-C while the template VM boots): the VM is stopped, the tmpfs unmounted,
   * the directory and the lock removed, and init rejects with KATA_ERR_INTERRUPTED.
   */
  readonly signal?: AbortSignal;
}

export interface InitResult {
  /** False when a usable template was already there (init is idempotent). */
  readonly created: boolean;
  readonly status: TemplateStatus;
  /** Milliseconds from the start of the template VM to its saved state. */
  readonly ms?: number;
}

function checkUsable(validated: ValidatedConfig): string {
  const { config } = validated;
  const dir = config.factory.template_path;
  if (!config.factory.enable_template) {
    throw new KataError('KATA_ERR_TEMPLATE', 'VM templating is not enabled in this configuration', { key: 'factory.enable_template', value: false, fix: 'set enable_template = true in [factory]' });
  }
  if (!validated.judgement.capabilities.some((c) => c.name === TEMPLATE_CAPABILITY)) {
    throw new KataError('KATA_ERR_TEMPLATE', `the "${config.hypervisorName}" hypervisor plugin cannot make VM templates (no "${TEMPLATE_CAPABILITY}" capability)`, {
      key: 'factory.enable_template',
      fix: 'use a hypervisor that can (qemu, with a shared_fs other than virtio-fs), or set enable_template = false',
    });
  }
  // The validated config phase has checked the path; a caller that built its own config has not.
  return resolveTemplateDir(dir);
}

/**
 * Takes `<template_path>.lock` (beside the directory, which init mounts over) for one `factory
 * init` or `destroy`: a second one fails with KATA_ERR_TEMPLATE while the first runs. The lock
 * names its process by pid and start time (/proc/<pid>/stat), so a lock whose process is gone, or
 * whose pid now belongs to another process, is taken over; it is removed only while it still
 * holds what was read. Returns the release function, which removes the lock only if it is still
 * this process's.
 */
export async function takeInitLock(dir: string): Promise<() => Promise<void>> {
  const lock = `${dir}.lock`;
  const mine = `${process.pid} ${processStartTime(process.pid) ?? ''}\n`;
  for (let attempt = 0; ; attempt++) {
    try {
      await writeFile(lock, mine, { flag: 'wx', mode: 0o600 });
      return async () => {
        if ((await readFile(lock, 'utf8').catch(() => undefined)) === mine) await rm(lock, { force: true });
      };
    } catch (e) {
      // EEXIST twice: the lock came back between our two tries, so someone else just took it.
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 1) {
        throw new KataError('KATA_ERR_TEMPLATE', `cannot take the template lock ${lock}: ${(e as NodeJS.ErrnoException).code ?? errorText(e)}`, {
          key: 'factory.template_path',
          fix: 'run as root, with the directory that holds template_path writable by root',
          cause: e,
        });
      }
      const held = await readFile(lock, 'utf8').catch(() => '');
      const [pidText, startTime] = held.trim().split(/\s+/);
      const holder = Number(pidText);
      if (Number.isInteger(holder) && holder > 0 && processAlive(holder) && (!startTime || processStartTime(holder) === startTime)) {
        throw new KataError('KATA_ERR_TEMPLATE', `another \`factory init\` or \`destroy\` (pid ${holder}) holds the template lock ${lock}`, {
          key: 'factory.template_path',
          fix: `wait for it to finish, then run \`kata-runtime factory status\`; if pid ${holder} is not a kata-runtime, remove ${lock}`,
        });
      }
      if ((await readFile(lock, 'utf8').catch(() => '')) === held) await rm(lock, { force: true });
    }
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** `factory init`: makes the template unless a usable one is there; a stale or broken one is replaced. One at a time (takeInitLock). */
export async function initTemplate(validated: ValidatedConfig, opts: TemplateOptions = {}): Promise<InitResult> {
  const dir = checkUsable(validated);
  await mkdir(path.dirname(dir), { recursive: true });
  const release = await takeInitLock(dir);
  try {
    return await initLocked(validated, dir, opts);
  } finally {
    await release();
  }
}

async function initLocked(validated: ValidatedConfig, dir: string, opts: TemplateOptions): Promise<InitResult> {
  const log = (opts.log ?? silentLogger()).child({ factory: 'template' });
  const before = await templateStatus(validated.config, validated.plan);
  if (before.usable) {
    log.info({ path: dir }, 'a usable VM template is already there');
    return { created: false, status: before };
  }
  if (before.exists || (await isMountPoint(dir))) {
    log.info({ path: dir, why: before.reason }, 'replacing the VM template');
    await destroyLocked(dir);
  }
  const files = templateLayout(dir);
  const t0 = performance.now();
  const memoryMiB = validated.plan.vm.memory.bootMiB;
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    // As Kata: the RAM lives in memory, not on whatever disk holds template_path.
    await run('mount', ['-t', 'tmpfs', '-o', `size=${memoryMiB + TMPFS_SLACK_MIB}M,mode=0700`, 'tmpfs', dir]).catch((e: { stderr?: string }) => {
      throw new KataError('KATA_ERR_TEMPLATE', `cannot mount a tmpfs on ${dir}: ${e.stderr?.trim() || String(e)}`, { fix: 'run as root' });
    });
    const { fingerprint, inputs } = await templateFingerprint(validated.plan);
    const hypervisorVersion = await saveTemplateVm(validated, files, opts, log);
    const meta: TemplateMeta = { format: TEMPLATE_FORMAT, fingerprint, hypervisor: validated.config.hypervisorName, memoryMiB, createdAt: new Date().toISOString(), inputs, ...(hypervisorVersion ? { hypervisorVersion } : {}) };
    await writeFile(`${files.metaFile}.tmp`, `${JSON.stringify(meta, null, 2)}\n`, { mode: 0o600 });
    await rename(`${files.metaFile}.tmp`, files.metaFile);
  } catch (e) {
    await destroyLocked(dir).catch((err: unknown) => log.error({ err }, 'could not remove the unfinished template'));
    if (e instanceof KataError && (e.code === 'KATA_ERR_TEMPLATE' || e.code === 'KATA_ERR_INTERRUPTED')) throw e;
    throw new KataError('KATA_ERR_TEMPLATE', `cannot make the VM template in ${dir}: ${errorText(e)}`, { cause: e });
  }
  const ms = performance.now() - t0;
  const status = await templateStatus(validated.config, validated.plan);
  if (!status.usable) {
    // E.g. the kernel was replaced while the template VM booted: sandboxes would not clone it.
    await destroyLocked(dir).catch((err: unknown) => log.error({ err }, 'could not remove the unusable template'));
    throw new KataError('KATA_ERR_TEMPLATE', `the VM template made in ${dir} is not usable: ${status.reason}`, { key: 'factory.template_path', fix: 'run `kata-runtime factory init` again once the guest files and the configuration stay unchanged' });
  }
  log.info({ path: dir, ms: Math.round(ms) }, 'VM template made');
  return { created: true, status, ms };
}

/** Boots the template VM, waits for its agent, saves it and stops it; returns the hypervisor's version when known. */
async function saveTemplateVm(validated: ValidatedConfig, files: ReturnType<typeof templateLayout>, opts: TemplateOptions, log: Logger): Promise<string | undefined> {
  const { plan, config } = validated;
  if (!plan.agent) throw new KataError('KATA_ERR_INTERNAL', `the "${plan.hypervisor}" plugin planned no agent address`);
  const sandboxId = `vm-template-${process.pid}`;
  const running = await launchVm(validated, { sandboxId, ...(opts.runRoot ? { runRoot: opts.runRoot } : {}), log, template: { role: 'save', files }, ...(opts.signal ? { signal: opts.signal } : {}) });
  try {
    const address = fillSandboxDir(plan.agent.address, running.ctx.runDir);
    const dialling = connectAgent(address, { deadlineMs: config.agent.dial_timeout * 1000 });
    const agent = await untilAborted(dialling, opts.signal, sandboxId).catch((e: unknown) => {
      if (e instanceof KataError && e.code === 'KATA_ERR_INTERRUPTED') {
        dialling.then((a) => a.close(), () => undefined);
        throw e;
      }
      throw new KataError('KATA_ERR_TEMPLATE', `the template VM's agent did not answer: ${errorText(e)} (console log: ${running.ctx.runDir}/console.log)`, { cause: e });
    });
    try {
      // The calls every clone makes first, made once here: the agent's code for them is then
      // compiled in the saved memory instead of in every clone (TCG makes that slow).
      const now = Date.now();
      await agent.reseedRandomDev({ data: randomBytes(64) });
      await agent.setGuestDateTime({ Sec: BigInt(Math.floor(now / 1000)), Usec: 0n });
    } finally {
      agent.close();
    }
    // As Kata: give the agent a moment to see the connection end before the VM is frozen.
    await delay(200);
    if (opts.signal?.aborted) throw interruptedError(sandboxId);
    if (!running.vm.saveTemplate) throw new KataError('KATA_ERR_TEMPLATE', `the "${running.vm.hypervisor}" driver cannot save a template`);
    await running.vm.saveTemplate();
    return (running.vm as { version?: string }).version;
  } finally {
    await running.stop();
  }
}

/**
 * `factory destroy`: unmounts the template's tmpfs (detached when clones still map its memory: the
 * kernel frees it after the last one ends) and removes the directory. Nothing to do when there is
 * none. It takes init's lock, so it never pulls the tmpfs from under a template being made. A
 * directory with no tmpfs on it was not made by `factory init`: it is removed only when empty,
 * and whatever is in it is left alone.
 */
export async function destroyTemplate(configured: string): Promise<{ removed: boolean }> {
  const dir = resolveTemplateDir(configured);
  if (!existsSync(dir)) return { removed: false };
  const release = await takeInitLock(dir);
  try {
    return await destroyLocked(dir);
  } finally {
    await release();
  }
}

async function destroyLocked(dir: string): Promise<{ removed: boolean }> {
  const mounted = await isMountPoint(dir);
  if (mounted) await unmount(dir);
  let removed = mounted;
  await rmdir(dir).then(
    () => (removed = true),
    (e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') return;
      throw new KataError('KATA_ERR_TEMPLATE', `cannot remove ${dir}: ${e.code ?? e.message}${mounted ? '' : ': no tmpfs is mounted there, so it is not a template made by `factory init`, and its files are left alone'}`, {
        key: 'factory.template_path',
        fix: mounted ? `see what still uses ${dir}` : `check template_path; remove ${dir} yourself if it is no longer needed`,
        cause: e,
      });
    },
  );
  return { removed };
}

export { templateStatus };
