/**
 * Benchmarks for the configuration phase (issue 2), each printed as a ratio against a baseline
 * measured in the same run:
 *
 * 1. the in-process config phase (parse, schema, plugins, validation, plan) on the reference
 *    Cloud Hypervisor configuration, median against the median of the TOML parse alone; target:
 *    median under 5 ms;
 * 2. the whole `kata-runtime --config F validate --json` process against a bare `node -e 0`;
 *    target: at most 2x;
 * 3. the two TOML parsers (`toml`, the chosen base, and `smol-toml`, which replaced it) on every
 *    Kata reference file: first parse in a fresh process, and the median of warm parses.
 *
 * Exits 1 when a target is missed. Run with `npm run bench`.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { Targets, median, ms } from './stats.js';
import { performance } from 'node:perf_hooks';
import { PACKAGE_ROOT } from '../core/paths.js';
import { judgeConfig } from '../core/runtime.js';
import { parseToml } from '../core/config/parse.js';
import { useBuiltinPlugins } from '../core/plugin-loader.js';
import { BUILTIN_PLUGINS } from '../plugins/builtin.js';

useBuiltinPlugins(BUILTIN_PLUGINS);

const REF = path.resolve(PACKAGE_ROOT, '..', 'shared', 'reference', 'kata-configs');
const CLH = existsSync(path.join(REF, 'configuration-clh.toml')) ? path.join(REF, 'configuration-clh.toml') : path.join(PACKAGE_ROOT, 'examples', 'configuration-clh-tdx.toml');
// The installed `kata-runtime` (package.json bin): the bundle.
const CLI = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');

const targets = new Targets();
const verdict = (ok: boolean, target: string) => targets.verdict(ok, target);

async function configPhase(): Promise<void> {
  const text = readFileSync(CLH, 'utf8');
  const runs = 300;
  for (let i = 0; i < 30; i++) await judgeConfig({ text, file: CLH });
  const phase: number[] = [];
  const parse: number[] = [];
  for (let i = 0; i < runs; i++) {
    let t = performance.now();
    parseToml(text, CLH);
    parse.push(performance.now() - t);
    t = performance.now();
    const j = await judgeConfig({ text, file: CLH });
    phase.push(performance.now() - t);
    if (!j.valid) throw new Error(`benchmark config is invalid: ${JSON.stringify(j.problems)}`);
  }
  const p = median(phase);
  const b = median(parse);
  console.log(`1. config phase, ${path.basename(CLH)}, ${runs} runs`);
  console.log(`   baseline  TOML parse alone      median ${ms(b)}`);
  console.log(`   measured  whole config phase    median ${ms(p)}   ratio ${(p / b).toFixed(1)}x the parse   ${verdict(p < 5, 'median < 5 ms')}`);
}

function processStart(): void {
  const runs = 15;
  const bare: number[] = [];
  const cli: number[] = [];
  const time = (args: string[]) => {
    const t = performance.now();
    const r = spawnSync(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const d = performance.now() - t;
    return { d, status: r.status, err: r.stderr.toString() };
  };
  for (let i = 0; i < 3; i++) {
    time(['-e', '0']);
    time([CLI, '--config', CLH, 'validate', '--json']);
  }
  for (let i = 0; i < runs; i++) {
    bare.push(time(['-e', '0']).d);
    const r = time([CLI, '--config', CLH, 'validate', '--json']);
    if (r.status !== 0) throw new Error(`validate exited ${r.status}: ${r.err}`);
    cli.push(r.d);
  }
  const b = median(bare);
  const c = median(cli);
  console.log(`2. process, ${runs} runs each, interleaved`);
  console.log(`   baseline  node -e 0                          median ${ms(b)}`);
  console.log(`   measured  kata-runtime validate --json       median ${ms(c)}   ratio ${(c / b).toFixed(2)}x   ${verdict(c / b <= 2, '<= 2x node -e 0')}`);
}

function tomlParsers(): void {
  if (!existsSync(REF)) {
    console.log('3. TOML parsers: skipped (../shared/reference is absent)');
    return;
  }
  const files = [...readdirSync(REF).filter((f) => f.endsWith('.toml')).map((f) => path.join(REF, f)), ...readdirSync(path.join(REF, '2.4.0')).map((f) => path.join(REF, '2.4.0', f))];
  // First parse in a fresh process for each library and file: what one `kata-runtime` start pays.
  const probe = (lib: 'toml' | 'smol-toml', file: string): number => {
    const code =
      lib === 'toml'
        ? `const t=require('toml');const s=require('fs').readFileSync(process.argv[1],'utf8');const a=performance.now();try{t.parse(s)}catch(e){};console.log(performance.now()-a)`
        : `import('smol-toml').then(t=>{const s=require('fs').readFileSync(process.argv[1],'utf8');const a=performance.now();try{t.parse(s,{integersAsBigInt:'asNeeded'})}catch(e){};console.log(performance.now()-a)})`;
    return Number(execFileSync(process.execPath, ['-e', code, file], { cwd: PACKAGE_ROOT }).toString().trim());
  };
  const rows: [string, number, number][] = [];
  for (const f of files) rows.push([path.relative(REF, f), probe('toml', f), probe('smol-toml', f)]);
  console.log(`3. TOML parsers, first parse in a fresh process (${files.length} Kata reference files)`);
  console.log('   file                                        toml 5 (base)   smol-toml   ratio');
  for (const [f, a, b] of rows) console.log(`   ${f.padEnd(44)} ${ms(a).padStart(12)} ${ms(b).padStart(11)}   ${(a / b).toFixed(1)}x`);
  const ta = median(rows.map((r) => r[1]));
  const tb = median(rows.map((r) => r[2]));
  console.log(`   median                                      ${ms(ta).padStart(12)} ${ms(tb).padStart(11)}   ${(ta / tb).toFixed(1)}x faster with smol-toml`);
}

await configPhase();
processStart();
tomlParsers();
if (targets.failed) {
  console.log('\nsome targets were missed');
  process.exitCode = 1;
}
