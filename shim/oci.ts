/**
 * What the shim reads from OCI runtime specs: the bundle's config.json at Create, and the process
 * spec of an Exec (JSON inside a protobuf Any). Only the fields the runtime acts on are read; a
 * field it cannot honour (a terminal) is refused with a coded error rather than ignored.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { KataError } from '../core/errors.js';
import type { ContainerResources, MountSpec, ProcessSpec } from '../core/sandbox.js';
import { demandFromOciLinux, type ResourceDemand } from '../core/resources.js';

/** CRI's annotations: which pod a container belongs to, and whether it is the pod's sandbox. */
export const CONTAINER_TYPE_ANNOTATION = 'io.kubernetes.cri.container-type';
export const SANDBOX_ID_ANNOTATION = 'io.kubernetes.cri.sandbox-id';

export interface BundleSpec {
  readonly process: ProcessSpec;
  readonly terminal: boolean;
  readonly hostname: string | undefined;
  /** The rootfs directory, absolute (config.json's root.path is relative to the bundle). */
  readonly rootPath: string;
  readonly annotations: Readonly<Record<string, string>>;
  /** The pod this container joins (CRI), or its own id when it starts one. */
  readonly sandboxId: string;
  /** True for a container that joins an existing sandbox rather than creating one. */
  readonly joinsSandbox: boolean;
  /** The spec's mounts; bind mounts of host paths are volumes the sandbox shares with the guest. */
  readonly mounts: readonly MountSpec[];
  /**
   * The network namespace to join (`linux.namespaces` entry of type `network` with a path, as
   * `ctr run --with-ns network:<path>` and CRI set it); undefined for none or a new one.
   */
  readonly netns: string | undefined;
  /** `linux.resources` for the guest agent (undefined: none set). */
  readonly resources: ContainerResources | undefined;
  /** The CPU and memory limits of `linux.resources`, which size the VM (hot-plug). */
  readonly demand: ResourceDemand;
}

type Json = Record<string, unknown>;

function specError(where: string, message: string): KataError {
  return new KataError('KATA_ERR_OCI_SPEC', `${where}: ${message}`);
}

function obj(v: unknown): Json | undefined {
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Json) : undefined;
}

function strings(v: unknown, where: string, field: string): string[] | undefined {
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) throw specError(where, `${field} must be an array of strings`);
  return v as string[];
}

function uint(v: unknown, where: string, field: string): number | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 0xffffffff) throw specError(where, `${field} must be a 32-bit unsigned integer`);
  return v;
}

/** An OCI `process` object → what the sandbox runs. */
export function parseProcess(raw: unknown, where: string): { process: ProcessSpec; terminal: boolean } {
  const p = obj(raw);
  if (!p) throw specError(where, 'process is missing or not an object');
  const args = strings(p.args, where, 'process.args');
  if (!args || args.length === 0) throw specError(where, 'process.args is empty: there is nothing to run');
  const env = strings(p.env, where, 'process.env');
  if (p.cwd !== undefined && (typeof p.cwd !== 'string' || !p.cwd.startsWith('/'))) throw specError(where, 'process.cwd must be an absolute path');
  const user = obj(p.user) ?? {};
  const uid = uint(user.uid, where, 'process.user.uid');
  const gid = uint(user.gid, where, 'process.user.gid');
  const terminal = p.terminal === true;
  const box = obj(p.consoleSize);
  const rows = uint(box?.height, where, 'process.consoleSize.height') ?? 0;
  const cols = uint(box?.width, where, 'process.consoleSize.width') ?? 0;
  return {
    process: {
      args,
      ...(env ? { env } : {}),
      ...(p.cwd ? { cwd: p.cwd as string } : {}),
      ...(uid !== undefined ? { uid } : {}),
      ...(gid !== undefined ? { gid } : {}),
      ...(terminal ? { terminal: { rows: Math.min(rows, 0xffff), cols: Math.min(cols, 0xffff) } } : {}),
    },
    terminal,
  };
}

