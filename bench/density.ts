/**
 * Pod density (issue 16): the host memory of N idle sandboxes, each a `ctr run -d … sleep` through
 * our shim under a private containerd (test/helpers/containerd.ts) with QEMU and the project's guest
 * image, as the sum of the proportional set sizes (PSS, /proc/<pid>/smaps_rollup) of every QEMU and
 * every shim, and their unique set sizes (USS, private pages: what one more pod adds, however many
 * run; PSS falls as pods are added, since pods share code and the template's pages). One run
 * measures several variants side by side, each with its own containerd, one after the other, and
 * prints per-pod figures and each variant's ratio against the first one:
 *
 * - `previous`: the shipped configuration with the defaults before issue 16 (default_memory = 512,
 *   QEMU's default TCG translation buffer, no free-page-reporting balloon, the guest's swiotlb);
 * - `shipped`: configs/configuration-qemu.toml as it is;
 * - `templated`: the shipped file with `[factory] enable_template` on a template made for the run
 *   (`kata-runtime factory init` in the variant's temp directory before its pods, `factory destroy`
 *   after them, also on Ctrl-C): every pod is a clone (checked on QEMU's argv).
 *
 * A variant is a name, a configuration derived from the shipped file and extra environment for the
 * shim: a `templated` variant (VM templating, the factory) is one more entry in {@link VARIANTS}.
 * QEMU's PSS is also split by mapping (guest RAM, TCG buffer, heap, files, other anonymous), and the
 * time each `ctr run -d` took (VM boot included) is printed beside it.
 *
 *     npm run bench:density [-- --pods N] [--variants previous,shipped] [--settle SECONDS] [--json] [--dump DIR]
 *         [--try '[templated:]key=value;key=value' …]   (more variants: the shipped file with these keys changed)
 *
 * Everything is torn down at the end (tasks killed and removed, containerd stopped and its
 * leftovers reported). Needs qemu-system-x86_64, containerd and ctr; builds the guest image if missing.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as delay } from 'node:timers/promises';
import { parseArgs, promisify } from 'node:util';
import { PACKAGE_ROOT } from '../core/paths.js';
import { BUSYBOX_IMAGE, startContainerd, type TestContainerd } from '../test/helpers/containerd.js';
import { ensureGuestImage, type GuestImage } from '../test/helpers/guest.js';
import { qemuBinary } from '../test/helpers/qemu.js';
import { shimBinDir } from '../test/helpers/shim.js';
import { TempDir } from '../test/helpers/tmp.js';
import { median } from './stats.js';
import { pssKiB, qemuPssSplit, ussKiB, type QemuPssSplit } from './pss.js';

const RUNTIME = 'io.containerd.kata.v2';
const run = promisify(execFile);

/** One column of the comparison. */
export interface DensityVariant {
  readonly name: string;
  readonly about: string;
  /** The configuration file's text, from the shipped one (kernel and initrd already pointed at the image); `dir` is the variant's own temp directory. */
  config(shipped: string, dir: string): string;
  /** Extra environment for containerd and so for the shims it starts. */
  readonly env?: Record<string, string>;
  /**
   * Runs before the variant's pods start and after they are gone, with the variant's configuration
   * file and environment: where a `templated` variant makes its template (`kata-runtime factory
   * init`) and removes it (`factory destroy`).
   */
  setup?(config: string, env: Record<string, string>): Promise<void>;
  teardown?(config: string, env: Record<string, string>): Promise<void>;
  /** Throws when a pod's QEMU (its argv) is not what the variant claims to measure. */
  check?(qemuArgv: readonly string[], dir: string): void;
}

const KATA_RUNTIME = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');

