/**
 * The lifecycle hooks as the real sandbox calls them: real QEMU, the guest image and its agent, a
 * plugin handed over in process that records every call of the hooks plugin authors tap.
 */
import assert from 'node:assert/strict';
import { copyFileSync } from 'node:fs';
import path from 'node:path';
import { definePlugin } from '../../core/plugin-api.js';
import { loadValidatedConfig } from '../../core/runtime.js';
import { Sandbox } from '../../core/sandbox.js';
import { guestImageSuite } from '../helpers/guest.js';
import { qemuLeftBehind, sandboxConfigText } from '../helpers/qemu.js';

const BLOCK = 'shared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"';

function recorder(calls: string[]) {
  return definePlugin({
    manifest: { name: 'recorder', version: '1.0.0', runtime: '^1.0.0' },
    apply({ hooks }) {
      hooks.checkPlan.tap('recorder', (plan) => void calls.push(`checkPlan ${plan.hypervisor}`));
      hooks.vmStarted.tapPromise('recorder', async (ctx) => void calls.push(`vmStarted ${ctx.sandboxId}`));
      hooks.agentReady.tapPromise('recorder', async (ctx) => void calls.push(`agentReady ${ctx.sandboxId}`));
      hooks.containerCreated.tapPromise('recorder', async (c) => void calls.push(`containerCreated ${c.containerId}`));
      hooks.containerStarted.tapPromise('recorder', async (c) => void calls.push(`containerStarted ${c.containerId}`));
      hooks.containerExited.tapPromise('recorder', async (c, status) => void calls.push(`containerExited ${c.containerId} ${status}`));
      hooks.vmStopped.tapPromise('recorder', async () => void calls.push('vmStopped'));
      hooks.sandboxStopped.tapPromise('recorder', async (ctx, exit) => void calls.push(`sandboxStopped ${ctx.sandboxId} ${exit.expected}`));
    },
  });
}

describe('plugin lifecycle hooks in a real sandbox @integration', function () {
  this.timeout(600_000);
  const suite = guestImageSuite('kata-hooks-');


  it('calls agentReady, the container hooks (the exit once, with its status) and sandboxStopped in order', async () => {
    const calls: string[] = [];
    const runRoot = path.join(suite.tmp.path, 'run');
    const validated = await loadValidatedConfig({ text: sandboxConfigText(suite.image, BLOCK), plugins: [recorder(calls)] });
    const sandbox = await Sandbox.create(validated, { sandboxId: 'sb-hooks', runRoot });
    try {
      const disk = path.join(suite.tmp.path, 'c1.ext4');
      copyFileSync(suite.image.busyboxRootfs as string, disk);
      const c = await sandbox.createContainer({ id: 'c1', rootfs: { kind: 'block', path: disk, fstype: 'ext4' }, process: { args: ['sh', '-c', 'exit 7'] } });
      await c.start();
      assert.equal(await c.wait(), 7);
      await c.delete();
    } finally {
      await sandbox.stop();
    }
    assert.deepEqual(calls, ['checkPlan qemu', 'vmStarted sb-hooks', 'agentReady sb-hooks', 'containerCreated c1', 'containerStarted c1', 'containerExited c1 7', 'vmStopped', 'sandboxStopped sb-hooks true']);
    assert.deepEqual(await qemuLeftBehind(runRoot), []);
  });
});
