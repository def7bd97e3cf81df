/**
 * A Cloud Hypervisor API simulator: cloud-hypervisor cannot be installed on this project's
 * machines, so the clh driver is tested against this instead. It enforces the published contract,
 * not Cloud Hypervisor's internals:
 *
 * - HTTP/1.1 on the `--api-socket` unix socket, base path /api/v1, GET for vmm.ping and vm.info,
 *   PUT for the rest; a wrong method is 400, an unknown route 404.
 * - Every request body is validated against the OpenAPI spec (../shared/reference/cloud-hypervisor.yaml,
 *   or the pinned subset test/fixtures/clh-api-subset.json when ../shared is absent), with unknown
 *   fields refused so that a misspelt field fails here instead of being ignored.
 * - VM states as Cloud Hypervisor has them (not created → Created → Running → Shutdown), and
 *   out-of-order calls answered with its status codes: 404 while no VM is created, 409 for a
 *   duplicate device id, 400 for an invalid config, 500 for other refusals (boot twice, create
 *   twice …). Error bodies are a JSON array of strings (v47 and later) or plain text (before),
 *   chosen with CLH_SIM_ERROR_FORMAT.
 * - Some of Cloud Hypervisor's config validation: fs needs shared memory, TDX needs firmware and
 *   a fixed vCPU count, and `platform.tdx` is refused by a build without the `tdx` feature.
 *
 * The VM behind it is real (CLH_SIM_GUEST=qemu, the default): vm.boot starts QEMU (`pc` machine,
 * whose root bus takes ACPI hot-plug like Cloud Hypervisor's) with the payload's kernel, initramfs
 * and command line; vm.add-disk hot-plugs a virtio-blk device into a free slot of the root bus
 * through QMP and answers its real `bdf`; vm.remove-device unplugs it. The hybrid vsock socket
 * (VmConfig.vsock.socket) answers `CONNECT 1024\n` with `OK <port>\n` and forwards the stream to
 * the guest agent's virtio-serial port: this project's guest agent listens there, not on vsock
 * (the hosts have no vhost-vsock). With CLH_SIM_GUEST=none, vm.boot runs no guest and every
 * CONNECT is refused as if nothing listened in the guest.
 *
 * Error messages are the simulator's own wording; only their format and status codes follow
 * Cloud Hypervisor.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { appendFileSync, existsSync, readFileSync, statSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { chooseAccelerator, detectHost } from '../../core/host.js';
import { QmpClient } from '../../plugins/qemu/qmp.js';
import { CLH_API_SUBSET, CLH_OPENAPI, compileComponent, referenceFile, type OpenApiValidator } from './openapi.js';

export const SIM_VERSION = '53.0.0';

/** The guest agent's port behind the hybrid vsock. */
const AGENT_PORT = 1024;
/** Host-side ports Cloud Hypervisor allocates for host-initiated connections start at 2^30. */
const LOCAL_PORT_BASE = 2 ** 30;
/** Longest CONNECT line Cloud Hypervisor reads. */
const MAX_CONNECT_LINE = 32;
/** The root-bus slots hot-plugged disks may take (boot devices take the ones below). */
const FIRST_HOTPLUG_SLOT = 6;
const LAST_SLOT = 0x1f;

export interface SimulatorOptions {
  readonly apiSocket: string;
  /** `vmm.ping` features. */
  readonly features: readonly string[];
  readonly errorFormat: 'json' | 'text';
  /** Append one JSON line per request here: {method, endpoint, body, status, reply}. */
  readonly requestLog?: string;
  readonly guest: 'qemu' | 'none';
  readonly qemuBinary: string;
  /** Where the simulator's own files (QMP and agent sockets) go. */
  readonly workDir: string;
  readonly log: (line: string) => void;
  /** Guest console output (a `Tty` serial port or console). */
  readonly console: (chunk: Buffer) => void;
}

type VmState = 'Created' | 'Running' | 'Shutdown';

/** A refusal: the status and Cloud Hypervisor-style error chain, top first. */
class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly chain: readonly string[],
  ) {
    super(chain.join(': '));
  }
}