/** `kata-runtime --config <config> factory <command>` with the variant's environment. */
async function factory(command: 'init' | 'destroy', config: string, env: Record<string, string>): Promise<void> {
  const t0 = performance.now();
  try {
    await run(process.execPath, [KATA_RUNTIME, '--config', config, 'factory', command], { env: { ...process.env, ...env }, timeout: 600_000 });
  } catch (e) {
    throw new Error(`kata-runtime factory ${command} failed: ${(e as { stderr?: string }).stderr ?? String(e)}`);
  }
  process.stderr.write(`      [density] factory ${command}: ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
}

/**
 * `key = value` under `[hypervisor.qemu]`: the existing line replaced, or a new line at the top of
 * the section. `value` is TOML (quote strings yourself); undefined removes the key.
 */
export function setQemuKey(text: string, key: string, value: string | undefined): string {
  const line = new RegExp(`^${key}\\s*=.*\\n`, 'm');
  const without = text.replace(line, '');
  if (value === undefined) return without;
  if (line.test(text)) return text.replace(line, `${key} = ${value}\n`);
  return without.replace(/^\[hypervisor\.qemu\]\n/m, `[hypervisor.qemu]\n${key} = ${value}\n`);
}

/** The shipped configuration with the agent inside the initramfs (the full initramfs.cpio.gz) instead of on the agent disk. */
function agentInInitramfs(t: string): string {
  const dir = path.dirname(/^initrd = "(.*)"$/m.exec(t)?.[1] ?? '');
  const inRam: [string, string | undefined][] = [
    ['initrd', `"${path.join(dir, 'initramfs.cpio.gz')}"`],
    ['image', undefined],
    ['disable_image_nvdimm', 'true'],
  ];
  return inRam.reduce((acc, [k, v]) => setQemuKey(acc, k, v), t);
}

export const VARIANTS: readonly DensityVariant[] = [
  {
    name: 'previous',
    about: 'default_memory = 512, QEMU\'s 1 GiB TCG buffer, no balloon, the guest\'s 64 MiB swiotlb, the agent in the initramfs (the defaults before issue 16)',
    config: (t) => {
      const old: [string, string | undefined][] = [
        ['default_memory', '512'],
        ['tcg_tb_size', undefined],
        ['reclaim_guest_freed_memory', 'false'],
        // Linux's default swiotlb size, which also keeps the qemu plugin from adding swiotlb=noforce.
        ['kernel_params', '"swiotlb=32768"'],
      ];
      return old.reduce((acc, [k, v]) => setQemuKey(acc, k, v), agentInInitramfs(t));
    },
  },
  { name: 'shipped', about: 'configs/configuration-qemu.toml as shipped', config: (t) => t },
  { name: 'initramfs', about: 'the agent inside the initramfs (initramfs.cpio.gz, no agent disk), as shipped before the agent disk', config: agentInInitramfs },
  templated('templated', 'shipped, with [factory] enable_template: every pod a copy-on-write clone of one template (its memory file on a tmpfs, paid once per host, not in the figures)', (t) => t),
];

/** A variant whose pods are clones of a template made for it from `edit(shipped)`. */
function templated(name: string, about: string, edit: (shipped: string) => string): DensityVariant {
  return {
    name,
    about,
    config: (t, dir) => `${edit(t)}\n[factory]\nenable_template = true\ntemplate_path = "${path.join(dir, 'template')}"\n`,
    setup: (config, env) => factory('init', config, env),
    teardown: (config, env) => factory('destroy', config, env),
    check: (argv, dir) => {
      const ram = argv.find((a) => a.startsWith('memory-backend-file,')) ?? '';
      if (!ram.includes(`mem-path=${path.join(dir, 'template', 'memory')},share=off`)) throw new Error(`a templated pod booted cold (its RAM: ${ram || 'anonymous'})`);
    },
  };
}

interface PodFigures {
  id: string;
  startMs: number;
  qemuKiB: number;
  shimKiB: number;
  /** Unique set sizes (private pages): what this pod alone holds, however many pods run. */
  qemuUssKiB: number;
  shimUssKiB: number;
  split: QemuPssSplit;
}

interface VariantResult {
  variant: string;
  guestRamMiB: number;
  pods: PodFigures[];
}

const { values: opts } = parseArgs({
  options: {
    pods: { type: 'string', default: '3' },
    variants: { type: 'string', default: VARIANTS.map((v) => v.name).join(',') },
    settle: { type: 'string', default: '10' },
    json: { type: 'boolean', default: false },
    /** Copy each QEMU's /proc/<pid>/smaps (and the shim's) into this directory, for a closer look. */
    dump: { type: 'string' },
    /** One more variant: the shipped configuration with `key=value[;key=value]` under [hypervisor.qemu] (TOML values), `env:NAME=value` for the shim's environment; `templated:` first makes it a templated variant. */
    try: { type: 'string', multiple: true, default: [] },
  },
});
const pods = Number(opts.pods);
const settleMs = Number(opts.settle) * 1000;
if (!Number.isInteger(pods) || pods < 1) throw new Error(`--pods ${opts.pods}: give a positive integer`);
if (!Number.isFinite(settleMs) || settleMs < 0) throw new Error(`--settle ${opts.settle}: give seconds`);
const chosen = opts.variants.split(',').filter(Boolean).map((name) => {
  const v = VARIANTS.find((x) => x.name === name);
  if (!v) throw new Error(`--variants: no variant "${name}" (known: ${VARIANTS.map((x) => x.name).join(', ')})`);
  return v;
});
for (const [i, spec] of opts.try.entries()) {
  const pairs: [string, string][] = [];
  const env: Record<string, string> = {};
  const isTemplated = spec.startsWith('templated:');
  for (const kv of spec.replace(/^templated:/, '').split(';')) {
    const m = /^(env:)?([A-Za-z0-9_]+)=(.+)$/.exec(kv.trim());
    if (!m) throw new Error(`--try ${spec}: give key=value pairs separated by ";" (env:NAME=value for the shim's environment)`);
    if (m[1]) env[m[2]!] = m[3]!;
    else pairs.push([m[2]!, m[3]!]);
  }
  const edit = (t: string) => pairs.reduce((acc, [k, v]) => setQemuKey(acc, k, v), t);
  if (isTemplated) chosen.push({ ...templated(`try${i}`, `shipped with ${spec}`, edit), env });
  else chosen.push({ name: `try${i}`, about: `shipped with ${spec}`, env, config: edit });
}
if (chosen.length === 0) throw new Error('no variant to measure');

const MiB = (kib: number) => `${(kib / 1024).toFixed(1)} MiB`.padStart(10);

/** `default_memory` of a configuration text, MiB. */
function guestRamOf(text: string): number {
  const m = /^default_memory\s*=\s*(\d+)/m.exec(text);
  return m ? Number(m[1]) : 2048;
}

async function measureVariant(variant: DensityVariant, tmp: TempDir, image: GuestImage): Promise<VariantResult> {
  const dir = path.join(tmp.path, variant.name);
  const runRoot = path.join(dir, 'run');
  const shipped = readFileSync(path.join(PACKAGE_ROOT, 'configs', 'configuration-qemu.toml'), 'utf8')
    .replace(/^kernel = .*$/m, `kernel = "${image.kernel}"`)
    .replace(/^initrd = .*$/m, `initrd = "${image.agentDisk?.initrd ?? image.initrd}"`)
    .replace(/^image = .*$/m, image.agentDisk ? `image = "${image.agentDisk.image}"` : '');
  const text = variant.config(shipped, dir);
  const config = tmp.file(`${variant.name}/configuration.toml`, text);
  const ctx = { skip: () => { throw new Error('containerd and ctr are not installed'); } } as unknown as Mocha.Context;
  const sub = new TempDir(`kata-bench-density-${variant.name}-`);
  const env = { KATA_CONF_FILE: config, KATA_TS_RUN_ROOT: runRoot, KATA_TS_SBS_ROOT: path.join(dir, 'sbs'), ...variant.env };
  let ctrd: TestContainerd;
  try {
    await variant.setup?.(config, env);
    if (interrupted) throw new Error('interrupted');
    ctrd = await startContainerd(ctx, { pathPrefix: [shimBinDir(sub)], env });
  } catch (err) {
    sub.cleanup();
    await variant.teardown?.(config, env);
    throw err;
  }
  const started: string[] = [];
  const result: VariantResult = { variant: variant.name, guestRamMiB: guestRamOf(text), pods: [] };
  try {
    const starts: Record<string, number> = {};
    for (let i = 0; i < pods && !interrupted; i++) {
      const id = `${variant.name}-${i}`;
      const t0 = performance.now();
      const r = await ctrd.ctr(['run', '-d', '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sleep', '100000'], { timeoutMs: 240_000 });
      if (r.code !== 0) throw new Error(`ctr run -d ${id} failed (${r.code}): ${r.stderr}\n${ctrd.logTail(30)}`);
      starts[id] = performance.now() - t0;
      started.push(id);
      process.stderr.write(`      [density] ${variant.name}: pod ${i + 1}/${pods} started in ${(starts[id]! / 1000).toFixed(1)} s\n`);
    }
    // Idle: let the guests finish what they do after the agent answers (page reporting, node's GC).
    if (!interrupted) await delay(settleMs);
    if (interrupted) throw new Error('interrupted');
    for (const id of started) {
      const pidFile = path.join(runRoot, ctrd.namespace, id, 'qemu.pid');
      if (!existsSync(pidFile)) throw new Error(`no ${pidFile}: where did QEMU go?`);
      const qemu = Number(readFileSync(pidFile, 'utf8').trim());
      const ppid = Number(/^\d+ \(.*\) \S (\d+) /s.exec(readFileSync(`/proc/${qemu}/stat`, 'latin1'))![1]);
      const shimArgv = readFileSync(`/proc/${ppid}/cmdline`, 'latin1');
      if (!shimArgv.includes('containerd-shim-kata-v2')) throw new Error(`QEMU ${qemu}'s parent ${ppid} is not the shim: ${shimArgv}`);
      variant.check?.(readFileSync(`/proc/${qemu}/cmdline`, 'latin1').split('\0'), dir);
      if (opts.dump) {
        mkdirSync(opts.dump, { recursive: true });
        writeFileSync(path.join(opts.dump, `${id}.qemu.smaps`), readFileSync(`/proc/${qemu}/smaps`));
        writeFileSync(path.join(opts.dump, `${id}.shim.smaps`), readFileSync(`/proc/${ppid}/smaps`));
        writeFileSync(path.join(opts.dump, `${id}.qemu.argv`), readFileSync(`/proc/${qemu}/cmdline`, 'latin1').split('\0').join('\n'));
      }
      result.pods.push({
        id, startMs: starts[id]!, qemuKiB: pssKiB(qemu), shimKiB: pssKiB(ppid), qemuUssKiB: ussKiB(qemu), shimUssKiB: ussKiB(ppid),
        split: qemuPssSplit(qemu, result.guestRamMiB),
      });
    }
  } finally {
    for (const id of started) {
      await ctrd.ctr(['task', 'kill', '-s', 'SIGKILL', id]);
      for (let i = 0; i < 100 && new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm').test((await ctrd.ctr(['task', 'ls'])).stdout); i++) await delay(200);
      await ctrd.ctr(['task', 'rm', '-f', id]);
      await ctrd.ctr(['container', 'rm', id]);
    }
    const left = await ctrd.stop();
    const leftovers = Object.entries(left).filter(([, v]) => Array.isArray(v) && v.length > 0);
    if (leftovers.length > 0) process.stderr.write(`      [density] ${variant.name}: left behind: ${JSON.stringify(Object.fromEntries(leftovers))}\n`);
    sub.cleanup();
    await variant.teardown?.(config, env);
  }
  return result;
}

if (!qemuBinary()) {
  console.log('qemu-system-x86_64 is not installed: nothing to measure');
  process.exit(0);
}
const image = await ensureGuestImage();
const tmp = new TempDir('kata-bench-density-');
// Ctrl-C stops the measurement, not the teardown: the running variant's finally removes its pods.
let interrupted = false;
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    if (interrupted) process.exit(130);
    interrupted = true;
    process.stderr.write(`      [density] ${sig}: tearing down (again to quit at once)\n`);
  });
}
const results: VariantResult[] = [];
try {
  for (const v of chosen) if (!interrupted) results.push(await measureVariant(v, tmp, image));
} finally {
  tmp.cleanup();
}

