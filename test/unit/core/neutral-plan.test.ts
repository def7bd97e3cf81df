import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { ConfigInvalidError, Problem } from '../../../core/errors.js';
import { PACKAGE_ROOT } from '../../../core/paths.js';
import type { VmDescription } from '../../../core/plan.js';
import { judgeConfig, loadValidatedConfig, type Judgement } from '../../../core/runtime.js';
import { launchVm } from '../../../core/vm-lifecycle.js';
import { TempDir, fakeConfig, fakeHypervisorSource } from '../../helpers/tmp.js';

const FIRMWARE = '/usr/share/ovmf/OVMF.inteltdx.fd';
const STANDIN_VIRTIOFSD = path.join(PACKAGE_ROOT, 'test', 'fixtures', 'standins', 'virtiofsd.mjs');
const EVERY_RENDER_CAPABILITY = [
  'render:device:vhost-user-fs',
  'render:device:9p',
  'render:device:disk',
  'render:device:console',
  'render:device:rng',
  'render:device:agent-channel',
  'render:tee:tdx',
  'render:access-platform',
  'render:device:net',
];

/**
 * A third-party hypervisor plugin, written as an outside author would (importing `kata-ts/plugin`):
 * it declares the `render:*` capabilities it is given, "renders" the plan by recording the intents
 * it received as its launch artefact, and its driver writes the plan's VM description it was
 * started with to `<run root>/recorded.json`.
 */
function recorderSource(renders: readonly string[]): string {
  return `
import { writeFileSync } from 'node:fs';
import { definePlugin } from 'kata-ts/plugin';

export default definePlugin({
  manifest: { name: 'recorder', version: '1.0.0', runtime: '^1.0.0', provides: ['hypervisor', 'hypervisor:recorder'] },
  apply({ hooks }) {
    hooks.capabilities.tap({ stage: -100 }, (caps, cfg) => {
      if (!cfg.hypervisor.disable_block_device_use) { caps.add('block-device'); caps.add('block-device-hotplug'); caps.add('virtio-blk'); }
      if (cfg.hypervisor.shared_fs !== 'none') { caps.add('fs-sharing'); caps.add('fs-sharing:' + cfg.hypervisor.shared_fs); }
      caps.add('cpu-hotplug');
      caps.add('memory-hotplug');
      for (const c of ${JSON.stringify(renders)}) caps.add(c);
    });
    hooks.plan.tap({ stage: -100 }, (plan) => {
      plan.agent = { address: 'unix://{sandbox_dir}/recorder-agent.sock' };
      return plan;
    });
    hooks.plan.tap({ stage: 1000 }, (plan) => {
      const { launch, native, ...intents } = plan.vm;
      plan.vm.launch = JSON.parse(JSON.stringify(intents));
      return plan;
    });
    hooks.createVm.tapPromise('recorder', async (ctx) => {
      writeFileSync(ctx.runDir + '/../recorded.json', JSON.stringify(ctx.plan.vm));
      let done;
      const exited = new Promise((r) => (done = r));
      return {
        hypervisor: 'recorder', pid: undefined, exited,
        async start() {}, async hotplugBlock() { throw new Error('no'); }, async unplugBlock() {},
        async stop() { const e = { expected: true, code: 0, signal: null, stderrTail: [] }; done(e); return e; },
      };
    });
  },
});
`;
}

/** A TD is sized at boot: the tdx plugin vetoes anything else. */
const TD_SIZING = 'static_sandbox_resource_mgmt = true';

/** One hypervisor section body, used unchanged under [hypervisor.recorder], [hypervisor.qemu] and [hypervisor.clh]. */
function section(lines: string): string {
  return `kernel = "/k"\ninitrd = "/i"\nfirmware = "${FIRMWARE}"\nconfidential_guest = true\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"\n${lines}\n`;
}

const VIRTIO_FS_OPT_IN = `shared_fs = "virtio-fs"\nvirtio_fs_daemon = "${STANDIN_VIRTIOFSD}"\nvirtio_fs_queue_size = 512\nvirtio_fs_access_platform = true`;

