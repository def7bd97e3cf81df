/**
 * `kata-runtime cleanup [--dry-run] [--json]` (ours; Kata's runtime has no such command, its shim
 * cleans up after itself): removes the sandbox run directories under the run root (KATA_TS_RUN_ROOT,
 * default /run/kata-ts) whose owner is provably gone: a `kata-runtime run` or a shim killed with
 * SIGKILL (its VM died with it). A directory whose owner runs, or that a live process (a hypervisor,
 * virtiofsd) still uses, or whose owner cannot be told, is kept and listed with the reason.
 * What is mounted under a stale directory is unmounted first. `kata-runtime run` does the same
 * before it starts a sandbox.
 *
 * Exit 0 when every stale directory was removed, 1 when one could not be.
 */
import { reapStaleRunDirs } from '../core/run-dirs.js';
import { DEFAULT_RUN_ROOT } from '../core/vm-lifecycle.js';
import { toJson } from './io.js';
import { EXIT, usageError, type CommandContext } from './main.js';

export async function cleanupCommand(ctx: CommandContext): Promise<number> {
  if (ctx.args.length > 0) throw usageError(`cleanup takes no arguments (got ${ctx.args.join(' ')}); the run root is KATA_TS_RUN_ROOT, default ${DEFAULT_RUN_ROOT}`);
  const runRoot = ctx.io.env.KATA_TS_RUN_ROOT || DEFAULT_RUN_ROOT;
  const dryRun = ctx.flags.dryRun;
  const r = await reapStaleRunDirs(runRoot, { log: ctx.log, dryRun });
  if (ctx.flags.json) {
    ctx.io.out(
      toJson({
        runRoot,
        dryRun,
        removed: r.reaped,
        kept: r.kept.map((k) => ({ dir: k.dir, reason: k.reason })),
        problems: r.failed.map((f) => ({ code: f.error.code, key: f.dir, reason: f.error.message, fix: f.error.fix })),
      }) + '\n',
    );
  } else {
    const lines = [`run root: ${runRoot}`];
    for (const d of r.reaped) lines.push(`${dryRun ? 'stale  ' : 'removed'}  ${d}`);
    for (const k of r.kept) lines.push(`kept     ${k.dir}: ${k.reason}`);
    for (const f of r.failed) lines.push(`FAILED   ${f.dir}: ${f.error.message}`);
    if (r.reaped.length + r.kept.length + r.failed.length === 0) lines.push('nothing to clean up');
    ctx.io.out(lines.join('\n') + '\n');
  }
  if (r.failed.length > 0) {
    ctx.io.err(r.failed.map((f) => `kata-runtime: ${f.error.message}\n  fix: ${f.error.fix}\n  code: ${f.error.code}\n`).join(''));
    return EXIT.FAILED;
  }
  return EXIT.OK;
}
