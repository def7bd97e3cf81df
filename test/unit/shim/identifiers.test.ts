import assert from 'node:assert/strict';
import sinon from 'sinon';
import { KataError } from '../../../core/errors.js';
import { parseShimFlags } from '../../../shim/flags.js';
import { MAX_IDENTIFIER_LENGTH, checkIdentifier, guardTaskIds, identifierProblem } from '../../../shim/identifiers.js';
import { GrpcCode, TtrpcError, type CallContext } from '../../../wire/ttrpc/index.js';

const isInvalidId = (key: string) => (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_INVALID_ID' && e.key === key;

describe('shim identifiers (containerd pkg/identifiers)', () => {
  // containerd's own cases (validate_test.go), plus what the shim must never take as a path component.
  const valid = ['default', 'Default', 'default-default', 'containerd.io', 'foo.boo', 'swarmkit.docker.io', '0912341234', 'task.0.0123456789', 'container.system-75-f19a.00', 'underscores_are_allowed', 'k8s.io', 'a'.repeat(MAX_IDENTIFIER_LENGTH), 'f'.repeat(64)];
  const invalid = ['', '.foo..foo', 'foo/foo', 'foo/..', 'foo..foo', 'foo.-boo', '-foo.boo', 'foo.boo-', 'but__only_tasteful_underscores', 'zn--e9.org', 'default--default', 'a'.repeat(MAX_IDENTIFIER_LENGTH + 1), '..', '.', '../../x', '/abs', 'a b', 'foo\n', 'x\0y', 'é'];

  it('accepts what containerd accepts', () => {
    for (const id of valid) assert.equal(identifierProblem(id), undefined, id);
  });

  it('refuses what containerd refuses, and anything that could leave a directory', () => {
    for (const id of invalid) assert.notEqual(identifierProblem(id), undefined, JSON.stringify(id));
  });

  it('says where the value came from and quotes at most 80 characters of it', () => {
    const huge = 'x'.repeat(4 << 20);
    assert.throws(() => checkIdentifier('Create.id', huge), (e: unknown) => isInvalidId('Create.id')(e) && (e as Error).message.length < 200 && /4194304 characters/.test((e as Error).message));
  });

  it('refuses a bad -id or -namespace on every action of the binary', () => {
    for (const action of ['start', 'delete']) {
      assert.throws(() => parseShimFlags(['-namespace', 'default', '-id', '../../x', action]), isInvalidId('-id'));
      assert.throws(() => parseShimFlags(['-namespace', '..', '-id', 'c1', action]), isInvalidId('-namespace'));
    }
    assert.throws(() => parseShimFlags(['-namespace', 'default', '-id', 'a/b', '-socket', '/run/containerd/s/x']), isInvalidId('-id'));
  });

  describe('guardTaskIds', () => {
    const ctx = {} as CallContext;
    it('answers INVALID_ARGUMENT with the code before the service sees a bad id or exec id', async () => {
      const create = sinon.stub().resolves({ pid: 1 });
      const exec = sinon.stub().resolves({});
      const guarded = guardTaskIds({ Create: create, Exec: exec });
      const refused = (key: string) => (e: unknown) => e instanceof TtrpcError && e.code === GrpcCode.INVALID_ARGUMENT && e.message.includes('[KATA_ERR_INVALID_ID]') && isInvalidId(key)(e.cause);
      assert.throws(() => guarded.Create!({ id: '../../etc', bundle: '/b' } as never, ctx), refused('Create.id'));
      assert.throws(() => guarded.Exec!({ id: 'c1', execId: '../e' } as never, ctx), refused('Exec.exec_id'));
      assert.throws(() => guarded.Exec!({ id: '', execId: 'e1' } as never, ctx), refused('Exec.id'));
      assert.equal(create.callCount + exec.callCount, 0);
      assert.deepEqual(await guarded.Create!({ id: 'c1', bundle: '/b' } as never, ctx), { pid: 1 });
      await guarded.Exec!({ id: 'c1', execId: 'e1' } as never, ctx);
      await guarded.Exec!({ id: 'c1', execId: '' } as never, ctx);
      assert.equal(create.callCount, 1);
      assert.equal(exec.callCount, 2);
    });
  });
});
