import assert from 'node:assert/strict';
import { createHooks, createTapView } from '../../../core/hooks.js';
import { ERROR_CODES, KataError, errorText, isKnownErrorCode, pluginErrorCodePrefix } from '../../../core/errors.js';

describe('KataError', () => {
  it('keeps the plugin as a field and formats the prefix from it', () => {
    const e = new KataError('KATA_ERR_CONFIG_VETO', 'no virtio-fs here', { plugin: 'tdx', key: 'hypervisor.clh.shared_fs' });
    assert.equal(e.plugin, 'tdx');
    assert.equal(e.text, 'no virtio-fs here');
    assert.equal(e.message, '[plugin tdx] no virtio-fs here');
    assert.equal(e.toJSON().message, '[plugin tdx] no virtio-fs here');
  });

  it('has no prefix without a plugin', () => {
    const e = new KataError('KATA_ERR_SANDBOX', 'too long');
    assert.equal(e.message, 'too long');
    assert.equal(e.text, 'too long');
    assert.equal(e.fix, ERROR_CODES.KATA_ERR_SANDBOX.fix);
  });

  it('carries a plugin code of its own as it is, with the fix the plugin gave', () => {
    const e = new KataError('MY_POLICY_ERR_TOO_BIG', 'the pod asks for 64 vCPUs', { plugin: 'my-policy', fix: 'ask for at most 8' });
    assert.equal(e.code, 'MY_POLICY_ERR_TOO_BIG');
    assert.equal(e.fix, 'ask for at most 8');
    assert.equal(e.message, '[plugin my-policy] the pod asks for 64 vCPUs');
  });

  it('does not crash on a code nobody documented, and points at the plugin for the fix', () => {
    const e = new KataError('ODD_ERR_X' as never, 'odd', { plugin: 'odd' });
    assert.equal(e.code, 'ODD_ERR_X');
    assert.match(e.fix, /plugin odd/);
    assert.equal(isKnownErrorCode('ODD_ERR_X'), false);
    assert.equal(isKnownErrorCode('KATA_ERR_SANDBOX'), true);
  });

  it('names the code prefix of a plugin in upper snake case', () => {
    assert.equal(pluginErrorCodePrefix('my-policy'), 'MY_POLICY_ERR_');
    assert.equal(pluginErrorCodePrefix('tdx'), 'TDX_ERR_');
  });

  it('keeps a plugin code and the text through the hook wrapper, stamped once with the tapping plugin', () => {
    const hooks = createHooks();
    createTapView(hooks, 'my-policy').configParsed.tap('my-policy', () => {
      throw new KataError('MY_POLICY_ERR_TOO_BIG', 'too big', { plugin: 'someone-else', key: 'x.y' });
    });
    assert.throws(
      () => hooks.configParsed.call({}),
      (e: KataError) => e.code === 'MY_POLICY_ERR_TOO_BIG' && e.plugin === 'my-policy' && e.hook === 'configParsed' && e.text === 'too big' && e.message === '[plugin my-policy] too big',
    );
  });

  it('gives the words of any error without a prefix (errorText)', () => {
    assert.equal(errorText(new KataError('KATA_ERR_QMP', 'closed', { plugin: 'qemu' })), 'closed');
    assert.equal(errorText(new Error('plain')), 'plain');
    assert.equal(errorText('str'), 'str');
  });
});
