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
import { KataError, definePlugin, errorText, renderDeviceCapability, type VmContext } from '../../core/plugin-api.js';
import { redirectCommand, scanCommands, tapCommand, tapName, teardownCommands, type Command } from './commands.js';
import { parseInterfaces, parseRoutes, type PodNetwork } from './scan.js';
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

/** Reads the namespace: interfaces to mirror and the routes through them. */
export async function scanNetns(netns: string, run: CommandRunner = runCommand): Promise<PodNetwork> {
  const cmds = scanCommands(netns);
  const read = (c: Command, what: string) =>
    run(c).catch((e: unknown) => {
      throw new KataError('KATA_ERR_NETWORK', `cannot read the ${what} of network namespace ${netns}: ${commandError(e)}`, { value: netns, plugin: PLUGIN_NAME, cause: e });
    });
  const [addrs, r4, r6] = await Promise.all([read(cmds.addresses, 'interfaces'), read(cmds.routes4, 'IPv4 routes'), read(cmds.routes6, 'IPv6 routes')]);
  let interfaces;
  try {
    interfaces = parseInterfaces(addrs);
  } catch (e) {
    throw new KataError('KATA_ERR_NETWORK', `network namespace ${netns}: ${errorText(e)}`, { value: netns, plugin: PLUGIN_NAME, cause: e });
  }
  const devices = new Set(interfaces.map((i) => i.name));
  return { interfaces, routes: [...parseRoutes(r4, 'v4', devices), ...parseRoutes(r6, 'v6', devices)] };
}

/** What one sandbox set up, to undo. */
interface Wiring {
  readonly netns: string;
  readonly pairs: { iface: string; tap: string }[];
}

const wired = new WeakMap<VmContext, Wiring>();

/** Removes the taps and filters of `w`; every step is tried (a vanished namespace makes them all fail, harmlessly). */
export async function unwire(w: Wiring, run: CommandRunner = runCommand): Promise<string[]> {
  const failures: string[] = [];
  for (const p of [...w.pairs].reverse()) {
    for (const c of teardownCommands(w.netns, p.iface, p.tap)) await run(c).catch((e: unknown) => failures.push(`${c.args.join(' ')}: ${commandError(e)}`));
  }
  return failures;
}

/**
 * Makes a tap per interface and wires it to its interface, filling `ctx.network`. On a failure,
 * what was made is removed and the error names the interface.
 */
export async function wireSandbox(ctx: VmContext, netns: string, run: CommandRunner = runCommand, check: (netns: string) => Promise<void> = checkNetns): Promise<Wiring> {
  const t0 = performance.now();
  await check(netns);
  const pod = await scanNetns(netns, run);
  const w: Wiring = { netns, pairs: [] };
  try {
    for (const [i, iface] of pod.interfaces.entries()) {
      const tap = tapName(i);
      try {
        await run(tapCommand(netns, tap, iface.mtu)).catch((e: unknown) => {
          // Only a failure of the second line (bringing it up) means the tap is ours to remove:
          // one that failed to be added may be someone else's of the same name.
          if (/Command failed -:2\b/.test(commandError(e))) w.pairs.push({ iface: iface.name, tap });
          throw e;
        });
        w.pairs.push({ iface: iface.name, tap });
        await run(redirectCommand(netns, iface.name, tap));
      } catch (e) {
        if (e instanceof KataError) throw e;
        throw new KataError('KATA_ERR_NETWORK', `interface ${iface.name} of network namespace ${netns}: cannot make and wire its tap ${tap}: ${commandError(e)}`, { value: iface.name, plugin: PLUGIN_NAME, cause: e });
      }
      ctx.network.devices.push({ kind: 'net', id: `net${i}`, tap, mac: iface.mac, mtu: iface.mtu });
      ctx.network.interfaces.push({ name: iface.name, mac: iface.mac, mtu: iface.mtu, addresses: iface.addresses });
    }
    ctx.network.routes.push(...pod.routes);
  } catch (e) {
    ctx.network.devices.length = 0;
    ctx.network.interfaces.length = 0;
    const left = await unwire(w, run);
    if (left.length > 0) ctx.log.warn({ plugin: PLUGIN_NAME, failures: left }, 'could not remove everything made for the network');
    throw e;
  }
  ctx.network.timings.host = performance.now() - t0;
  ctx.log.info({ plugin: PLUGIN_NAME, netns, interfaces: pod.interfaces.map((i) => i.name), routes: pod.routes.length, ms: Math.round(ctx.network.timings.host) }, 'pod network wired to the VM');
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

    hooks.vmStopped.tapPromise(PLUGIN_NAME, async (ctx) => {
      const w = wired.get(ctx);
      wired.delete(ctx);
      if (!w) return;
      const left = await unwire(w);
      if (left.length > 0) ctx.log.warn({ plugin: PLUGIN_NAME, failures: left }, 'could not remove everything made for the network');
    });
  },
});
