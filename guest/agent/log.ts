/**
 * The agent's console log: one line per event on stderr (the guest's /dev/console, ttyS0, which
 * the qemu plugin writes to `console.log`), each starting with `KATA-TS-AGENT: ` so that it reads
 * apart from the kernel's and /init's lines. Sparse by default (start, listening, connections,
 * container lifecycle, failures); `agent.log=debug` on the kernel command line adds one line per RPC.
 */
export const LOG_PREFIX = 'KATA-TS-AGENT: ';

let debugOn = false;

export function setDebug(on: boolean): void {
  debugOn = on;
}

export function isDebug(): boolean {
  return debugOn;
}

export function log(message: string): void {
  process.stderr.write(`${LOG_PREFIX}${message}\n`);
}

export function debug(message: string): void {
  if (debugOn) log(message);
}
