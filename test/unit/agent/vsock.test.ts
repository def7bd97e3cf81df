/**
 * The AF_VSOCK transport: socat (`VSOCK-CONNECT`) with ttrpc over its stdin and stdout.
 *
 * This host is itself a VM (local CID 3) without vhost-vsock or vsock loopback, so no vsock
 * listener can be reached: connecting to CID 2 (the hypervisor host) is reset at once, CID 3
 * (ourselves) is "No such device", CID 1 waits for the kernel's 2 s connect timeout. The real
 * AF_VSOCK path is therefore tested on its failure side; the success side (ttrpc through the
 * socat child) is tested by pointing the same socat at a unix socket (`testOnlySocatAddress`).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AgentClient, connectAgent } from '../../../core/agent/client.js';
import { AGENT_ERROR_CODES, AgentError } from '../../../core/agent/errors.js';
import { AgentService, Health, HealthCheckResponse_ServingStatus } from '../../../wire/agent/proto.gen.js';
import { dialAgent, parseAgentAddress } from '../../../core/agent/transports.js';
import { ERROR_CODES } from '../../../core/errors.js';
import { TtrpcServer } from '../../../wire/ttrpc/server.js';
import { TempDir } from '../../helpers/tmp.js';
import { pidAlive, until, within } from '../../helpers/wait.js';
import { liveProcesses } from '../../helpers/procs.js';

const haveVsock = existsSync('/dev/vsock');
const TRANSPORTS_JS = fileURLToPath(new URL('../../../core/agent/transports.js', import.meta.url));

/** Live socat processes whose parent is `parent` (with setpriv, socat is exec'd in its place). */
function socatChildren(parent = process.pid): number[] {
  return liveProcesses()
    .filter((p) => p.comm === 'socat' && p.ppid === parent)
    .map((p) => p.pid);
}

function isAgentError(kind: AgentError['kind'], check: (e: AgentError) => void = () => undefined): (e: unknown) => boolean {
  return (e) => {
    assert.ok(e instanceof AgentError, `not an AgentError: ${e instanceof Error ? e.stack : String(e)}`);
    assert.equal(e.kind, kind, e.message);
    assert.equal(e.code, AGENT_ERROR_CODES[kind]);
    check(e);
    return true;
  };
}

