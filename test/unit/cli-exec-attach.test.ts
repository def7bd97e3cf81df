import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { attachDebugConsole } from '../../cli/exec.js';
import type { KataError } from '../../core/errors.js';
import { TempDir } from '../helpers/tmp.js';

/** A stand-in shim management socket for sandbox `sb` under a temporary sbs root. */
async function fakeShim(tmp: TempDir, handler: http.RequestListener): Promise<{ env: NodeJS.ProcessEnv; server: http.Server }> {
  const root = path.join(tmp.path, 'sbs');
  mkdirSync(path.join(root, 'sb'), { recursive: true });
  const server = http.createServer(handler);
  await new Promise<void>((resolve) => server.listen(path.join(root, 'sb', 'shim-monitor.sock'), resolve));
  return { env: { KATA_TS_SBS_ROOT: root }, server };
}

describe('kata-runtime exec: attaching to a shim', () => {
  let tmp: TempDir;
  let server: http.Server | undefined;
  beforeEach(() => (tmp = new TempDir('kata-exec-attach-')));
  afterEach(async () => {
    server?.closeAllConnections();
    await new Promise((r) => (server ? server.close(r) : r(undefined)));
    server = undefined;
    tmp.cleanup();
  });

  it('gives up with KATA_ERR_DEBUG_CONSOLE when the shim accepts the connection and never answers', async () => {
    const shim = await fakeShim(tmp, () => undefined);
    server = shim.server;
    const t0 = Date.now();
    await assert.rejects(attachDebugConsole('sb', shim.env, 300), (e: KataError) => e.code === 'KATA_ERR_DEBUG_CONSOLE' && /no answer within 300 ms/.test(e.message));
    assert.ok(Date.now() - t0 < 5000);
  });

  it("shows the shim's message from a refusal followed by 2 MiB more (of which it keeps 4 KiB)", async () => {
    let sent = 0;
    const shim = await fakeShim(tmp, (_req, res) => {
      res.writeHead(409, { 'content-type': 'application/json' });
      res.write(JSON.stringify({ message: 'the debug console is off' }));
      // Then far more than anyone needs to read.
      const chunk = Buffer.alloc(64 * 1024, 0x20);
      for (let i = 0; i < 32; i++) {
        res.write(chunk);
        sent += chunk.length;
      }
      res.end();
    });
    server = shim.server;
    await assert.rejects(attachDebugConsole('sb', shim.env), (e: KataError) => {
      assert.equal(e.code, 'KATA_ERR_DEBUG_CONSOLE');
      assert.equal(e.message, 'sandbox "sb": the debug console is off');
      return true;
    });
    assert.equal(sent, 2 * 1024 * 1024);
  });

  it('says the sandbox is not running when its socket does not exist', async () => {
    await assert.rejects(attachDebugConsole('nope', { KATA_TS_SBS_ROOT: tmp.path }), (e: KataError) => e.code === 'KATA_ERR_DEBUG_CONSOLE' && /no running sandbox "nope"/.test(e.message));
  });
});
