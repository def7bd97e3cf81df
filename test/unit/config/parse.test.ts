import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { MAX_CONFIG_BYTES, parseToml, readConfigFile, ConfigParseError } from '../../../core/config/parse.js';
import type { KataError } from '../../../core/errors.js';
import { TempDir } from '../../helpers/tmp.js';

describe('parseToml', () => {
  it('reports the line and column of a syntax error', () => {
    assert.throws(
      () => parseToml('[hypervisor.qemu]\nkernel = "/k"\nimage = \n', 'c.toml'),
      (e: ConfigParseError) => e.code === 'KATA_ERR_CONFIG_PARSE' && e.line === 3 && e.column > 0 && e.file === 'c.toml' && e.message.startsWith('c.toml:3:'),
    );
  });

  it('keeps integers beyond 2^53 exact as BigInt', () => {
    const raw = parseToml('x = 9223372036854775807\ny = 2048\n');
    assert.equal(raw.x, 9223372036854775807n);
    assert.equal(raw.y, 2048);
  });

  it('refuses a hypervisor section written as an array of tables, naming it', () => {
    assert.throws(
      () => parseToml('[[hypervisor.qemu]]\npath = "/usr/bin/qemu-system-x86_64"\n', 'c.toml'),
      (e: KataError) => e.code === 'KATA_ERR_CONFIG_TABLE_ARRAY' && e.key === 'hypervisor.qemu' && e.fix.includes('[hypervisor.qemu], not [[hypervisor.qemu]]'),
    );
  });

  it('refuses [[agent.kata]] and [[runtime]] as well, and keeps arrays of tables inside a section', () => {
    assert.throws(() => parseToml('[[agent.kata]]\ndial_timeout = 1\n'), (e: KataError) => e.code === 'KATA_ERR_CONFIG_TABLE_ARRAY' && e.key === 'agent.kata');
    assert.throws(() => parseToml('[[runtime]]\nenable_debug = true\n'), (e: KataError) => e.code === 'KATA_ERR_CONFIG_TABLE_ARRAY' && e.key === 'runtime');
    const raw = parseToml('[hypervisor.qemu]\n[[hypervisor.qemu.x]]\na = 1\n');
    assert.deepEqual(JSON.parse(JSON.stringify((raw.hypervisor as Record<string, Record<string, unknown>>).qemu?.x)), [{ a: 1 }]);
  });

  it('reports a duplicate key as a parse error', () => {
    assert.throws(() => parseToml('a = 1\na = 2\n'), (e: KataError) => e.code === 'KATA_ERR_CONFIG_PARSE');
  });
});

describe('readConfigFile', () => {
  it('reports an unreadable file with a coded error', () => {
    const tmp = new TempDir();
    try {
      assert.throws(() => readConfigFile(tmp.path), (e: KataError) => e.code === 'KATA_ERR_CONFIG_READ');
    } finally {
      tmp.cleanup();
    }
  });

  it('refuses a 1 GiB file by its size, before reading it', () => {
    const tmp = new TempDir();
    try {
      const file = tmp.file('huge.toml', '');
      const fd = openSync(file, 'r+');
      ftruncateSync(fd, 1024 ** 3); // sparse: no disk used
      closeSync(fd);
      assert.throws(() => readConfigFile(file), (e: KataError) => e.code === 'KATA_ERR_CONFIG_TOO_LARGE' && e.value === file);
    } finally {
      tmp.cleanup();
    }
  });

  it('reads a file of exactly the limit and refuses one byte more', () => {
    const tmp = new TempDir();
    try {
      const pad = (n: number) => `# ${'x'.repeat(n - 3)}\n`;
      assert.deepEqual(Object.keys(readConfigFile(tmp.file('max.toml', pad(MAX_CONFIG_BYTES)))), []);
      assert.throws(() => readConfigFile(tmp.file('over.toml', pad(MAX_CONFIG_BYTES + 1))), (e: KataError) => e.code === 'KATA_ERR_CONFIG_TOO_LARGE');
    } finally {
      tmp.cleanup();
    }
  });
});
