/**
 * VM templates shared by a whole test run (issue 16: where templating makes the suite faster, the
 * suite uses it). A suite whose subject is not the boot turns a configuration file into one whose
 * sandboxes start as clones: {@link useSharedTemplate} adds a `[factory]` section whose
 * `template_path` is keyed by the rest of the file, and makes that template with
 * `kata-runtime factory init` the first time in this process (two suites with the same
 * configuration clone the same template). Everything a suite proves about the sandbox then holds
 * for clones, and the cold boot keeps its own coverage in every suite that does not call this
 * (the guest, the agent, `kata-runtime run`, hot-plug, networking, CRI …). The templates are
 * destroyed when the test process exits (`factory destroy`: tmpfs unmounted, files removed), and
 * those of a run that was killed before it could are removed by the next run.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { mountsUnderIn } from '../../core/mounts.js';
import { DIST_ROOT } from '../../core/paths.js';
import { processStartTime } from '../../core/run-dirs.js';

const KATA_RUNTIME = path.join(DIST_ROOT, 'bundle', 'kata-runtime.mjs');
/** This process's templates: a tmpfs each, mounted under this directory by `factory init`. */
const ROOT = `/run/kata-ts-test-templates-${process.pid}`;
/** In ROOT: this process's start time (/proc/<pid>/stat), so that a later run whose pid is the same tells it apart. */
const OWNER = 'owner';
/** Template directory → a copy of the configuration that made it (for `factory destroy` at exit). */
const made = new Map<string, string>();

function factory(command: 'init' | 'destroy', config: string): void {
  execFileSync(process.execPath, [KATA_RUNTIME, '--config', config, 'factory', command], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 300_000 });
}

/**
 * Appends `[factory] enable_template = true` to `config` (a file without a `[factory]` table),
 * with the template this configuration shares with every other suite of the run that has the same
 * file, made now if it is not there yet. Returns the template's directory; not as root, leaves the
 * file alone (the sandboxes boot cold) and returns undefined.
 */
export function useSharedTemplate(config: string): string | undefined {
  // A template lives on a tmpfs that `factory init` mounts: without root the suite boots cold.
  if (process.getuid?.() !== 0) return undefined;
  const text = readFileSync(config, 'utf8');
  if (/^\s*\[factory\]/m.test(text)) throw new Error(`${config} has a [factory] table already`);
  const dir = path.join(ROOT, createHash('sha256').update(text).digest('hex').slice(0, 16));
  appendFileSync(config, `\n[factory]\nenable_template = true\ntemplate_path = "${dir}"\n`);
  if (!made.has(dir)) {
    if (made.size === 0) sweepDeadRuns();
    mkdirSync(ROOT, { recursive: true, mode: 0o700 });
    writeFileSync(path.join(ROOT, OWNER), `${processStartTime(process.pid) ?? ''}\n`);
    const copy = `${dir}.toml`;
    writeFileSync(copy, readFileSync(config));
    made.set(dir, copy);
    try {
      factory('init', copy);
    } catch (e) {
      throw new Error(`kata-runtime factory init failed for the shared template ${dir}: ${(e as { stderr?: Buffer }).stderr?.toString() ?? String(e)}`);
    }
  }
  return dir;
}

/** Whether the run that made `root` (pid `pid`) is still running: its pid alive with the start time it recorded. */
function runAlive(root: string, pid: number): boolean {
  const recorded = (() => {
    try {
      return readFileSync(path.join(root, OWNER), 'utf8').trim();
    } catch {
      return undefined;
    }
  })();
  const now = processStartTime(pid);
  return now !== undefined && (recorded === undefined || recorded === '' || recorded === now);
}

/** Lazily unmounts whatever is still mounted at or below `root` (a template whose `destroy` failed), deepest first, so that removing `root` cannot reach into a live tmpfs. */
function unmountUnder(root: string): void {
  // Synchronous: it also runs in the exit handler.
  for (const m of mountsUnderIn(readFileSync('/proc/self/mountinfo', 'utf8'), root)) execFileSync('umount', ['-l', m]);
}

/** A run that was killed (no exit handler ran) left its templates mounted: remove them. */
function sweepDeadRuns(): void {
  for (const name of readdirSync('/run')) {
    const m = /^kata-ts-test-templates-(\d+)$/.exec(name);
    if (!m || Number(m[1]) === process.pid) continue;
    const root = path.join('/run', name);
    if (runAlive(root, Number(m[1]))) continue;
    for (const f of readdirSync(root).filter((n) => n.endsWith('.toml'))) {
      try {
        factory('destroy', path.join(root, f));
      } catch {
        // Its tmpfs may be gone already; what is still mounted is unmounted below.
      }
    }
    unmountUnder(root);
    rmSync(root, { recursive: true, force: true });
  }
}

/** Destroys this process's templates (also run at exit). */
export function destroySharedTemplates(): void {
  for (const [dir, copy] of made) {
    try {
      factory('destroy', copy);
    } catch (e) {
      process.stderr.write(`could not destroy the shared VM template ${dir}: ${(e as { stderr?: Buffer }).stderr?.toString() ?? String(e)}\n`);
    }
  }
  made.clear();
  if (existsSync(ROOT)) {
    unmountUnder(ROOT);
    rmSync(ROOT, { recursive: true, force: true });
  }
}

process.on('exit', destroySharedTemplates);
