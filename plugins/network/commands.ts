/**
 * The iproute2 commands of the tc-filter model, as argument vectors, all run inside the pod's
 * network namespace (`nsenter --net=<path>`): never a shell, and every name checked before it is
 * put in a vector.
 */
import { KataError, inNetns } from '../../core/plugin-api.js';
import { IFNAME } from './scan.js';

export interface Command {
  readonly binary: string;
  readonly args: string[];
  /** Written to the command's stdin (a `-batch -` list: one command per line, names already checked). */
  readonly input?: string;
}

function name(n: string): string {
  // A name starting with '-' would be read as an option; IFNAME never allows it.
  if (!IFNAME.test(n)) throw new KataError('KATA_ERR_NETWORK', `"${n}" is not a Linux interface name`, { value: n });
  return n;
}

/** A command run in the namespace at `netns`. */
export function inPodNetns(netns: string, binary: 'ip' | 'tc', args: readonly string[]): Command {
  return inNetns(netns, binary, args);
}

/** The tap of the `index`-th mirrored interface, named as Kata names it. */
export function tapName(index: number): string {
  return `tap${index}_kata`;
}

export const scanCommands = (netns: string) => ({
  addresses: inPodNetns(netns, 'ip', ['-d', '-json', 'addr', 'show']),
  routes4: inPodNetns(netns, 'ip', ['-4', '-json', 'route', 'show']),
  routes6: inPodNetns(netns, 'ip', ['-6', '-json', 'route', 'show']),
});

/** Creates tap `tap` and brings it up with `mtu`: `ip` argument vectors, one per line of {@link tapCommand}. */
export function tapArgs(tap: string, mtu: number): string[][] {
  return [
    ['tuntap', 'add', 'dev', name(tap), 'mode', 'tap'],
    ['link', 'set', 'dev', name(tap), 'mtu', String(mtu), 'up'],
  ];
}

/**
 * {@link tapArgs} as one `ip -batch -` run (one process instead of two). ip stops at the first
 * failing line and says which (`Command failed -:<line>`), so a caller knows whether the tap was made.
 */
export function tapCommand(netns: string, tap: string, mtu: number): Command {
  return { ...inPodNetns(netns, 'ip', ['-batch', '-']), input: tapArgs(tap, mtu).map((a) => a.join(' ')).join('\n') + '\n' };
}

/**
 * Ingress qdiscs on both devices, and a filter on each that sends every frame out of the other:
 * what arrives on the pod interface leaves through the tap into the VM, and the reverse. As tc
 * argument vectors, one per line of the batch.
 */
export function redirectArgs(iface: string, tap: string): string[][] {
  const out: string[][] = [];
  for (const [from, to] of [[iface, tap], [tap, iface]] as const) {
    out.push(['qdisc', 'add', 'dev', name(from), 'handle', 'ffff:', 'ingress']);
    out.push(['filter', 'add', 'dev', name(from), 'parent', 'ffff:', 'protocol', 'all', 'u32', 'match', 'u32', '0', '0', 'action', 'mirred', 'egress', 'redirect', 'dev', name(to)]);
  }
  return out;
}

/**
 * {@link redirectArgs} as one `tc -batch -` run (one process instead of four: each costs a fork
 * and exec of nsenter and tc). Every word is a checked interface name or a constant, so no line
 * can carry a second command.
 */
export function redirectCommand(netns: string, iface: string, tap: string): Command {
  return { ...inPodNetns(netns, 'tc', ['-batch', '-']), input: redirectArgs(iface, tap).map((a) => a.join(' ')).join('\n') + '\n' };
}

/** Undoes one interface's set-up: the tap goes (its qdisc and filter with it), the pod interface's ingress qdisc goes. */
export function teardownCommands(netns: string, iface: string, tap: string): Command[] {
  return [inPodNetns(netns, 'tc', ['qdisc', 'del', 'dev', name(iface), 'ingress']), inPodNetns(netns, 'ip', ['link', 'del', 'dev', name(tap)])];
}
