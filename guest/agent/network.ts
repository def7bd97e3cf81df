/**
 * The guest's network, as kata-agent's UpdateInterface, UpdateRoutes, ListInterfaces, ListRoutes
 * and AddARPNeighbors set and report it. Node has no netlink: busybox `ip` does the work, one
 * argument vector per change, with every name, address and prefix checked first (a value that
 * starts with `-` would be read as an option; nothing here passes through a shell). Neighbours
 * need iproute2's `ip` (busybox's `ip neigh` only shows and flushes; its `arp -s` is IPv4 only),
 * which the image ships at /agent/bin/ip.
 *
 * An interface is found by its MAC address (the host gave the virtio-net device the pod
 * interface's MAC) and takes the pod interface's name, MTU and addresses.
 */
import { readFile, readdir } from 'node:fs/promises';
import { isIP } from 'node:net';
import { spawn } from 'node:child_process';
import { IPFamily, type ARPNeighbor, type IPAddress, type Interface, type Route } from '../../wire/agent/proto.gen.js';
import type { MessageInit } from '../../wire/ttrpc/codec.js';
import { deadlineExceeded, internal, invalidArgument, notFound } from './errors.js';
import { HELPER_ENV, busyboxOk, sleep } from './sys.js';

const IFNAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$/;
const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
/** How long UpdateInterface waits for the device with the MAC to appear (its driver probing). */
const LINK_WAIT_MS = 5_000;
const LINK_POLL_MS = 100;

/** Runs `busybox ip args`, answering its stdout. */
export type IpRunner = (args: readonly string[]) => Promise<string>;

const runIp: IpRunner = async (args) => (await busyboxOk('ip', args)).stdout;

/** iproute2's ip in the guest image (guest/image/agent-payload.ts GUEST_IPROUTE2). */
export const IPROUTE2 = '/agent/bin/ip';
/** At most this many neighbours per AddARPNeighbors: the work a request can cause is bounded. */
export const MAX_NEIGHBORS = 1024;
/** How long one `ip -batch` of neighbours may take. */
const NEIGH_TIMEOUT_MS = 30_000;

/** Runs iproute2's `ip -batch -` with `input` (one command per line); rejects with its stderr. */
export type IpBatchRunner = (input: string) => Promise<void>;

const runIproute2Batch: IpBatchRunner = (input) =>
  new Promise((resolve, reject) => {
    const child = spawn(IPROUTE2, ['-batch', '-'], { stdio: ['pipe', 'ignore', 'pipe'], env: HELPER_ENV, cwd: '/', timeout: NEIGH_TIMEOUT_MS });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
    child.once('error', reject);
    child.once('close', (code, signal) => {
      if (code === 0) resolve();
      else reject(new Error(stderr.trim().replace(/\s+/g, ' ') || (signal ? `killed by ${signal}` : `exit ${code}`)));
    });
  });

/** rtnetlink neighbour states (NUD_*) a request may ask for, as iproute2's `nud` words; 0 means permanent (kata-agent's default). */
const NUD_STATES: ReadonlyMap<number, string> = new Map([
  [0, 'permanent'],
  [0x80, 'permanent'],
  [0x40, 'noarp'],
  [0x02, 'reachable'],
  [0x04, 'stale'],
]);
/** NTF_ROUTER: the neighbour is an IPv6 router. No other neighbour flag is accepted. */
const NTF_ROUTER = 0x80;

/**
 * The `ip neigh replace` words of one neighbour, every value checked against a closed set of
 * characters (no blank, quote, `#` or backslash can reach the batch line, so a line is exactly
 * one command): the IP of the stated family (no zone, not unspecified), a MAC, an interface name,
 * a known state, no flag but NTF_ROUTER.
 */