describe('the plan as intents, seen by a third-party hypervisor plugin (a recording driver)', () => {
  let tmp: TempDir;
  let recorder: string;
  beforeEach(() => {
    tmp = new TempDir();
    tmp.linkPackage();
    recorder = tmp.file('recorder.mjs', recorderSource(EVERY_RENDER_CAPABILITY));
  });
  afterEach(() => {
    delete process.env.STANDIN_ARGS_FILE;
    tmp.cleanup();
  });

  const recorderConfig = (lines: string, plugin = recorder) => `[hypervisor.recorder]\n${section(lines)}\n[runtime]\n${TD_SIZING}\nplugins = ["${plugin}"]\n`;
  const builtinConfig = (hv: 'qemu' | 'clh', lines: string) => `[hypervisor.${hv}]\n${section(lines)}\n[runtime]\n${TD_SIZING}\n`;

  it('receives the TDX settings and the virtio-fs device as intents, as the built-in hypervisors do', async () => {
    const j = await judgeConfig({ text: recorderConfig(VIRTIO_FS_OPT_IN) });
    assert.equal(j.valid, true, JSON.stringify(j.problems));
    assert.deepEqual(j.plugins.map((p) => p.name).sort(), ['devmapper', 'network', 'recorder', 'tdx', 'virtiofs']);
    const seen = j.plan?.vm.launch as Omit<VmDescription, 'launch' | 'native'>;
    assert.deepEqual(seen.confidential, { tee: 'tdx', firmware: FIRMWARE, accessPlatform: true });
    assert.equal(seen.firmware, FIRMWARE);
    assert.deepEqual(seen.devices, [{ kind: 'vhost-user-fs', socket: '{sandbox_dir}/virtiofsd.sock', tag: 'kataShared', queues: 1, queueSize: 512, cacheSizeMiB: 0 }]);
    assert.equal(seen.memory.shared, true, 'virtiofs asks for shared guest memory');
    assert.equal(seen.cpus.hotplug, false, 'a TD has a fixed vCPU count');
    assert.equal(seen.cpus.max, seen.cpus.boot);
    assert.equal(seen.memory.hotplug, false);
    assert.equal(seen.kernel, '/k');

    // The built-in drivers get the very same intents from tdx and virtiofs.
    for (const hv of ['qemu', 'clh'] as const) {
      const { plan } = await loadValidatedConfig({ text: builtinConfig(hv, VIRTIO_FS_OPT_IN) });
      assert.deepEqual(plan.vm.confidential, seen.confidential, hv);
      assert.deepEqual(plan.vm.devices.filter((d) => d.kind === 'vhost-user-fs'), seen.devices, hv);
      assert.equal(plan.vm.memory.shared, true, hv);
    }
  });

  it('hands its driver the intents when the VM is created', async () => {
    process.env.STANDIN_ARGS_FILE = path.join(tmp.path, 'args.json');
    const running = await launchVm(await loadValidatedConfig({ text: recorderConfig(VIRTIO_FS_OPT_IN) }), { sandboxId: 'rec1', runRoot: path.join(tmp.path, 'run') });
    try {
      const recorded = JSON.parse(readFileSync(path.join(tmp.path, 'run', 'recorded.json'), 'utf8')) as VmDescription;
      assert.equal(recorded.hypervisor, 'recorder');
      assert.deepEqual(recorded.confidential, { tee: 'tdx', firmware: FIRMWARE, accessPlatform: true });
      assert.deepEqual(recorded.devices.map((d) => d.kind), ['vhost-user-fs']);
    } finally {
      await running.stop();
    }
  });

  it('gets the same tdx vetoes as the built-in hypervisors', async () => {
    const tdxProblems = (j: Judgement, table: string) =>
      j.problems.filter((p) => p.plugin === 'tdx').map((p) => ({ code: p.code, key: p.key.replace(`${table}.`, '') }));
    for (const lines of [`shared_fs = "virtio-fs"\nvirtio_fs_daemon = "${STANDIN_VIRTIOFSD}"`, 'shared_fs = "virtio-9p"']) {
      const rec = tdxProblems(await judgeConfig({ text: recorderConfig(lines) }), 'hypervisor.recorder');
      assert.ok(rec.some((p) => p.key === 'shared_fs'), `tdx vetoes ${lines.split('\n')[0]} for the recorder`);
      const qemu = tdxProblems(await judgeConfig({ text: builtinConfig('qemu', lines) }), 'hypervisor.qemu');
      assert.deepEqual(rec, qemu, lines);
    }
    // Cloud Hypervisor has no 9p at all (its own veto), but tdx says the same about virtio-fs.
    const lines = `shared_fs = "virtio-fs"\nvirtio_fs_daemon = "${STANDIN_VIRTIOFSD}"`;
    assert.deepEqual(
      tdxProblems(await judgeConfig({ text: recorderConfig(lines) }), 'hypervisor.recorder'),
      tdxProblems(await judgeConfig({ text: builtinConfig('clh', lines) }), 'hypervisor.clh'),
    );
  });

  it('fails the validated config phase, naming the plugin and the capability, when it cannot render TDX or vhost-user-fs', async () => {
    const limited = tmp.file('limited.mjs', recorderSource(['render:device:console']).replaceAll("'recorder'", "'limited'").replace('hypervisor:recorder', 'hypervisor:limited'));
    const text = `[hypervisor.limited]\n${section(VIRTIO_FS_OPT_IN)}\n[runtime]\n${TD_SIZING}\nplugins = ["${limited}"]\n`;
    const j = await judgeConfig({ text });
    assert.equal(j.valid, false);
    assert.equal(j.plan, undefined);
    const missing = (capability: string) => j.problems.find((p) => p.code === 'KATA_ERR_CAPABILITY_MISSING' && p.reason.includes(`"${capability}"`));
    assert.deepEqual(pick(missing('render:tee:tdx')), { code: 'KATA_ERR_CAPABILITY_MISSING', plugin: 'tdx', key: 'hypervisor.limited.confidential_guest' });
    assert.deepEqual(pick(missing('render:access-platform')), { code: 'KATA_ERR_CAPABILITY_MISSING', plugin: 'tdx', key: 'hypervisor.limited.confidential_guest' });
    assert.deepEqual(pick(missing('render:device:vhost-user-fs')), { code: 'KATA_ERR_CAPABILITY_MISSING', plugin: 'virtiofs', key: 'hypervisor.limited.shared_fs' });
    await assert.rejects(loadValidatedConfig({ text }), (e: ConfigInvalidError) => e.code === 'KATA_ERR_CONFIG_INVALID' && e.problems.length === j.problems.length);
  });

  it('refuses, in the validated config phase, an intent some plugin added without asking for its capability', async () => {
    // A device plugin of the next issue's kind, which forgot verdict.require().
    const net = tmp.file(
      'net.mjs',
      `export default { manifest: { name: 'net', version: '1.0.0', runtime: '^1.0.0', requires: ['hypervisor'] }, apply({ hooks }) {
        hooks.plan.tap('net', (plan) => { plan.vm.devices.push({ kind: 'net', tap: 'tap0' }); return plan; });
      } };`,
    );
    // Without the network plugin, whose own requirement would report the missing capability first.
    const text = (plugin: string) => `[hypervisor.recorder]\nkernel = "/k"\nimage = "/img"\nshared_fs = "none"\ndisable_block_device_use = true\n[runtime]\ninternetworking_model = "none"\nplugins = ["${plugin}", "${net}"]\n`;
    const noNet = tmp.file('recorder-no-net.mjs', recorderSource(EVERY_RENDER_CAPABILITY.filter((c) => c !== 'render:device:net')));
    const j = await judgeConfig({ text: text(noNet) });
    assert.equal(j.valid, false);
    assert.equal(j.plan, undefined);
    assert.deepEqual(
      j.problems.map((p) => ({ code: p.code, hook: p.hook, key: p.key, plugin: p.plugin })),
      [{ code: 'KATA_ERR_CAPABILITY_MISSING', hook: 'plan', key: 'hypervisor.recorder', plugin: undefined }],
    );
    assert.match(j.problems[0]?.reason ?? '', /"render:device:net"/);

    // Declared, the same intent reaches the hypervisor plugin.
    const ok = await judgeConfig({ text: text(recorder) });
    assert.equal(ok.valid, true, JSON.stringify(ok.problems));
    assert.deepEqual((ok.plan?.vm.launch as VmDescription).devices, [{ kind: 'net', tap: 'tap0' }]);
  });
});