interface Validators {
  readonly VmConfig: OpenApiValidator;
  readonly DiskConfig: OpenApiValidator;
  readonly VmRemoveDevice: OpenApiValidator;
  readonly VmResize: OpenApiValidator;
  readonly source: string;
}

export async function loadValidators(): Promise<Validators> {
  const file = referenceFile(CLH_OPENAPI) ?? CLH_API_SUBSET;
  const [VmConfig, DiskConfig, VmRemoveDevice, VmResize] = await Promise.all(['VmConfig', 'DiskConfig', 'VmRemoveDevice', 'VmResize'].map((c) => compileComponent(file, c, { closed: true })));
  return { VmConfig: VmConfig!, DiskConfig: DiskConfig!, VmRemoveDevice: VmRemoveDevice!, VmResize: VmResize!, source: file };
}

type Json = Record<string, unknown>;

interface Disk {
  readonly config: Json;
  readonly slot: number;
  /** The QEMU device and node id: unique per plug, since a removed id may be reused before the guest lets go. */
  readonly qemuId: string;
}

export class ClhSimulator {
  readonly #opts: SimulatorOptions;
  readonly #validators: Validators;
  readonly #server: http.Server;
  #state: VmState | undefined;
  #config: Json | undefined;
  readonly #disks = new Map<string, Disk>();
  /** Slots still held by a removed device until the guest ejects it. */
  readonly #ejecting = new Set<number>();
  #guest: QemuGuest | undefined;
  #vsock: net.Server | undefined;
  #vsockPath: string | undefined;
  #nextLocalPort = LOCAL_PORT_BASE;
  #plugCount = 0;
  readonly #connections = new Set<net.Socket>();
  #shuttingDown = false;
  /** Serialises requests, as Cloud Hypervisor's single API thread does. */
  #queue: Promise<unknown> = Promise.resolve();
  onVmmShutdown: () => void = () => undefined;

  private constructor(opts: SimulatorOptions, validators: Validators) {
    this.#opts = opts;
    this.#validators = validators;
    this.#server = http.createServer((req, res) => this.#onRequest(req, res));
  }

  static async listen(opts: SimulatorOptions): Promise<ClhSimulator> {
    const sim = new ClhSimulator(opts, await loadValidators());
    // Like Cloud Hypervisor: a stale socket file is removed before binding.
    await rm(opts.apiSocket, { force: true });
    await new Promise<void>((resolve, reject) => {
      sim.#server.once('error', reject);
      sim.#server.listen(opts.apiSocket, () => resolve());
    });
    opts.log(`API on ${opts.apiSocket}; request bodies checked against ${path.basename(sim.#validators.source)}`);
    return sim;
  }

  /** Stops the guest, closes every socket and removes the files. */
  async close(): Promise<void> {
    if (this.#shuttingDown) return;
    this.#shuttingDown = true;
    await this.#stopVm();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    this.#server.closeAllConnections();
    await rm(this.#opts.apiSocket, { force: true });
  }

  // -------------------------------------------------------------------------------------------
  // HTTP

  #onRequest(req: http.IncomingMessage, res: http.ServerResponse): void {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const run = this.#queue.then(() => this.#handle(req, Buffer.concat(chunks).toString('utf8')));
      this.#queue = run.catch(() => undefined);
      void run.then(
        ({ status, body, logged }) => {
          this.#record(req, logged, status, body);
          if (body === undefined) res.writeHead(status).end();
          else res.writeHead(status, { 'Content-Type': 'application/json' }).end(JSON.stringify(body));
        },
        (e: unknown) => {
          const err = e instanceof ApiError ? e : new ApiError(500, ['Internal simulator error', e instanceof Error ? e.message : String(e)]);
          this.#record(req, undefined, err.status, err.chain);
          if (this.#opts.errorFormat === 'json') res.writeHead(err.status, { 'Content-Type': 'application/json' }).end(JSON.stringify(err.chain));
          else res.writeHead(err.status, { 'Content-Type': 'text/plain' }).end(err.chain.join(': '));
        },
      );
    });
  }