export function neighborArgs(n: MessageInit<ARPNeighbor>): string[] {
  const to = n.toIPAddress;
  if (!to) throw invalidArgument('ARP neighbour without toIPAddress');
  const family = familyOf(to.family ?? 0);
  const addr = to.address ?? '';
  if (!/^[0-9A-Fa-f.:]{2,45}$/.test(addr) || isIP(addr) !== (family === 'v4' ? 4 : 6)) throw invalidArgument(`ARP neighbour address ${JSON.stringify(addr)} is not an IP${family} address`);
  if (addr === '0.0.0.0' || /^[0:]+$/.test(addr)) throw invalidArgument(`ARP neighbour address ${addr} is unspecified`);
  const device = checkIfname(n.device ?? '', 'ARP neighbour device');
  const lladdr = (n.lladdr ?? '').toLowerCase();
  if (!MAC.test(lladdr)) throw invalidArgument(`ARP neighbour ${addr}: lladdr ${JSON.stringify(n.lladdr ?? '')} is not a MAC address`);
  const state = n.state ?? 0;
  const nud = NUD_STATES.get(state);
  if (nud === undefined) throw invalidArgument(`ARP neighbour ${addr}: state ${state} is not one of ${[...NUD_STATES.keys()].join(', ')} (NUD_PERMANENT, NOARP, REACHABLE, STALE)`);
  const flags = n.flags ?? 0;
  if (flags !== 0 && flags !== NTF_ROUTER) throw invalidArgument(`ARP neighbour ${addr}: flags ${flags} are not 0 or ${NTF_ROUTER} (NTF_ROUTER)`);
  return ['neigh', 'replace', addr, 'lladdr', lladdr, 'dev', device, 'nud', nud, ...(flags === NTF_ROUTER ? ['router'] : [])];
}

export function checkIfname(name: string, what: string): string {
  if (!IFNAME.test(name)) throw invalidArgument(`${what} ${JSON.stringify(name)} is not an interface name (1 to 15 letters, digits, "_", "." or "-", not starting with "-" or ".")`);
  return name;
}

function familyOf(f: number): 'v4' | 'v6' {
  if (f === IPFamily.v4) return 'v4';
  if (f === IPFamily.v6) return 'v6';
  throw invalidArgument(`IP family ${f} is neither v4 (0) nor v6 (1)`);
}

/** `address/mask` for `ip addr add`, after checking both against the family. */
export function addressArg(a: IPAddress): string {
  const family = familyOf(a.family);
  if (isIP(a.address) !== (family === 'v4' ? 4 : 6)) throw invalidArgument(`${JSON.stringify(a.address)} is not an IP${family} address`);
  const max = family === 'v4' ? 32 : 128;
  if (!/^\d{1,3}$/.test(a.mask) || Number(a.mask) > max) throw invalidArgument(`prefix length ${JSON.stringify(a.mask)} of ${a.address} is not 0..${max}`);
  return `${a.address}/${Number(a.mask)}`;
}

function checkPrefix(dest: string, family: 'v4' | 'v6'): string {
  const [addr, len, ...rest] = dest.split('/');
  const max = family === 'v4' ? 32 : 128;
  const ok = rest.length === 0 && addr !== undefined && isIP(addr) === (family === 'v4' ? 4 : 6) && (len === undefined || (/^\d{1,3}$/.test(len) && Number(len) <= max));
  if (!ok) throw invalidArgument(`route destination ${JSON.stringify(dest)} is not an IP${family} prefix`);
  return dest;
}

/** The `ip route replace` argument vector of one route. */
export function routeArgs(r: MessageInit<Route>): string[] {
  const family = familyOf(r.family ?? 0);
  const dest = r.dest ? checkPrefix(r.dest, family) : 'default';
  const args = [...(family === 'v6' ? ['-6'] : []), 'route', 'replace', dest];
  if (r.gateway) {
    if (isIP(r.gateway) !== (family === 'v4' ? 4 : 6)) throw invalidArgument(`route gateway ${JSON.stringify(r.gateway)} is not an IP${family} address`);
    args.push('via', r.gateway);
  }
  if (!r.device) throw invalidArgument(`route to ${dest} names no device`);
  args.push('dev', checkIfname(r.device, 'route device'));
  if (r.source) {
    if (isIP(r.source) === 0) throw invalidArgument(`route source ${JSON.stringify(r.source)} is not an IP address`);
    args.push('src', r.source);
  }
  if (r.scope === 253) args.push('scope', 'link');
  else if (r.scope === 254) args.push('scope', 'host');
  return args;
}

