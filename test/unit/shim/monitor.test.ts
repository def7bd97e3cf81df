import assert from 'node:assert/strict';
import { existsSync, mkdirSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { attachDebugConsole } from '../../../cli/exec.js';
import { ShimMonitor, shimMonitorSocket } from '../../../shim/monitor.js';
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
    await assert.rejects(ShimMonitor.start('sb4', { debugConsoleSocket: () => undefined }, env), (e: { code: string }) => e.code === 'KATA_ERR_DEBUG_CONSOLE');
    assert.ok(existsSync(first.socketPath));
    // What a killed shim leaves (a path nobody listens on) is replaced.
    await first.close();
    mkdirSync(path.dirname(first.socketPath), { recursive: true });
    writeFileSync(first.socketPath, '');
    const second = await ShimMonitor.start('sb4', { debugConsoleSocket: () => undefined }, env);
    closers.push(() => second.close());
    assert.equal(statSync(second.socketPath).isSocket(), true);
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
