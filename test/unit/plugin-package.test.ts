import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { TempDir } from '../helpers/tmp.js';

/** Runs npm with an argument vector; the registry is reachable, but the cache answers first. */
function npm(cwd: string, args: string[]): string {
  return execFileSync('npm', [...args, '--no-audit', '--no-fund', '--loglevel=error'], { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function writeJson(file: string, value: unknown): void {
  writeFileSync(file, JSON.stringify(value, null, 2) + '\n');
}

/** The installed runtime's `validate --json` on `config`: exit status and its one JSON document. */
function validate(site: string, config: string): { status: number | null; report: { valid: boolean; problems: { code: string; plugin?: string; key?: string }[]; plugins: { name: string; builtin: boolean }[] } } {
  const r = spawnSync(path.join(site, 'node_modules', '.bin', 'kata-runtime'), ['--config', config, 'validate', '--json'], { encoding: 'utf8' });
  return { status: r.status, report: JSON.parse(r.stdout) };
}

const config = (plugin: string, debug = true) => `[hypervisor.qemu]
kernel = "/k"
image = "/i"
shared_fs = "none"
disable_block_device_use = true

[agent.kata]
debug_console_enabled = ${debug}

[runtime]
plugins = [${JSON.stringify(plugin)}]
`;

const VETO = [['KATA_ERR_CONFIG_VETO', 'no-debug-console', 'agent.kata.debug_console_enabled']];

describe('the kata-ts package as a plugin author installs it', function () {
  this.timeout(180_000);
  let tmp: TempDir;
  let files: string[];
  let author: string;
  let site: string;
  let pluginFile: string;

  before(() => {
    tmp = new TempDir('kata-ts-package-');
    // What `npm publish` would upload, from the built tree.
    const packed = JSON.parse(npm(PACKAGE_ROOT, ['pack', '--json', '--pack-destination', tmp.path])) as { filename: string; files: { path: string }[] }[];
    const tarball = path.join(tmp.path, packed[0]!.filename);
    files = packed[0]!.files.map((f) => f.path);

    // The author's project: the README's example plugin as a package depending on kata-ts.
    author = path.join(tmp.path, 'author');
    mkdirSync(author);
    const readme = readFileSync(path.join(PACKAGE_ROOT, 'README.md'), 'utf8');
    const m = /```js\n\/\/ example-plugin: (\S+)\n([\s\S]*?)```/.exec(readme);
    assert.ok(m, 'the README has an example plugin block');
    pluginFile = path.join(author, m[1]!);
    writeFileSync(pluginFile, m[2]!);
    writeJson(path.join(author, 'package.json'), {
      name: 'no-debug-console',
      version: '1.0.0',
      type: 'module',
      exports: `./${m[1]}`,
      files: [m[1]],
      peerDependencies: { 'kata-ts': '^0.1.0' },
    });
    npm(author, ['install', '--prefer-offline', '--ignore-scripts', '--save-dev', tarball]);

    // A host where the runtime and the author's packed plugin are installed side by side.
    const pluginTarball = path.join(tmp.path, (JSON.parse(npm(author, ['pack', '--json', '--pack-destination', tmp.path])) as { filename: string }[])[0]!.filename);
    site = path.join(tmp.path, 'site');
    mkdirSync(site);
    writeJson(path.join(site, 'package.json'), { name: 'site', version: '1.0.0', private: true });
    npm(site, ['install', '--prefer-offline', '--ignore-scripts', tarball, pluginTarball]);
  });
  after(() => tmp?.cleanup());

  it('packs the plugin API with its declarations and nothing from test/', () => {
    for (const f of ['dist/core/plugin-api.js', 'dist/core/plugin-api.d.ts', 'dist/core/hooks.d.ts', 'dist/core/plan.d.ts', 'dist/bundle/kata-runtime.mjs', 'dist/schemas/validators.js', 'dist/bin/testing.js', 'dist/bin/testing.d.ts', 'dist/core/testing.d.ts']) {
      assert.ok(files.includes(f), `${f} is in the tarball`);
    }
    assert.deepEqual(files.filter((f) => f.startsWith('dist/test/') || f.startsWith('test/')), []);
  });

  it('type-checks the README example against the installed declarations', () => {
    const tsc = path.join(PACKAGE_ROOT, 'node_modules', '.bin', 'tsc');
    const args = ['--noEmit', '--allowJs', '--checkJs', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--types', 'node', '--typeRoots', path.join(PACKAGE_ROOT, 'node_modules', '@types')];
    const ok = spawnSync(tsc, [...args, pluginFile], { cwd: author, encoding: 'utf8' });
    assert.equal(ok.status, 0, ok.stdout + ok.stderr);
    // The check has teeth: a misspelt verdict method is a type error.
    const bad = path.join(author, 'misspelt.mjs');
    writeFileSync(bad, readFileSync(pluginFile, 'utf8').replace('verdict.veto(', 'verdict.vetoo('));
    const no = spawnSync(tsc, [...args, bad], { cwd: author, encoding: 'utf8' });
    assert.notEqual(no.status, 0, 'tsc fails on the misspelt method');
    assert.match(no.stdout, /vetoo/);
  });

  it('loads the plugin by package name through the installed runtime', () => {
    const r = validate(site, tmp.file('by-name.toml', config('no-debug-console')));
    assert.equal(r.status, 1);
    assert.ok(r.report.plugins.some((p) => p.name === 'no-debug-console' && !p.builtin));
    assert.deepEqual(r.report.problems.map((p) => [p.code, p.plugin, p.key]), VETO);
  });

  it('loads the plugin by absolute path through the installed runtime', () => {
    const r = validate(site, tmp.file('by-path.toml', config(pluginFile)));
    assert.deepEqual(r.report.problems.map((p) => [p.code, p.plugin, p.key]), VETO);
  });

  it('stays quiet when the debug console is off', () => {
    const r = validate(site, tmp.file('quiet.toml', config(pluginFile, false)));
    assert.equal(r.status, 0, JSON.stringify(r.report.problems));
    assert.equal(r.report.valid, true);
    assert.ok(r.report.plugins.some((p) => p.name === 'no-debug-console' && !p.builtin));
  });

  it('judges the plugin in process through the installed test kit, as validate --json does', () => {
    const script = `import { judge } from 'kata-ts/testing';
import plugin from './${path.basename(pluginFile)}';
console.log(JSON.stringify(await judge(process.argv[1], { plugins: [plugin] })));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, config('unused').replace(/\[runtime\][^]*$/, '')], { cwd: author, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const report = JSON.parse(r.stdout) as { problems: { code: string; plugin?: string; key?: string }[] };
    assert.deepEqual(report.problems.map((p) => [p.code, p.plugin, p.key]), VETO);
  });

  it("loads the plugin by a path relative to the configuration file's directory, whatever the working directory", () => {
    mkdirSync(path.join(author, 'conf'));
    const file = path.join(author, 'conf', 'relative.toml');
    writeFileSync(file, config(`../${path.basename(pluginFile)}`));
    const r = validate(site, file);
    assert.deepEqual(r.report.problems.map((p) => [p.code, p.plugin, p.key]), VETO);
  });
});
