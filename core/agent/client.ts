/**
 * The runtime's client of kata-agent (or of our guest agent, which speaks the same API): typed
 * calls of `grpc.AgentService` and `grpc.Health` over one ttrpc connection, with Kata's per-call
 * timeouts, and every failure as an {@link AgentError}.
 */
import type { Duplex } from 'node:stream';
import { GrpcCode, grpcCodeName } from '../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../wire/ttrpc/errors.js';
import { TtrpcClient, type CallOptions, type ServiceClient } from '../../wire/ttrpc/client.js';
import type { MessageInit } from '../../wire/ttrpc/codec.js';
import { AgentError } from './errors.js';
import {
  AgentService,
  Health,
  HealthCheckResponse_ServingStatus,
  type CloseStdinRequest,
  type CreateContainerRequest,
  type CreateSandboxRequest,
  type ExecProcessRequest,
  type GuestDetailsRequest,
  type ARPNeighbor,
  type ReseedRandomDevRequest,
  type SetGuestDateTimeRequest,
  type Interface,
  type Interfaces,
  type Route,
  type Routes,
  type GuestDetailsResponse,
  type HealthCheckResponse,
  type ReadStreamRequest,
  type RemoveContainerRequest,
  type SignalProcessRequest,
  type StartContainerRequest,
  type StatsContainerResponse,
  type TtyWinResizeRequest,
  type UpdateContainerRequest,
  type VersionCheckResponse,
  type WaitProcessRequest,
  type WriteStreamRequest,
} from '../../wire/agent/proto.gen.js';
import { dialAgent, formatAgentAddress, parseAgentAddress, type AgentAddress, type DialOptions } from './transports.js';

/** Kata's defaults (runtime `kata_agent.go`): 60 s for most calls, 30 s for Check. */
export const AGENT_TIMEOUTS = Object.freeze({
  defaultMs: 60_000,
  checkMs: 30_000,
  createContainerMs: 60_000,
});

export interface AgentCallOptions {
  /** Overrides the method's default deadline; 0 waits without limit. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface AgentClientOptions {
  /** Deadline of calls that have no method-specific one. Default {@link AGENT_TIMEOUTS}.defaultMs. */
  defaultTimeoutMs?: number;
  /** Where the connection goes, for error messages. */
  address?: string;
  onProtocolError?: (err: TtrpcError) => void;
}

export interface ConnectAgentOptions extends DialOptions, AgentClientOptions {}

/**
 * Connects to the agent and waits until it answers Health.Check with SERVING, all within
 * `deadlineMs`. Over virtio-serial the connection opens before the guest does, and the Check
 * waits in the port until the agent reads it; over hybrid vsock the handshake itself waits.
 */
export async function connectAgent(address: AgentAddress | string, opts: ConnectAgentOptions = {}): Promise<AgentClient> {
  const addr = typeof address === 'string' ? parseAgentAddress(address) : address;
  const where = formatAgentAddress(addr);
  const deadlineMs = opts.deadlineMs ?? 30_000;
  const start = Date.now();
  const stream = await dialAgent(addr, { ...opts, deadlineMs });
  const client = new AgentClient(stream, { ...opts, address: where });
  const left = Math.max(1, deadlineMs - (Date.now() - start));
  try {
    const res = await client.check({ timeoutMs: left, signal: opts.signal });
    if (res.status !== HealthCheckResponse_ServingStatus.SERVING) {
      throw new AgentError('unreachable', `the agent at ${where} is up but reports status ${res.status} (not SERVING)`, { address: where, method: 'Check' });
    }
  } catch (e) {
    client.close();
    if (e instanceof AgentError && e.kind === 'call' && e.grpcCode === GrpcCode.DEADLINE_EXCEEDED) {
      throw new AgentError('unreachable', `the agent at ${where} did not answer Health.Check within ${deadlineMs} ms of dialling`, {
        address: where,
        method: 'Check',
        cause: e,
        fix: 'Check that the VM booted and its agent started (the guest console log shows both); on a slow host (TCG) allow a longer dial timeout.',
      });
    }
    throw e;
  }
  return client;
}

