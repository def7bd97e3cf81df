/**
 * Reading a pod's network namespace: what `ip -json` (iproute2) says about its links, addresses
 * and routes, turned into the interfaces to mirror and the routes the guest gets. Pure: the
 * caller runs `ip` (argv only) and hands over its output.
 */
import { isIP } from 'node:net';
import type { GuestInterface, GuestIpAddress, GuestNeighbor, GuestRoute } from '../../core/plugin-api.js';

/** An interface of the pod's namespace to mirror into the VM. */
export interface PodInterface extends GuestInterface {
  /** The link kind iproute2 reports (`veth`, `macvlan`, …; '' for a device without one). */
  readonly kind: string;
}

export interface PodNetwork {
  readonly interfaces: PodInterface[];
  readonly routes: GuestRoute[];
  readonly neighbors: GuestNeighbor[];
}

/** Link kinds never mirrored: taps (ours, or another runtime's) are the VM side, not the pod's. */
const SKIPPED_KINDS = new Set(['tun', 'tap']);
const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
/** Linux interface names: 1 to 15 bytes, no '/', ':' or whitespace; never read as an option. */
export const IFNAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$/;

interface IpAddrInfo {
  family?: string;
  local?: string;
  prefixlen?: number;
  scope?: string;
}

interface IpLink {
  ifname?: string;
  mtu?: number;
  link_type?: string;
  address?: string;
  linkinfo?: { info_kind?: string };
  addr_info?: IpAddrInfo[];
}

interface IpRoute {
  table?: string;
  dst?: string;
  gateway?: string;
  dev?: string;
  prefsrc?: string;
  scope?: string;
  type?: string;
}

function parseJsonArray(text: string, what: string): unknown[] {
  const v: unknown = JSON.parse(text.trim() === '' ? '[]' : text);
  if (!Array.isArray(v)) throw new Error(`${what}: expected a JSON array from ip -json`);
  return v;
}

/**
 * The interfaces to mirror, from `ip -d -json addr show`: Ethernet links other than loopback and
 * taps, with their MAC, MTU and addresses (IPv4, and IPv6 of global scope: the guest makes its own
 * link-local ones). A link whose name or MAC is malformed is refused: these names reach `ip` and
 * `tc` argument vectors.
 */
export function parseInterfaces(addrJson: string): PodInterface[] {
  const out: PodInterface[] = [];
  for (const raw of parseJsonArray(addrJson, 'ip addr') as IpLink[]) {
    if (raw.link_type !== 'ether') continue;
    const kind = raw.linkinfo?.info_kind ?? '';
    if (SKIPPED_KINDS.has(kind)) continue;
    const name = raw.ifname ?? '';
    if (!IFNAME.test(name)) throw new Error(`interface name ${JSON.stringify(name)} is not a Linux interface name`);
    const mac = (raw.address ?? '').toLowerCase();
    if (!MAC.test(mac)) throw new Error(`interface ${name}: MAC address ${JSON.stringify(raw.address)} is malformed`);
    const mtu = Number(raw.mtu ?? 1500);
    const addresses: GuestIpAddress[] = [];
    for (const a of raw.addr_info ?? []) {
      const family = a.family === 'inet' ? 'v4' : a.family === 'inet6' ? 'v6' : undefined;
      if (!family || typeof a.local !== 'string' || typeof a.prefixlen !== 'number') continue;
      if (isIP(a.local) !== (family === 'v4' ? 4 : 6)) continue;
      if (family === 'v6' && a.scope !== 'global') continue;
      addresses.push({ family, address: a.local, prefixLength: a.prefixlen });
    }
    out.push({ name, mac, mtu, addresses, kind });
  }
  return out;
}

const SCOPES: Readonly<Record<string, number>> = Object.freeze({ global: 0, universe: 0, site: 200, link: 253, host: 254 });

/**
 * The routes of `family` through mirrored interfaces, from `ip -json route show` (or `ip -6`):
 * unicast routes only, IPv6 link-local and multicast prefixes left to the guest's kernel.
 * Routes through devices not in `devices` (the taps, anything skipped) are dropped.
 */