describe('vsock transport (socat)', () => {
  let existing: Set<number>;

  beforeEach(() => {
    existing = new Set(socatChildren());
  });

  afterEach(async () => {
    // Whatever a test did, it leaves no socat behind.
    await until('no socat child left', () => socatChildren().every((p) => existing.has(p)), 2000);
  });

  describe('over real AF_VSOCK (failure side only: no vhost-vsock on this host)', function () {
    before(function () {
      if (!haveVsock) this.skip();
    });

    it('retries CID 2 (reset: nothing listens) until the deadline, then names the CID, port and socat message', async () => {
      const t0 = Date.now();
      await assert.rejects(dialAgent(parseAgentAddress('vsock://2:61999'), { deadlineMs: 600, retryIntervalMs: 10 }), isAgentError('unreachable', (e) => {
        assert.match(e.message, /^the agent at vsock:\/\/2:61999 did not answer within 600 ms \((\d+) attempts; last: socat could not connect to CID 2 port 61999: Connection reset by peer\)$/);
        assert.ok(Number(/\((\d+) attempts/.exec(e.message)![1]) > 2, 'several attempts');
        assert.match(e.fix ?? '', /guest CID is 2 .* vsock port 61999/);
        assert.equal(e.address, 'vsock://2:61999');
      }));
      assert.ok(Date.now() - t0 < 2000);
    });

    it('retries CID 3 (this VM itself: "No such device") the same way', async () => {
      await assert.rejects(connectAgent('vsock://3:1024', { deadlineMs: 400, retryIntervalMs: 10 }), isAgentError('unreachable', (e) => {
        assert.match(e.message, /vsock:\/\/3:1024 .*attempts; last: socat could not connect to CID 3 port 1024: No such device\)$/);
      }));
    });

    it('stops at once on abort, also while socat waits in connect() (CID 1), and kills it', async () => {
      const ac = new AbortController();
      const dial = dialAgent(parseAgentAddress('vsock://1:61999'), { deadlineMs: 20_000, signal: ac.signal });
      const pid = await until('socat started', () => socatChildren().find((p) => !existing.has(p)));
      const t0 = Date.now();
      ac.abort(new Error('stop dialling'));
      await assert.rejects(within(dial, 'the aborted dial', 1000), /stop dialling/);
      assert.ok(Date.now() - t0 < 500);
      await until('socat killed', () => !pidAlive(pid), 1000);
    });

    it('stops on abort between attempts', async () => {
      const ac = new AbortController();
      setTimeout(() => ac.abort(new Error('stop dialling')), 150);
      await assert.rejects(dialAgent(parseAgentAddress('vsock://2:61999'), { deadlineMs: 20_000, signal: ac.signal }), /stop dialling/);
    });

    it('has socat killed by the kernel when the runtime process dies mid-dial (setpriv --pdeathsig)', async function () {
      if (!existsSync('/usr/bin/setpriv')) this.skip();
      // A runtime process dialling CID 1: socat sits in connect() for the kernel's 2 s, where only
      // the parent-death signal can end it early (its stdin reaching EOF is read after connect()).
      const runtime = spawn(process.execPath, ['--input-type=module', '-e', `import(${JSON.stringify(TRANSPORTS_JS)}).then((t) => t.dialAgent({ kind: 'vsock', cid: 1, port: 61999 }, { deadlineMs: 60000 })).catch(() => undefined); setInterval(() => {}, 1000);`], { stdio: 'ignore' });
      try {
        const pid = await until('socat started by the runtime process', () => socatChildren(runtime.pid).at(0), 5000);
        runtime.kill('SIGKILL');
        const t0 = Date.now();
        await until('socat gone after its parent died', () => !pidAlive(pid), 1500);
        assert.ok(Date.now() - t0 < 1000, 'killed by the parent-death signal, not by its connect() timing out');
      } finally {
        runtime.kill('SIGKILL');
      }
    });
  });

  describe('the socat plumbing, over a unix socket instead of vsock', () => {
    let tmp: TempDir;
    let sockPath: string;
    let server: TtrpcServer;
    let waiting: Array<() => void>;
    const clients: AgentClient[] = [];

    const connect = (opts: { deadlineMs?: number; retryIntervalMs?: number } = {}): Promise<AgentClient> =>
      connectAgent('vsock://3:1024', { deadlineMs: 5000, ...opts, testOnlySocatAddress: `UNIX-CONNECT:${sockPath}` }).then((c) => {
        clients.push(c);
        return c;
      });

    beforeEach(() => {
      tmp = new TempDir('kata-ts-vsock-');
      sockPath = path.join(tmp.path, 'agent.sock');
      waiting = [];
      server = new TtrpcServer();
      server.register(Health, {
        Check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }),
        Version: () => ({ grpcVersion: 'test', agentVersion: '9.9.9' }),
      });
      server.register(AgentService, {
        WaitProcess: () => new Promise((resolve) => waiting.push(() => resolve({ status: 0 }))),
        // Payloads larger than socat's 8 KiB buffer, to cross several reads and writes each way.
        GetGuestDetails: () => ({ agentDetails: { version: 'x'.repeat(100_000) } }),
        WriteStdin: (req) => ({ len: req.data.length }),
      });
    });

    afterEach(async () => {
      for (const c of clients.splice(0)) c.close();
      for (const f of waiting) f();
      await server.close();
      tmp.cleanup();
    });

    it('connects through the socat child, checks health and makes further calls', async () => {
      await server.listen(sockPath);
      const c = await connect();
      const [pid, ...more] = socatChildren().filter((p) => !existing.has(p));
      assert.ok(pid !== undefined && more.length === 0, 'one socat child carries the connection');
      assert.equal((await c.check()).status, HealthCheckResponse_ServingStatus.SERVING);
      assert.equal((await c.version()).agentVersion, '9.9.9');
      assert.equal((await c.getGuestDetails()).agentDetails?.version.length, 100_000);
      assert.equal(await c.writeStdin({ containerId: 'c1', execId: 'c1', data: new Uint8Array(300_000).fill(7) }), 300_000);
    });

    it('keeps dialling while nothing listens (socat\'s connect fails), and connects once the agent does', async () => {
      setTimeout(() => void server.listen(sockPath), 300);
      const t0 = Date.now();
      const c = await connect({ retryIntervalMs: 10 });
      assert.ok(Date.now() - t0 >= 250);
      assert.equal((await c.check()).status, HealthCheckResponse_ServingStatus.SERVING);
    });

    it('reports socat\'s own message at the deadline', async () => {
      await assert.rejects(connect({ deadlineMs: 300, retryIntervalMs: 10 }), isAgentError('unreachable', (e) => {
        assert.match(e.message, /last: socat could not connect to UNIX-CONNECT:.* \(standing in for CID 3 port 1024\): No such file or directory\)$/);
      }));
    });

    it('kills socat when the client closes', async () => {
      await server.listen(sockPath);
      const c = await connect();
      const pid = socatChildren().find((p) => !existing.has(p));
      assert.ok(pid);
      c.close();
      await until('socat killed', () => !pidAlive(pid), 1000);
      assert.equal((await c.closed).kind, 'closed');
    });

    it('fails pending calls with the usual "closed" AgentError when the agent side closes, and socat exits', async () => {
      await server.listen(sockPath);
      const c = await connect();
      const pid = socatChildren().find((p) => !existing.has(p));
      const wait = c.waitProcess({ containerId: 'c1', execId: 'c1' });
      await until('WaitProcess reached the agent', () => waiting.length === 1);
      await server.close();
      await assert.rejects(within(wait, 'the pending WaitProcess'), isAgentError('closed', (e) => assert.equal(e.method, 'WaitProcess')));
      assert.equal((await c.closed).kind, 'closed');
      await until('socat exited', () => !pidAlive(pid), 1000);
      await assert.rejects(c.check(), isAgentError('closed'));
    });

    it("carries socat's message into the closed error when the connection breaks", async () => {
      // The peer closing with our request unread makes socat's next read fail with ECONNRESET,
      // which socat reports as a warning before exiting 0.
      const peer = net.createServer({ pauseOnConnect: true }, (s) => setTimeout(() => s.destroy(), 100));
      await new Promise<void>((r) => peer.listen(sockPath, r));
      try {
        const stream = await dialAgent(parseAgentAddress('vsock://3:1024'), { deadlineMs: 5000, testOnlySocatAddress: `UNIX-CONNECT:${sockPath}` });
        const c = new AgentClient(stream, { address: 'vsock://3:1024' });
        clients.push(c);
        await assert.rejects(c.check(), isAgentError('closed', (e) => assert.match(e.message, /socat for vsock:\/\/3:1024: Connection reset by peer/)));
      } finally {
        peer.close();
      }
    });

    it('has socat end when the runtime process dies with a connection open', async () => {
      await server.listen(sockPath);
      const runtime = spawn(process.execPath, ['--input-type=module', '-e', `import(${JSON.stringify(TRANSPORTS_JS)}).then((t) => t.dialAgent({ kind: 'vsock', cid: 3, port: 1024 }, { testOnlySocatAddress: ${JSON.stringify(`UNIX-CONNECT:${sockPath}`)} })).then(() => console.log('connected')); setInterval(() => {}, 1000);`], { stdio: ['ignore', 'pipe', 'inherit'] });
      try {
        await within(new Promise((r) => runtime.stdout.once('data', r)), 'the runtime process connecting', 5000);
        const pid = socatChildren(runtime.pid).at(0);
        assert.ok(pid);
        runtime.kill('SIGKILL');
        await until('socat gone after its parent died', () => !pidAlive(pid), 1000);
      } finally {
        runtime.kill('SIGKILL');
      }
    });
  });

  describe('coded refusals', () => {
    it('says how to install socat when it is not on PATH', async () => {
      const tmp = new TempDir('kata-ts-nosocat-');
      const path0 = process.env.PATH;
      process.env.PATH = tmp.path;
      try {
        await assert.rejects(dialAgent(parseAgentAddress('vsock://3:1024'), { deadlineMs: 5000 }), isAgentError('socat-missing', (e) => {
          assert.equal(e.code, 'KATA_ERR_VSOCK_SOCAT');
          assert.match(e.message, /vsock:\/\/3:1024.*socat is not on PATH/);
          assert.match(e.fix ?? '', /apt-get install socat/);
        }));
      } finally {
        process.env.PATH = path0;
        tmp.cleanup();
      }
      assert.match(ERROR_CODES.KATA_ERR_VSOCK_SOCAT.fix, /apt-get install socat/);
    });

    it('says the same for a socat that does not know the address type (older than 1.7.4), without retrying', async () => {
      // socat's real "unknown device/address" message, for an address type this socat lacks.
      const t0 = Date.now();
      await assert.rejects(dialAgent(parseAgentAddress('vsock://3:1024'), { deadlineMs: 5000, testOnlySocatAddress: 'NO-SUCH-CONNECT:1' }), isAgentError('socat-missing', (e) => {
        assert.match(e.message, /unknown device\/address "NO-SUCH-CONNECT"/);
        assert.match(e.fix ?? '', /apt-get install socat/);
      }));
      assert.ok(Date.now() - t0 < 1000);
    });

    it('refuses with KATA_ERR_VSOCK_UNSUPPORTED when the kernel lacks the address family, without retrying', async () => {
      // Address family 46 is AF_MAX: the kernel's real EAFNOSUPPORT, as on a host without vsock.
      await assert.rejects(dialAgent(parseAgentAddress('vsock://3:1024'), { deadlineMs: 5000, testOnlySocatAddress: 'SOCKET-CONNECT:46:0:x0000' }), isAgentError('transport-unsupported', (e) => {
        assert.equal(e.code, 'KATA_ERR_VSOCK_UNSUPPORTED');
        assert.match(e.message, /no AF_VSOCK support .*Address family not supported by protocol/);
      }));
    });
  });
});
