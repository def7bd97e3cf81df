/**
 * The agent client against an in-test ttrpc server that implements a few kata-agent methods, over
 * a unix socket (the virtio-serial transport).
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { AgentClient, connectAgent } from '../../../core/agent/client.js';
import { AGENT_ERROR_CODES, AgentError } from '../../../core/agent/errors.js';
import { formatAgentAddress, parseAgentAddress } from '../../../core/agent/transports.js';
import {
  AgentService,
  CreateContainerRequest,
  Health,
  HealthCheckResponse_ServingStatus,
  type CreateContainerRequest as CreateContainerRequestT,
} from '../../../wire/agent/proto.gen.js';
import { KataError } from '../../../core/errors.js';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { TtrpcServer } from '../../../wire/ttrpc/server.js';
import { TempDir } from '../../helpers/tmp.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function isAgentError(kind: AgentError['kind'], extra: Partial<Pick<AgentError, 'method' | 'grpcCode'>> = {}): (e: unknown) => boolean {
  return (e) => {
    assert.ok(e instanceof AgentError, `not an AgentError: ${String(e)}`);
    assert.ok(e instanceof KataError);
    assert.equal(e.kind, kind);
    assert.equal(e.code, AGENT_ERROR_CODES[kind]);
    for (const [k, v] of Object.entries(extra)) assert.equal(e[k as keyof AgentError], v, k);
    return true;
  };
}

/** What a CreateContainer for a block-device rootfs looks like (the devmapper / TDX data path). */
const CREATE_BLK: Parameters<AgentClient['createContainer']>[0] = {
  containerId: 'c1',
  execId: 'c1',
  stringUser: { uid: '0', gid: '0', additionalGids: ['10'] },
  storages: [{ driver: 'blk', source: '02/00', fstype: 'ext4', options: ['rw'], mountPoint: '/run/kata-containers/shared/containers/c1' }],
  OCI: {
    Version: '1.0.2',
    Process: { Terminal: false, User: { UID: 0, GID: 0, AdditionalGids: [10] }, Args: ['/bin/sh', '-c', 'echo hi; exit 3'], Env: ['PATH=/bin:/usr/bin'], Cwd: '/' },
    Root: { Path: '/run/kata-containers/shared/containers/c1/rootfs', Readonly: false },
    Hostname: 'sandbox',
    Annotations: { 'io.katacontainers.pkg.oci.container_type': 'pod_container' },
    Linux: { Namespaces: [{ Type: 'pid' }, { Type: 'mount' }, { Type: 'uts' }], Devices: [{ Path: '/dev/null', Type: 'c', Major: 1n, Minor: 3n, FileMode: 0o666 }] },
  },
};

