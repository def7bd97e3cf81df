import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { loadValidatedConfig } from '../../../core/runtime.js';
import { launchVm } from '../../../core/vm-lifecycle.js';
import type { KataError } from '../../../core/errors.js';
import { isMountPoint } from '../../../core/mounts.js';
import { OWNER_FILE } from '../../../core/run-dirs.js';
import { TempDir, fakeConfig, fakeHypervisorSource } from '../../helpers/tmp.js';

/**
 * A fake hypervisor whose VM records what happens to it in <runDir>/../events.log, and fails
 * where the configuration's kernel path says: "/fail-start", "/fail-daemon".
 */
const LIFECYCLE = `
    const log = (ctx, what) => fs.appendFileSync(ctx.runDir + '/../events.log', what + '\\n');
    hooks.beforeVmStart.tapPromise('fakevmm', async (ctx) => {
      log(ctx, 'daemon-start:' + fs.existsSync(ctx.runDir));
      if (ctx.config.hypervisor.kernel === '/fail-daemon') throw new Error('daemon would not start');
    });
    hooks.createVm.tapPromise('fakevmm', async (ctx) => {
      let resolveExit;
      const exited = new Promise((r) => (resolveExit = r));
      return {
        hypervisor: 'fakevmm', pid: 4242, exited,
        async start() { log(ctx, 'vm-start'); if (ctx.config.hypervisor.kernel === '/fail-start') throw new Error('bad kernel'); if (ctx.config.hypervisor.kernel === '/hang-start') await exited; },
        async hotplugBlock(dev) { log(ctx, 'plug:' + dev.id); return { id: dev.id, pciPath: '02/00' }; },
        async unplugBlock(id) { log(ctx, 'unplug:' + id); },
        async stop() { log(ctx, 'vm-stop'); const e = { expected: true, code: 0, signal: null, stderrTail: [] }; resolveExit(e); return e; },
      };
    });
    hooks.vmStarted.tapPromise('fakevmm', async (ctx) => log(ctx, 'started'));
    hooks.vmStopped.tapPromise('fakevmm', async (ctx, exit) => log(ctx, 'daemon-stop:' + (exit ? 'exit' : 'no-exit')));
`;

