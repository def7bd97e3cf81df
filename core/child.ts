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
  const found = findExecutable(binary);
  const resolved = found === undefined ? undefined : assertTrustedPath(found, what);
  if (!setprivPath || !resolved) return spawn(resolved ?? binary, [...args], options);
  return spawn(setprivPath, ['--pdeathsig', 'KILL', '--', resolved, ...args], options);
}
