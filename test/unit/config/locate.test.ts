import assert from 'node:assert/strict';
import path from 'node:path';
import { chmodSync, symlinkSync } from 'node:fs';
import { annotationConfigDirs, configFromAnnotation, locateConfig, defaultConfigPaths, SYSCONF_CONFIG_PATH, DEFAULT_CONFIG_PATH, CONFIG_PATH_ANNOTATION, type LocatedConfig } from '../../../core/config/locate.js';
import type { AnnotationError } from '../../../core/annotations.js';
import type { KataError } from '../../../core/errors.js';
import { TempDir } from '../../helpers/tmp.js';

describe('locateConfig', () => {
  let tmp: TempDir;
  let env: NodeJS.ProcessEnv;
  beforeEach(() => {
    tmp = new TempDir();
    env = { KATA_TS_SYSROOT: tmp.path };
  });
  afterEach(() => tmp.cleanup());

  it("uses Kata's two default paths, /etc first, when nothing relocates them", () => {
    assert.deepEqual(defaultConfigPaths({}), [SYSCONF_CONFIG_PATH, DEFAULT_CONFIG_PATH]);
    assert.deepEqual(defaultConfigPaths({}), ['/etc/kata-containers/configuration.toml', '/usr/share/defaults/kata-containers/configuration.toml']);
  });

  it('relocates both default paths under KATA_TS_SYSROOT', () => {
    assert.deepEqual(defaultConfigPaths(env), [path.join(tmp.path, SYSCONF_CONFIG_PATH), path.join(tmp.path, DEFAULT_CONFIG_PATH)]);
  });

  it('prefers /etc over /usr/share/defaults', () => {
    const etc = tmp.file(SYSCONF_CONFIG_PATH, '');
    tmp.file(DEFAULT_CONFIG_PATH, '');
    assert.equal(locateConfig({ env }).path, etc);
  });

  it('falls back to /usr/share/defaults when /etc has none', () => {
    const usr = tmp.file(DEFAULT_CONFIG_PATH, '');
    const found = locateConfig({ env });
    assert.equal(found.path, usr);
    assert.equal(found.source, 'default');
    assert.equal(found.tried[0]?.used, false);
  });

  it('puts KATA_CONF_FILE before the default paths', () => {
    tmp.file(SYSCONF_CONFIG_PATH, '');
    const mine = tmp.file('mine.toml', '');
    assert.deepEqual([locateConfig({ env: { ...env, KATA_CONF_FILE: mine } }).path, locateConfig({ env: { ...env, KATA_CONF_FILE: mine } }).source], [mine, 'env']);
  });

  it('puts --config before KATA_CONF_FILE', () => {
    const flag = tmp.file('flag.toml', '');
    const envFile = tmp.file('env.toml', '');
    assert.equal(locateConfig({ flag, env: { ...env, KATA_CONF_FILE: envFile } }).source, 'flag');
  });

  it('puts the shim option before KATA_CONF_FILE, and ignores annotations (the administrator\'s file is found first)', () => {
    const opt = tmp.file('opt.toml', '');
    const envFile = tmp.file('env.toml', '');
    const e = { ...env, KATA_CONF_FILE: envFile };
    assert.equal(locateConfig({ shimConfigPath: opt, env: e }).path, opt);
    assert.equal(locateConfig({ shimConfigPath: opt, env: e }).source, 'shim-option');
  });

  it('fails on an explicitly named file that does not exist instead of falling back', () => {
    tmp.file(SYSCONF_CONFIG_PATH, '');
    assert.throws(() => locateConfig({ env: { ...env, KATA_CONF_FILE: path.join(tmp.path, 'missing.toml') } }), (e: KataError) => e.code === 'KATA_ERR_CONFIG_NOT_FOUND' && e.key === 'KATA_CONF_FILE');
  });

  it('lists every default path it tried when none exists', () => {
    assert.throws(() => locateConfig({ env }), (e: KataError) => e.code === 'KATA_ERR_CONFIG_NOT_FOUND' && e.message.includes(SYSCONF_CONFIG_PATH) && e.message.includes(DEFAULT_CONFIG_PATH));
  });

  it('does not take a directory for a configuration file', () => {
    tmp.file(`${SYSCONF_CONFIG_PATH}/inner`, '');
    const usr = tmp.file(DEFAULT_CONFIG_PATH, '');
    assert.equal(locateConfig({ env }).path, usr);
  });
});