export function parseRoutes(routeJson: string, family: 'v4' | 'v6', devices: ReadonlySet<string>): GuestRoute[] {
  const out: GuestRoute[] = [];
  for (const r of parseJsonArray(routeJson, 'ip route') as IpRoute[]) {
    if (r.type !== undefined && r.type !== 'unicast') continue;
    // `table all` lists every table; only the main table's routes are the pod's (as `ip route show`).
    if (r.table !== undefined && r.table !== 'main') continue;
    if (!r.dev || !devices.has(r.dev)) continue;
    const dest = r.dst === undefined || r.dst === 'default' ? '' : r.dst;
    if (dest !== '' && !validPrefix(dest, family)) continue;
    if (family === 'v6' && (dest.startsWith('fe80:') || dest.startsWith('ff00:'))) continue;
    const gateway = r.gateway ?? '';
    if (gateway !== '' && isIP(gateway) !== (family === 'v4' ? 4 : 6)) continue;
    const source = r.prefsrc ?? '';
    if (source !== '' && isIP(source) === 0) continue;
    out.push({ family, dest, gateway, device: r.dev, source, scope: SCOPES[r.scope ?? 'global'] ?? 0 });
  }
  // Routes without a gateway first: a gateway must be reachable when its route is added.
  return [...out.filter((r) => r.gateway === ''), ...out.filter((r) => r.gateway !== '')];
}

/** `a.b.c.d` or `a.b.c.d/n` (or the IPv6 forms) with a prefix length in range. */
export function validPrefix(value: string, family: 'v4' | 'v6'): boolean {
  const [addr, len, ...rest] = value.split('/');
  if (rest.length > 0 || addr === undefined) return false;
  if (isIP(addr) !== (family === 'v4' ? 4 : 6)) return false;
  if (len === undefined) return true;
  if (!/^\d{1,3}$/.test(len)) return false;
  return Number(len) <= (family === 'v4' ? 32 : 128);
}

interface IpNeigh {
  dst?: string;
  dev?: string;
  lladdr?: string;
  state?: string[];
  router?: unknown;
}

/**
 * The permanent neighbours on mirrored interfaces, from `ip -json neigh show nud permanent`: what
 * Kata passes to the agent's AddARPNeighbors (`NUD_PERMANENT` entries with a link-layer address).
 * An entry whose address or MAC is malformed is left out.
 */
export function parseNeighbors(neighJson: string, devices: ReadonlySet<string>): GuestNeighbor[] {
  const out: GuestNeighbor[] = [];
  for (const n of parseJsonArray(neighJson, 'ip neigh') as IpNeigh[]) {
    if (!n.dev || !devices.has(n.dev) || !Array.isArray(n.state) || !n.state.includes('PERMANENT')) continue;
    const address = n.dst ?? '';
    const v = isIP(address);
    const mac = (n.lladdr ?? '').toLowerCase();
    if (v === 0 || address.includes('%') || !MAC.test(mac)) continue;
    out.push({ family: v === 4 ? 'v4' : 'v6', address, device: n.dev, mac, router: n.router !== undefined });
  }
  return out;
}

/**
 * The lines of the namespace scan, one `ip -d -json -batch -` run (one process instead of one per
 * question): the links with their addresses, the IPv4 and the IPv6 routes of every table (`root`
 * picks the family; {@link parseRoutes} keeps the main table's), the permanent neighbours.
 */
export const SCAN_LINES = ['addr show', 'route show table all root 0.0.0.0/0', 'route show table all root ::/0', 'neigh show nud permanent'] as const;

/** Splits the scan's output into the answers of {@link SCAN_LINES}: one JSON array per line (ip -json escapes newlines in strings). */
export function splitScan(text: string): string[] {
  const parts = text.split('\n').filter((l) => l.trim() !== '');
  if (parts.length !== SCAN_LINES.length) throw new Error(`expected ${SCAN_LINES.length} JSON answers from ip -batch, got ${parts.length}`);
  return parts;
}

/** The whole scan: interfaces to mirror, their routes and their permanent neighbours. */
export function parseScan(text: string): PodNetwork {
  const [addrs = '', r4 = '', r6 = '', neigh = ''] = splitScan(text);
  const interfaces = parseInterfaces(addrs);
  const devices = new Set(interfaces.map((i) => i.name));
  return { interfaces, routes: [...parseRoutes(r4, 'v4', devices), ...parseRoutes(r6, 'v6', devices)], neighbors: parseNeighbors(neigh, devices) };
}
