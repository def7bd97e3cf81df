/**
 * VM templating (issue 16): sandbox start as a clone of a template against a cold boot, with real
 * QEMU (TCG) and the project's guest image, side by side in one run.
 *
 * Start = Sandbox.create: the VM started (cold: kernel, /init and the agent booted; clone: QEMU
 * spawned, device state restored, `cont`), the agent answering, entropy and clock handed to a
 * clone, CreateSandbox answered (the 9p share mounted). Cold boots and clones alternate, so that
 * the load of the other engineers' tests on this machine falls on both alike; medians of RUNS.
 * Also printed: the host memory (PSS) of one idle QEMU of each kind, two seconds after start.
 * The configuration is the shipped one (configs/configuration-qemu.toml) with `[factory]` added.
 *
 * Goal: a clone starts in at most 0.35x the time of a cold boot (aim 0.2x).
 * Run with `npm run bench:template` (as root: the template lives on a tmpfs it mounts).
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as delay } from 'node:timers/promises';
import { PACKAGE_ROOT } from '../core/paths.js';
import { loadValidatedConfig } from '../core/runtime.js';
import { Sandbox } from '../core/sandbox.js';
import { destroyTemplate, initTemplate } from '../core/template.js';
import { useBuiltinPlugins } from '../core/plugin-loader.js';
import { BUILTIN_PLUGINS } from '../plugins/builtin.js';
import { ensureGuestImage } from '../test/helpers/guest.js';
import { qemuBinary } from '../test/helpers/qemu.js';
import { TempDir } from '../test/helpers/tmp.js';
import { pssKiB } from './pss.js';
import { Targets, median, ms } from './stats.js';

useBuiltinPlugins(BUILTIN_PLUGINS);

const RUNS = Number(process.env.BENCH_RUNS ?? 5);
const GOAL = 0.35;
const AIM = 0.2;
const targets = new Targets();

const binary = qemuBinary();
if (!binary || process.getuid?.() !== 0) {
  console.log('needs qemu-system-x86_64 and root (the template is on a tmpfs): nothing to measure');
  process.exit(0);
}
const image = await ensureGuestImage();
const tmp = new TempDir('kata-bench-tmpl-');
const templateDir = path.join(tmp.path, 'template');
const runRoot = path.join(tmp.path, 'run');
// The shipped configuration (its memory, TCG buffer and devices), on the project's guest image,
// with templating on.
const text = `${readFileSync(path.join(PACKAGE_ROOT, 'configs', 'configuration-qemu.toml'), 'utf8')
  .replace(/^path = .*$/m, `path = "${binary}"`)
  .replace(/^kernel = .*$/m, `kernel = "${image.kernel}"`)
  .replace(/^initrd = .*$/m, `initrd = "${image.initrd}"`)}
[factory]
enable_template = true
template_path = "${templateDir}"
`;


const validated = await loadValidatedConfig({ text });
const cold: number[] = [];
const clone: number[] = [];
const pss: { cold?: number; clone?: number } = {};
try {
  const t0 = performance.now();
  const init = await initTemplate(validated, { runRoot });
  console.log(`factory init: template made in ${ms(performance.now() - t0)} (${init.created ? 'new' : 'already there'})`);

  for (let i = 0; i < RUNS; i++) {
    for (const kind of ['cold', 'clone'] as const) {
      const start = performance.now();
      const sandbox = await Sandbox.create(validated, { sandboxId: `bench-${kind}-${i}`, runRoot, ...(kind === 'cold' ? { template: 'none' as const } : {}) });
      const took = performance.now() - start;
      const wasClone = sandbox.running.ctx.template?.role === 'clone';
      if (wasClone !== (kind === 'clone')) throw new Error(`run ${i}: a ${kind} start came out ${wasClone ? 'a clone' : 'cold'}`);
      (kind === 'cold' ? cold : clone).push(took);
      if (i === 0) {
        await delay(2000);
        pss[kind] = sandbox.running.vm.pid === undefined ? NaN : pssKiB(sandbox.running.vm.pid);
      }
      await sandbox.stop();
      console.log(`  run ${i + 1}/${RUNS} ${kind.padEnd(5)} ${ms(took)}`);
    }
  }
} finally {
  await destroyTemplate(templateDir).catch((e: unknown) => console.error('could not remove the template:', e));
  tmp.cleanup();
}

const mc = median(cold);
const mt = median(clone);
const ratio = mt / mc;
console.log(`\nsandbox start (Sandbox.create to CreateSandbox answered), median of ${RUNS}:`);
console.log(`  cold boot         ${ms(mc)}   (min ${ms(Math.min(...cold))}, max ${ms(Math.max(...cold))})`);
console.log(`  clone of template ${ms(mt)}   (min ${ms(Math.min(...clone))}, max ${ms(Math.max(...clone))})`);
console.log(`  ratio             ${ratio.toFixed(3)}x   ${targets.verdict(ratio <= GOAL, `<= ${GOAL}x, aim ${AIM}x`)}`);
console.log(`QEMU PSS of one idle sandbox 2 s after start: cold ${((pss.cold ?? NaN) / 1024).toFixed(0)} MiB, clone ${((pss.clone ?? NaN) / 1024).toFixed(0)} MiB`);
process.exit(targets.failed ? 1 : 0);
