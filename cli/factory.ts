/**
 * `kata-runtime factory init | status | destroy`: Kata's VM factory commands for the VM template
 * (`[factory] enable_template`, `template_path`). The configuration is read as `run` reads it
 * (KATA_TS_CACHE_DIR applied), so that the template's fingerprint is the one sandboxes compute.
 *
 *   init     make the template (nothing to do when a usable one is there; a stale one is replaced)
 *   status   whether a template exists and matches this configuration (exit 0 either way)
 *   destroy  remove it: no process, file or mount is left
 */
import os from 'node:os';
import { readConfigFile } from '../core/config/parse.js';
import { KataError } from '../core/errors.js';
import { loadValidatedConfig } from '../core/runtime.js';
import { destroyTemplate, initTemplate, templateStatus } from '../core/template.js';
import type { TemplateStatus } from '../core/template-files.js';
import { DEFAULT_RUN_ROOT } from '../core/vm-lifecycle.js';
import { toJson } from './io.js';
import { EXIT, type CommandContext } from './main.js';
import { withCacheDir } from './run.js';

const SUBCOMMANDS = ['init', 'status', 'destroy'] as const;
const INIT_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

export async function factoryCommand(ctx: CommandContext): Promise<number> {
  const [sub, ...rest] = ctx.args;
  if (!SUBCOMMANDS.includes(sub as (typeof SUBCOMMANDS)[number]) || rest.length > 0) {
    throw new KataError('KATA_ERR_USAGE', `usage: kata-runtime factory ${SUBCOMMANDS.join('|')}${sub ? ` (got "${[sub, ...rest].join(' ')}")` : ''}`);
  }
  const file = ctx.locate().path;
  const { raw } = withCacheDir(readConfigFile(file), ctx.io.env);
  const validated = await loadValidatedConfig({ file, raw, log: ctx.log });
  const { config, plan } = validated;
  const report = (status: TemplateStatus, extra: Record<string, unknown> = {}) => {
    if (ctx.flags.json) {
      ctx.io.out(`${toJson({ ...extra, ...status })}\n`);
      return;
    }
    const state = status.usable ? 'exists and matches this configuration' : status.exists ? `exists but is not usable: ${status.reason}` : 'does not exist';
    ctx.io.out(`vm factory: ${status.enabled ? 'on' : 'off'} (enable_template = ${status.enabled})\ntemplate ${status.path}: ${state}\n`);
  };
  if (sub === 'status') {
    report(await templateStatus(config, plan));
    return EXIT.OK;
  }
  if (sub === 'destroy') {
    const { removed } = await destroyTemplate(config.factory.template_path);
    if (ctx.flags.json) ctx.io.out(`${toJson({ removed, path: config.factory.template_path })}\n`);
    else ctx.io.out(removed ? `vm factory destroyed: ${config.factory.template_path} removed\n` : `no vm template at ${config.factory.template_path}\n`);
    return EXIT.OK;
  }
  const runRoot = ctx.io.env.KATA_TS_RUN_ROOT || DEFAULT_RUN_ROOT;
  // Ctrl-C, SIGTERM or SIGHUP while the template VM boots: init stops it and removes what it made
  // (tmpfs, directory, lock), then we exit 128+n.
  const abort = new AbortController();
  let interrupted: NodeJS.Signals | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    interrupted ??= sig;
    ctx.log.info({ signal: sig }, 'interrupted: removing the unfinished template');
    abort.abort();
  };
  for (const s of INIT_SIGNALS) process.on(s, onSignal);
  let r: Awaited<ReturnType<typeof initTemplate>>;
  try {
    r = await initTemplate(validated, { runRoot, log: ctx.log, signal: abort.signal });
  } catch (e) {
    if (interrupted) {
      ctx.io.err(`kata-runtime: factory init interrupted (${interrupted}): nothing was left behind\n`);
      return 128 + (os.constants.signals[interrupted] ?? 0);
    }
    throw e;
  } finally {
    for (const s of INIT_SIGNALS) process.off(s, onSignal);
  }
  if (ctx.flags.json) report(r.status, { created: r.created, ...(r.ms !== undefined ? { ms: Math.round(r.ms) } : {}) });
  else ctx.io.out(r.created ? `vm factory initialized: template made in ${config.factory.template_path} (${Math.round(r.ms ?? 0)} ms)\n` : `vm factory already initialized: ${config.factory.template_path} matches this configuration\n`);
  return EXIT.OK;
}