export class AgentClient {
  private readonly ttrpc: TtrpcClient;
  private readonly agent: ServiceClient<typeof AgentService>;
  private readonly health: ServiceClient<typeof Health>;
  private readonly defaultTimeoutMs: number;
  private readonly address: string | undefined;

  constructor(stream: Duplex, opts: AgentClientOptions = {}) {
    this.ttrpc = new TtrpcClient(stream, { onProtocolError: opts.onProtocolError });
    this.agent = this.ttrpc.service(AgentService);
    this.health = this.ttrpc.service(Health);
    this.defaultTimeoutMs = opts.defaultTimeoutMs ?? AGENT_TIMEOUTS.defaultMs;
    this.address = opts.address;
  }

  /** Settles once the connection has closed (agent or VM gone, or {@link close}); never rejects. */
  get closed(): Promise<AgentError> {
    return this.ttrpc.closed.then(
      (reason) =>
        new AgentError('closed', `the connection to ${this.address ? `the agent at ${this.address}` : 'the agent'} closed (${reason.statusMessage})`, {
          grpcCode: reason.code,
          address: this.address,
          cause: reason,
        }),
    );
  }

  get isClosed(): boolean {
    return this.ttrpc.isClosed;
  }

  close(): void {
    this.ttrpc.close();
  }

  check(opts: AgentCallOptions & { service?: string } = {}): Promise<HealthCheckResponse> {
    return this.run('Check', AGENT_TIMEOUTS.checkMs, opts, (o) => this.health.Check({ service: opts.service ?? '' }, o));
  }

  version(opts: AgentCallOptions = {}): Promise<VersionCheckResponse> {
    return this.run('Version', AGENT_TIMEOUTS.checkMs, opts, (o) => this.health.Version({}, o));
  }

  getGuestDetails(req: MessageInit<GuestDetailsRequest> = {}, opts: AgentCallOptions = {}): Promise<GuestDetailsResponse> {
    return this.run('GetGuestDetails', this.defaultTimeoutMs, opts, (o) => this.agent.GetGuestDetails(req, o));
  }

  async createSandbox(req: MessageInit<CreateSandboxRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('CreateSandbox', this.defaultTimeoutMs, opts, (o) => this.agent.CreateSandbox(req, o));
  }

  /** Mixes host entropy into the guest's RNG (kata-agent's ReseedRandomDev). */
  async reseedRandomDev(req: MessageInit<ReseedRandomDevRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('ReseedRandomDev', this.defaultTimeoutMs, opts, (o) => this.agent.ReseedRandomDev(req, o));
  }

  /** Sets the guest's clock (kata-agent's SetGuestDateTime). */
  async setGuestDateTime(req: MessageInit<SetGuestDateTimeRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('SetGuestDateTime', this.defaultTimeoutMs, opts, (o) => this.agent.SetGuestDateTime(req, o));
  }

  async destroySandbox(opts: AgentCallOptions = {}): Promise<void> {
    await this.run('DestroySandbox', this.defaultTimeoutMs, opts, (o) => this.agent.DestroySandbox({}, o));
  }

  async createContainer(req: MessageInit<CreateContainerRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('CreateContainer', AGENT_TIMEOUTS.createContainerMs, opts, (o) => this.agent.CreateContainer(req, o));
  }

  async startContainer(req: MessageInit<StartContainerRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('StartContainer', this.defaultTimeoutMs, opts, (o) => this.agent.StartContainer(req, o));
  }

  /** `req.timeout` is the agent's own limit (seconds, 0 = none) for the processes to go. */
  async removeContainer(req: MessageInit<RemoveContainerRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('RemoveContainer', this.defaultTimeoutMs, opts, (o) => this.agent.RemoveContainer(req, o));
  }

