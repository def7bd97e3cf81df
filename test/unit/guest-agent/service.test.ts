/**
 * The agent's RPC table (guest/agent/service.ts) through a real ttrpc server and the runtime's own
 * client, on a unix socket: the answers that need no VM (health, guest details, request checks).
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { connectAgent, type AgentClient } from '../../../core/agent/client.js';
import { AgentError } from '../../../core/agent/errors.js';
import { TtrpcServer } from '../../../wire/ttrpc/server.js';
import { Sandbox } from '../../../guest/agent/sandbox.js';
import { registerServices } from '../../../guest/agent/service.js';
import { TempDir } from '../../helpers/tmp.js';

function code(name: string) {
  return (e: unknown) => {
    assert.ok(e instanceof AgentError, String(e));
    assert.equal(e.grpcCodeName, name, e.message);
    return true;
  };
}

describe('guest agent: RPC table', () => {
  let tmp: TempDir;
  let server: TtrpcServer;
  let client: AgentClient;
  let sandbox: Sandbox;
  let logged: string[];
  const write = process.stderr.write.bind(process.stderr);

  before(async () => {
    logged = [];
    // The agent logs failed calls to stderr (the guest console); keep the test output clean.
    process.stderr.write = ((chunk: string | Uint8Array) => (logged.push(String(chunk)), true)) as typeof process.stderr.write;
    tmp = new TempDir('kata-ts-agent-svc-');
    server = new TtrpcServer();
    sandbox = new Sandbox();
    registerServices(server, sandbox);
    const sock = path.join(tmp.path, 'agent.sock');
    await server.listen(sock);
    client = await connectAgent(`unix://${sock}`, { deadlineMs: 5000 });
  });
  after(async () => {
    process.stderr.write = write;
    client?.close();
    await server?.close();
    tmp?.cleanup();
  });

  it('answers Health.Check SERVING and its version', async () => {
    assert.equal((await client.check()).status, 1);
    assert.deepEqual(await client.version(), { grpcVersion: '0.0.1', agentVersion: '0.1.0-kata-ts' });
  });

  it('describes itself in GetGuestDetails', async () => {
    const d = await client.getGuestDetails({ memBlockSize: false });
    assert.equal(d.memBlockSizeBytes, 0n, 'not asked for');
    assert.equal(d.agentDetails?.version, '0.1.0-kata-ts');
    assert.ok(d.agentDetails?.storageHandlers.includes('blk'));
  });

  it('answers GetOOMEvent with the container of a queued OOM kill, and holds the call until there is one', async () => {
    sandbox.oomEvents.push('c1');
    assert.equal(await client.getOOMEvent(), 'c1');
    let answered = false;
    const pending = client.getOOMEvent().finally(() => (answered = true));
    await client.check(); // the long poll does not hold other calls up
    assert.equal(answered, false);
    sandbox.oomEvents.push('c2');
    assert.equal(await pending, 'c2');
  });

  it('answers other calls while 200 long polls of the runtime wait on its one connection', async () => {
    const polls = Array.from({ length: 200 }, () => client.getOOMEvent());
    await new Promise((r) => setTimeout(r, 50));
    assert.equal((await client.check({ timeoutMs: 2000 })).status, 1, 'a call behind 200 long polls is answered');
    const ids = Array.from({ length: 200 }, (_, i) => `c${i}`);
    for (const id of ids) sandbox.oomEvents.push(id);
    assert.deepEqual((await Promise.all(polls)).sort(), [...ids].sort());
  });

  it('answers NOT_FOUND for containers it does not have', async () => {
    await assert.rejects(client.waitProcess({ containerId: 'c1', execId: '' }), code('NOT_FOUND'));
    await assert.rejects(client.readStdout({ containerId: 'c1', execId: '', len: 1 }), code('NOT_FOUND'));
    await assert.rejects(client.signalProcess({ containerId: 'c1', execId: '', signal: 9 }), code('NOT_FOUND'));
    await assert.rejects(client.removeContainer({ containerId: 'c1' }), code('NOT_FOUND'));
    await assert.rejects(client.ttyWinResize({ containerId: 'c1', execId: '', row: 40, column: 100 }), code('NOT_FOUND'));
    assert.ok(logged.some((l) => /^KATA-TS-AGENT: WaitProcess failed: NOT_FOUND: container c1 not found/.test(l)), logged.join(''));
  });

  it('answers INVALID_ARGUMENT for malformed CreateContainer requests, before touching the guest', async () => {
    const oci = { Process: { Args: ['true'], Cwd: '/' }, Root: { Path: '/nonexistent-root' } };
    await assert.rejects(client.createContainer({ containerId: 'x', OCI: oci }), code('INVALID_ARGUMENT'), 'id too short');
    await assert.rejects(client.createContainer({ containerId: 'c1' }), code('INVALID_ARGUMENT'), 'no spec');
    await assert.rejects(client.createContainer({ containerId: 'c1', OCI: { Root: { Path: '/r' } } }), code('INVALID_ARGUMENT'), 'no process');
    await assert.rejects(client.createContainer({ containerId: 'c1', OCI: { ...oci, Root: { Path: 'relative' } } }), code('INVALID_ARGUMENT'), 'relative root');
    await assert.rejects(client.createContainer({ containerId: 'c1', OCI: oci }), code('INVALID_ARGUMENT'), 'root not a directory');
    const storages = [{ driver: 'nvdimm', source: '/dev/pmem0', fstype: 'ext4', mountPoint: '/run/x' }];
    await assert.rejects(client.createContainer({ containerId: 'c1', storages, OCI: oci }), code('INVALID_ARGUMENT'), 'unknown storage driver');
  });
});
