/**
 * The contract of a sandbox's management socket (Kata's `shim-monitor.sock`), shared by the shim,
 * which serves it, and `kata-runtime exec`, which attaches to it: where it is and the name of the
 * debug-console upgrade. Neither front end imports the other.
 */
import path from 'node:path';
import { checkIdentifier } from './identifiers.js';

/** Kata's directory of per-sandbox shim sockets; KATA_TS_SBS_ROOT overrides it (tests). */
export const DEFAULT_SBS_ROOT = '/run/vc/sbs';

/** The upgrade protocol name of a debug-console attach. */
export const DEBUG_CONSOLE_PROTOCOL = 'kata-debug-console';

export function sbsRoot(env: NodeJS.ProcessEnv = process.env): string {
  return env.KATA_TS_SBS_ROOT || DEFAULT_SBS_ROOT;
}

/** The management socket of `sandboxId`; the id is checked as a containerd identifier first. */
export function shimMonitorSocket(sandboxId: string, env: NodeJS.ProcessEnv = process.env): string {
  checkIdentifier('sandbox-id', sandboxId);
  return path.join(sbsRoot(env), sandboxId, 'shim-monitor.sock');
}
