/**
 * Processes the runtime starts that must not outlive it: the hypervisor and its daemons. They are
 * started through util-linux's `setpriv --pdeathsig KILL`, which asks the kernel to SIGKILL the
 * child when the runtime process dies, however it dies (SIGKILL included), and then execs the
 * program: the pid, command line and stdio are the program's own.
 *
 * Without setpriv (not a Debian/Ubuntu host), or for a program that cannot be found (so that the
 * caller sees spawn's own ENOENT), the program is spawned directly and outlives a crashed runtime
 * as before.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import path from 'node:path';
import { assertTrustedPath } from './trusted-path.js';

let setprivPath: string | null | undefined;

/** The first executable `name` on PATH (or `name` itself when it has a slash), if any. */
export function findExecutable(name: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
  const candidates = name.includes('/') ? [name] : (env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':').filter(Boolean).map((d) => path.join(d, name));
  for (const c of candidates) {
    try {
      accessSync(c, constants.X_OK);
      return c;
    } catch {
      /* next */
    }
  }
  return undefined;
}

/**
 * Spawns `binary` so that it is killed when this process dies. Running as root, the binary (found
 * on PATH when it has no slash) must pass the StrictModes check of core/trusted-path.ts first:
 * throws KATA_ERR_UNTRUSTED_PATH otherwise, before anything runs, and runs the real path checked.
 */
export function spawnTied(binary: string, args: readonly string[], options: SpawnOptions, what = 'binary'): ChildProcess {
  setprivPath ??= findExecutable('setpriv') ?? null;
  const resolved = trustedProgram(binary, what);
  if (!setprivPath || !resolved) return spawn(resolved ?? binary, [...args], options);
  return spawn(setprivPath, ['--pdeathsig', 'KILL', '--', resolved, ...args], options);
}

/**
 * The program to execute for `binary` (found on PATH when it has no slash): running as root, its
 * real path once it has passed the StrictModes check (KATA_ERR_UNTRUSTED_PATH otherwise, before
 * anything runs); undefined when it cannot be found, so that spawn reports its own ENOENT.
 */
function trustedProgram(binary: string, what: string, trust: { plugin?: string } = {}): string | undefined {
  const found = findExecutable(binary);
  return found === undefined ? undefined : assertTrustedPath(found, what, trust);
}

/** Process groups of probes still running: killed when this process exits or is interrupted first. */
const probeGroups = new Set<number>();
const FORWARDED_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

function killAllProbeGroups(): void {
  for (const pgid of probeGroups) killProcessGroup(pgid);
  probeGroups.clear();
}

// A detached probe does not get the terminal's Ctrl-C: while one runs, an interrupt kills its group
// first and is then delivered again with the default action, as if nobody had listened.
function onProbeSignal(signal: NodeJS.Signals): void {
  killAllProbeGroups();
  unwatchSignals();
  process.kill(process.pid, signal);
}

function watchSignals(): void {
  process.on('exit', killAllProbeGroups);
  for (const s of FORWARDED_SIGNALS) if (process.listenerCount(s) === 0) process.on(s, onProbeSignal);
}

function unwatchSignals(): void {
  process.off('exit', killAllProbeGroups);
  for (const s of FORWARDED_SIGNALS) process.off(s, onProbeSignal);
}

/** SIGKILLs every process of a group; a group already gone is not an error. */
export function killProcessGroup(pgid: number, signal: NodeJS.Signals = 'SIGKILL'): void {
  try {
    process.kill(-pgid, signal);
  } catch {
    // ESRCH: nobody left in the group
  }
}

/**
 * Spawns a short-lived probe (`--version`, a VMM started only to be asked something) in a process
 * group of its own, so that whatever it forks can be killed with it: call the returned `kill()` on
 * timeout and when done. The group is also killed if this process exits, or is interrupted by
 * SIGINT, SIGTERM or SIGHUP (when nobody else handles those), before that. The binary passes the
 * same trust check as {@link spawnTied}'s.
 */
export function spawnProbe(binary: string, args: readonly string[], options: SpawnOptions, what = 'binary', trust: { plugin?: string } = {}): { child: ChildProcess; kill(): void } {
  // Throws KATA_ERR_UNTRUSTED_PATH before anything runs, as spawnTied does.
  const program = trustedProgram(binary, what, trust) ?? binary;
  // Listening before the spawn: a signal that arrives while spawn() runs (the probe may already be
  // forking) is then delivered to the handler once this function has registered the group, instead
  // of killing this process by default with the group unknown.
  const first = probeGroups.size === 0;
  if (first) watchSignals();
  let child: ChildProcess;
  try {
    child = spawn(program, [...args], { ...options, detached: true });
  } catch (e) {
    if (first) unwatchSignals();
    throw e;
  }
  const pgid = child.pid;
  if (pgid === undefined) {
    // Not started (the 'error' event follows): nothing to kill.
    if (first) unwatchSignals();
    return { child, kill: () => undefined };
  }
  probeGroups.add(pgid);
  return {
    child,
    kill() {
      if (!probeGroups.delete(pgid)) return;
      killProcessGroup(pgid);
      if (probeGroups.size === 0) unwatchSignals();
    },
  };
}
