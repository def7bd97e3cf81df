import assert from 'node:assert/strict';
import { parseToml, readConfigFile, ConfigParseError } from '../../../core/config/parse.js';
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
});