/** Reads and checks `<bundle>/config.json`. */
export async function readBundleSpec(bundle: string, containerId: string): Promise<BundleSpec> {
  const file = path.join(bundle, 'config.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw specError(file, `cannot read: ${(e as Error).message}`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw specError(file, `not valid JSON: ${(e as Error).message}`);
  }
  const spec = obj(parsed);
  if (!spec) throw specError(file, 'the spec is not a JSON object');
  const { process, terminal } = parseProcess(spec.process, file);
  const root = obj(spec.root);
  const rootPath = typeof root?.path === 'string' && root.path !== '' ? path.resolve(bundle, root.path) : path.join(bundle, 'rootfs');
  const annotations: Record<string, string> = {};
  for (const [k, v] of Object.entries(obj(spec.annotations) ?? {})) if (typeof v === 'string') annotations[k] = v;
  const type = annotations[CONTAINER_TYPE_ANNOTATION];
  const joinsSandbox = type === 'container' && !!annotations[SANDBOX_ID_ANNOTATION];
  return {
    process,
    terminal,
    netns: networkNamespace(spec.linux, file),
    resources: parseResources(obj(spec.linux)?.resources, file),
    demand: demandFromOciLinux(spec.linux),
    mounts: parseMounts(spec.mounts, file),
    hostname: typeof spec.hostname === 'string' && spec.hostname !== '' ? spec.hostname : undefined,
    rootPath,
    annotations,
    sandboxId: joinsSandbox ? annotations[SANDBOX_ID_ANNOTATION]! : containerId,
    joinsSandbox,
  };
}

/** The path of the `network` entry of `linux.namespaces`; it must be absolute. */
export function networkNamespace(raw: unknown, where: string): string | undefined {
  const namespaces = obj(raw)?.namespaces;
  if (namespaces === undefined || namespaces === null) return undefined;
  if (!Array.isArray(namespaces)) throw specError(where, 'linux.namespaces must be an array');
  const net = namespaces.map(obj).find((n) => n?.type === 'network');
  if (!net || net.path === undefined || net.path === '') return undefined;
  if (typeof net.path !== 'string' || !path.isAbsolute(net.path) || net.path.includes('\0')) throw specError(where, 'the network namespace path (linux.namespaces) must be an absolute path');
  return path.normalize(net.path);
}

function parseMounts(raw: unknown, where: string): MountSpec[] {
  if (raw === undefined || raw === null) return [];
  if (!Array.isArray(raw)) throw specError(where, 'mounts must be an array');
  return raw.map((m: unknown, i) => {
    const mount = obj(m);
    const field = `mounts[${i}]`;
    if (!mount) throw specError(where, `${field} is not an object`);
    if (typeof mount.destination !== 'string' || !mount.destination.startsWith('/')) throw specError(where, `${field}.destination must be an absolute path`);
    const options = strings(mount.options, where, `${field}.options`) ?? [];
    const type = typeof mount.type === 'string' ? mount.type : '';
    const source = typeof mount.source === 'string' ? mount.source : '';
    const isBind = type === 'bind' || options.includes('bind') || options.includes('rbind');
    if (isBind && !source.startsWith('/')) throw specError(where, `${field}.source must be an absolute host path for a bind mount`);
    return { destination: mount.destination, type, source, options };
  });
}

/** The process of an Exec: JSON of an OCI `process` in the request's Any. */
export function parseExecSpec(value: Uint8Array | undefined, execId: string): { process: ProcessSpec; terminal: boolean } {
  const where = `exec ${execId}`;
  if (!value || value.length === 0) throw specError(where, 'the request carries no process spec');
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(value).toString('utf8'));
  } catch (e) {
    throw specError(where, `the process spec is not valid JSON: ${(e as Error).message}`);
  }
  return parseProcess(parsed, where);
}

const INT64_MIN = -(1n << 63n);
const INT64_MAX = (1n << 63n) - 1n;

