import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, symlinkSync } from 'node:fs';
import path from 'node:path';
import { assertTrustedPath, trustProblem } from '../../../core/trusted-path.js';
import type { KataError } from '../../../core/errors.js';
import { Daemon } from '../../../core/daemon.js';
import { hypervisorVersion } from '../../../core/host.js';
import { silentLogger } from '../../../core/logger.js';
import { PACKAGE_ROOT } from '../../../core/paths.js';
import { CLI } from '../../helpers/cli.js';
import { TempDir } from '../../helpers/tmp.js';

/** An unprivileged uid that owns nothing here. */
const NOBODY = 65534;

describe('trusted path (StrictModes check)', () => {
  let tmp: TempDir;
  before(function () {
    // Files owned by root and by someone else are needed: only root can make both.
    if (process.geteuid?.() !== 0) this.skip();
  });
  beforeEach(() => (tmp = new TempDir()));
  afterEach(() => tmp?.cleanup());

  const refused = (file: string, offender: string, why: RegExp) =>
    assert.throws(
      () => assertTrustedPath(file, 'test file', { asRoot: true }),
      (e: KataError) => {
        assert.equal(e.code, 'KATA_ERR_UNTRUSTED_PATH');
        assert.equal(e.value, file);
        assert.ok(e.message.includes(`"${offender}"`) || e.message.includes('the file'), e.message);
        assert.match(e.message, why);
        assert.ok(e.fix.includes(offender), e.fix);
        return true;
      },
    );

  it('accepts a root-owned file, mode 0755, in root-owned directories (the temp dir under sticky /tmp)', () => {
    const f = tmp.file('ok/bin', '#!/bin/sh\n');
    chmodSync(f, 0o755);
    assert.equal(trustProblem(f), undefined);
    assert.equal(assertTrustedPath(f, 'test file', { asRoot: true }), f);
  });

  it('refuses a file owned by another user', () => {
    const f = tmp.file('theirs', '');
    chownSync(f, NOBODY, NOBODY);
    refused(f, f, /owned by uid 65534, not root/);
    assert.equal(trustProblem(f)?.uid, NOBODY);
  });

  it('refuses a group-writable file', () => {
    const f = tmp.file('gw', '');
    chmodSync(f, 0o664);
    refused(f, f, /writable by group or others \(owner uid 0, mode 0664\)/);
  });

  it('refuses a file in a world-writable directory without the sticky bit, naming the directory', () => {
    const f = tmp.file('open/plugin.mjs', '');
    chmodSync(path.dirname(f), 0o777);
    refused(f, path.dirname(f), /its directory ".*\/open" is writable by group or others and has no sticky bit \(owner uid 0, mode 0777\)/);
    assert.equal(trustProblem(f)?.offender, path.dirname(f));
  });

  it('refuses a file below a directory owned by another user, however deep', () => {
    const f = tmp.file('user/a/b/plugin.mjs', '');
    chownSync(path.join(tmp.path, 'user'), NOBODY, NOBODY);
    refused(f, path.join(tmp.path, 'user'), /owned by uid 65534/);
  });

  it('accepts a world-writable directory with the sticky bit, as /tmp', () => {
    const f = tmp.file('sticky/plugin.mjs', '');
    chmodSync(path.dirname(f), 0o1777);
    assert.equal(trustProblem(f), undefined);
  });

  it('judges what a symlink resolves to: a link in a trusted place to an untrusted file is refused', () => {
    const target = tmp.file('open/evil.mjs', '');
    chmodSync(path.dirname(target), 0o777);
    mkdirSync(path.join(tmp.path, 'safe'));
    const link = path.join(tmp.path, 'safe', 'plugin.mjs');
    symlinkSync(target, link);
    assert.throws(() => assertTrustedPath(link, 'test file', { asRoot: true }), (e: KataError) => e.code === 'KATA_ERR_UNTRUSTED_PATH' && e.message.includes(`resolved to "${target}"`));
  });

  it('returns the real path to open, so that a link swapped after the check changes nothing', () => {
    const target = tmp.file('safe/plugin.mjs', '');
    const link = path.join(tmp.path, 'link.mjs');
    symlinkSync(target, link);
    assert.equal(assertTrustedPath(link, 'test file', { asRoot: true }), target);
  });

  it('does not check when not running as root, and leaves a missing file to the caller', () => {
    const f = tmp.file('theirs', '');
    chownSync(f, NOBODY, NOBODY);
    assert.equal(assertTrustedPath(f, 'test file', { asRoot: false }), f);
    const missing = path.join(tmp.path, 'missing');
    assert.equal(assertTrustedPath(missing, 'test file', { asRoot: true }), missing);
  });
});

describe('trusted path: what the runtime runs as root', () => {
  let tmp: TempDir;
  let marker: string;
  let script: string;
  before(function () {
    if (process.geteuid?.() !== 0) this.skip();
  });
  beforeEach(() => {
    tmp = new TempDir();
    marker = path.join(tmp.path, 'ran');
    // Would print a version and leave a marker, if it ever ran.
    script = tmp.file('open/fake-binary', `#!/bin/sh\necho ran > ${marker}\necho "QEMU emulator version 7.2.0"\nsleep 30\n`);
    chmodSync(script, 0o755);
    chmodSync(path.dirname(script), 0o777);
  });
  afterEach(() => tmp?.cleanup());

  it('a daemon binary (virtiofsd …) in a world-writable directory is refused before it starts', async () => {
    await assert.rejects(
      Daemon.start({ name: 'virtiofsd', binary: script, args: [], socket: path.join(tmp.path, 'vfs.sock'), log: silentLogger(), readyTimeoutMs: 2_000 }),
      (e: KataError) => e.code === 'KATA_ERR_UNTRUSTED_PATH' && e.value === script && e.message.includes('the virtiofsd binary'),
    );
    assert.equal(existsSync(marker), false);
  });

  it('the hypervisor binary is not run even for its --version (kata-runtime check, env)', async () => {
    const v = await hypervisorVersion(script);
    assert.equal(v.version, null);
    assert.match(v.reason, /refusing to use the hypervisor binary .* as root: its directory .* is writable by group or others/);
    assert.equal(existsSync(marker), false);
  });

  it('kata-runtime --config (operator input) still applies the check to the plugins it names', () => {
    const plugin = tmp.file('open/evil.mjs', `import { writeFileSync } from 'node:fs';\nwriteFileSync(${JSON.stringify(marker)}, 'x');\nexport default {};\n`);
    const config = tmp.file('c.toml', readFileSync(path.join(PACKAGE_ROOT, 'configs', 'configuration-qemu.toml'), 'utf8').replace(/^\[runtime\]$/m, `[runtime]\nplugins = [${JSON.stringify(plugin)}]`));
    const r = spawnSync(process.execPath, [CLI, 'validate', '--config', config], { encoding: 'utf8' });
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /refusing to use plugin module .*evil\.mjs.*\n.*fix: .*chmod go-w[^]*code: KATA_ERR_UNTRUSTED_PATH/);
    assert.equal(existsSync(marker), false);
  });
});