  async execProcess(req: MessageInit<ExecProcessRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('ExecProcess', this.defaultTimeoutMs, opts, (o) => this.agent.ExecProcess(req, o));
  }

  async signalProcess(req: MessageInit<SignalProcessRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('SignalProcess', this.defaultTimeoutMs, opts, (o) => this.agent.SignalProcess(req, o));
  }

  /** Blocks until the process ends; no deadline unless given. Resolves to its exit status. */
  async waitProcess(req: MessageInit<WaitProcessRequest>, opts: AgentCallOptions = {}): Promise<number> {
    const res = await this.run('WaitProcess', 0, opts, (o) => this.agent.WaitProcess(req, o));
    return res.status;
  }

  /** Waits for output; no deadline unless given. An empty result is end of file. */
  async readStdout(req: MessageInit<ReadStreamRequest>, opts: AgentCallOptions = {}): Promise<Uint8Array> {
    return this.readStream('ReadStdout', () => this.run('ReadStdout', 0, opts, (o) => this.agent.ReadStdout(req, o)));
  }

  /** As {@link readStdout}, for standard error. */
  async readStderr(req: MessageInit<ReadStreamRequest>, opts: AgentCallOptions = {}): Promise<Uint8Array> {
    return this.readStream('ReadStderr', () => this.run('ReadStderr', 0, opts, (o) => this.agent.ReadStderr(req, o)));
  }

  /**
   * kata-agent ends a stream with an INTERNAL status whose message says "eof" ("read meet eof");
   * older agents send empty data. Both become an empty result.
   */
  private async readStream(_method: string, call: () => Promise<{ data: Uint8Array }>): Promise<Uint8Array> {
    try {
      return (await call()).data;
    } catch (e) {
      if (e instanceof AgentError && e.kind === 'call' && e.grpcCode === GrpcCode.INTERNAL && /\beof\b/i.test(e.message)) return new Uint8Array(0);
      throw e;
    }
  }

  /** Resolves to the number of bytes the agent took. */
  async writeStdin(req: MessageInit<WriteStreamRequest>, opts: AgentCallOptions = {}): Promise<number> {
    return (await this.run('WriteStdin', this.defaultTimeoutMs, opts, (o) => this.agent.WriteStdin(req, o))).len;
  }

  async closeStdin(req: MessageInit<CloseStdinRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('CloseStdin', this.defaultTimeoutMs, opts, (o) => this.agent.CloseStdin(req, o));
  }

  /** Sets the window size (rows, columns) of a process's terminal. */
  async ttyWinResize(req: MessageInit<TtyWinResizeRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('TtyWinResize', this.defaultTimeoutMs, opts, (o) => this.agent.TtyWinResize(req, o));
  }

  /**
   * Blocks until the guest's OOM killer kills a process of a container, and resolves to that
   * container's id: a long poll, without deadline unless given, that ends with a "closed"
   * AgentError when the connection closes. ttrpc cannot cancel a call in the agent, so a call
   * given up through `signal` still takes the next event there: abort only when giving up on
   * OOM events altogether.
   */
  /** Configures the guest interface whose MAC is `iface.hwAddr`; answers it as configured. */
  updateInterface(iface: MessageInit<Interface>, opts: AgentCallOptions = {}): Promise<Interface> {
    return this.run('UpdateInterface', this.defaultTimeoutMs, opts, (o) => this.agent.UpdateInterface({ interface: iface }, o));
  }

  /** Replaces the guest's routes with `routes`; answers the guest's routes afterwards. */
  async updateRoutes(routes: MessageInit<Route>[], opts: AgentCallOptions = {}): Promise<Route[]> {
    const res = await this.run('UpdateRoutes', this.defaultTimeoutMs, opts, (o) => this.agent.UpdateRoutes({ routes: { Routes: routes } }, o));
    return res.Routes;
  }

