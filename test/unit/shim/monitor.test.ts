import assert from 'node:assert/strict';
import { chownSync, existsSync, mkdirSync, readdirSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { attachDebugConsole } from '../../../cli/exec.js';
import { createLogger } from '../../../core/logger.js';
import { ShimMonitor, shimMonitorSocket } from '../../../shim/monitor.js';
import { TaskService } from '../../../shim/service.js';
import { FakeSandboxFactory } from '../../helpers/fake-sandbox.js';
import { TempDir } from '../../helpers/tmp.js';

/** What a refused attach throws: the code and key, checked by the caller. */
async function refusal(p: Promise<unknown>): Promise<{ code: string; key?: string }> {
  try {
    await p;
  } catch (e) {
    return e as { code: string; key?: string };
  }
  assert.fail('the attach was not refused');
}

function read(sock: net.Socket | import('node:stream').Duplex, until: string): Promise<string> {
  let out = '';
  return new Promise((resolve) => {
    const on = (d: Buffer) => {
      out += d.toString();
      if (out.includes(until)) {
        sock.off('data', on);
        resolve(out);
      }
    };
    sock.on('data', on);
  });
}

describe('ShimMonitor (shim-monitor.sock)', () => {
  let tmp: TempDir;
  let env: NodeJS.ProcessEnv;
  const closers: (() => unknown)[] = [];
  beforeEach(() => {
    tmp = new TempDir('kata-monitor-');
    env = { KATA_TS_SBS_ROOT: path.join(tmp.path, 'sbs') };
  });
  afterEach(async () => {
    for (const c of closers.splice(0)) await c();
    tmp.cleanup();
  });

  it('refuses a sandbox id that is not a containerd identifier before building a path', () => {
    for (const id of ['../etc', 'a/b', '', '.hidden']) {
      assert.throws(() => shimMonitorSocket(id, env), (e: { code: string; key: string }) => e.code === 'KATA_ERR_INVALID_ID' && e.key === 'sandbox-id', id);
    }
  });

  it("listens at Kata's path under the sbs root, root only (directory 0700, socket 0600), and removes both when closed", async () => {
    const m = await ShimMonitor.start('sb1', { debugConsoleSocket: () => undefined }, env);
    assert.equal(m.socketPath, path.join(tmp.path, 'sbs', 'sb1', 'shim-monitor.sock'));
    assert.equal(statSync(m.socketPath).mode & 0o777, 0o600);
    assert.equal(statSync(path.dirname(m.socketPath)).mode & 0o777, 0o700);
    await m.close();
    assert.equal(existsSync(path.dirname(m.socketPath)), false);
  });

  it('does not take the socket of a live shim serving the same sandbox id, and replaces a dead one', async () => {
    const first = await ShimMonitor.start('sb4', { debugConsoleSocket: () => undefined }, env);
    await assert.rejects(ShimMonitor.start('sb4', { debugConsoleSocket: () => undefined }, env), (e: { code: string; key: string }) => e.code === 'KATA_ERR_MANAGEMENT_SOCKET' && e.key === 'sandbox-id');
    assert.ok(existsSync(first.socketPath));
    // What a killed shim leaves (a path nobody listens on) is replaced.
    await first.close();
    mkdirSync(path.dirname(first.socketPath), { recursive: true });
    writeFileSync(first.socketPath, '');
    const second = await ShimMonitor.start('sb4', { debugConsoleSocket: () => undefined }, env);
    closers.push(() => second.close());
    assert.equal(statSync(second.socketPath).isSocket(), true);
  });

  it("refuses a symlink, a file or another user's directory at <sbs>/<id> with KATA_ERR_MANAGEMENT_SOCKET, touching nothing behind it", async () => {
    const sbs = path.join(tmp.path, 'sbs');
    mkdirSync(sbs);
    const elsewhere = path.join(tmp.path, 'elsewhere');
    mkdirSync(elsewhere, { mode: 0o755 });
    symlinkSync(elsewhere, path.join(sbs, 'link'));
    writeFileSync(path.join(sbs, 'file'), '');
    symlinkSync(path.join(tmp.path, 'nowhere'), path.join(sbs, 'dangling'));
    const cases: [string, RegExp][] = [
      ['link', /: it is a symlink$/],
      ['file', /: it is not a directory$/],
      ['dangling', /: it is a symlink$/],
    ];
    if (process.getuid?.() === 0) {
      mkdirSync(path.join(sbs, 'theirs'), { mode: 0o755 });
      chownSync(path.join(sbs, 'theirs'), 65534, 65534);
      cases.push(['theirs', /: it is owned by uid 65534, not by this shim's \(uid 0\)$/]);
    }
    for (const [id, why] of cases) {
      await assert.rejects(ShimMonitor.start(id, { debugConsoleSocket: () => undefined }, env), (e: { code: string; key: string; value: string; message: string }) => {
        assert.deepEqual([e.code, e.key, e.value], ['KATA_ERR_MANAGEMENT_SOCKET', 'sandbox-id', id]);
        assert.ok(e.message.startsWith(`no management socket in ${path.join(sbs, id)}: `), e.message);
        assert.match(e.message, why);
        return true;
      });
    }
    assert.equal(statSync(elsewhere).mode & 0o777, 0o755, 'the mode of what the link names is left');
    assert.deepEqual(readdirSync(elsewhere), [], 'no socket is made there');
    if (process.getuid?.() === 0) assert.equal(statSync(path.join(sbs, 'theirs')).mode & 0o777, 0o755);
  });

  it('lets the shim run its pod without the socket when it is refused, and logs why with the code', async () => {
    mkdirSync(path.join(tmp.path, 'sbs'));
    symlinkSync(tmp.path, path.join(tmp.path, 'sbs', 'pod1'));
    const lines: string[] = [];
    const factory = new FakeSandboxFactory();
    const service = new TaskService({
      createSandbox: factory.createSandbox,
      namespace: 'default',
      events: { publish: () => undefined } as never,
      log: createLogger({ level: 'warn', stream: { write: (l: string) => lines.push(l) } }),
      runRoot: path.join(tmp.path, 'run'),
      onShutdown: () => undefined,
      startMonitor: (id, source) => ShimMonitor.start(id, source, env),
    });
    const bundle = path.join(tmp.path, 'bundle');
    mkdirSync(path.join(bundle, 'rootfs'), { recursive: true });
    writeFileSync(path.join(bundle, 'config.json'), JSON.stringify({ ociVersion: '1.0.2', process: { args: ['/pause'], cwd: '/' }, root: { path: path.join(bundle, 'rootfs') } }));
    await service.create({ id: 'pod1', bundle, rootfs: [], stdin: '', stdout: '', stderr: '', terminal: false, checkpoint: '', parentCheckpoint: '' } as never);
    assert.equal(factory.sandboxes.length, 1, 'the sandbox runs');
    const warned = lines.map((l) => JSON.parse(l) as { msg: string; err?: { code?: string } }).find((l) => /management socket/.test(l.msg));
    assert.equal(warned?.err?.code, 'KATA_ERR_MANAGEMENT_SOCKET', lines.join(''));
    assert.equal(existsSync(path.join(tmp.path, 'shim-monitor.sock')), false);
    await service.close();
  });

  it('refuses the debug console with KATA_ERR_DEBUG_CONSOLE when the sandbox is unknown or its console is off', async () => {
    assert.equal((await refusal(attachDebugConsole('nosuch', env))).code, 'KATA_ERR_DEBUG_CONSOLE');
    const m = await ShimMonitor.start('sb2', { debugConsoleSocket: () => undefined }, env);
    closers.push(() => m.close());
    const e = await refusal(attachDebugConsole('sb2', env));
    assert.deepEqual([e.code, e.key], ['KATA_ERR_DEBUG_CONSOLE', 'sandbox-id']);
  });

  it('relays the console both ways, one attach at a time, and ends attaches when closed', async () => {
    const consoleSock = path.join(tmp.path, 'console.sock');
    const guest = net.createServer((s) => s.on('data', (d) => s.write(`echo:${d.toString()}`)));
    await new Promise<void>((r) => guest.listen(consoleSock, r));
    closers.push(() => new Promise((r) => guest.close(r)));
    const m = await ShimMonitor.start('sb3', { debugConsoleSocket: () => consoleSock }, env);
    const conn = await attachDebugConsole('sb3', env);
    conn.write('hello');
    assert.equal(await read(conn, 'echo:hello'), 'echo:hello');
    assert.equal((await refusal(attachDebugConsole('sb3', env))).code, 'KATA_ERR_DEBUG_CONSOLE');
    const closed = new Promise((r) => conn.once('close', r));
    await m.close();
    await closed;
  });
});
