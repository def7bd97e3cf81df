/**
 * The installed `kata-runtime` is a bundle (dist/bundle/kata-runtime.mjs): it must behave like the
 * unbundled code, including with a third-party plugin that imports the unbundled `kata-ts/plugin`.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, symlinkSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { TempDir } from '../helpers/tmp.js';

const BIN = path.join(PACKAGE_ROOT, (JSON.parse(readFileSync(path.join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { bin: Record<string, string> }).bin['kata-runtime'] as string);
const run = (...args: string[]) => spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, KATA_CONF_FILE: '' } });

describe('the kata-runtime bin (bundled)', () => {
  it('validates the bundled TDX example and prints the vm.create body', () => {
    const r = run('--config', path.join(PACKAGE_ROOT, 'examples', 'configuration-clh-tdx.toml'), 'validate', '--json');
    assert.equal(r.status, 0, r.stderr);
    const report = JSON.parse(r.stdout) as { valid: boolean; vm: { platform: { tdx: boolean } } };
    assert.equal(report.valid, true);
    assert.equal(report.vm.platform.tdx, true);
  });

  it('exits 1 with the veto on stderr, and no stack trace, for the TDX + virtio-fs example', () => {
    const r = run('--config', path.join(PACKAGE_ROOT, 'examples', 'configuration-clh-tdx-virtiofs.toml'), 'validate');
    assert.equal(r.status, 1);
    assert.match(r.stderr, /\[plugin tdx\] hypervisor\.clh\.shared_fs = "virtio-fs".*\[KATA_ERR_CONFIG_VETO\]/);
    assert.doesNotMatch(r.stderr, /^\s+at /m);
  });

  it('validate --json shows the tdx veto of the agent debug console, with reason and fix', () => {
    const tmp = new TempDir();
    try {
      const example = readFileSync(path.join(PACKAGE_ROOT, 'examples', 'configuration-clh-tdx.toml'), 'utf8');
      assert.match(example, /^\[agent\.kata\]$/m);
      const cfg = tmp.file('configuration.toml', example.replace(/^\[agent\.kata\]$/m, '[agent.kata]\ndebug_console_enabled = true'));
      const r = run('--config', cfg, 'validate', '--json');
      assert.equal(r.status, 1, r.stderr);
      const report = JSON.parse(r.stdout) as { valid: boolean; problems: { code: string; key: string; plugin?: string; reason: string; fix: string }[] };
      assert.equal(report.valid, false);
      const veto = report.problems.find((p) => p.key === 'agent.kata.debug_console_enabled');
      assert.deepEqual(veto && { code: veto.code, plugin: veto.plugin }, { code: 'KATA_ERR_CONFIG_VETO', plugin: 'tdx' });
      assert.ok(veto && veto.reason.length > 0 && veto.fix.length > 0, JSON.stringify(veto));
    } finally {
      tmp.cleanup();
    }
  });

  it('runs as `kata-runtime` from a symlink on PATH, as the README installs it, and lists the Kata aliases in --help', () => {
    const tmp = new TempDir();
    try {
      const binDir = path.join(tmp.path, 'bin');
      tmp.file('bin/.keep', '');
      symlinkSync(path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs'), path.join(binDir, 'kata-runtime'));
      const env = { ...process.env, PATH: `${binDir}:${path.dirname(process.execPath)}:/usr/bin:/bin`, KATA_CONF_FILE: '' };
      const v = spawnSync('kata-runtime', ['--version'], { encoding: 'utf8', env });
      assert.equal(v.status, 0, v.stderr);
      assert.match(v.stdout, /^kata-runtime +: \d+\.\d+\.\d+/);
      const h = spawnSync('kata-runtime', ['--help'], { encoding: 'utf8', env });
      assert.match(h.stdout, /^ {2}check .*\(alias: kata-check/m);
      assert.match(h.stdout, /^ {2}env .*\(alias: kata-env/m);
      assert.match(h.stdout, /^ {2}cleanup /m);
      const alias = spawnSync('kata-runtime', ['--config', path.join(PACKAGE_ROOT, 'examples', 'configuration-clh-tdx.toml'), 'kata-env', '--json'], { encoding: 'utf8', env });
      assert.equal((JSON.parse(alias.stdout) as { Hypervisor: { Name: string } }).Hypervisor.Name, 'clh');
    } finally {
      tmp.cleanup();
    }
  });

  it('exits 2 on a usage error', () => {
    assert.equal(run('no-such-command').status, 2);
  });

  it("keeps the code of a coded error thrown by a third-party plugin that uses the package's own copy of the API", () => {
    const tmp = new TempDir();
    try {
      tmp.linkPackage();
      const plugin = tmp.file(
        'strict.mjs',
        `import { definePlugin, KataError } from 'kata-ts/plugin';
export default definePlugin({
  manifest: { name: 'strict', version: '1.0.0', runtime: '^1.0.0' },
  apply({ hooks }) {
    hooks.validate.tap('strict', () => { throw new KataError('KATA_ERR_CONFIG_VALUE', 'no', { key: 'runtime.enable_debug' }); });
  },
});
`,
      );
      const cfg = tmp.file('c.toml', `[hypervisor.qemu]\nkernel = "/k"\nimage = "/i"\nshared_fs = "none"\ndisable_block_device_use = true\n[runtime]\nplugins = ["${plugin}"]\n`);
      const r = run('--config', cfg, 'validate');
      assert.equal(r.status, 1);
      assert.match(r.stderr, /\[plugin strict\] no/);
      assert.match(r.stderr, /code: KATA_ERR_CONFIG_VALUE/);
    } finally {
      tmp.cleanup();
    }
  });
});
