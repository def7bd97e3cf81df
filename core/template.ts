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
import { fillSandboxDir } from './plan.js';
import type { ValidatedConfig } from './runtime.js';
import { TEMPLATE_CAPABILITY, TEMPLATE_FORMAT, templateFingerprint, templateLayout, templateStatus, type TemplateMeta, type TemplateStatus } from './template-files.js';
import { TEMPLATE_PATH } from './config/rules.js';
import { launchVm } from './vm-lifecycle.js';

const run = promisify(execFile);

/** Room on the tmpfs beside the guest RAM, for the device state (a few hundred KiB) and template.json. */
const TMPFS_SLACK_MIB = 64;

export interface TemplateOptions {
  /** Parent of the template VM's run directory. */
  readonly runRoot?: string;
  readonly log?: Logger;
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
  // The validated config phase has checked both; a caller that built its own config has not.
  if (!TEMPLATE_PATH.test(dir)) throw new KataError('KATA_ERR_TEMPLATE', `template_path "${dir}" is not a plain absolute path`, { key: 'factory.template_path', value: dir });
  if (!validated.judgement.capabilities.some((c) => c.name === TEMPLATE_CAPABILITY)) {
    throw new KataError('KATA_ERR_TEMPLATE', `the "${config.hypervisorName}" hypervisor plugin cannot make VM templates (no "${TEMPLATE_CAPABILITY}" capability)`, { key: 'factory.enable_template' });
  }
  return dir;
}

/**
 * Takes `<template_path>.lock` (beside the directory, which init mounts over) for one `factory
 * init`: a second one fails with KATA_ERR_TEMPLATE while the first runs. A lock whose process is
 * gone is taken over. Returns the release function.
 */
export async function takeInitLock(dir: string): Promise<() => Promise<void>> {
  const lock = `${dir}.lock`;
  for (let attempt = 0; ; attempt++) {
    try {
      await writeFile(lock, `${process.pid}\n`, { flag: 'wx', mode: 0o600 });
      return () => rm(lock, { force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) {
        throw new KataError('KATA_ERR_TEMPLATE', `cannot take the template lock ${lock}: ${(e as NodeJS.ErrnoException).code ?? errorText(e)}`, { cause: e });
      }
      const holder = Number((await readFile(lock, 'utf8').catch(() => '')).trim());
      if (Number.isInteger(holder) && holder > 0 && processAlive(holder)) {
        throw new KataError('KATA_ERR_TEMPLATE', `another \`factory init\` (pid ${holder}) is making the template in ${dir}`, { fix: 'wait for it to finish, then run `kata-runtime factory status`' });
      }
      await rm(lock, { force: true });
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
  if (before.exists) {
    log.info({ path: dir, why: before.reason }, 'replacing the VM template');
    await destroyTemplate(validated.config.factory.template_path);
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
    await destroyTemplate(dir).catch((err: unknown) => log.error({ err }, 'could not remove the unfinished template'));
    if (e instanceof KataError && e.code === 'KATA_ERR_TEMPLATE') throw e;
    throw new KataError('KATA_ERR_TEMPLATE', `cannot make the VM template in ${dir}: ${errorText(e)}`, { cause: e });
  }
  const ms = performance.now() - t0;
  const status = await templateStatus(validated.config, validated.plan);
  log.info({ path: dir, ms: Math.round(ms) }, 'VM template made');
  return { created: true, status, ms };
}

/** Boots the template VM, waits for its agent, saves it and stops it; returns the hypervisor's version when known. */
async function saveTemplateVm(validated: ValidatedConfig, files: ReturnType<typeof templateLayout>, opts: TemplateOptions, log: Logger): Promise<string | undefined> {
  const { plan, config } = validated;
  if (!plan.agent) throw new KataError('KATA_ERR_INTERNAL', `the "${plan.hypervisor}" plugin planned no agent address`);
  const sandboxId = `vm-template-${process.pid}`;
  const running = await launchVm(validated, { sandboxId, ...(opts.runRoot ? { runRoot: opts.runRoot } : {}), log, template: { role: 'save', files } });
  try {
    const address = fillSandboxDir(plan.agent.address, running.ctx.runDir);
    const agent = await connectAgent(address, { deadlineMs: config.agent.dial_timeout * 1000 }).catch((e: unknown) => {
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
    if (!running.vm.saveTemplate) throw new KataError('KATA_ERR_TEMPLATE', `the "${running.vm.hypervisor}" driver cannot save a template`);
    await running.vm.saveTemplate();
    return (running.vm as { version?: string }).version;
  } finally {
    await running.stop();
  }
}

/**
 * `factory destroy`: unmounts the template's tmpfs (detached when clones still map its memory: the
 * kernel frees it after the last one ends) and removes the directory. Nothing to do when there is none.
 */
export async function destroyTemplate(dir: string): Promise<{ removed: boolean }> {
  if (!TEMPLATE_PATH.test(dir)) throw new KataError('KATA_ERR_TEMPLATE', `template_path "${dir}" is not a plain absolute path`, { key: 'factory.template_path', value: dir });
  const mounted = await isMountPoint(dir);
  const files = templateLayout(dir);
  if (mounted) await unmount(dir);
  let removed = mounted;
  for (const f of [files.metaFile, `${files.metaFile}.tmp`, files.stateFile, files.memoryFile]) {
    await rm(f, { force: true });
  }
  await rmdir(dir).then(
    () => (removed = true),
    (e: NodeJS.ErrnoException) => {
      if (e.code !== 'ENOENT') throw new KataError('KATA_ERR_TEMPLATE', `cannot remove ${dir}: ${e.code ?? e.message} (files that are not the template's are left alone)`, { cause: e });
    },
  );
  return { removed };
}

export { templateStatus };