describe('the scsi-controller intent', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir()));
  afterEach(() => tmp.cleanup());

  /** A device plugin that asks for a SCSI controller in whatever VM it is in. */
  const scsiPlugin = () =>
    tmp.file(
      'scsi.mjs',
      `export default { manifest: { name: 'scsi', version: '1.0.0', runtime: '^1.0.0', requires: ['hypervisor'] }, apply({ hooks }) {
        hooks.plan.tap('scsi', (plan) => { plan.vm.devices.push({ kind: 'scsi-controller', id: 'extra0' }); return plan; });
      } };`,
    );
  const text = (hv: 'qemu' | 'clh', plugin: string) => `[hypervisor.${hv}]\nkernel = "/k"\ninitrd = "/i"\nshared_fs = "none"\ndisable_block_device_use = true\n[runtime]\nplugins = ["${plugin}"]\n`;

  it('is rendered by qemu as a virtio-scsi-pci controller', async () => {
    const j = await judgeConfig({ text: text('qemu', scsiPlugin()) });
    assert.equal(j.valid, true, JSON.stringify(j.problems));
    assert.ok((j.plan?.vm.launch as string[]).includes('virtio-scsi-pci,id=extra0'));
  });

  it('is refused in the validated config phase under clh, which does not declare render:device:scsi-controller', async () => {
    const j = await judgeConfig({ text: text('clh', scsiPlugin()) });
    assert.equal(j.valid, false);
    assert.deepEqual(
      j.problems.map((p) => ({ code: p.code, hook: p.hook })),
      [{ code: 'KATA_ERR_CAPABILITY_MISSING', hook: 'plan' }],
    );
    assert.match(j.problems[0]?.reason ?? '', /"render:device:scsi-controller"/);
  });
});

describe('the plan hook guard', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir()));
  afterEach(() => tmp.cleanup());

  it('refuses a plugin that replaces the VM description instead of adding to it, with a coded error', async () => {
    const hv = tmp.file('replacer.mjs', fakeHypervisorSource('replacer', "hooks.plan.tap({ stage: 100 }, (plan) => { plan.vm = { launch: ['x'] }; return plan; });"));
    await assert.rejects(judgeConfig({ text: fakeConfig('replacer', hv), builtins: [] }), (e: { code: string; hook?: string }) => e.code === 'KATA_ERR_PLUGIN_HOOK' && e.hook === 'plan');
  });
});

function pick(p: Problem | undefined): Pick<Problem, 'code' | 'plugin' | 'key'> | undefined {
  return p && { code: p.code, plugin: p.plugin, key: p.key };
}