/** `ip -o addr show` lines: `2: eth0    inet 192.0.2.2/24 scope global eth0\ ...`. */
export function parseAddrLines(text: string): Map<string, IPAddress[]> {
  const out = new Map<string, IPAddress[]>();
  for (const line of text.split('\n')) {
    const m = /^\d+:\s+(\S+)\s+(inet6?)\s+([0-9A-Fa-f.:]+)\/(\d+)/.exec(line);
    if (!m) continue;
    const [, dev, fam, address, mask] = m as unknown as [string, string, string, string, string];
    const list = out.get(dev) ?? [];
    list.push({ family: fam === 'inet6' ? IPFamily.v6 : IPFamily.v4, address, mask });
    out.set(dev, list);
  }
  return out;
}

/** `ip route show` lines: `default via 192.0.2.1 dev eth0`, `192.0.2.0/24 dev eth0 scope link  src 192.0.2.2`. */
export function parseRouteLines(text: string, family: 'v4' | 'v6'): Route[] {
  const out: Route[] = [];
  for (const line of text.split('\n')) {
    const words = line.trim().split(/\s+/);
    if (words.length < 3 || words[0] === 'multicast' || words[0] === 'unreachable' || words[0] === 'local') continue;
    const at = (k: string) => {
      const i = words.indexOf(k);
      return i >= 0 ? (words[i + 1] ?? '') : '';
    };
    const scope = at('scope');
    out.push({
      dest: words[0] === 'default' ? '' : (words[0] ?? ''),
      gateway: at('via'),
      device: at('dev'),
      source: at('src'),
      scope: scope === 'link' ? 253 : scope === 'host' ? 254 : 0,
      family: family === 'v6' ? IPFamily.v6 : IPFamily.v4,
      flags: 0,
    });
  }
  return out;
}

export class GuestNetwork {
  #renamed = 0;

  constructor(
    private readonly ip: IpRunner = runIp,
    private readonly sysNet = '/sys/class/net',
    private readonly ipBatch: IpBatchRunner = runIproute2Batch,
  ) {}

  /** `lo` up: every sandbox has loopback, with or without a pod network. */
  async loopbackUp(): Promise<void> {
    await this.ip(['link', 'set', 'dev', 'lo', 'up']).catch((e: Error) => {
      throw internal(`cannot bring lo up: ${e.message}`, e);
    });
  }

