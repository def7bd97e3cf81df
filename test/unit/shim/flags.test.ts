import assert from 'node:assert/strict';
import { KataError } from '../../../core/errors.js';
import { parseShimFlags } from '../../../shim/flags.js';

const isShimError = (text: RegExp) => (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_SHIM' && text.test(e.message);

describe('shim flags (Go flag syntax, as containerd writes them)', () => {
  it('reads the start invocation of containerd 1.6', () => {
    const f = parseShimFlags(['-namespace', 'default', '-address', '/run/containerd/containerd.sock', '-publish-binary', '/usr/bin/containerd', '-id', 'k1', '-debug', 'start']);
    assert.deepEqual(f, {
      action: 'start',
      namespace: 'default',
      address: '/run/containerd/containerd.sock',
      publishBinary: '/usr/bin/containerd',
      id: 'k1',
      bundle: undefined,
      debug: true,
      socket: undefined,
    });
  });

  it('accepts -name=value, --name value and -debug=false', () => {
    const f = parseShimFlags(['--namespace', 'ns', '-id=c1', '-bundle=/b', '-debug=false', 'delete']);
    assert.equal(f.action, 'delete');
    assert.equal(f.namespace, 'ns');
    assert.equal(f.id, 'c1');
    assert.equal(f.bundle, '/b');
    assert.equal(f.debug, false);
  });

  it('runs as the daemon only with -socket', () => {
    assert.equal(parseShimFlags(['-namespace', 'n', '-id', 'c', '-socket', '/run/x.sock']).action, 'serve');
    assert.throws(() => parseShimFlags(['-namespace', 'n', '-id', 'c']), isShimError(/no action given/));
  });

  it('answers -v and -info without needing the other flags', () => {
    assert.equal(parseShimFlags(['-v']).action, 'version');
    assert.equal(parseShimFlags(['-info']).action, 'info');
  });

  it('refuses what containerd never sends, naming it', () => {
    assert.throws(() => parseShimFlags(['-namespace', 'n', '-id', 'c', 'run']), isShimError(/unknown action "run"/));
    assert.throws(() => parseShimFlags(['-namespace', 'n', '-id', 'c', '-bogus', 'start']), isShimError(/unknown flag -bogus/));
    assert.throws(() => parseShimFlags(['-namespace', 'n', 'start']), isShimError(/missing -id/));
    assert.throws(() => parseShimFlags(['-id', 'c', '-namespace']), isShimError(/-namespace needs a value/));
    assert.throws(() => parseShimFlags(['-namespace', 'n', '-id', 'c', '-debug=maybe', 'start']), isShimError(/boolean/));
    assert.throws(() => parseShimFlags(['-namespace', 'n', '-id', 'c', 'start', 'delete']), isShimError(/one action at most/));
  });
});