/** An integer JSON field as a bigint within [min, max]; undefined when absent (null too). */
function int(v: unknown, where: string, field: string, min: bigint, max: bigint): bigint | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v)) throw specError(where, `${field} must be an integer`);
  // JSON numbers above 2^53 arrive rounded: clamp to the protobuf field's range rather than wrap.
  const b = BigInt(v);
  if (b < min) throw specError(where, `${field} ${v} is below ${min}`);
  return b > max ? max : b;
}

function str(v: unknown, where: string, field: string): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') throw specError(where, `${field} must be a string`);
  return v;
}

/**
 * The runtime spec's `linux.resources` (JSON) → kata's LinuxResources for the guest agent: memory
 * (limit, reservation, swap), cpu (shares, quota, period, cpus, mems), pids (limit). Absent fields
 * are 0, which the agent reads as "not set". Values are checked for type and range here; the agent
 * checks them against cgroup v2 again. Devices, block I/O, hugepages and network are not passed
 * (the guest agent applies none of them).
 */
export function parseResources(raw: unknown, where: string): ContainerResources | undefined {
  if (raw === undefined || raw === null) return undefined;
  const r = obj(raw);
  if (!r) throw specError(where, 'linux.resources must be an object');
  const out: { Memory?: ContainerResources['Memory']; CPU?: ContainerResources['CPU']; Pids?: ContainerResources['Pids'] } = {};
  const mem = obj(r.memory);
  if (mem) {
    const f = (k: string) => int(mem[k], where, `linux.resources.memory.${k}`, -1n, INT64_MAX);
    out.Memory = { Limit: f('limit') ?? 0n, Reservation: f('reservation') ?? 0n, Swap: f('swap') ?? 0n };
  }
  const cpu = obj(r.cpu);
  if (cpu) {
    out.CPU = {
      Shares: int(cpu.shares, where, 'linux.resources.cpu.shares', 0n, (1n << 64n) - 1n) ?? 0n,
      Quota: int(cpu.quota, where, 'linux.resources.cpu.quota', INT64_MIN, INT64_MAX) ?? 0n,
      Period: int(cpu.period, where, 'linux.resources.cpu.period', 0n, (1n << 64n) - 1n) ?? 0n,
      Cpus: str(cpu.cpus, where, 'linux.resources.cpu.cpus') ?? '',
      Mems: str(cpu.mems, where, 'linux.resources.cpu.mems') ?? '',
    };
  }
  const pids = obj(r.pids);
  if (pids) out.Pids = { Limit: int(pids.limit, where, 'linux.resources.pids.limit', INT64_MIN, INT64_MAX) ?? 0n };
  return out.Memory || out.CPU || out.Pids ? out : undefined;
}

/**
 * An UpdateTaskRequest's resources: runtime-spec LinuxResources as JSON in a typeurl Any
 * (`types.containerd.io/opencontainers/runtime-spec/1/LinuxResources`, what containerd's
 * WithResources and CRI's UpdateContainerResources send).
 */
export function parseUpdateResources(any: { type_url: string; value: Uint8Array } | undefined, id: string): ContainerResources {
  return parseUpdate(any, id).resources;
}

/** containerd's Update: the limits for the guest agent and what they ask of the VM (hot-plug). */
export function parseUpdate(any: { type_url: string; value: Uint8Array } | undefined, id: string): { resources: ContainerResources; demand: ResourceDemand } {
  const where = `update of ${id}`;
  if (!any || any.value.length === 0) throw specError(where, 'the request carries no resources');
  if (!any.type_url.endsWith('/LinuxResources')) throw specError(where, `resources of type ${JSON.stringify(any.type_url)} are not runtime-spec LinuxResources`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(any.value).toString('utf8'));
  } catch (e) {
    throw specError(where, `the resources are not valid JSON: ${(e as Error).message}`);
  }
  return { resources: parseResources(parsed, where) ?? {}, demand: demandFromOciLinux({ resources: parsed }) };
}
