import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import type { KataError } from '../../../core/errors.js';
import { SANDBOX_DIR } from '../../../core/plan.js';
import { ClhApiClient, clhApiFailure, errorBodyMessage } from '../../../plugins/clh/api.js';
import { bdfToPciPath, fillVmConfig } from '../../../plugins/clh/driver.js';
import { TempDir } from '../../helpers/tmp.js';

describe('clh driver helpers', () => {
  describe('errorBodyMessage', () => {
    it('joins a JSON array error chain (Cloud Hypervisor v47 and later)', () => {
      assert.equal(errorBodyMessage('["Error adding disk","Failed to open disk image /x","No such file or directory (os error 2)"]'), 'Error adding disk: Failed to open disk image /x: No such file or directory (os error 2)');
    });

    it('takes a plain-text body as it is (older releases), also one that starts with a bracket', () => {
      assert.equal(errorBodyMessage('VmNotCreated\n'), 'VmNotCreated');
      assert.equal(errorBodyMessage('[not json'), '[not json');
    });
  });

  describe('bdfToPciPath', () => {
    it("gives the slot on the root bus as Kata's PCI path", () => {
      assert.equal(bdfToPciPath('0000:00:06.0'), '06');
      assert.equal(bdfToPciPath('0000:00:1F.0'), '1f');
    });

    it('refuses an address off bus 0 of segment 0, or a function other than 0, with a coded error', () => {
      for (const bdf of ['0001:00:06.0', '0000:01:06.0', '0000:00:06.1', '06', '0000:00:20.0']) {
        assert.throws(() => bdfToPciPath(bdf), (e: KataError) => e.code === 'KATA_ERR_HOTPLUG' && e.plugin === 'clh', bdf);
      }
    });
  });

  it('fills the run directory into every path of the VmConfig', () => {
    const filled = fillVmConfig({ payload: { kernel: '/k' }, vsock: { cid: 3, socket: `${SANDBOX_DIR}/clh.vsock` }, fs: [{ tag: 't', socket: `${SANDBOX_DIR}/v.sock`, num_queues: 1, queue_size: 8 }] }, '/run/x');
    assert.deepEqual([filled.vsock?.socket, filled.fs?.[0]?.socket, filled.payload.kernel], ['/run/x/clh.vsock', '/run/x/v.sock', '/k']);
  });

  describe('ClhApiClient', () => {
    let tmp: TempDir;
    beforeEach(() => (tmp = new TempDir('kata-clh-api-')));
    afterEach(() => tmp.cleanup());

    it('times out a call the VMM does not answer (KATA_ERR_CLH_API_TIMEOUT)', async () => {
      const socketPath = path.join(tmp.path, 'api.sock');
      const held: net.Socket[] = [];
      const server = net.createServer((s) => held.push(s)).listen(socketPath);
      try {
        const api = new ClhApiClient({ socketPath, timeoutMs: 100, plugin: 'clh' });
        await assert.rejects(api.bootVm(), (e: KataError) => e.code === 'KATA_ERR_CLH_API_TIMEOUT' && /vm\.boot within 100 ms/.test(e.message));
      } finally {
        for (const s of held) s.destroy();
        await new Promise((r) => server.close(r));
      }
    });

    it('reports a missing API socket as KATA_ERR_CLH_API without a status', async () => {
      const api = new ClhApiClient({ socketPath: path.join(tmp.path, 'none.sock'), timeoutMs: 1000 });
      await assert.rejects(api.ping(), (e: KataError) => {
        assert.equal(e.code, 'KATA_ERR_CLH_API');
        assert.equal(clhApiFailure(e)?.status, undefined);
        assert.match(e.message, /the API socket does not exist/);
        return true;
      });
    });
  });
});