  #record(req: http.IncomingMessage, body: unknown, status: number, reply: unknown): void {
    if (!this.#opts.requestLog) return;
    const endpoint = (req.url ?? '').replace(/^\/api\/v1\//, '');
    appendFileSync(this.#opts.requestLog, `${JSON.stringify({ method: req.method, endpoint, body, status, reply })}\n`);
  }

  async #handle(req: http.IncomingMessage, text: string): Promise<{ status: number; body?: unknown; logged?: unknown }> {
    const url = req.url ?? '';
    const m = /^\/api\/v1\/([a-z.-]+)$/.exec(url);
    const route = m ? ROUTES[m[1] as string] : undefined;
    if (!route) throw new ApiError(404, [`Unknown route ${url}`]);
    if (req.method !== route.method) throw new ApiError(400, [`${m![1]} takes ${route.method}, not ${req.method}`]);
    let body: unknown;
    if (route.schema) {
      try {
        body = JSON.parse(text);
      } catch (e) {
        throw new ApiError(400, ['Error parsing JSON', (e as Error).message]);
      }
      const validate = this.#validators[route.schema];
      if (!validate(body)) throw new ApiError(400, [`Invalid ${route.schema}`, ...validate.messages()]);
    }
    const reply = await this.#dispatch(m![1] as string, body as Json);
    return { ...reply, logged: body };
  }

  async #dispatch(endpoint: string, body: Json): Promise<{ status: number; body?: unknown }> {
    switch (endpoint) {
      case 'vmm.ping':
        return { status: 200, body: { version: SIM_VERSION, build_version: `v${SIM_VERSION}-simulator`, pid: process.pid, features: this.#opts.features } };
      case 'vm.create':
        return this.#create(body);
      case 'vm.boot':
        return this.#boot();
      case 'vm.info':
        return this.#info();
      case 'vm.add-disk':
        return this.#addDisk(body);
      case 'vm.remove-device':
        return this.#removeDevice(String(body.id));
      case 'vm.resize':
        return this.#resize(body);
      case 'vm.shutdown':
        this.#needVm();
        if (this.#state !== 'Running') throw new ApiError(500, ['Error shutting down VM', `Invalid VM state transition: ${this.#state} to Shutdown`]);
        await this.#stopVm();
        this.#state = 'Shutdown';
        return { status: 204 };
      case 'vm.delete':
        await this.#stopVm();
        this.#state = undefined;
        this.#config = undefined;
        this.#disks.clear();
        return { status: 204 };
      case 'vmm.shutdown':
        await this.#stopVm();
        setImmediate(() => this.onVmmShutdown());
        return { status: 204 };
      default:
        throw new ApiError(404, [`Unknown route ${endpoint}`]);
    }
  }

  #needVm(): Json {
    if (!this.#state || !this.#config) throw new ApiError(404, ['VM is not created']);
    return this.#config;
  }

  #create(config: Json): { status: number } {
    if (this.#state) throw new ApiError(500, ['Error creating VM', 'VM is already created']);
    const platform = (config.platform ?? {}) as Json;
    const payload = (config.payload ?? {}) as Json;
    const cpus = config.cpus as { boot_vcpus: number; max_vcpus: number } | undefined;
    const memory = (config.memory ?? {}) as Json;
    if (platform.tdx === true) {
      if (!this.#opts.features.includes('tdx')) throw new ApiError(400, ['Invalid VmConfig', 'platform.tdx needs a cloud-hypervisor built with the "tdx" feature']);
      if (!payload.firmware) throw new ApiError(400, ['Invalid VmConfig', 'TDX firmware missing (TdxFirmwareMissing)']);
      if (cpus && cpus.max_vcpus !== cpus.boot_vcpus) throw new ApiError(400, ['Invalid VmConfig', 'TDX guests cannot hot-plug vCPUs: max_vcpus must equal boot_vcpus (TdxNoCpuHotplug)']);
    }
    if (Array.isArray(config.fs) && config.fs.length > 0 && memory.shared !== true && memory.hugepages !== true) {
      throw new ApiError(400, ['Invalid VmConfig', 'Using vhost-user requires using shared memory or huge pages (VhostUserRequiresSharedMemory)']);
    }
    if (!payload.kernel && !payload.firmware) throw new ApiError(400, ['Invalid VmConfig', 'The payload needs a kernel or firmware']);
    const ids = new Set<string>();
    for (const d of (config.disks ?? []) as Json[]) {
      if (typeof d.id === 'string' && ids.has(d.id)) throw new ApiError(409, ['Invalid VmConfig', `Identifier ${d.id} is not unique`]);
      if (typeof d.id === 'string') ids.add(d.id);
    }
    this.#config = structuredClone(config);
    this.#state = 'Created';
    return { status: 204 };
  }

  async #boot(): Promise<{ status: number }> {
    const config = this.#needVm();
    if (this.#state === 'Running') throw new ApiError(500, ['Error booting VM', 'VM is already booted']);
    if ((config.platform as Json | undefined)?.tdx === true && !tdxHost()) {
      throw new ApiError(500, ['Error booting VM', 'Error creating TDX VM', 'this host has no Intel TDX (kvm_intel tdx is not enabled)']);
    }
    const payload = config.payload as Json;
    for (const f of ['kernel', 'initramfs', 'firmware'] as const) {
      if (typeof payload[f] === 'string' && !existsSync(payload[f])) throw new ApiError(500, ['Error booting VM', `Cannot open ${f} ${payload[f]}`, 'No such file or directory (os error 2)']);
    }
    for (const fs of (config.fs ?? []) as Json[]) {
      // The vhost-user-fs device connects to its backend (virtiofsd) when the VM is built.
      if (!(await canConnect(String(fs.socket)))) throw new ApiError(500, ['Error booting VM', `Cannot create virtio-fs device ${String(fs.tag)}`, `Failed to connect to vhost-user backend at ${String(fs.socket)}`]);
    }
    if (this.#opts.guest === 'qemu') {
      this.#guest = await QemuGuest.start(config, this.#opts);
    }
    const vsock = config.vsock as { socket: string } | undefined;
    if (vsock) await this.#listenVsock(vsock.socket);
    this.#state = 'Running';
    return { status: 204 };
  }

  /**
   * vm.resize as Cloud Hypervisor checks it: vCPUs within max_vcpus, RAM within size +
   * hotplug_size; the VM config then shows the new boot_vcpus and hotplugged_size. The QEMU guest
   * behind the simulator does not get the vCPUs or memory (no hot-plug is simulated).
   */
  #resize(body: Json): { status: number } {
    const config = this.#needVm();
    const cpus = config.cpus as { boot_vcpus: number; max_vcpus: number };
    const memory = config.memory as { size: number; hotplug_size?: number; hotplugged_size?: number };
    if (typeof body.desired_vcpus === 'number' && body.desired_vcpus > cpus.max_vcpus) {
      throw new ApiError(500, ['Error resizing VM', `Error resizing vCPUs: desired vCPUs ${body.desired_vcpus} above max_vcpus ${cpus.max_vcpus}`]);
    }
    if (typeof body.desired_ram === 'number') {
      if (body.desired_ram > memory.size + (memory.hotplug_size ?? 0)) throw new ApiError(500, ['Error resizing VM', 'Error resizing RAM: not enough hot-pluggable memory (hotplug_size)']);
      if (body.desired_ram < memory.size + (memory.hotplugged_size ?? 0)) throw new ApiError(500, ['Error resizing VM', 'Error resizing RAM: ACPI memory hot-plug cannot remove memory']);
    }
    if (typeof body.desired_vcpus === 'number') cpus.boot_vcpus = body.desired_vcpus;
    if (typeof body.desired_ram === 'number') memory.hotplugged_size = body.desired_ram - memory.size;
    return { status: 204 };
  }

  #info(): { status: number; body: unknown } {
    const config = this.#needVm();
    const tree: Record<string, unknown> = {};
    for (const [id, d] of this.#disks) tree[id] = { id, resources: [], children: [], pci_bdf: bdf(d.slot) };
    return { status: 200, body: { config, state: this.#state, device_tree: tree } };
  }

  async #addDisk(disk: Json): Promise<{ status: number; body?: unknown }> {
    const config = this.#needVm();
    const id = typeof disk.id === 'string' ? disk.id : `_disk${this.#plugCount}`;
    const known = new Set([...((config.disks ?? []) as Json[]).map((d) => d.id), ...this.#disks.keys()]);
    if (known.has(id)) throw new ApiError(409, ['Error adding disk', `Identifier ${id} is not unique`]);
    if (typeof disk.path !== 'string') throw new ApiError(400, ['Error adding disk', 'A disk needs a path (or a vhost-user socket)']);
    try {
      const st = statSync(disk.path);
      if (!st.isFile() && !st.isBlockDevice()) throw new Error('not a file or block device');
    } catch (e) {
      throw new ApiError(500, ['Error adding disk', `Failed to open disk image ${disk.path}`, (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'No such file or directory (os error 2)' : (e as Error).message]);
    }
    const entry = { ...disk, id };
    if (this.#state !== 'Running') {
      // Cold-add: the disk is part of the config the next boot uses.
      config.disks = [...((config.disks ?? []) as Json[]), entry];
      return { status: 204 };
    }
    const used = new Set([...[...this.#disks.values()].map((d) => d.slot), ...this.#ejecting]);
    let slot = FIRST_HOTPLUG_SLOT;
    while (used.has(slot) && slot <= LAST_SLOT) slot++;
    if (slot > LAST_SLOT) throw new ApiError(500, ['Error adding disk', 'No PCI slot available on segment 0']);
    const qemuId = `d${++this.#plugCount}-${slot}`;
    if (this.#guest) {
      try {
        await this.#guest.plug(qemuId, disk.path, disk.readonly === true, slot);
      } catch (e) {
        throw new ApiError(500, ['Error adding disk', 'Failed to hot-plug the device', e instanceof Error ? e.message : String(e)]);
      }
    }
    this.#disks.set(id, { config: entry, slot, qemuId });
    return { status: 200, body: { id, bdf: bdf(slot) } };
  }

  async #removeDevice(id: string): Promise<{ status: number }> {
    const config = this.#needVm();
    const disk = this.#disks.get(id);
    const cold = ((config.disks ?? []) as Json[]).findIndex((d) => d.id === id);
    if (!disk && cold < 0) throw new ApiError(404, ['Error removing device', `Unknown device id ${id}`]);
    if (disk) {
      this.#disks.delete(id);
      if (this.#guest) {
        // The 204 means "requested": the slot is free once the guest has ejected the device.
        this.#ejecting.add(disk.slot);
        void this.#guest.unplug(disk.qemuId).finally(() => this.#ejecting.delete(disk.slot));
      }
    } else {
      (config.disks as Json[]).splice(cold, 1);
    }
    return { status: 204 };
  }

  // -------------------------------------------------------------------------------------------
  // Hybrid vsock

  async #listenVsock(socketPath: string): Promise<void> {
    await rm(socketPath, { force: true });
    const server = net.createServer((conn) => this.#onVsockConnection(conn));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
    this.#vsock = server;
    this.#vsockPath = socketPath;
  }

  #onVsockConnection(conn: net.Socket): void {
    this.#connections.add(conn);
    conn.once('close', () => this.#connections.delete(conn));
    conn.on('error', () => undefined);
    let line = Buffer.alloc(0);
    const onData = (chunk: Buffer): void => {
      line = Buffer.concat([line, chunk]);
      const nl = line.indexOf(0x0a);
      if (nl < 0) {
        if (line.length >= MAX_CONNECT_LINE) conn.destroy();
        return;
      }
      conn.off('data', onData);
      conn.pause();
      const rest = line.subarray(nl + 1);
      const m = /^connect\s+(\d+)\s*$/i.exec(line.subarray(0, nl).toString('latin1'));
      if (!m || nl >= MAX_CONNECT_LINE) {
        conn.destroy();
        return;
      }
      void this.#forward(conn, Number(m[1]), rest);
    };
    conn.on('data', onData);
  }

  /** Connects to the guest port; without a listener the host side just sees the connection end. */
  async #forward(conn: net.Socket, port: number, rest: Buffer): Promise<void> {
    const target = port === AGENT_PORT ? this.#guest?.agentSocket : undefined;
    const peer = target ? await connect(target) : undefined;
    if (!peer || conn.destroyed) {
      peer?.destroy();
      conn.end();
      return;
    }
    this.#connections.add(peer);
    peer.once('close', () => this.#connections.delete(peer));
    conn.write(`OK ${this.#nextLocalPort++}\n`);
    if (rest.length) peer.write(rest);
    peer.on('error', () => conn.destroy());
    conn.on('error', () => peer.destroy());
    peer.once('close', () => conn.destroy());
    conn.once('close', () => peer.destroy());
    conn.pipe(peer);
    peer.pipe(conn);
    conn.resume();
  }

  async #stopVm(): Promise<void> {
    const guest = this.#guest;
    this.#guest = undefined;
    this.#ejecting.clear();
    for (const c of this.#connections) c.destroy();
    if (this.#vsock) {
      const server = this.#vsock;
      this.#vsock = undefined;
      await new Promise<void>((resolve) => server.close(() => resolve()));
      if (this.#vsockPath) await rm(this.#vsockPath, { force: true });
    }
    await guest?.stop();
  }
}

const ROUTES: Record<string, { method: 'GET' | 'PUT'; schema?: 'VmConfig' | 'DiskConfig' | 'VmRemoveDevice' | 'VmResize' }> = {
  'vmm.ping': { method: 'GET' },
  'vmm.shutdown': { method: 'PUT' },
  'vm.create': { method: 'PUT', schema: 'VmConfig' },
  'vm.boot': { method: 'PUT' },
  'vm.info': { method: 'GET' },
  'vm.add-disk': { method: 'PUT', schema: 'DiskConfig' },
  'vm.remove-device': { method: 'PUT', schema: 'VmRemoveDevice' },
  'vm.resize': { method: 'PUT', schema: 'VmResize' },
  'vm.shutdown': { method: 'PUT' },
  'vm.delete': { method: 'PUT' },
};

function bdf(slot: number): string {
  return `0000:00:${slot.toString(16).padStart(2, '0')}.0`;
}

function tdxHost(): boolean {
  try {
    return /^[Y1]/.test(readFileSync('/sys/module/kvm_intel/parameters/tdx', 'utf8'));
  } catch {
    return false;
  }
}

function connect(socketPath: string): Promise<net.Socket | undefined> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    s.once('error', () => resolve(undefined));
    s.once('connect', () => resolve(s));
  });
}

async function canConnect(socketPath: string): Promise<boolean> {
  const s = await connect(socketPath);
  s?.destroy();
  return s !== undefined;
}

// ---------------------------------------------------------------------------------------------
// The real VM behind the simulator.

class QemuGuest {
  readonly agentSocket: string;
  readonly #child: ChildProcess;
  readonly #qmp: QmpClient;
  readonly #files: string[];
  readonly #exited: Promise<void>;

  private constructor(child: ChildProcess, qmp: QmpClient, agentSocket: string, files: string[], exited: Promise<void>) {
    this.#child = child;
    this.#qmp = qmp;
    this.agentSocket = agentSocket;
    this.#files = files;
    this.#exited = exited;
  }

  static async start(config: Json, opts: SimulatorOptions): Promise<QemuGuest> {
    const payload = config.payload as { kernel?: string; initramfs?: string; cmdline?: string };
    if (!payload.kernel) throw new ApiError(500, ['Error booting VM', 'the simulator boots a kernel payload only (no firmware boot)']);
    const memory = config.memory as { size: number } | undefined;
    const cpus = config.cpus as { boot_vcpus: number } | undefined;
    const qmpSocket = path.join(opts.workDir, 'clh-sim-qmp.sock');
    const agentSocket = path.join(opts.workDir, 'clh-sim-agent.sock');
    const { accelerator } = chooseAccelerator(detectHost(), 'auto');
    const serialTty = (config.serial as Json | undefined)?.mode === 'Tty' || (config.console as Json | undefined)?.mode === 'Tty';
    const args = [
      '--pdeathsig', 'KILL', '--', opts.qemuBinary,
      '-name', 'clh-simulator-guest', '-machine', `pc,accel=${accelerator}`, '-nodefaults', '-no-user-config', '-display', 'none',
      '-m', String(Math.max(64, Math.floor((memory?.size ?? 512 * 2 ** 20) / 2 ** 20))), '-smp', String(cpus?.boot_vcpus ?? 1),
      '-kernel', payload.kernel, ...(payload.initramfs ? ['-initrd', payload.initramfs] : []), '-append', payload.cmdline ?? '',
      '-chardev', `socket,id=qmp,path=${qmpSocket},server=on,wait=off`, '-mon', 'chardev=qmp,mode=control',
      '-device', 'virtio-serial-pci,id=vser,bus=pci.0,addr=0x3',
      '-chardev', `socket,id=agent,path=${agentSocket},server=on,wait=off`, '-device', 'virtserialport,chardev=agent,name=agent.channel.0',
      ...(serialTty ? ['-serial', 'stdio'] : []),
    ];
    let slot = 4;
    for (const d of (config.disks ?? []) as Json[]) {
      const id = `boot${slot}`;
      args.push('-blockdev', `driver=raw,node-name=${id},read-only=${d.readonly === true ? 'on' : 'off'},file.driver=file,file.filename=${String(d.path)}`);
      args.push('-device', `virtio-blk-pci,drive=${id},bus=pci.0,addr=0x${(slot++).toString(16)}`);
      if (slot >= FIRST_HOTPLUG_SLOT) break;
    }
    opts.log(`booting the guest: qemu ${args.slice(3).join(' ')}`);
    // setpriv: QEMU dies with the simulator, as a guest dies with its VMM, even on SIGKILL.
    const child = spawn('setpriv', args, { cwd: opts.workDir, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stdout?.on('data', (c: Buffer) => opts.console(c));
    child.stderr?.on('data', (c: Buffer) => {
      stderr += c.toString();
      opts.log(`qemu: ${c.toString().trimEnd()}`);
    });
    const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
    const files = [qmpSocket, agentSocket];
    const until = Date.now() + 10_000;
    let sock: net.Socket | undefined;
    while (!(sock = await connect(qmpSocket))) {
      if (child.exitCode !== null || child.signalCode !== null || Date.now() > until) {
        child.kill('SIGKILL');
        throw new ApiError(500, ['Error booting VM', `the simulator's QEMU did not start: ${stderr.trim() || 'no output'}`]);
      }
      await delay(20);
    }
    const qmp = await QmpClient.handshake(sock, { commandTimeoutMs: 10_000 }, qmpSocket);
    return new QemuGuest(child, qmp, agentSocket, files, exited);
  }

  async plug(id: string, file: string, readOnly: boolean, slot: number): Promise<void> {
    const driver = statSync(file).isBlockDevice() ? 'host_device' : 'file';
    await this.#qmp.execute('blockdev-add', { driver: 'raw', 'node-name': id, 'read-only': readOnly, file: { driver, filename: file, 'read-only': readOnly } });
    try {
      await this.#qmp.execute('device_add', { driver: 'virtio-blk-pci', id, drive: id, bus: 'pci.0', addr: `0x${slot.toString(16)}` });
    } catch (e) {
      await this.#qmp.execute('blockdev-del', { 'node-name': id }).catch(() => undefined);
      throw e;
    }
  }

  /** device_del, then the guest's DEVICE_DELETED, then blockdev-del. */
  async unplug(id: string): Promise<void> {
    const since = this.#qmp.eventCursor;
    try {
      await this.#qmp.execute('device_del', { id });
      await this.#qmp.waitForEvent('DEVICE_DELETED', (e) => e.data.device === id, 30_000, { since });
      await this.#qmp.execute('blockdev-del', { 'node-name': id });
    } catch {
      // The guest did not let go, or QEMU went away: the slot is freed with the VM.
    }
  }

  async stop(): Promise<void> {
    await this.#qmp.execute('quit', undefined, { timeoutMs: 2_000 }).catch(() => undefined);
    this.#qmp.close();
    const killer = setTimeout(() => this.#child.kill('SIGKILL'), 3_000);
    await this.#exited;
    clearTimeout(killer);
    await Promise.all(this.#files.map((f) => rm(f, { force: true })));
  }
}
