/**
 * A client for Cloud Hypervisor's REST API: HTTP/1.1 over the unix socket given with
 * `--api-socket path=…`, base path `/api/v1`, node:http doing the HTTP.
 *
 * Every action is a PUT except `vmm.ping` and `vm.info` (GET). Success is 204 without a body, or
 * 200 with JSON. An error's body is a JSON array of strings (the error chain, top first) in
 * Cloud Hypervisor v47 and later, plain text before; both are turned into one message.
 *
 * Each call has its own timeout: Kata gives every call 1 s, and 20 s for a confidential guest,
 * whose memory is accepted and measured while vm.create and vm.boot run.
 */
import http from 'node:http';
import { KataError } from '../../core/plugin-api.js';
import type { ClhDiskConfig, ClhVmConfig } from './vm-config.js';

export const API_ROOT = '/api/v1';

export type ClhEndpoint =
  | 'vmm.ping'
  | 'vmm.shutdown'
  | 'vm.create'
  | 'vm.boot'
  | 'vm.info'
  | 'vm.add-disk'
  | 'vm.remove-device'
  | 'vm.resize'
  | 'vm.shutdown'
  | 'vm.delete';

/** `VmmPingResponse`. `features` lists what the binary was built with (`kvm`, `tdx`, …). */
export interface VmmPing {
  readonly version: string;
  readonly build_version?: string;
  readonly pid?: number;
  readonly features?: readonly string[];
}

/** `PciDeviceInfo`: what a hot-plug answers. `bdf` is `segment:bus:device.function`, e.g. `0000:00:06.0`. */
export interface PciDeviceInfo {
  readonly id: string;
  readonly bdf: string;
}

/** `VmInfo`, the fields the runtime reads. */
export interface VmInfo {
  readonly config: ClhVmConfig;
  readonly state: 'Created' | 'Running' | 'Shutdown' | 'Paused' | 'BreakPoint';
  readonly memory_actual_size?: number;
  readonly device_tree?: Record<string, { id?: string; pci_bdf?: string }>;
}

export interface ClhApiOptions {
  readonly socketPath: string;
  /** Default per-call timeout. */
  readonly timeoutMs: number;
  /** Names the plugin in errors. */
  readonly plugin?: string;
}

export interface CallOptions {
  readonly timeoutMs?: number;
}

/** A reply: the HTTP status and the parsed JSON body (undefined for 204). */
export interface ClhReply<T> {
  readonly status: number;
  readonly body: T | undefined;
}

/** Details of a KATA_ERR_CLH_API error, for callers that react to the status. */
export interface ClhApiFailure {
  readonly endpoint: ClhEndpoint;
  /** The HTTP status, or undefined when no answer came (connection refused or closed). */
  readonly status: number | undefined;
  /** Cloud Hypervisor's own words: the error chain joined with ": ", or the plain-text body. */
  readonly vmmMessage: string;
}

const GET_ENDPOINTS: ReadonlySet<ClhEndpoint> = new Set(['vmm.ping', 'vm.info']);

/** Cloud Hypervisor's error body, either format, as one line. */
export function errorBodyMessage(body: string): string {
  const text = body.trim();
  if (text.startsWith('[')) {
    try {
      const chain: unknown = JSON.parse(text);
      if (Array.isArray(chain) && chain.every((m) => typeof m === 'string')) return chain.map((m) => m.trim()).filter(Boolean).join(': ');
    } catch {
      // Not JSON after all: plain text that starts with a bracket.
    }
  }
  return text;
}

/** The failure details of an error raised by this client, if it is one. */
export function clhApiFailure(e: unknown): ClhApiFailure | undefined {
  return e instanceof KataError && e.code === 'KATA_ERR_CLH_API' ? (e as KataError & { clh?: ClhApiFailure }).clh : undefined;
}

export class ClhApiClient {
  readonly #opts: ClhApiOptions;

  constructor(opts: ClhApiOptions) {
    this.#opts = opts;
  }

  get socketPath(): string {
    return this.#opts.socketPath;
  }

  ping(opts?: CallOptions): Promise<VmmPing> {
    return this.#json<VmmPing>('vmm.ping', undefined, opts);
  }

  async createVm(config: ClhVmConfig, opts?: CallOptions): Promise<void> {
    await this.call('vm.create', config, opts);
  }

  async bootVm(opts?: CallOptions): Promise<void> {
    await this.call('vm.boot', undefined, opts);
  }

  info(opts?: CallOptions): Promise<VmInfo> {
    return this.#json<VmInfo>('vm.info', undefined, opts);
  }

