import assert from 'node:assert/strict';
import { KataError } from '../../../core/errors.js';
import { definePlugin, type ContainerEvent, type KataConfig, type SandboxPlan, type VerdictView, type VmContext, type VmExit } from '../../../core/plugin-api.js';
import { judge, runLifecycle } from '../../../core/testing.js';

const QEMU = `[hypervisor.qemu]
kernel = "/k"
image = "/i"
shared_fs = "none"
default_memory = 512
disable_block_device_use = true
`;
const BLOCK_QEMU = QEMU.replace('disable_block_device_use = true', 'disable_block_device_use = false\nblock_device_driver = "virtio-blk"');

/** A plugin tapping the new hooks, recording each call with its arguments. */
function observer(name: string, calls: string[], extra: (hooks: Parameters<Parameters<typeof definePlugin>[0]['apply']>[0]['hooks']) => void = () => undefined) {
  return definePlugin({
    manifest: { name, version: '1.0.0', runtime: '^1.0.0' },
    apply({ hooks }) {
      hooks.agentReady.tapPromise(name, async (ctx: VmContext) => void calls.push(`agentReady ${ctx.sandboxId}`));
      hooks.containerCreated.tapPromise(name, async (c: ContainerEvent) => void calls.push(`containerCreated ${c.containerId} ${c.sandbox.sandboxId}`));
      hooks.containerStarted.tapPromise(name, async (c: ContainerEvent) => void calls.push(`containerStarted ${c.containerId}`));
      hooks.containerExited.tapPromise(name, async (c: ContainerEvent, status: number) => void calls.push(`containerExited ${c.containerId} ${status}`));
      hooks.sandboxStopped.tapPromise(name, async (ctx: VmContext, exit: VmExit) => void calls.push(`sandboxStopped ${ctx.sandboxId} ${exit.expected}`));
      extra(hooks);
    },
  });
}

/** Refuses a VM whose resolved maximum memory exceeds `limitMiB`: a value only the plan has. */
function memoryCap(limitMiB: number, seen: { plan?: SandboxPlan; config?: KataConfig; frozen?: boolean; launch?: unknown } = {}, veto: (v: VerdictView, p: SandboxPlan) => void = (v, p) =>
  v.veto({ key: 'hypervisor.qemu.default_maxmemory', value: p.vm.memory.maxMiB, reason: `the VM may grow to ${p.vm.memory.maxMiB} MiB, over the ${limitMiB} MiB this host allows`, fix: `set default_maxmemory = ${limitMiB}` })) {
  return definePlugin({
    manifest: { name: 'memory-cap', version: '1.0.0', runtime: '^1.0.0' },
    apply({ hooks }) {
      hooks.checkPlan.tap('memory-cap', (plan, config, verdict) => {
        Object.assign(seen, { plan, config, frozen: Object.isFrozen(plan.vm.memory), launch: plan.vm.launch });
        if (plan.vm.memory.maxMiB > limitMiB) veto(verdict, plan);
      });
    },
  });
}

describe('hook checkPlan', () => {
  it('gets the final plan, frozen and rendered, with the configuration, after the plan hook', async () => {
    const seen: { plan?: SandboxPlan; config?: KataConfig; frozen?: boolean; launch?: unknown } = {};
    const report = await judge(QEMU, { plugins: [memoryCap(Number.MAX_SAFE_INTEGER, seen)] });
    assert.equal(report.valid, true, JSON.stringify(report.problems));
    assert.equal(seen.frozen, true);
    assert.ok(Array.isArray(seen.launch), 'the qemu plugin rendered its argv before the check');
    assert.equal(seen.config?.hypervisorName, 'qemu');
    assert.ok((seen.plan?.vm.memory.maxMiB ?? 0) > 512, 'the resolved maximum memory, which no configuration key holds as such');
  });

  it('vetoes with a coded problem naming the plugin and the hook, and leaves no plan', async () => {
    const report = await judge(QEMU, { plugins: [memoryCap(1024)] });
    assert.equal(report.valid, false);
    assert.deepEqual(report.problems.map((p) => [p.code, p.plugin, p.hook, p.key]), [['KATA_ERR_CONFIG_VETO', 'memory-cap', 'checkPlan', 'hypervisor.qemu.default_maxmemory']]);
    assert.match(report.problems[0]!.fix, /default_maxmemory = 1024/);
    assert.equal(report.plan, null);
  });

  it('stops before any VM is created or started when it vetoes', async () => {
    const r = await runLifecycle(QEMU, { plugins: [memoryCap(1024)] });
    assert.equal(r.error?.code, 'KATA_ERR_CONFIG_INVALID');
    assert.deepEqual(r.events, []);
    assert.equal(r.plan, undefined);
  });

  it('refuses a veto without a fix as the plugin own error, keeping the hook', async () => {
    const report = await judge(QEMU, { plugins: [memoryCap(1024, {}, (v) => v.veto({ key: 'hypervisor.qemu.default_maxmemory', reason: 'too big' } as never))] });
    assert.deepEqual(report.problems.map((p) => [p.code, p.plugin, p.hook]), [['KATA_ERR_PLUGIN_BAD_VETO', 'memory-cap', 'checkPlan']]);
  });
});