  /** The guest's links: name → MAC (lower case). */
  async links(): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    for (const name of await readdir(this.sysNet).catch(() => [] as string[])) {
      const mac = await readFile(`${this.sysNet}/${name}/address`, 'utf8').catch(() => '');
      out.set(name, mac.trim().toLowerCase());
    }
    return out;
  }

  async #linkWithMac(mac: string, signal?: AbortSignal): Promise<string> {
    for (let waited = 0; ; waited += LINK_POLL_MS) {
      for (const [name, m] of await this.links()) if (m === mac) return name;
      if (waited >= LINK_WAIT_MS) throw deadlineExceeded(`no network device with MAC ${mac} appeared within ${LINK_WAIT_MS} ms (is virtio_net loaded?)`);
      await sleep(LINK_POLL_MS, signal);
    }
  }

  /** Gives the link with `iface.hwAddr` the name, MTU and addresses of `iface`, and brings it up. */
  async updateInterface(iface: Interface, signal?: AbortSignal): Promise<Interface> {
    const name = checkIfname(iface.name, 'interface name');
    const mac = iface.hwAddr.toLowerCase();
    if (!MAC.test(mac)) throw invalidArgument(`interface ${name}: hwAddr ${JSON.stringify(iface.hwAddr)} is not a MAC address`);
    const mtu = Number(iface.mtu);
    if (mtu !== 0 && (mtu < 68 || mtu > 65535)) throw invalidArgument(`interface ${name}: MTU ${mtu} is not 68..65535`);
    const addresses = iface.IPAddresses.map(addressArg);
    const current = await this.#linkWithMac(mac, signal);
    const step = async (args: string[]) =>
      this.ip(args).catch((e: Error) => {
        throw internal(`interface ${name}: ${e.message}`, e);
      });
    await step(['link', 'set', 'dev', current, 'down']);
    if (current !== name) {
      // The name may be held by another device of the pod (the guest names them eth0, eth1, … in
      // probe order, not in the pod's order): that one moves aside, and takes its own name when
      // its UpdateInterface comes.
      const holder = (await this.links()).get(name);
      if (holder !== undefined && holder !== mac) {
        await step(['link', 'set', 'dev', name, 'down']);
        await step(['link', 'set', 'dev', name, 'name', `kata_tmp${++this.#renamed}`]);
      }
      await step(['link', 'set', 'dev', current, 'name', name]);
    }
    if (mtu !== 0) await step(['link', 'set', 'dev', name, 'mtu', String(mtu)]);
    await step(['addr', 'flush', 'dev', name]);
    for (const a of addresses) await step(['addr', 'add', a, 'dev', name]);
    await step(['link', 'set', 'dev', name, 'up']);
    return iface;
  }

  /**
   * Replaces the IPv4 routes of the devices named in `routes` (flushed first, as kata-agent
   * replaces all routes) and adds or replaces each route, those without a gateway first. Answers
   * the routes the guest then has.
   */
  async updateRoutes(routes: readonly Route[]): Promise<Route[]> {
    const argvs = routes.map(routeArgs);
    const ordered = [...argvs.filter((a) => !a.includes('via')), ...argvs.filter((a) => a.includes('via'))];
    const devices = new Set(routes.filter((r) => r.family === IPFamily.v4).map((r) => r.device));
    for (const d of devices) await this.ip(['route', 'flush', 'dev', d]).catch(() => undefined);
    for (const args of ordered) {
      await this.ip(args).catch((e: Error) => {
        throw internal(`cannot add route (${args.join(' ')}): ${e.message}`, e);
      });
    }
    return this.listRoutes();
  }

  /**
   * kata-agent's AddARPNeighbors: each neighbour (the pod namespace's permanent ones, as Kata
   * sends them) is added or replaced on its device. All are checked before any is applied; the
   * devices must exist. One `ip -batch` run for all.
   */
  async addArpNeighbors(neighbors: readonly ARPNeighbor[]): Promise<void> {
    if (neighbors.length > MAX_NEIGHBORS) throw invalidArgument(`${neighbors.length} ARP neighbours: at most ${MAX_NEIGHBORS} per request`);
    const lines = neighbors.map(neighborArgs);
    if (lines.length === 0) return;
    const links = await this.links();
    for (const l of lines) {
      const device = l[l.indexOf('dev') + 1] as string;
      if (!links.has(device)) throw notFound(`ARP neighbour ${l[2]}: no interface ${device} in the guest`);
    }
    await this.ipBatch(lines.map((l) => l.join(' ')).join('\n') + '\n').catch((e: Error) => {
      throw internal(`cannot add ARP neighbours: ${e.message}`, e);
    });
  }

  async listInterfaces(): Promise<Interface[]> {
    const addrs = parseAddrLines(await this.ip(['-o', 'addr', 'show']));
    const out: Interface[] = [];
    for (const [name, mac] of await this.links()) {
      const mtu = Number((await readFile(`${this.sysNet}/${name}/mtu`, 'utf8').catch(() => '0')).trim());
      out.push({ device: name, name, IPAddresses: addrs.get(name) ?? [], mtu: BigInt(Number.isFinite(mtu) ? mtu : 0), hwAddr: mac, devicePath: '', type: '', rawFlags: 0 });
    }
    return out;
  }

  async listRoutes(): Promise<Route[]> {
    const v4 = parseRouteLines(await this.ip(['route', 'show']), 'v4');
    const v6 = parseRouteLines(await this.ip(['-6', 'route', 'show']).catch(() => ''), 'v6');
    return [...v4, ...v6];
  }
}
