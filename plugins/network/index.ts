/**
 * network: the pod's network namespace mirrored into the VM, with Kata's tc-filter model. At
 * sandbox start (beforeVmStart) it reads the namespace's interfaces with `ip -json`, makes a tap
 * beside each (skipping `lo`), redirects traffic both ways with tc ingress filters + mirred, and
 * adds a `net` device intent per tap (the hypervisor plugin renders it; the hypervisor runs in the
 * namespace to open the taps). The core then hands the interfaces and routes to the guest agent.
 * When the VM stops the taps and filters go.
 *
 * Applies unless `internetworking_model = "none"` or `disable_new_netns = true`; other models
 * (macvtap) are refused in the validated config phase. A sandbox without a network namespace of
 * its own gets no network device.
 */
import { execFile } from 'node:child_process';
import { stat, statfs } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { promisify } from 'node:util';
import { KataError, STAGE, definePlugin, errorText, renderDeviceCapability, type VmContext } from '../../core/plugin-api.js';
import { REDIRECT_LINES, TAP_LINES, failedLine, redirectsCommand, scanCommand, tapName, tapsCommand, teardownCommands, type Command, type TapPair } from './commands.js';
import { parseScan, type PodInterface, type PodNetwork } from './scan.js';
import { MANIFEST, PLUGIN_NAME } from './manifest.js';

export { PLUGIN_NAME };

/** statfs(2) f_type of a network namespace file (NSFS_MAGIC). */
const NSFS_MAGIC = 0x6e736673;
/** Each ip/tc run; they answer in milliseconds. */
const COMMAND_TIMEOUT_MS = 10_000;

const execFileP = promisify(execFile);

/** Runs one command (argv only) and answers its stdout. Replaceable in tests. */
export type CommandRunner = (cmd: Command) => Promise<string>;

