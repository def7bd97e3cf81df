/**
 * `kata-runtime [--config F] validate [--json]` (ours): runs the validated config phase and explains
 * its decisions. It judges the configuration, not this host: the files it names need not exist.
 *
 * Exit 0 valid, 1 invalid (every problem on stderr), 2 usage error.
 */
import { ConfigInvalidError, formatProblem } from '../core/errors.js';
import { judgeConfig, type Judgement } from '../core/runtime.js';
import { toReport } from '../core/validate-report.js';
import { EXIT, usageError, type CommandContext } from './main.js';
import { describeError, toJson } from './io.js';

export { toReport, type ValidateReport } from '../core/validate-report.js';

export async function validateCommand(ctx: CommandContext): Promise<number> {
  if (ctx.args.length > 0) throw usageError(`validate takes no arguments (got ${ctx.args.join(' ')}); name the file with --config`);
  const located = ctx.locate();
  const j = await judgeConfig({ file: located.path, log: ctx.log });
  ctx.io.out(ctx.flags.json ? toJson(toReport(j)) + '\n' : explain(j));
  if (!j.valid) {
    ctx.io.err(describeError(new ConfigInvalidError(j.problems, located.path)));
    return EXIT.FAILED;
  }
  return EXIT.OK;
}

/** The human-readable explanation. */
export function explain(j: Judgement): string {
  const lines: string[] = [];
  lines.push(`configuration: ${j.configPath ?? '(in memory)'}`);
  lines.push(`verdict:       ${j.valid ? 'valid' : `INVALID (${j.problems.length} problem${j.problems.length === 1 ? '' : 's'})`}`);
  lines.push(`hypervisor:    ${j.hypervisor}`);
  lines.push('', 'plugins:');
  for (const p of j.plugins) lines.push(`  ${`${p.name} ${p.version}`.padEnd(20)} ${(p.builtin ? 'built-in' : p.specifier).padEnd(10)} loaded for ${p.reason}`);
  if (j.capabilities.length > 0 || j.removedCapabilities.length > 0) {
    lines.push('', 'capabilities:');
    for (const c of j.capabilities) lines.push(`  + ${c.name.padEnd(28)} by ${c.by}${c.note ? ` (${c.note})` : ''}`);
    for (const c of j.removedCapabilities) lines.push(`  - ${c.name.padEnd(28)} removed by ${c.by}: ${c.why}`);
  }
  if (j.requirements.length > 0) {
    lines.push('', 'requirements:');
    for (const r of j.requirements) lines.push(`  ${r.met ? 'met    ' : 'UNMET  '} ${r.plugin} needs ${r.capability}: ${r.why}`);
  }
  if (j.problems.length > 0) {
    lines.push('', 'problems:');
    for (const p of j.problems) lines.push(`  - ${formatProblem(p)}`);
  }
  if (j.unknownKeys.length > 0) {
    lines.push('', 'unknown keys (ignored):');
    for (const k of j.unknownKeys) lines.push(`  ${k}`);
  }
  if (j.plan) {
    const plan = j.plan;
    lines.push('', 'plan:');
    lines.push(`  shared filesystem: ${plan.sharedFs}`);
    lines.push(`  container rootfs:  ${plan.rootfs.length === 0 ? 'none' : plan.rootfs.map((r) => (r === 'block-hotplug' ? `block-hotplug (${plan.blockDriver ?? '?'})` : `shared-fs (${plan.sharedFs})`)).join(', else ')}`);
    lines.push(`  confidential:      ${plan.confidential ? `${plan.confidential.tee} (firmware ${plan.confidential.firmware})` : 'no'}`);
    for (const n of plan.notes) lines.push(`  ${n.level === 'warn' ? 'warning' : 'note'} [${n.by}]: ${n.message}`);
    lines.push('', `vm (${plan.vm.hypervisor} launch):`);
    const launch = plan.vm.launch;
    if (Array.isArray(launch)) lines.push(`  ${launch.map((a) => shellQuote(String(a))).join(' \\\n    ')}`);
    else lines.push(...toJson(launch).split('\n').map((l) => `  ${l}`));
  }
  return lines.join('\n') + '\n';
}

function shellQuote(s: string): string {
  if (/^[A-Za-z0-9_\-+=.,/:@%]+$/.test(s)) return s;
  // POSIX single quotes; a quote inside becomes '\'' (close, escaped quote, reopen).
  return "'" + s.split("'").join("'\\''") + "'";
}

