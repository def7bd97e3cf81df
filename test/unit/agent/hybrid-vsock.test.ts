/**
 * Cloud Hypervisor's hybrid vsock: an in-test unix server plays the VMM (`CONNECT <port>\n` →
 * `OK <host port>\n`, or closing when nothing listens on the port yet) and hands the stream to a
 * ttrpc server playing the agent.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { connectAgent } from '../../../core/agent/client.js';
import { AgentError } from '../../../core/agent/errors.js';
import { AGENT_VSOCK_PORT, dialAgent } from '../../../core/agent/transports.js';
import { AgentService, Health, HealthCheckResponse_ServingStatus } from '../../../wire/agent/proto.gen.js';
import { TtrpcServer } from '../../../wire/ttrpc/server.js';
import { TempDir } from '../../helpers/tmp.js';

interface FakeVmm {
  server: net.Server;
  /** CONNECT lines received, in order. */
  requests: string[];
  close(): Promise<void>;
}

/**
 * `reply(attempt)` decides each connection's fate: a string to send (then the agent serves the
 * stream if it starts with OK), or null to close without a word (the guest is not listening yet).
 */
async function fakeVmm(socketPath: string, agent: TtrpcServer, reply: (attempt: number, port: number) => string | null): Promise<FakeVmm> {
  const requests: string[] = [];
  const socks = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    socks.add(sock);
    sock.on('close', () => socks.delete(sock));
    sock.on('error', () => undefined);
    let buf = Buffer.alloc(0);
    const onData = (chunk: Buffer): void => {
      buf = Buffer.concat([buf, chunk]);
      const nl = buf.indexOf(0x0a);
      if (nl < 0) return;
      sock.off('data', onData);
      const line = buf.subarray(0, nl).toString();
      requests.push(line);
      const port = Number(/^CONNECT (\d+)$/.exec(line)?.[1] ?? NaN);
      const answer = reply(requests.length, port);
      if (answer === null) {
        sock.end();
        return;
      }
      sock.write(answer);
      if (!answer.startsWith('OK')) return;
      sock.pause();
      const rest = buf.subarray(nl + 1);
      if (rest.length) sock.unshift(rest);
      agent.serve(sock);
    };
    sock.on('data', onData);
  });
  await new Promise<void>((r) => server.listen(socketPath, r));
  return {
    server,
    requests,
    close: async () => {
      for (const s of socks) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

describe('hybrid vsock transport', () => {
  let tmp: TempDir;
  let sockPath: string;
  let agent: TtrpcServer;
  let vmm: FakeVmm | undefined;

  beforeEach(() => {
    tmp = new TempDir('kata-ts-hvsock-');
    sockPath = path.join(tmp.path, 'clh.sock');
    agent = new TtrpcServer();
    agent.register(Health, { Check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }) });
    agent.register(AgentService, { WaitProcess: () => ({ status: 3 }) });
  });

  afterEach(async () => {
    await vmm?.close();
    vmm = undefined;
    await agent.close();
    tmp.cleanup();
  });

  it('sends CONNECT 1024, takes "OK <port>" and then speaks ttrpc on the same stream', async () => {
    vmm = await fakeVmm(sockPath, agent, () => 'OK 1073741824\n');
    const c = await connectAgent(`hvsock://${sockPath}:${AGENT_VSOCK_PORT}`, { deadlineMs: 2000 });
    try {
      assert.deepEqual(vmm.requests, ['CONNECT 1024']);
      assert.equal(await c.waitProcess({ containerId: 'c', execId: 'c' }), 3);
    } finally {
      c.close();
    }
  });

  it('keeps dialling while the VMM socket does not exist yet, and connects once it does', async () => {
    setTimeout(() => void fakeVmm(sockPath, agent, () => 'OK 5\n').then((v) => (vmm = v)), 200);
    const c = await connectAgent(`hvsock://${sockPath}:1024`, { deadlineMs: 5000, retryIntervalMs: 10 });
    c.close();
    assert.deepEqual(vmm!.requests, ['CONNECT 1024']);
  });

  it('keeps dialling while the VMM closes the connection (nothing listens on the port yet)', async () => {
    vmm = await fakeVmm(sockPath, agent, (attempt) => (attempt < 4 ? null : 'OK 77\n'));
    const c = await connectAgent(`hvsock://${sockPath}:1024`, { deadlineMs: 5000, retryIntervalMs: 5 });
    c.close();
    assert.equal(vmm.requests.length, 4);
  });

  it('fails at once with a "handshake" AgentError when the reply is not OK', async () => {
    vmm = await fakeVmm(sockPath, agent, () => 'ERR no such port\n');
    const t0 = Date.now();
    await assert.rejects(dialAgent({ kind: 'hvsock', path: sockPath, port: 1024 }, { deadlineMs: 5000 }), (e: unknown) => {
      assert.ok(e instanceof AgentError);
      assert.equal(e.kind, 'handshake');
      assert.match(e.message, /expected "OK <port>" in reply to "CONNECT 1024", got "ERR no such port"/);
      return true;
    });
    assert.ok(Date.now() - t0 < 1000, 'no retrying on a wrong reply');
    assert.equal(vmm.requests.length, 1);
  });

  it('fails with "handshake" on a reply line that never ends', async () => {
    vmm = await fakeVmm(sockPath, agent, () => 'x'.repeat(100));
    await assert.rejects(dialAgent({ kind: 'hvsock', path: sockPath, port: 1024 }, { deadlineMs: 2000 }), (e: unknown) => e instanceof AgentError && e.kind === 'handshake');
  });

  it('gives up with "unreachable" at the deadline when the port never opens', async () => {
    vmm = await fakeVmm(sockPath, agent, () => null);
    await assert.rejects(dialAgent({ kind: 'hvsock', path: sockPath, port: 1024 }, { deadlineMs: 300, retryIntervalMs: 10 }), (e: unknown) => {
      assert.ok(e instanceof AgentError);
      assert.equal(e.kind, 'unreachable');
      assert.match(e.message, /closed without answering CONNECT 1024/);
      return true;
    });
    assert.ok(vmm.requests.length > 1);
  });

  it('retries a VMM that accepts but does not answer within the handshake timeout', async () => {
    let calls = 0;
    vmm = await fakeVmm(sockPath, agent, () => (++calls === 1 ? '' : 'OK 9\n'));
    const c = await connectAgent(`hvsock://${sockPath}:1024`, { deadlineMs: 5000, handshakeTimeoutMs: 100, retryIntervalMs: 5 });
    c.close();
    assert.equal(vmm.requests.length, 2);
  });
});