describe('agent client', () => {
  let tmp: TempDir;
  let sockPath: string;
  let server: TtrpcServer;
  let created: CreateContainerRequestT[];
  let exits: Map<string, (status: number) => void>;
  const clients: AgentClient[] = [];

  const start = async (): Promise<void> => {
    await server.listen(sockPath);
  };
  const client = (): AgentClient => {
    const c = new AgentClient(net.connect(sockPath), { address: `unix://${sockPath}` });
    clients.push(c);
    return c;
  };

  beforeEach(() => {
    tmp = new TempDir('kata-ts-agent-');
    sockPath = path.join(tmp.path, 'agent.sock');
    created = [];
    exits = new Map();
    server = new TtrpcServer();
    server.register(Health, { Check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }) });
    server.register(AgentService, {
      CreateContainer: (req) => {
        if (created.some((c) => c.containerId === req.containerId)) throw new TtrpcError(GrpcCode.ALREADY_EXISTS, `container ${req.containerId} exists`);
        created.push(req);
        return {};
      },
      WaitProcess: (req) => new Promise((resolve) => exits.set(`${req.containerId}/${req.execId}`, (status) => resolve({ status }))),
    });
  });

  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const f of exits.values()) f(0);
    await server.close();
    tmp.cleanup();
  });

  it('sends CreateContainer with a blk Storage and an OCI spec that the agent decodes field for field', async () => {
    await start();
    await client().createContainer(CREATE_BLK);
    assert.equal(created.length, 1);
    const got = created[0]!;
    assert.deepEqual(got.storages, [
      { driver: 'blk', driverOptions: [], source: '02/00', fstype: 'ext4', options: ['rw'], mountPoint: '/run/kata-containers/shared/containers/c1', fsGroup: undefined, shared: false },
    ]);
    assert.deepEqual(got.OCI?.Process?.Args, ['/bin/sh', '-c', 'echo hi; exit 3']);
    assert.deepEqual(got.OCI?.Process?.User, { UID: 0, GID: 0, AdditionalGids: [10], Username: '' });
    assert.deepEqual(got.OCI?.Root, { Path: '/run/kata-containers/shared/containers/c1/rootfs', Readonly: false });
    assert.deepEqual(got.OCI?.Linux?.Namespaces.map((n) => n.Type), ['pid', 'mount', 'uts']);
    assert.equal(got.OCI?.Linux?.Devices[0]?.Minor, 3n);
    assert.deepEqual(got.OCI?.Annotations, { 'io.katacontainers.pkg.oci.container_type': 'pod_container' });
    assert.deepEqual(got.stringUser, { uid: '0', gid: '0', additionalGids: ['10'] });
    // And the bytes themselves decode to the same thing outside the server.
    assert.deepEqual(CreateContainerRequest.decode(CreateContainerRequest.encode(CREATE_BLK)), got);
  });

  it("reports the agent's error status as a coded AgentError naming the method and the gRPC code", async () => {
    await start();
    const c = client();
    await c.createContainer({ containerId: 'c1' });
    await assert.rejects(c.createContainer({ containerId: 'c1' }), isAgentError('call', { method: 'CreateContainer', grpcCode: GrpcCode.ALREADY_EXISTS }));
    await assert.rejects(c.readStdout({ containerId: 'c1', execId: 'c1', len: 1024 }), (e: unknown) => {
      isAgentError('call', { method: 'ReadStdout', grpcCode: GrpcCode.UNIMPLEMENTED })(e);
      assert.match((e as Error).message, /UNIMPLEMENTED: method ReadStdout/);
      return true;
    });
  });

  it('waits in WaitProcess for the exit status while other calls go through', async () => {
    await start();
    const c = client();
    const wait = c.waitProcess({ containerId: 'c1', execId: 'c1' });
    await c.createContainer({ containerId: 'c2' });
    assert.equal((await c.check()).status, HealthCheckResponse_ServingStatus.SERVING);
    while (!exits.has('c1/c1')) await sleep(2);
    exits.get('c1/c1')!(137);
    assert.equal(await wait, 137);
  });

  it('gives up on a call after its timeout with a DEADLINE_EXCEEDED AgentError', async () => {
    await start();
    await assert.rejects(client().waitProcess({ containerId: 'c1', execId: 'c1' }, { timeoutMs: 50 }), isAgentError('call', { method: 'WaitProcess', grpcCode: GrpcCode.DEADLINE_EXCEEDED }));
  });

  it('fails pending calls with a "closed" AgentError when the agent goes away', async () => {
    await start();
    const c = client();
    const wait = c.waitProcess({ containerId: 'c1', execId: 'c1' });
    while (!exits.has('c1/c1')) await sleep(2);
    await server.close();
    await assert.rejects(wait, isAgentError('closed', { method: 'WaitProcess' }));
    assert.equal((await c.closed).kind, 'closed');
  });

  it('connects over virtio-serial (a unix socket) once the socket appears, then checks health', async () => {
    setTimeout(() => void start(), 150);
    const c = await connectAgent(`unix://${sockPath}`, { deadlineMs: 5000, retryIntervalMs: 10 });
    clients.push(c);
    assert.equal((await c.check()).status, HealthCheckResponse_ServingStatus.SERVING);
  });

  it('gives up with an "unreachable" AgentError when nothing listens before the deadline', async () => {
    const t0 = Date.now();
    await assert.rejects(connectAgent(`unix://${sockPath}`, { deadlineMs: 200, retryIntervalMs: 10 }), (e: unknown) => {
      isAgentError('unreachable')(e);
      assert.match((e as Error).message, /did not answer within 200 ms \(\d+ attempts; last: .*ENOENT/);
      return true;
    });
    assert.ok(Date.now() - t0 < 1500);
  });

  it('gives up with "unreachable" when the socket accepts but the agent never answers Check', async () => {
    const silent = net.createServer(() => undefined);
    await new Promise<void>((r) => silent.listen(sockPath, r));
    try {
      await assert.rejects(connectAgent(`unix://${sockPath}`, { deadlineMs: 200 }), isAgentError('unreachable', { method: 'Check' }));
    } finally {
      silent.close();
    }
  });

  it('parses and prints the agent address forms', () => {
    assert.deepEqual(parseAgentAddress('unix:///run/vc/agent.sock'), { kind: 'unix', path: '/run/vc/agent.sock' });
    assert.deepEqual(parseAgentAddress('hvsock:///run/vc/vm/clh.sock:1024'), { kind: 'hvsock', path: '/run/vc/vm/clh.sock', port: 1024 });
    assert.deepEqual(parseAgentAddress('vsock://3:1024'), { kind: 'vsock', cid: 3, port: 1024 });
    for (const a of ['unix:///a', 'hvsock:///a/b:1024', 'vsock://4294967295:1']) assert.equal(formatAgentAddress(parseAgentAddress(a)), a);
    for (const bad of ['/no/scheme', 'unix://relative', 'hvsock:///a/b', 'hvsock:///a:x', 'vsock://3', 'tcp://1.2.3.4:5']) {
      assert.throws(() => parseAgentAddress(bad), isAgentError('address'), bad);
    }
  });
});