describe('launchVm', () => {
  let tmp: TempDir;
  let plugin: string;
  const events = () => readFileSync(path.join(tmp.path, 'run', 'events.log'), 'utf8').trim().split('\n');
  beforeEach(() => {
    tmp = new TempDir();
    plugin = tmp.file('fakevmm.mjs', `import * as fs from 'node:fs';\n${fakeHypervisorSource('fakevmm', LIFECYCLE)}`);
  });
  afterEach(() => tmp.cleanup());

  const validated = (kernel: string) => loadValidatedConfig({ text: fakeConfig('fakevmm', plugin).replace('kernel = "/k"', `kernel = "${kernel}"`) });

  it('starts daemons, creates and starts the VM, and on stop cleans up and removes the run directory', async () => {
    const running = await launchVm(await validated('/k'), { sandboxId: 'sb1', runRoot: path.join(tmp.path, 'run') });
    assert.equal(running.ctx.runDir, path.join(tmp.path, 'run', 'sb1'));
    assert.deepEqual(await running.hotplugBlock({ id: 'd1', path: '/x' }), { id: 'd1', pciPath: '02/00' });
    await running.unplugBlock('d1');
    const exit = await running.stop();
    assert.equal(exit.expected, true);
    assert.deepEqual(events(), ['daemon-start:true', 'vm-start', 'started', 'plug:d1', 'unplug:d1', 'vm-stop', 'daemon-stop:exit']);
    assert.equal(existsSync(running.ctx.runDir), false);
  });

  it('stops only once when stop is called twice', async () => {
    const running = await launchVm(await validated('/k'), { sandboxId: 'sb2', runRoot: path.join(tmp.path, 'run') });
    await Promise.all([running.stop(), running.stop()]);
    assert.equal(events().filter((e) => e === 'vm-stop').length, 1);
  });

  it('undoes everything when the VM fails to start, and reports the plugin', async () => {
    await assert.rejects(launchVm(await validated('/fail-start'), { sandboxId: 'sb3', runRoot: path.join(tmp.path, 'run') }), (e: KataError) => e.code === 'KATA_ERR_PLUGIN_HOOK' || /bad kernel/.test(e.message));
    assert.deepEqual(events(), ['daemon-start:true', 'vm-start', 'vm-stop', 'daemon-stop:exit']);
    assert.equal(existsSync(path.join(tmp.path, 'run', 'sb3')), false);
  });

  it('undoes the daemons when one fails to start, without creating a VM', async () => {
    await assert.rejects(launchVm(await validated('/fail-daemon'), { sandboxId: 'sb4', runRoot: path.join(tmp.path, 'run') }), (e: KataError) => e.code === 'KATA_ERR_PLUGIN_HOOK' && e.plugin === 'fakevmm' && e.hook === 'beforeVmStart');
    assert.deepEqual(events(), ['daemon-start:true', 'daemon-stop:no-exit']);
    assert.equal(existsSync(path.join(tmp.path, 'run', 'sb4')), false);
  });

  it('refuses, before creating anything, a run directory too long for the unix sockets in it', async () => {
    const runRoot = path.join(tmp.path, 'run', 'a-rather-long-namespace-name');
    const sandboxId = 'f'.repeat(64); // CRI's sandbox ids are 64 hex characters
    await assert.rejects(launchVm(await validated('/k'), { sandboxId, runRoot }), (e: KataError) => e.code === 'KATA_ERR_SANDBOX' && /unix sockets/.test(e.message) && /KATA_TS_RUN_ROOT/.test(e.fix));
    assert.equal(existsSync(runRoot), false);
  });

  it('refuses a sandbox id that could escape the run root', async () => {
    await assert.rejects(launchVm(await validated('/k'), { sandboxId: '../etc', runRoot: path.join(tmp.path, 'run') }), (e: KataError) => e.code === 'KATA_ERR_USAGE');
  });

  it('records its owner (this process) in the run directory before anything starts', async () => {
    const running = await launchVm(await validated('/k'), { sandboxId: 'sb-owner', runRoot: path.join(tmp.path, 'run') });
    try {
      assert.equal((JSON.parse(readFileSync(path.join(running.ctx.runDir, OWNER_FILE), 'utf8')) as { pid: number }).pid, process.pid);
    } finally {
      await running.stop();
    }
  });

  it('on abort while the VM starts, stops it, removes the run directory and rejects with KATA_ERR_INTERRUPTED', async () => {
    const abort = new AbortController();
    const launching = launchVm(await validated('/hang-start'), { sandboxId: 'sb-int', runRoot: path.join(tmp.path, 'run'), signal: abort.signal });
    const runDir = path.join(tmp.path, 'run', 'sb-int');
    while (!existsSync(path.join(tmp.path, 'run', 'events.log')) || !events().includes('vm-start')) await new Promise((r) => setTimeout(r, 5));
    abort.abort();
    await assert.rejects(launching, (e: KataError) => e.code === 'KATA_ERR_INTERRUPTED');
    assert.deepEqual(events(), ['daemon-start:true', 'vm-start', 'vm-stop', 'daemon-stop:exit']);
    assert.equal(existsSync(runDir), false);
  });

  it('reports a run root it cannot create with KATA_ERR_RUN_DIR', async () => {
    const file = tmp.file('not-a-dir', '');
    await assert.rejects(launchVm(await validated('/k'), { sandboxId: 'sb5', runRoot: path.join(file, 'run') }), (e: KataError) => e.code === 'KATA_ERR_RUN_DIR' && e.value === path.join(file, 'run', 'sb5'));
  });

  it('unmounts what is left mounted under the run directory before removing it: host data survives', async function () {
    if (process.getuid?.() !== 0) this.skip();
    const data = tmp.file('host-data/precious.txt', 'keep me\n');
    const running = await launchVm(await validated('/k'), { sandboxId: 'sb-mount', runRoot: path.join(tmp.path, 'run') });
    const target = path.join(running.ctx.runDir, 'shared', 'c1', 'rootfs');
    mkdirSync(target, { recursive: true });
    execFileSync('mount', ['--bind', path.dirname(data), target]);
    try {
      await running.stop();
      assert.equal(await isMountPoint(target), false);
      assert.equal(existsSync(running.ctx.runDir), false);
      assert.equal(readFileSync(data, 'utf8'), 'keep me\n');
    } finally {
      if (await isMountPoint(target)) execFileSync('umount', ['-l', target]);
    }
  });
});
