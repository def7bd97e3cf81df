import assert from 'node:assert/strict';
import sinon from 'sinon';
import { judgeConfig } from '../../../core/runtime.js';
import { activationOf, manifestProblems } from '../../../core/plugin-loader.js';
import type { PluginManifest, PluginSource } from '../../../core/plugin-api.js';
import { BUILTIN_PLUGINS } from '../../../plugins/builtin.js';
import { MANIFEST as QEMU_MANIFEST } from '../../../plugins/qemu/manifest.js';
import { MANIFEST as TDX_MANIFEST } from '../../../plugins/tdx/manifest.js';
import { TempDir, fakeConfig, fakeHypervisorSource } from '../../helpers/tmp.js';

describe('plugin activation', () => {
  describe('activationOf', () => {
    const raw = { hypervisor: { qemu: { shared_fs: 'virtio-9p', confidential_guest: true } } };

    it('applies a plugin without activation always', () => {
      assert.deepEqual(activationOf(undefined, raw, 'qemu'), { active: true, reason: '' });
    });

    it('matches the hypervisor section by name and says so', () => {
      assert.deepEqual(activationOf({ hypervisor: 'qemu' }, raw, 'qemu'), { active: true, reason: '[hypervisor.qemu] section' });
      assert.equal(activationOf({ hypervisor: 'clh' }, raw, 'qemu').active, false);
    });

    it('reads hypervisor.* as the configuration\'s hypervisor section and uses the default of an absent key', () => {
      assert.equal(activationOf({ when: [{ key: 'hypervisor.*.shared_fs', in: ['virtio-fs'], default: 'virtio-fs' }] }, raw, 'qemu').active, false);
      assert.deepEqual(activationOf({ when: [{ key: 'hypervisor.*.disable_block_device_use', in: [false], default: false }] }, raw, 'qemu'), {
        active: true,
        reason: 'disable_block_device_use = false',
      });
      assert.equal(activationOf({ when: [{ key: 'hypervisor.*.missing', in: [true] }] }, raw, 'qemu').active, false);
    });

    it('is stopped by any unless condition', () => {
      const act = { when: [{ key: 'hypervisor.*.confidential_guest', in: [true] }], unless: [{ key: 'hypervisor.*.sev_snp_guest', in: [true] }] };
      assert.equal(activationOf(act, raw, 'qemu').active, true);
      assert.equal(activationOf(act, { hypervisor: { qemu: { confidential_guest: true, sev_snp_guest: true } } }, 'qemu').active, false);
    });

    it('activates nothing on a value of the wrong type (the shape check reports it)', () => {
      assert.equal(activationOf({ when: [{ key: 'hypervisor.*.shared_fs', in: ['virtio-fs'], default: 'virtio-fs' }] }, { hypervisor: { qemu: { shared_fs: ['virtio-fs'] } } }, 'qemu').active, false);
    });
  });

  describe('in the validated config phase', () => {
    let tmp: TempDir;
    beforeEach(() => (tmp = new TempDir()));
    afterEach(() => tmp.cleanup());

    it('applies a third-party plugin only where its activation matches', async () => {
      const hv = tmp.file('fakevmm.mjs', fakeHypervisorSource('fakevmm'));
      const policy = tmp.file(
        'policy.mjs',
        `export default { manifest: { name: 'policy', version: '1.0.0', runtime: '^1.0.0', activation: { when: [{ key: 'hypervisor.*.enable_debug', in: [true] }] } },
          apply({ hooks }) { hooks.validate.tap('policy', (cfg, v) => v.veto({ key: 'hypervisor.fakevmm.enable_debug', value: true, reason: 'no debug here', fix: 'enable_debug = false' })); } };`,
      );
      const text = (extra: string) => fakeConfig('fakevmm', hv, extra).replace(`plugins = ["${hv}"]`, `plugins = ${JSON.stringify([hv, policy])}`);
      const off = await judgeConfig({ text: text(''), builtins: [] });
      assert.equal(off.valid, true, JSON.stringify(off.problems));
      assert.deepEqual(off.plugins.map((p) => p.name), ['fakevmm']);
      const on = await judgeConfig({ text: text('enable_debug = true'), builtins: [] });
      assert.deepEqual(on.plugins.map((p) => [p.name, p.reason]), [['fakevmm', 'listed in runtime.plugins'], ['policy', 'listed in runtime.plugins; enable_debug = true']]);
      assert.deepEqual(on.problems.map((p) => [p.code, p.plugin, p.key]), [['KATA_ERR_CONFIG_VETO', 'policy', 'hypervisor.fakevmm.enable_debug']]);
    });

    it('takes the built-in plugins from the caller, not from the core', async () => {
      const text = '[hypervisor.qemu]\nkernel = "/k"\nimage = "/i"\n';
      await assert.rejects(judgeConfig({ text, builtins: [] }), (e: { code: string; message: string }) => e.code === 'KATA_ERR_HYPERVISOR_UNSUPPORTED' && /available: \)/.test(e.message));
      const loads: string[] = [];
      const src = (name: string): PluginSource => ({
        name,
        load: async () => {
          loads.push(name);
          return { default: { manifest: { name, version: '1.0.0', runtime: '^1.0.0', provides: ['hypervisor', `hypervisor:${name}`], activation: { hypervisor: name } },
            apply: ({ hooks }: { hooks: { plan: { tap: (o: object, f: (plan: { vm: { launch?: unknown } }) => unknown) => void } } }) => hooks.plan.tap({ stage: 1000 }, (plan) => ((plan.vm.launch = [name]), plan)) } };
        },
      });
      const j = await judgeConfig({ text, builtins: [src('qemu'), src('other')] });
      assert.deepEqual(j.plugins.map((p) => [p.name, p.builtin, p.reason]), [['qemu', true, '[hypervisor.qemu] section']]);
      assert.deepEqual(loads.sort(), ['other', 'qemu']);
    });

    it('imports each built-in plugin once per process, however many configurations it judges', async () => {
      const qemu = (await import('../../../plugins/qemu/index.js')) as unknown;
      const load = sinon.spy(async () => qemu);
      const builtins: PluginSource[] = [{ name: 'qemu', load }];
      const text = '[hypervisor.qemu]\nkernel = "/k"\nimage = "/i"\nshared_fs = "virtio-9p"\ndisable_block_device_use = true\n';
      for (let i = 0; i < 3; i++) assert.equal((await judgeConfig({ text, builtins })).valid, true);
      sinon.assert.calledOnce(load);
    });

    it('does not import a built-in offered with its manifest when its activation does not match', async () => {
      const qemu = (await import('../../../plugins/qemu/index.js')) as { default: { manifest: PluginManifest } };
      const tdxLoad = sinon.spy(async () => import('../../../plugins/tdx/index.js'));
      const qemuLoad = sinon.spy(async () => qemu);
      const builtins: PluginSource[] = [
        { name: 'qemu', manifest: qemu.default.manifest, load: qemuLoad },
        { name: 'tdx', manifest: TDX_MANIFEST, load: tdxLoad },
      ];
      const text = '[hypervisor.qemu]\nkernel = "/k"\nimage = "/i"\nshared_fs = "virtio-9p"\ndisable_block_device_use = true\n';
      const j = await judgeConfig({ text, builtins });
      assert.deepEqual(j.plugins.map((p) => p.name), ['qemu']);
      sinon.assert.notCalled(tdxLoad);
    });

    it('refuses a built-in whose module manifest differs from the one it was offered with', async () => {
      const qemu = await import('../../../plugins/qemu/index.js');
      const builtins: PluginSource[] = [{ name: 'qemu', manifest: { ...QEMU_MANIFEST, version: '9.9.9' }, load: async () => qemu }];
      await assert.rejects(judgeConfig({ text: '[hypervisor.qemu]\nkernel = "/k"\nimage = "/i"\n', builtins }), (e: { code: string }) => e.code === 'KATA_ERR_PLUGIN_BAD_MANIFEST');
    });

    it('ships built-in manifests that pass the manifest checks (they are not re-checked at every start)', async () => {
      for (const b of BUILTIN_PLUGINS) {
        assert.deepEqual(await manifestProblems({ manifest: b.manifest, apply: () => undefined }), [], b.name);
        assert.equal(b.manifest?.name, b.name);
      }
    });

    it('reports a confidential guest whose TEE no plugin provides, naming the TEEs that exist', async () => {
      const j = await judgeConfig({ text: '[hypervisor.qemu]\nkernel = "/k"\nimage = "/i"\nconfidential_guest = true\nsev_snp_guest = true\n' });
      const p = j.problems.find((x) => x.code === 'KATA_ERR_TEE_UNSUPPORTED');
      assert.equal(p?.key, 'hypervisor.qemu.sev_snp_guest');
      assert.match(p?.reason ?? '', /available: tdx \(plugin tdx\)/);
      assert.ok(!j.plugins.some((x) => x.name === 'tdx'));
    });
  });
});
