import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { TempDir } from '../helpers/tmp.js';

/** Runs npm with an argument vector; the registry is reachable, but the cache answers first. */
function npm(cwd: string, args: string[]): string {
  return execFileSync('npm', [...args, '--no-audit', '--no-fund', '--loglevel=error'], { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

describe('the plugin template (examples/plugin-template) as an author copies it', function () {
  this.timeout(240_000);
  let tmp: TempDir;
  let copy: string;

  before(() => {
    tmp = new TempDir('kata-ts-template-');
    const packed = JSON.parse(npm(PACKAGE_ROOT, ['pack', '--json', '--pack-destination', tmp.path])) as { filename: string }[];
    const tarball = path.join(tmp.path, packed[0]!.filename);
    copy = path.join(tmp.path, 'my-plugin');
    cpSync(path.join(PACKAGE_ROOT, 'examples', 'plugin-template'), copy, { recursive: true, filter: (src) => !/[/\\](node_modules|dist)$/.test(src) });
    npm(copy, ['install', '--prefer-offline', '--ignore-scripts', '--save-dev', tarball]);
  });
  after(() => tmp?.cleanup());

  it("type-checks, builds and passes its own tests against the packed kata-ts and its test kit", () => {
    const r = spawnSync('npm', ['test'], { cwd: copy, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    const count = (what: string) => Number(new RegExp(`^# ${what} (\\d+)$`, 'm').exec(r.stdout)?.[1]);
    assert.equal(count('fail'), 0);
    assert.ok(count('pass') >= 5, r.stdout);
  });

  it('fails its tests when the plugin no longer vetoes', () => {
    const file = path.join(copy, 'src', 'index.ts');
    const source = readFileSync(file, 'utf8');
    const disabled = source.replace('if (max > max_mib)', 'if (max < 0)');
    assert.notEqual(disabled, source, 'the veto was disabled');
    writeFileSync(file, disabled);
    try {
      const r = spawnSync('npm', ['test'], { cwd: copy, encoding: 'utf8' });
      assert.notEqual(r.status, 0);
      assert.match(r.stdout, /^# fail [1-9]/m);
    } finally {
      writeFileSync(file, source);
    }
  });
});
