/**
 * The iproute2 commands of the tc-filter model, as argument vectors, all run inside the pod's
 * network namespace (`nsenter --net=<path>`): never a shell, and every name checked before it is
 * put in a vector.
 */
import { KataError, inNetns } from '../../core/plugin-api.js';
import { IFNAME, SCAN_LINES } from './scan.js';

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

/** The namespace scan (scan.ts SCAN_LINES) as one `ip -d -json -batch -` run. */
export function scanCommand(netns: string): Command {
  return { ...inPodNetns(netns, 'ip', ['-d', '-json', '-batch', '-']), input: SCAN_LINES.join('\n') + '\n' };
}

/** A tap and the pod interface it is wired to. */
export interface TapPair {
  readonly iface: string;
  readonly tap: string;
  /**
   * Whether the pod interface's ingress qdisc is ours to delete (we added it). False when the
   * filter batch stopped before adding it: one already there is someone else's. Default: true.
   */
  ingress?: boolean;
}

/** Lines of the tap batch per interface ({@link tapArgs}); line `n` (1-based) of a failure says which interface failed, and whether its tap was made. */
export const TAP_LINES = 2;
/** Lines of the filter batch per interface ({@link redirectArgs}). */
export const REDIRECT_LINES = 4;

const batch = (argvs: readonly string[][]): string => argvs.map((a) => a.join(' ')).join('\n') + '\n';

/** Creates tap `tap` and brings it up with `mtu`: `ip` argument vectors, one per line of {@link tapCommand}. */
export function tapArgs(tap: string, mtu: number): string[][] {
  return [
    ['tuntap', 'add', 'dev', name(tap), 'mode', 'tap'],
    ['link', 'set', 'dev', name(tap), 'mtu', String(mtu), 'up'],
  ];
}

/**
 * {@link tapArgs} of every interface as one `ip -batch -` run (one process per sandbox, not two
 * per interface). ip stops at the first failing line and says which (`Command failed -:<line>`),
 * so a caller knows which taps were made.
 */
export function tapsCommand(netns: string, taps: readonly { tap: string; mtu: number }[]): Command {
  return { ...inPodNetns(netns, 'ip', ['-batch', '-']), input: batch(taps.flatMap((t) => tapArgs(t.tap, t.mtu))) };
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
 * {@link redirectArgs} of every pair as one `tc -batch -` run (one process per sandbox instead of
 * four per interface: each costs a fork and exec of nsenter and tc). Every word is a checked
 * interface name or a constant, so no line can carry a second command.
 */
export function redirectsCommand(netns: string, pairs: readonly TapPair[]): Command {
  return { ...inPodNetns(netns, 'tc', ['-batch', '-']), input: batch(pairs.flatMap((p) => redirectArgs(p.iface, p.tap))) };
}

/**
 * Undoes the set-up of `pairs`: the pod interfaces' ingress qdiscs that are ours go, then the taps
 * (their qdiscs and filters with them). Two batches with `-force` (every line is tried; a failure
 * still fails the run).
 */
export function teardownCommands(netns: string, pairs: readonly TapPair[]): Command[] {
  const qdiscs = pairs.filter((p) => p.ingress !== false);
  return [
    ...(qdiscs.length > 0 ? [{ ...inPodNetns(netns, 'tc', ['-force', '-batch', '-']), input: batch(qdiscs.map((p) => ['qdisc', 'del', 'dev', name(p.iface), 'ingress'])) }] : []),
    ...(pairs.length > 0 ? [{ ...inPodNetns(netns, 'ip', ['-force', '-batch', '-']), input: batch(pairs.map((p) => ['link', 'del', 'dev', name(p.tap)])) }] : []),
  ];
}

/** The 1-based line number of the first failing line of an ip/tc batch, from its stderr (`Command failed -:<n>`). */
export function failedLine(stderr: string): number | undefined {
  const m = /Command failed -:(\d+)/.exec(stderr);
  return m ? Number(m[1]) : undefined;
}