describe('configFromAnnotation (a pod choosing its configuration)', () => {
  let tmp: TempDir;
  let env: NodeJS.ProcessEnv;
  let etcDir: string;
  let usrDir: string;
  beforeEach(() => {
    tmp = new TempDir();
    env = { KATA_TS_SYSROOT: tmp.path };
    [etcDir, usrDir] = annotationConfigDirs(env);
  });
  afterEach(() => tmp.cleanup());

  const admin = (enable: string[] | undefined): LocatedConfig => {
    const file = tmp.file('admin/configuration.toml', `[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\n${enable ? `enable_annotations = ${JSON.stringify(enable)}\n` : ''}`);
    return { path: file, source: 'shim-option', tried: [{ path: file, source: 'shim-option', used: true }] };
  };
  const choose = (a: LocatedConfig, value: string) => configFromAnnotation(a, { [CONFIG_PATH_ANNOTATION]: value }, { env, asRoot: true });
  const refusedAnnotation = (fn: () => unknown, reason: string, text: RegExp) =>
    assert.throws(fn, (e: AnnotationError) => {
      assert.equal(e.code, 'KATA_ERR_ANNOTATION');
      assert.equal(e.key, CONFIG_PATH_ANNOTATION);
      assert.equal(e.refusals.length, 1);
      assert.equal(e.refusals[0]?.reason, reason);
      assert.match(e.message, text);
      return true;
    });

  it('places the allowed directories where the default paths are', () => {
    assert.deepEqual(annotationConfigDirs({}), ['/etc/kata-containers', '/usr/share/defaults/kata-containers']);
    assert.deepEqual([etcDir, usrDir], [path.join(tmp.path, 'etc/kata-containers'), path.join(tmp.path, 'usr/share/defaults/kata-containers')]);
  });

  it("returns the administrator's configuration when the pod has no annotation", () => {
    const a = admin(undefined);
    assert.equal(configFromAnnotation(a, { 'io.katacontainers.other': 'x' }, { env }), a);
    assert.equal(configFromAnnotation(a, undefined, { env }), a);
  });

  it("refuses the annotation when the administrator's configuration does not enable config_path (the default), naming that file", () => {
    const chosen = tmp.file(SYSCONF_CONFIG_PATH.replace('configuration.toml', 'configuration-other.toml'), '');
    const a = admin(undefined);
    refusedAnnotation(() => choose(a, chosen), 'not-enabled', /config_path.*hypervisor\.qemu\.enable_annotations/s);
    assert.throws(() => choose(a, chosen), (e: KataError) => e.message.includes(`"${a.path}"`) && e.fix.includes(a.path));
    refusedAnnotation(() => choose(admin(['kernel_params', 'default_memory']), chosen), 'not-enabled', /enable_annotations/);
  });

  it('matches config_path as a whole name, as the hypervisor annotations are matched', () => {
    const chosen = tmp.file(SYSCONF_CONFIG_PATH.replace('configuration.toml', 'other.toml'), '');
    refusedAnnotation(() => choose(admin(['config']), chosen), 'not-enabled', /config_path/);
    assert.equal(choose(admin(['config_.*']), chosen).path, chosen);
  });

  it('refuses a path outside the allowed directories before looking at the file system (no probing)', () => {
    const a = admin(['config_path']);
    const outside = tmp.file('x/evil.toml', '');
    refusedAnnotation(() => choose(a, outside), 'path-not-allowed', /not directly inside/);
    // The same answer for a file that does not exist: a pod learns nothing about the host.
    refusedAnnotation(() => choose(a, path.join(tmp.path, 'x/missing.toml')), 'path-not-allowed', /not directly inside/);
    refusedAnnotation(() => choose(a, '/etc/shadow'), 'path-not-allowed', /not directly inside/);
    // Below an allowed directory, not directly inside it.
    refusedAnnotation(() => choose(a, tmp.file('etc/kata-containers/sub/c.toml', '')), 'path-not-allowed', /not directly inside/);
  });

  it('refuses a relative path (never resolved from the bundle)', () => {
    tmp.file('x/evil.toml', '');
    refusedAnnotation(() => choose(admin(['config_path']), '../../../../x/evil.toml'), 'path-not-allowed', /not absolute/);
    refusedAnnotation(() => choose(admin(['config_path']), 'configuration.toml'), 'path-not-allowed', /not absolute/);
  });

  it('refuses a path with ".." even when it would land in an allowed directory', () => {
    const a = admin(['config_path']);
    tmp.file(DEFAULT_CONFIG_PATH, '');
    refusedAnnotation(() => choose(a, `${etcDir}/../../usr/share/defaults/kata-containers/configuration.toml`), 'path-not-allowed', /"\.\." segment/);
    refusedAnnotation(() => choose(a, `${etcDir}/../kata-containers/configuration.toml`), 'path-not-allowed', /"\.\." segment/);
  });

  it('refuses a symbolic link in an allowed directory that resolves outside it', () => {
    const outside = tmp.file('x/evil.toml', '');
    tmp.file(DEFAULT_CONFIG_PATH, '');
    const link = path.join(usrDir, 'link.toml');
    symlinkSync(outside, link);
    refusedAnnotation(() => choose(admin(['config_path']), link), 'path-not-allowed', /resolves outside/);
  });

  it('fails on a named file that does not exist in an allowed directory: no fall-back', () => {
    tmp.file(DEFAULT_CONFIG_PATH, '');
    assert.throws(
      () => choose(admin(['config_path']), path.join(usrDir, 'missing.toml')),
      (e: KataError) => e.code === 'KATA_ERR_CONFIG_NOT_FOUND' && e.key === CONFIG_PATH_ANNOTATION && /does not exist/.test(e.message),
    );
  });

  it('refuses a chosen file that fails the trust check when running as root', function () {
    if (process.geteuid?.() !== 0) this.skip();
    const chosen = tmp.file(DEFAULT_CONFIG_PATH.replace('configuration.toml', 'configuration-gw.toml'), '');
    chmodSync(chosen, 0o666);
    assert.throws(() => choose(admin(['config_path']), chosen), (e: KataError) => e.code === 'KATA_ERR_UNTRUSTED_PATH' && e.key === CONFIG_PATH_ANNOTATION && e.value === chosen);
  });

  it('uses a file the administrator placed in either directory when config_path is enabled', () => {
    const a = admin(['config_path']);
    const inUsr = tmp.file(DEFAULT_CONFIG_PATH.replace('configuration.toml', 'configuration-clh.toml'), '');
    const inEtc = tmp.file(SYSCONF_CONFIG_PATH.replace('configuration.toml', 'configuration-tdx.toml'), '');
    const got = choose(a, inUsr);
    assert.deepEqual([got.path, got.source], [inUsr, 'annotation']);
    assert.deepEqual(got.tried.map((t) => [t.path, t.used]), [[a.path, false], [inUsr, true]]);
    assert.equal(choose(a, inEtc).path, inEtc);
  });
});
