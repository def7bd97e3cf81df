import assert from 'node:assert/strict';
import { chmodSync, chownSync, existsSync, mkdirSync, symlinkSync } from 'node:fs';
import path from 'node:path';
import { judgeConfig } from '../../../core/runtime.js';
import type { KataError } from '../../../core/errors.js';
import { TempDir, fakeConfig, fakeHypervisorSource } from '../../helpers/tmp.js';

describe('plugin loader', () => {
  let tmp: TempDir;
  let hv: string;
  beforeEach(() => {
    tmp = new TempDir();
    hv = tmp.file('fakevmm.mjs', fakeHypervisorSource('fakevmm'));
  });
  afterEach(() => tmp.cleanup());

  const judgeWith = (plugins: string[], extraSection = '', extraRuntime = '') =>
    judgeConfig({ text: fakeConfig('fakevmm', hv, extraSection).replace(`plugins = ["${hv}"]`, `plugins = ${JSON.stringify([hv, ...plugins])}\n${extraRuntime}`) });

  const rejectsWith = async (p: Promise<unknown>, code: string, plugin?: string) => {
    await assert.rejects(p, (e: KataError) => {
      assert.equal(e.code, code, e.message);
      if (plugin !== undefined) assert.equal(e.plugin, plugin);
      return true;
    });
  };

  it('loads a third-party hypervisor plugin by absolute path', async () => {
    const j = await judgeWith([]);
    assert.equal(j.valid, true, JSON.stringify(j.problems));
    assert.deepEqual(j.plugins.map((p) => [p.name, p.builtin]), [['fakevmm', false], ['network', true]]);
    assert.deepEqual(j.plan?.vm.launch, ['fakevmm', '--kernel', '/k']);
  });

  it('reports a missing module', () => rejectsWith(judgeWith([`${tmp.path}/nope.mjs`]), 'KATA_ERR_PLUGIN_NOT_FOUND'));

  it('reports a package that is not installed', () => rejectsWith(judgeWith(['kata-ts-no-such-plugin']), 'KATA_ERR_PLUGIN_NOT_FOUND'));

  it('refuses a relative path when the configuration was not read from a file', () => rejectsWith(judgeWith(['./rel.mjs']), 'KATA_ERR_PLUGIN_NOT_FOUND'));

  it("resolves a relative path against the configuration file's directory", async () => {
    tmp.file('rel.mjs', fakeHypervisorSource('fakevmm'));
    const file = tmp.file('conf/c.toml', fakeConfig('fakevmm', '../rel.mjs'));
    const j = await judgeConfig({ file });
    assert.equal(j.valid, true, JSON.stringify(j.problems));
    assert.deepEqual(j.plugins.map((p) => [p.name, p.specifier]), [['fakevmm', '../rel.mjs'], ['network', 'network']]);
  });

  it('tells an author who named a file without ./ how to write it', async () => {
    tmp.file('sub/p.mjs', fakeHypervisorSource('fakevmm'));
    await assert.rejects(judgeConfig({ file: tmp.file('c.toml', fakeConfig('fakevmm', 'sub/p.mjs')) }), (e: KataError) => {
      assert.deepEqual([e.code, e.plugin, e.key], ['KATA_ERR_PLUGIN_NOT_FOUND', 'sub/p.mjs', 'runtime.plugins']);
      assert.match(e.fix, /"\.\/sub\/p\.mjs"/);
      return true;
    });
  });

  it('reports a relative path that names no file as not found', () => rejectsWith(judgeConfig({ file: tmp.file('c.toml', fakeConfig('fakevmm', './missing.mjs')) }), 'KATA_ERR_PLUGIN_NOT_FOUND'));

  it('reports a module that throws while importing', () => rejectsWith(judgeWith([tmp.file('throws.mjs', 'throw new Error("kaput");')]), 'KATA_ERR_PLUGIN_IMPORT'));

  it('tells a missing dependency of the plugin from a missing plugin', () =>
    rejectsWith(judgeWith([tmp.file('dep.mjs', 'import "kata-ts-missing-dependency"; export default {};')]), 'KATA_ERR_PLUGIN_IMPORT'));

  it('reports a module without a default export', () => rejectsWith(judgeWith([tmp.file('nodefault.mjs', 'export const x = 1;')]), 'KATA_ERR_PLUGIN_NO_DEFAULT_EXPORT'));

  it('reports a bad manifest with every problem', async () => {
    const bad = tmp.file('bad.mjs', 'export default { manifest: { name: "Bad Name", version: "one", provides: "x" }, apply: 1 };');
    await assert.rejects(judgeWith([bad]), (e: KataError) => {
      assert.equal(e.code, 'KATA_ERR_PLUGIN_BAD_MANIFEST');
      for (const part of ['apply must be a function', 'manifest.name', 'manifest.runtime', 'manifest.provides', 'manifest.version']) assert.ok(e.message.includes(part), `${part} in ${e.message}`);
      return true;
    });
  });

  it('refuses a plugin built for another API major', () =>
    rejectsWith(judgeWith([tmp.file('v2.mjs', 'export default { manifest: { name: "v2", version: "1.0.0", runtime: "^2.0.0" }, apply() {} };')]), 'KATA_ERR_PLUGIN_API_VERSION', 'v2'));

  it('refuses a plugin whose requirement nobody provides', () =>
    rejectsWith(
      judgeWith([tmp.file('needy.mjs', 'export default { manifest: { name: "needy", version: "1.0.0", runtime: "^1.0.0", requires: ["gpu"] }, apply() {} };')]),
      'KATA_ERR_PLUGIN_MISSING_DEPENDENCY',
      'needy',
    ));

  it('refuses two plugins with one name', () => rejectsWith(judgeWith([tmp.file('dup.mjs', fakeHypervisorSource('fakevmm'))]), 'KATA_ERR_PLUGIN_DUPLICATE', 'fakevmm'));

  it('reports apply() throwing, naming the plugin', () =>
    rejectsWith(judgeWith([tmp.file('boom.mjs', 'export default { manifest: { name: "boom", version: "1.0.0", runtime: "^1.0.0" }, apply() { throw new Error("no"); } };')]), 'KATA_ERR_PLUGIN_APPLY', 'boom'));

  it('reports a hypervisor section that no plugin serves, listing those that exist', async () => {
    await assert.rejects(judgeConfig({ text: '[hypervisor.firecracker]\nkernel = "/k"\n' }), (e: KataError) => {
      assert.equal(e.code, 'KATA_ERR_HYPERVISOR_UNSUPPORTED');
      assert.equal(e.key, 'hypervisor.firecracker');
      assert.match(e.message, /available: clh, qemu/);
      return true;
    });
  });

  it('checks a plugin schema, attributing its errors to the plugin, and knows its keys', async () => {
    const withSchema = tmp.file(
      'schemed.mjs',
      `export default { manifest: { name: "schemed", version: "1.0.0", runtime: "^1.0.0", config: { table: "hypervisor.*", schema: { type: "object", properties: { turbo: { type: "boolean" }, level: { type: "integer", minimum: 1 } } } } }, apply() {} };`,
    );
    const j = await judgeWith([withSchema], 'turbo = "yes"\nlevel = 0\nmystery = 1');
    assert.equal(j.valid, false);
    assert.deepEqual(
      j.problems.map((p) => [p.code, p.plugin, p.key]),
      [
        ['KATA_ERR_CONFIG_SCHEMA', 'schemed', 'hypervisor.fakevmm.turbo'],
        ['KATA_ERR_CONFIG_SCHEMA', 'schemed', 'hypervisor.fakevmm.level'],
      ],
    );
    assert.deepEqual(j.unknownKeys, ['hypervisor.fakevmm.mystery']);
  });

  it('reports a plugin schema file that cannot be read', () =>
    rejectsWith(
      judgeWith([tmp.file('noschema.mjs', 'export default { manifest: { name: "noschema", version: "1.0.0", runtime: "^1.0.0", config: { table: "runtime", schema: "./missing.json" } }, apply() {} };')]),
      'KATA_ERR_PLUGIN_SCHEMA',
      'noschema',
    ));

  describe('as root, a plugin module nobody else may write (StrictModes)', () => {
    before(function () {
      if (process.geteuid?.() !== 0) this.skip();
    });
    /** A plugin that leaves a marker file the moment its top level runs. */
    const markerPlugin = (rel: string, marker: string) =>
      tmp.file(rel, `import { writeFileSync } from 'node:fs';\nwriteFileSync(${JSON.stringify(marker)}, 'imported as uid ' + process.getuid());\nexport default { manifest: { name: 'marker', version: '1.0.0', runtime: '^1.0.0' }, apply() {} };\n`);

    it('imports a plugin from a root-owned directory (the marker proves the module ran)', async () => {
      const marker = path.join(tmp.path, 'ran');
      const j = await judgeWith([markerPlugin('safe/marker.mjs', marker)]);
      assert.equal(j.valid, true, JSON.stringify(j.problems));
      assert.equal(existsSync(marker), true);
    });

    it('refuses a plugin in a world-writable directory without importing it', async () => {
      const marker = path.join(tmp.path, 'ran');
      const evil = markerPlugin('open/evil.mjs', marker);
      chmodSync(path.dirname(evil), 0o777);
      await assert.rejects(judgeWith([evil]), (e: KataError) => {
        assert.equal(e.code, 'KATA_ERR_UNTRUSTED_PATH');
        assert.equal(e.key, 'runtime.plugins');
        assert.equal(e.value, evil);
        return true;
      });
      assert.equal(existsSync(marker), false, 'the module ran before it was refused');
    });

    it('refuses a plugin owned by another user, and one reached through a symlink to such a file', async () => {
      const marker = path.join(tmp.path, 'ran');
      const theirs = markerPlugin('theirs/evil.mjs', marker);
      chownSync(theirs, 65534, 65534);
      await rejectsWith(judgeWith([theirs]), 'KATA_ERR_UNTRUSTED_PATH');
      mkdirSync(path.join(tmp.path, 'safe'));
      const link = path.join(tmp.path, 'safe', 'link.mjs');
      symlinkSync(theirs, link);
      await rejectsWith(judgeWith([link]), 'KATA_ERR_UNTRUSTED_PATH');
      assert.equal(existsSync(marker), false);
    });

    it('refuses a group-writable plugin file', async () => {
      const marker = path.join(tmp.path, 'ran');
      const gw = markerPlugin('gw/evil.mjs', marker);
      chmodSync(gw, 0o664);
      await rejectsWith(judgeWith([gw]), 'KATA_ERR_UNTRUSTED_PATH');
      assert.equal(existsSync(marker), false);
    });
  });
});
