import assert from 'node:assert/strict';
import path from 'node:path';
import { locateConfig, defaultConfigPaths, SYSCONF_CONFIG_PATH, DEFAULT_CONFIG_PATH, CONFIG_PATH_ANNOTATION } from '../../../core/config/locate.js';
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

  it('puts the annotation before the shim option, and the shim option before KATA_CONF_FILE', () => {
    const ann = tmp.file('ann.toml', '');
    const opt = tmp.file('opt.toml', '');
    const envFile = tmp.file('env.toml', '');
    const e = { ...env, KATA_CONF_FILE: envFile };
    assert.equal(locateConfig({ annotations: { [CONFIG_PATH_ANNOTATION]: ann }, shimConfigPath: opt, env: e }).path, ann);
    assert.equal(locateConfig({ shimConfigPath: opt, env: e }).path, opt);
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
