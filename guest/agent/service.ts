/**
 * The ttrpc services the agent serves: `grpc.AgentService` (the subset in protos/kata/agent.proto)
 * and `grpc.Health`, on top of {@link Sandbox}. Every handler's failure leaves as a gRPC status
 * (errors.ts); RPCs of kata-agent that are not in our proto answer UNIMPLEMENTED (the server does that).
 */
import { AgentService, Health, HealthCheckResponse_ServingStatus } from '../../wire/agent/proto.gen.js';
import type { CallContext, TtrpcServer } from '../../wire/ttrpc/server.js';
import { GrpcCode } from '../../wire/ttrpc/codes.js';
import { invalidArgument, isEndOfFile, toStatus } from './errors.js';
import { debug, isDebug, log } from './log.js';
import { guestMetrics } from './metrics.js';
import { reseedRandomDev, setGuestDateTime } from './clone.js';
import { onlineCpuMem } from './online.js';
import type { Sandbox } from './sandbox.js';
import { API_VERSION, AGENT_VERSION } from './version.js';

/** Calls `fn`, turning its failure into a status (logged unless it is a stream's end or a cancelled long poll). */
async function handle<T>(ctx: CallContext, fn: () => Promise<T> | T): Promise<T> {
  const t0 = isDebug() ? performance.now() : 0;
  try {
    const r = await fn();
    debug(`${ctx.method} ok (${(performance.now() - t0).toFixed(1)} ms)`);
    return r;
  } catch (e) {
    const status = toStatus(e);
    if (status.code !== GrpcCode.CANCELLED && !isEndOfFile(status)) log(`${ctx.method} failed: ${status.message}`);
    throw status;
  }
}

export function registerServices(server: TtrpcServer, sandbox: Sandbox): void {
  server.register(AgentService, {
    CreateSandbox: (req, ctx) => handle(ctx, async () => (await sandbox.createSandbox(req, ctx.signal), {})),
    DestroySandbox: (_req, ctx) => handle(ctx, async () => (await sandbox.destroySandbox(), {})),
    GetGuestDetails: (req, ctx) => handle(ctx, () => sandbox.guestDetails(req)),
    CreateContainer: (req, ctx) => handle(ctx, async () => (await sandbox.createContainer(req, ctx.signal), {})),
    StartContainer: (req, ctx) => handle(ctx, async () => (await sandbox.startContainer(req), {})),
    RemoveContainer: (req, ctx) => handle(ctx, async () => (await sandbox.removeContainer(req), {})),
    ExecProcess: (req, ctx) => handle(ctx, async () => (await sandbox.execProcess(req), {})),
    SignalProcess: (req, ctx) => handle(ctx, async () => (await sandbox.signalProcess(req), {})),
    WaitProcess: (req, ctx) => handle(ctx, async () => ({ status: await sandbox.waitProcess(req, ctx.signal) })),
    UpdateContainer: (req, ctx) => handle(ctx, async () => (await sandbox.updateContainer(req), {})),
    StatsContainer: (req, ctx) => handle(ctx, () => sandbox.statsContainer(req)),
    ReadStdout: (req, ctx) => handle(ctx, async () => ({ data: await sandbox.readStream(req, 'stdout', ctx.signal) })),
    ReadStderr: (req, ctx) => handle(ctx, async () => ({ data: await sandbox.readStream(req, 'stderr', ctx.signal) })),
    WriteStdin: (req, ctx) => handle(ctx, async () => ({ len: await sandbox.writeStdin(req) })),
    CloseStdin: (req, ctx) => handle(ctx, () => (sandbox.closeStdin(req), {})),
    TtyWinResize: (req, ctx) => handle(ctx, () => (sandbox.ttyWinResize(req), {})),
    GetOOMEvent: (_req, ctx) => handle(ctx, async () => ({ containerId: await sandbox.oomEvents.next(ctx.signal) })),
    OnlineCPUMem: (req, ctx) => handle(ctx, async () => (await onlineCpuMem({ nbCpus: req.nbCpus, cpuOnly: req.cpuOnly }, { signal: ctx.signal }), {})),
    UpdateInterface: (req, ctx) =>
      handle(ctx, () => {
        if (!req.interface) throw invalidArgument('UpdateInterface without an interface');
        return sandbox.network.updateInterface(req.interface, ctx.signal);
      }),
    UpdateRoutes: (req, ctx) => handle(ctx, async () => ({ Routes: await sandbox.network.updateRoutes(req.routes?.Routes ?? []) })),
    ListInterfaces: (_req, ctx) => handle(ctx, async () => ({ Interfaces: await sandbox.network.listInterfaces() })),
    ListRoutes: (_req, ctx) => handle(ctx, async () => ({ Routes: await sandbox.network.listRoutes() })),
    AddARPNeighbors: (req, ctx) => handle(ctx, async () => (await sandbox.network.addArpNeighbors(req.neighbors?.ARPNeighbors ?? []), {})),
    GetMetrics: (_req, ctx) => handle(ctx, async () => ({ metrics: await guestMetrics() })),
    ReseedRandomDev: (req, ctx) => handle(ctx, async () => (await reseedRandomDev(req.data), {})),
    SetGuestDateTime: (req, ctx) => handle(ctx, async () => (await setGuestDateTime(req.Sec), {})),
  }, {
    // The runtime keeps these open on its one connection for as long as a process runs (three a
    // process, and one GetOOMEvent): served parked, so that they never stop the connection being
    // read and SignalProcess or ExecProcess still arrive, however many processes run.
    parked: ['WaitProcess', 'ReadStdout', 'ReadStderr', 'GetOOMEvent'],
  });
  server.register(Health, {
    Check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }),
    Version: () => ({ grpcVersion: API_VERSION, agentVersion: AGENT_VERSION }),
  });
}
