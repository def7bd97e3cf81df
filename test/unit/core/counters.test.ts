import assert from 'node:assert/strict';
import path from 'node:path';
import { countHotplug, hotplugCounts } from '../../../core/counters.js';
import { loadValidatedConfig } from '../../../core/runtime.js';
import { launchVm } from '../../../core/vm-lifecycle.js';
import { TempDir, fakeConfig, fakeHypervisorSource } from '../../helpers/tmp.js';

/** A fake hypervisor whose block hot-plug of a device named "bad" fails. */
const VMM = `
    hooks.createVm.tapPromise('fakevmm', async () => {
      let resolveExit;
      const exited = new Promise((r) => (resolveExit = r));
      return {
        hypervisor: 'fakevmm', pid: 4242, exited,
        async start() {},
        async hotplugBlock(dev) { if (dev.id === 'bad') throw new Error('no slot'); return { id: dev.id, pciPath: '02/00' }; },
        async unplugBlock() {},
        async stop() { const e = { expected: true, code: 0, signal: null, stderrTail: [] }; resolveExit(e); return e; },
      };
    });
`;

describe('hot-plug counts (core/counters.ts)', () => {
  const count = (kind: string) => hotplugCounts().get(kind) ?? 0;

  it('counts each call by kind', () => {
    const before = count('test_kind');
    countHotplug('test_kind');
    countHotplug('test_kind');
    assert.equal(count('test_kind'), before + 2);
  });

  it("counts a VM's block hot-plugs and unplugs that succeed, whatever the hypervisor plugin, and not one that fails", async () => {
    const tmp = new TempDir();
    try {
      const plugin = tmp.file('fakevmm.mjs', fakeHypervisorSource('fakevmm', VMM));
      const running = await launchVm(await loadValidatedConfig({ text: fakeConfig('fakevmm', plugin) }), { sandboxId: 'sb1', runRoot: path.join(tmp.path, 'run') });
      const [plugs, unplugs] = [count('block'), count('block_unplug')];
      await running.hotplugBlock({ id: 'd1', path: '/x' });
      await assert.rejects(running.hotplugBlock({ id: 'bad', path: '/y' }), /no slot/);
      await running.unplugBlock('d1');
      assert.deepEqual([count('block') - plugs, count('block_unplug') - unplugs], [1, 1]);
      await running.stop();
    } finally {
      tmp.cleanup();
    }
  });
});