describe('hooks agentReady, containerCreated, containerStarted, containerExited, sandboxStopped', () => {
  it('are called in the lifecycle order with the sandbox, the container and its exit status', async () => {
    const calls: string[] = [];
    const r = await runLifecycle(QEMU, { plugins: [observer('watcher', calls)], sandboxId: 'sb-1', containers: [{ id: 'c1', exitStatus: 3 }, { id: 'c2', exitStatus: 137 }] });
    assert.equal(r.error, undefined, r.error?.message);
    assert.deepEqual(calls, [
      'agentReady sb-1',
      'containerCreated c1 sb-1',
      'containerStarted c1',
      'containerExited c1 3',
      'containerCreated c2 sb-1',
      'containerStarted c2',
      'containerExited c2 137',
      'sandboxStopped sb-1 true',
    ]);
    assert.deepEqual(r.events.filter((e) => e === 'hook:vmStarted' || e === 'hook:agentReady' || e === 'hook:vmStopped' || e === 'hook:sandboxStopped' || e === 'vm:stop'), ['hook:vmStarted', 'hook:agentReady', 'vm:stop', 'hook:vmStopped', 'hook:sandboxStopped']);
  });

  it('fails the sandbox start when an agentReady handler throws, keeping the hook name, and stops the VM', async () => {
    const r = await runLifecycle(QEMU, {
      plugins: [observer('gate', [], (hooks) => hooks.agentReady.tapPromise('gate', async () => {
        throw new Error('attestation failed');
      }))],
      containers: [{ id: 'c1' }],
    });
    assert.equal(r.error?.code, 'KATA_ERR_PLUGIN_HOOK');
    assert.equal(r.error?.plugin, 'gate');
    assert.equal(r.error?.hook, 'agentReady');
    assert.deepEqual(r.events.slice(r.events.indexOf('hook:agentReady')), ['hook:agentReady', 'vm:stop', 'hook:vmStopped']);
  });

  it('logs what a notice handler throws, with its code, plugin and hook, and goes on', async () => {
    const calls: string[] = [];
    const r = await runLifecycle(QEMU, {
      plugins: [
        observer('noisy', [], (hooks) => {
          hooks.containerCreated.tapPromise('noisy', async () => {
            throw new Error('created');
          });
          hooks.containerStarted.tapPromise('noisy', async () => {
            throw new KataError('NOISY_ERR_QUOTA' as never, 'over quota', { fix: 'raise the quota' });
          });
          hooks.containerExited.tapPromise('noisy', async () => {
            throw new Error('exited');
          });
          hooks.sandboxStopped.tapPromise('noisy', async () => {
            throw new Error('stopped');
          });
        }),
        observer('after', calls),
      ],
      containers: [{ id: 'c1' }],
    });
    assert.equal(r.error, undefined, r.error?.message);
    assert.deepEqual(r.noticeErrors.map((e) => [e.plugin, e.hook, e.code]), [
      ['noisy', 'containerCreated', 'KATA_ERR_PLUGIN_HOOK'],
      ['noisy', 'containerStarted', 'NOISY_ERR_QUOTA'],
      ['noisy', 'containerExited', 'KATA_ERR_PLUGIN_HOOK'],
      ['noisy', 'sandboxStopped', 'KATA_ERR_PLUGIN_HOOK'],
    ]);
    assert.match(r.noticeErrors[1]!.message, /^\[plugin noisy\] containerStarted handler failed: over quota/);
    assert.deepEqual(calls, ['agentReady kit-sandbox', 'containerCreated c1 kit-sandbox', 'containerStarted c1', 'containerExited c1 0', 'sandboxStopped kit-sandbox true'], 'the next plugin still hears of everything');
  });

  it('stops the configuration phase when a checkPlan handler throws, keeping the hook name', async () => {
    const thrower = definePlugin({
      manifest: { name: 'thrower', version: '1.0.0', runtime: '^1.0.0' },
      apply({ hooks }) {
        hooks.checkPlan.tap('thrower', () => {
          throw new RangeError('bad plan');
        });
      },
    });
    const report = await judge(QEMU, { plugins: [thrower] });
    assert.deepEqual(report.problems.map((p) => [p.code, p.plugin, p.hook]), [['KATA_ERR_PLUGIN_HOOK', 'thrower', 'checkPlan']]);
    const r = await runLifecycle(QEMU, { plugins: [thrower] });
    assert.deepEqual([r.error?.code, r.error?.hook, r.events], ['KATA_ERR_PLUGIN_HOOK', 'checkPlan', []]);
  });
});

describe('the recording hypervisor driver', () => {
  it('records the plan it got, its start and stop and the hot-plug of a block rootfs', async () => {
    const r = await runLifecycle(BLOCK_QEMU, { containers: [{ id: 'c1', rootfs: { kind: 'block', path: '/dev/mapper/c1', fstype: 'ext4' } }] });
    assert.equal(r.error, undefined, r.error?.message);
    assert.equal(r.plan?.hypervisor, 'qemu');
    assert.equal(r.plan?.vm.memory.bootMiB, 512);
    assert.deepEqual(r.hotplugged.map((d) => d.path), ['/dev/mapper/c1']);
    assert.deepEqual(r.unplugged, r.hotplugged.map((d) => d.id));
    assert.equal(r.attachments.c1?.storages[0]?.driver, 'blk');
    const vm = r.events.filter((e) => e.startsWith('vm:'));
    assert.deepEqual(vm, ['vm:create', 'vm:start', `vm:hotplug:${r.hotplugged[0]!.id}`, `vm:unplug:${r.hotplugged[0]!.id}`, 'vm:stop']);
  });
});