const perPod = (r: VariantResult) => {
  const sum = (f: (p: PodFigures) => number) => r.pods.reduce((a, p) => a + f(p), 0);
  const n = r.pods.length;
  return {
    qemu: sum((p) => p.qemuKiB) / n,
    shim: sum((p) => p.shimKiB) / n,
    total: sum((p) => p.qemuKiB + p.shimKiB) / n,
    qemuUss: sum((p) => p.qemuUssKiB) / n,
    shimUss: sum((p) => p.shimUssKiB) / n,
    sum: sum((p) => p.qemuKiB + p.shimKiB),
    split: Object.fromEntries((Object.keys(r.pods[0]!.split) as (keyof QemuPssSplit)[]).map((k) => [k, sum((p) => p.split[k]) / n])) as unknown as QemuPssSplit,
    startMs: median(r.pods.map((p) => p.startMs)),
  };
};

if (opts.json) {
  console.log(JSON.stringify(results.map((r) => ({ ...r, perPod: perPod(r) })), null, 2));
} else {
  const base = perPod(results[0]!);
  console.log(`Host memory of ${pods} idle pods (ctr run -d … sleep, shim + QEMU as configured), PSS after ${settleMs / 1000} s idle`);
  for (const r of results) {
    const p = perPod(r);
    const v = chosen.find((x) => x.name === r.variant)!;
    console.log(`\n${r.variant}: ${v.about}`);
    console.log(`   per pod   QEMU ${MiB(p.qemu)}   shim ${MiB(p.shim)}   total ${MiB(p.total)}   ratio ${(p.total / base.total).toFixed(2)}x against ${results[0]!.variant}`);
    console.log(`   private   QEMU ${MiB(p.qemuUss)}   shim ${MiB(p.shimUss)}   total ${MiB(p.qemuUss + p.shimUss)}   (USS: what one more pod adds, however many run)`);
    console.log(`   all ${pods} pods ${MiB(p.sum)}    ctr run -d median ${(p.startMs / 1000).toFixed(2)} s`);
    console.log(`   QEMU per pod: guest RAM ${MiB(p.split.guestRam)}  TCG buffer ${MiB(p.split.tcg)}  heap ${MiB(p.split.heap)}  files ${MiB(p.split.files)}  other anon ${MiB(p.split.otherAnon)}`);
    for (const pod of r.pods) console.log(`     ${pod.id.padEnd(14)} QEMU ${MiB(pod.qemuKiB)}  shim ${MiB(pod.shimKiB)}  start ${(pod.startMs / 1000).toFixed(2)} s`);
  }
}