export const runCommand: CommandRunner = async (cmd) => {
  const child = execFileP(cmd.binary, cmd.args, { timeout: COMMAND_TIMEOUT_MS, maxBuffer: 4 * 1024 * 1024, env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin' } });
  // A command that exits without reading its stdin (any but a batch) must not fail the write.
  child.child.stdin?.on('error', () => undefined);
  child.child.stdin?.end(cmd.input ?? '');
  const { stdout } = await child;
  return stdout;
};

function commandError(e: unknown): string {
  const stderr = (e as { stderr?: unknown }).stderr;
  return typeof stderr === 'string' && stderr.trim() !== '' ? stderr.trim().replace(/\s+/g, ' ') : errorText(e);
}

/** Checks that `netns` is an absolute path to a network namespace file (nsfs). */
export async function checkNetns(netns: string): Promise<void> {
  if (!path.isAbsolute(netns) || netns.includes('\0')) {
    throw new KataError('KATA_ERR_NETWORK', `the network namespace path ${JSON.stringify(netns)} is not absolute`, { value: netns, plugin: PLUGIN_NAME });
  }
  const st = await statfs(netns).catch((e: NodeJS.ErrnoException) => {
    throw new KataError('KATA_ERR_NETWORK', `the pod's network namespace ${netns} cannot be opened: ${e.code ?? e.message}`, { value: netns, plugin: PLUGIN_NAME, cause: e });
  });
  if (Number(st.type) !== NSFS_MAGIC) {
    throw new KataError('KATA_ERR_NETWORK', `${netns} is not a network namespace (its filesystem is not nsfs)`, {
      value: netns,
      plugin: PLUGIN_NAME,
      fix: 'give the path of a network namespace: /var/run/netns/<name> or /proc/<pid>/ns/net',
    });
  }
  // The host's own namespace (init's, or the runtime's): wiring it would redirect all of the
  // host's traffic on its interfaces into the VM.
  const target = await stat(netns);
  for (const host of ['/proc/1/ns/net', '/proc/self/ns/net']) {
    const h = await stat(host).catch(() => undefined);
    if (h && h.dev === target.dev && h.ino === target.ino) {
      throw new KataError('KATA_ERR_NETWORK', `${netns} is the host's network namespace (the same as ${host}): its interfaces are not mirrored into a VM`, {
        value: netns,
        plugin: PLUGIN_NAME,
        fix: 'give the pod a network namespace of its own; host networking is not supported',
      });
    }
  }
}

/** The fix for a namespace that was there when the start began and is gone now. */
const VANISHED_FIX =
  "the pod's network namespace was removed while the sandbox started (by the CNI plugin's or containerd's teardown, or by hand); nothing of the sandbox is left: start the pod again with a namespace that stays until the pod is removed";

/** Whether `netns` is gone (or no longer a namespace) now: a failed command is then explained by that. */
async function vanished(netns: string, check: (netns: string) => Promise<void>): Promise<boolean> {
  return check(netns).then(
    () => false,
    () => true,
  );
}

/**
 * Reads the namespace: interfaces to mirror, the routes through them and their permanent
 * neighbours, in one `ip -batch` run.
 */
export async function scanNetns(netns: string, run: CommandRunner = runCommand, check: (netns: string) => Promise<void> = checkNetns): Promise<PodNetwork> {
  const out = await run(scanCommand(netns)).catch(async (e: unknown) => {
    const gone = await vanished(netns, check);
    throw new KataError('KATA_ERR_NETWORK', `cannot read the interfaces, routes and neighbours of network namespace ${netns}${gone ? ' (it vanished meanwhile)' : ''}: ${commandError(e)}`, {
      value: netns,
      plugin: PLUGIN_NAME,
      cause: e,
      ...(gone ? { fix: VANISHED_FIX } : {}),
    });
  });
  try {
    return parseScan(out);
  } catch (e) {
    throw new KataError('KATA_ERR_NETWORK', `network namespace ${netns}: ${errorText(e)}`, { value: netns, plugin: PLUGIN_NAME, cause: e });
  }
}

/** What one sandbox set up, to undo. */
interface Wiring {
  readonly netns: string;
  readonly pairs: TapPair[];
}

/** The error of a failed tap or filter batch, naming the interface whose line failed, with the fix. */
async function wiringError(netns: string, iface: PodInterface, tap: string, step: 'tap' | 'filters', e: unknown, check: (netns: string) => Promise<void>): Promise<KataError> {
  const why = commandError(e);
  const doing = step === 'tap' ? 'make its tap' : 'redirect its traffic to the tap with tc';
  if (await vanished(netns, check)) {
    return new KataError('KATA_ERR_NETWORK', `interface ${iface.name}: network namespace ${netns} vanished while trying to ${doing} (tap ${tap}): ${why}`, { value: iface.name, plugin: PLUGIN_NAME, cause: e, fix: VANISHED_FIX });
  }
  let fix = "check that /dev/net/tun exists (modprobe tun), that the runtime has CAP_NET_ADMIN, and that tc's ingress qdisc and mirred action are available (sch_ingress, act_mirred)";
  if (step === 'tap' && /busy|exists/i.test(why)) {
    fix = `a device named ${tap} that this runtime did not make is in the pod's network namespace (tap<i>_kata names are the runtime's): remove it (ip link del ${tap} in that namespace) and start the pod again`;
  } else if (step === 'filters' && /exclusivity|exists/i.test(why)) {
    fix = `${iface.name} already has an ingress qdisc that this runtime did not add (another tool redirects its traffic): remove it (tc qdisc del dev ${iface.name} ingress in that namespace) or use internetworking_model = "none"`;
  }
  return new KataError('KATA_ERR_NETWORK', `interface ${iface.name} of network namespace ${netns}: cannot ${doing} (tap ${tap}): ${why}`, { value: iface.name, plugin: PLUGIN_NAME, cause: e, fix });
}

const wired = new WeakMap<VmContext, Wiring>();

/** Removes the taps and filters of `w`; every step is tried (a vanished namespace makes them all fail, harmlessly). */
export async function unwire(w: Wiring, run: CommandRunner = runCommand): Promise<string[]> {
  const failures: string[] = [];
  for (const c of teardownCommands(w.netns, w.pairs)) await run(c).catch((e: unknown) => failures.push(`${c.args.join(' ')}: ${commandError(e)}`));
  return failures;
}

/**
 * Makes a tap per interface and wires it to its interface, filling `ctx.network`: one scan, one
 * `ip -batch` for every tap, one `tc -batch` for every filter (three process starts per sandbox,
 * whatever the number of interfaces). On a failure, what was made is removed and the error names
 * the interface whose line failed.
 */
export async function wireSandbox(ctx: VmContext, netns: string, run: CommandRunner = runCommand, check: (netns: string) => Promise<void> = checkNetns): Promise<Wiring> {
  const t0 = performance.now();
  await check(netns);
  const pod = await scanNetns(netns, run, check);
  const w: Wiring = { netns, pairs: [] };
  const planned = pod.interfaces.map((iface, i) => ({ iface, tap: tapName(i) }));
  const at = (line: number | undefined, per: number) => planned[line === undefined ? 0 : Math.min(Math.floor((line - 1) / per), planned.length - 1)] ?? planned[0];
  try {
    if (planned.length > 0) {
      await run(tapsCommand(netns, planned.map((p) => ({ tap: p.tap, mtu: p.iface.mtu })))).catch(async (e: unknown) => {
        const line = failedLine(commandError(e));
        // The taps of the lines before the failing one were made. A failing second line (bringing
        // a tap up) means its tap was made too; a failing first line (adding it) means the name
        // may be someone else's tap, which is not ours to remove.
        const made = line === undefined ? 0 : Math.floor((line - 1) / TAP_LINES) + ((line - 1) % TAP_LINES === 0 ? 0 : 1);
        w.pairs.push(...planned.slice(0, made).map((p) => ({ iface: p.iface.name, tap: p.tap, ingress: false })));
        const failed = at(line, TAP_LINES);
        throw await wiringError(netns, failed!.iface, failed!.tap, 'tap', e, check);
      });
      w.pairs.push(...planned.map((p) => ({ iface: p.iface.name, tap: p.tap, ingress: false })));
      await run(redirectsCommand(netns, w.pairs)).then(
        () => w.pairs.forEach((p) => (p.ingress = true)),
        async (e: unknown) => {
          const line = failedLine(commandError(e));
          // A pair's first line adds the pod interface's ingress qdisc: ours when that line ran
          // before the failing one. One that failed to be added may be someone else's.
          if (line !== undefined) w.pairs.forEach((p, k) => (p.ingress = k * REDIRECT_LINES + 1 < line));
          const failed = at(line, REDIRECT_LINES);
          throw await wiringError(netns, failed!.iface, failed!.tap, 'filters', e, check);
        },
      );
    }
    for (const [i, { iface, tap }] of planned.entries()) {
      ctx.network.devices.push({ kind: 'net', id: `net${i}`, tap, mac: iface.mac, mtu: iface.mtu });
      ctx.network.interfaces.push({ name: iface.name, mac: iface.mac, mtu: iface.mtu, addresses: iface.addresses });
    }
    ctx.network.routes.push(...pod.routes);
    ctx.network.neighbors.push(...pod.neighbors);
  } catch (e) {
    ctx.network.devices.length = 0;
    ctx.network.interfaces.length = 0;
    const left = await unwire(w, run);
    if (left.length > 0) ctx.log.warn({ plugin: PLUGIN_NAME, failures: left }, 'could not remove everything made for the network');
    throw e;
  }
  ctx.network.timings.host = performance.now() - t0;
  ctx.log.info({ plugin: PLUGIN_NAME, netns, interfaces: pod.interfaces.map((i) => i.name), routes: pod.routes.length, neighbors: pod.neighbors.length, ms: Math.round(ctx.network.timings.host) }, 'pod network wired to the VM');
  return w;
}

export default definePlugin({
  manifest: MANIFEST,
  apply({ hooks }) {
    hooks.validate.tap(PLUGIN_NAME, (cfg, verdict) => {
      const model = cfg.runtime.internetworking_model;
      if (model !== 'tcfilter' && model !== 'default' && model !== 'none') {
        verdict.veto({
          code: 'KATA_ERR_NETWORK_MODEL',
          key: 'runtime.internetworking_model',
          value: model,
          reason: `the ${model} model is not built: this runtime connects the pod network with tc filters only`,
          fix: 'set internetworking_model = "tcfilter", or "none" for a VM without a network',
        });
      }
      verdict.require(renderDeviceCapability('net'), "each interface of the pod's network namespace becomes a virtio-net device, which the hypervisor plugin must render", {
        key: 'runtime.internetworking_model',
        fix: 'use a hypervisor whose plugin renders net devices (qemu, clh), or set internetworking_model = "none"',
      });
    });

    hooks.beforeVmStart.tapPromise(PLUGIN_NAME, async (ctx) => {
      if (!ctx.netns) return;
      wired.set(ctx, await wireSandbox(ctx, ctx.netns));
    });

    // Once more right before the hypervisor is made (before the hypervisor plugin's own createVm
    // tap): it enters the namespace to open the taps, and a namespace removed since the taps were
    // made would otherwise surface as the hypervisor failing to start.
    hooks.createVm.tapPromise({ stage: STAGE.HYPERVISOR }, async (ctx) => {
      const w = wired.get(ctx);
      if (!w || !(await vanished(w.netns, checkNetns))) return undefined;
      const names = w.pairs.map((p) => p.iface).join(', ');
      throw new KataError('KATA_ERR_NETWORK', `network namespace ${w.netns} vanished ${names ? `after its interfaces (${names}) were wired, ` : ''}before the hypervisor started in it`, {
        value: names || w.netns,
        plugin: PLUGIN_NAME,
        fix: VANISHED_FIX,
      });
    });

    hooks.vmStopped.tapPromise(PLUGIN_NAME, async (ctx) => {
      const w = wired.get(ctx);
      wired.delete(ctx);
      if (!w) return;
      const left = await unwire(w);
      if (left.length > 0) ctx.log.warn({ plugin: PLUGIN_NAME, failures: left }, 'could not remove everything made for the network');
    });
  },
});