  /**
   * Hot-plugs a disk. A running VM answers 200 with `{id, bdf}`; a VM that is created but not
   * booted answers 204 (the disk is cold-added), which is returned as undefined.
   */
  async addDisk(disk: ClhDiskConfig, opts?: CallOptions): Promise<PciDeviceInfo | undefined> {
    return (await this.call<PciDeviceInfo>('vm.add-disk', disk, opts)).body;
  }

  /** `VmResize`: the vCPU count and guest RAM (bytes) the VM should have; 204 when accepted. */
  async resize(body: { desired_vcpus?: number; desired_ram?: number }, opts?: CallOptions): Promise<void> {
    await this.call('vm.resize', body, opts);
  }

  /** Asks for a device's removal; the 204 means the request was accepted (removal is ACPI-based). */
  async removeDevice(id: string, opts?: CallOptions): Promise<void> {
    await this.call('vm.remove-device', { id }, opts);
  }

  async shutdownVm(opts?: CallOptions): Promise<void> {
    await this.call('vm.shutdown', undefined, opts);
  }

  async deleteVm(opts?: CallOptions): Promise<void> {
    await this.call('vm.delete', undefined, opts);
  }

  async shutdownVmm(opts?: CallOptions): Promise<void> {
    await this.call('vmm.shutdown', undefined, opts);
  }

  /** One request. Resolves for 2xx; rejects with KATA_ERR_CLH_API (error status, broken connection) or KATA_ERR_CLH_API_TIMEOUT. */
  call<T = unknown>(endpoint: ClhEndpoint, body?: unknown, opts: CallOptions = {}): Promise<ClhReply<T>> {
    const timeoutMs = opts.timeoutMs ?? this.#opts.timeoutMs;
    const method = GET_ENDPOINTS.has(endpoint) ? 'GET' : 'PUT';
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      let settled = false;
      const settle = (err: KataError | undefined, reply?: ClhReply<T>): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(reply as ClhReply<T>);
      };
      const req = http.request({
        socketPath: this.#opts.socketPath,
        path: `${API_ROOT}/${endpoint}`,
        method,
        // One connection per call: no pooled socket outlives the VMM.
        agent: false,
        headers: {
          Host: 'localhost',
          Accept: 'application/json',
          ...(payload ? { 'Content-Type': 'application/json', 'Content-Length': payload.length } : {}),
        },
      });
      const timer = setTimeout(() => {
        settle(new KataError('KATA_ERR_CLH_API_TIMEOUT', `Cloud Hypervisor did not answer ${method} ${endpoint} within ${timeoutMs} ms (API socket ${this.#opts.socketPath})`, { plugin: this.#opts.plugin }));
        req.destroy();
      }, timeoutMs);
      req.once('error', (err: NodeJS.ErrnoException) => {
        const why = err.code === 'ENOENT' ? 'the API socket does not exist' : err.code === 'ECONNREFUSED' ? 'nothing listens on the API socket' : err.message;
        settle(this.#failure(endpoint, undefined, `${why} (${this.#opts.socketPath})`, err));
      });
      req.once('response', (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.once('error', (err) => settle(this.#failure(endpoint, res.statusCode, `the reply broke off: ${err.message}`, err)));
        res.once('end', () => {
          const status = res.statusCode ?? 0;
          const text = Buffer.concat(chunks).toString('utf8');
          if (status < 200 || status > 299) {
            settle(this.#failure(endpoint, status, errorBodyMessage(text) || res.statusMessage || 'no message'));
            return;
          }
          if (status === 204 || text.trim() === '') {
            settle(undefined, { status, body: undefined });
            return;
          }
          try {
            settle(undefined, { status, body: JSON.parse(text) as T });
          } catch (e) {
            settle(this.#failure(endpoint, status, `the reply is not JSON: ${JSON.stringify(text.slice(0, 200))}`, e));
          }
        });
      });
      req.end(payload);
    });
  }

  async #json<T>(endpoint: ClhEndpoint, body: unknown, opts?: CallOptions): Promise<T> {
    const reply = await this.call<T>(endpoint, body, opts);
    if (reply.body === undefined) throw this.#failure(endpoint, reply.status, 'the reply has no body');
    return reply.body;
  }

  #failure(endpoint: ClhEndpoint, status: number | undefined, vmmMessage: string, cause?: unknown): KataError {
    const where = status === undefined ? '' : ` (HTTP ${status})`;
    const err = new KataError('KATA_ERR_CLH_API', `Cloud Hypervisor ${endpoint} failed${where}: ${vmmMessage}`, { plugin: this.#opts.plugin, cause });
    Object.defineProperty(err, 'clh', { value: Object.freeze({ endpoint, status, vmmMessage } satisfies ClhApiFailure), enumerable: false });
    return err;
  }
}