  /** Adds (or replaces) neighbours in the guest: kata-agent's AddARPNeighbors. */
  async addARPNeighbors(neighbors: MessageInit<ARPNeighbor>[], opts: AgentCallOptions = {}): Promise<void> {
    await this.run('AddARPNeighbors', this.defaultTimeoutMs, opts, (o) => this.agent.AddARPNeighbors({ neighbors: { ARPNeighbors: neighbors } }, o));
  }

  async listInterfaces(opts: AgentCallOptions = {}): Promise<Interface[]> {
    const res: Interfaces = await this.run('ListInterfaces', this.defaultTimeoutMs, opts, (o) => this.agent.ListInterfaces({}, o));
    return res.Interfaces;
  }

  /** kata-agent's UpdateContainer: new cgroup limits for a container (fields left 0 stay as they are). */
  async updateContainer(req: MessageInit<UpdateContainerRequest>, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('UpdateContainer', this.defaultTimeoutMs, opts, (o) => this.agent.UpdateContainer(req, o));
  }

  /** kata-agent's StatsContainer: the container cgroup's figures. */
  statsContainer(containerId: string, opts: AgentCallOptions = {}): Promise<StatsContainerResponse> {
    return this.run('StatsContainer', this.defaultTimeoutMs, opts, (o) => this.agent.StatsContainer({ containerId }, o));
  }

  async listRoutes(opts: AgentCallOptions = {}): Promise<Route[]> {
    const res: Routes = await this.run('ListRoutes', this.defaultTimeoutMs, opts, (o) => this.agent.ListRoutes({}, o));
    return res.Routes;
  }

  /** Asks the guest to online `nbCpus` hot-plugged vCPUs and, unless `cpuOnly`, the hot-plugged memory (kata-agent's OnlineCPUMem, waiting for it). */
  async onlineCpuMem(req: { nbCpus: number; cpuOnly: boolean }, opts: AgentCallOptions = {}): Promise<void> {
    await this.run('OnlineCPUMem', this.defaultTimeoutMs, opts, (o) => this.agent.OnlineCPUMem({ wait: true, ...req }, o));
  }

  async getOOMEvent(opts: AgentCallOptions = {}): Promise<string> {
    return (await this.run('GetOOMEvent', 0, opts, (o) => this.agent.GetOOMEvent({}, o))).containerId;
  }

  /** The guest's and the agent's figures as Prometheus text (kata-agent's GetMetrics). */
  async getMetrics(opts: AgentCallOptions = {}): Promise<string> {
    return (await this.run('GetMetrics', this.defaultTimeoutMs, opts, (o) => this.agent.GetMetrics({}, o))).metrics;
  }

  private async run<T>(method: string, timeoutMs: number, opts: AgentCallOptions, call: (o: CallOptions) => Promise<T>): Promise<T> {
    try {
      return await call({ timeoutMs: opts.timeoutMs ?? timeoutMs, signal: opts.signal });
    } catch (e) {
      throw e instanceof TtrpcError ? this.wrap(method, e) : e;
    }
  }

  private wrap(method: string, e: TtrpcError): AgentError {
    const closed = e.origin === 'local' && e.code === GrpcCode.UNAVAILABLE;
    const who = this.address ? `the agent at ${this.address}` : 'the agent';
    if (closed) {
      return new AgentError('closed', `${method}: the connection to ${who} closed (${e.statusMessage})`, {
        method,
        grpcCode: e.code,
        address: this.address,
        cause: e,
        fix: 'The agent or the VM went away; read the guest console and hypervisor logs. The sandbox must be recreated.',
      });
    }
    const what = e.origin === 'remote' ? `${who} answered ${grpcCodeName(e.code)}: ${e.statusMessage}` : e.message;
    return new AgentError('call', `agent ${method} failed: ${what}`, {
      method,
      grpcCode: e.code,
      address: this.address,
      cause: e,
      fix: e.code === GrpcCode.DEADLINE_EXCEEDED ? 'The guest may be overloaded (TCG is slow); raise the timeout for this call.' : 'Read the agent\'s error in the message; the guest console log may have more.',
    });
  }
}
