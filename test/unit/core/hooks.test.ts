import assert from 'node:assert/strict';
import { createHooks, createTapView, STAGE } from '../../../core/hooks.js';
import { CapabilitySet } from '../../../core/capabilities.js';
import { Verdict } from '../../../core/verdict.js';
import { KataError } from '../../../core/errors.js';

describe('hooks', () => {
  it('declares a frozen table', () => {
    const hooks = createHooks();
    assert.ok(Object.isFrozen(hooks));
    assert.deepEqual(Object.keys(hooks).sort(), ['agentReady', 'attachRootfs', 'beforeVmStart', 'capabilities', 'checkPlan', 'classifyRootfs', 'configParsed', 'containerCreated', 'containerExited', 'containerStarted', 'createVm', 'hostChecks', 'plan', 'sandboxStopped', 'validate', 'vmStarted', 'vmStopped']);
  });

  it('gives plugins a view with tap only', () => {
    const view = createTapView(createHooks(), 'p1');
    assert.deepEqual(Object.keys(view.validate), ['tap']);
    assert.equal((view.validate as unknown as { call?: unknown }).call, undefined);
  });

  it('offers tapPromise, not tap, on asynchronous hooks', () => {
    const view = createTapView(createHooks(), 'p1');
    assert.deepEqual(Object.keys(view.createVm), ['tapPromise']);
  });

  it('stamps a rejection inside an asynchronous handler with the plugin and hook', async () => {
    const hooks = createHooks();
    createTapView(hooks, 'p1').createVm.tapPromise('p1', async () => {
      throw new Error('no VM today');
    });
    await assert.rejects(hooks.createVm.promise({} as never), (e: KataError) => e.code === 'KATA_ERR_PLUGIN_HOOK' && e.plugin === 'p1' && e.hook === 'createVm');
  });

  it('refuses a tap under another plugin name', () => {
    const view = createTapView(createHooks(), 'p1');
    assert.throws(() => view.validate.tap('p2', () => undefined), (e: KataError) => e.code === 'KATA_ERR_PLUGIN_TAP' && e.plugin === 'p1' && e.hook === 'validate');
  });

  it('refuses a hook that does not exist', () => {
    const view = createTapView(createHooks(), 'p1') as unknown as Record<string, unknown>;
    assert.throws(() => view.nope, (e: KataError) => e.code === 'KATA_ERR_PLUGIN_TAP' && e.hook === 'nope');
  });

  it('stamps a throw inside a handler with the plugin and hook', () => {
    const hooks = createHooks();
    createTapView(hooks, 'p1').configParsed.tap('p1', () => {
      throw new Error('boom');
    });
    assert.throws(() => hooks.configParsed.call({}), (e: KataError) => e.code === 'KATA_ERR_PLUGIN_HOOK' && e.plugin === 'p1' && e.hook === 'configParsed' && e.message.startsWith('[plugin p1]'));
  });

  it('keeps the code of a coded error thrown by a handler and adds the plugin', () => {
    const hooks = createHooks();
    createTapView(hooks, 'p1').configParsed.tap({}, () => {
      throw new KataError('KATA_ERR_CONFIG_VALUE', 'bad', { key: 'a.b' });
    });
    assert.throws(() => hooks.configParsed.call({}), (e: KataError) => e.code === 'KATA_ERR_CONFIG_VALUE' && e.plugin === 'p1' && e.key === 'a.b');
  });

  it('stamps vetoes, requirements and capability changes with the tapping plugin', () => {
    const hooks = createHooks();
    createTapView(hooks, 'alpha').validate.tap('alpha', (_cfg, v) => {
      v.veto({ key: 'k', reason: 'r', fix: 'f' });
      v.require('x', 'why');
    });
    createTapView(hooks, 'beta').capabilities.tap({ stage: STAGE.HYPERVISOR }, (caps) => caps.add('x'));
    const verdict = new Verdict();
    const caps = new CapabilitySet();
    hooks.capabilities.call(caps as never, {} as never);
    hooks.validate.call({} as never, verdict as never, caps.readonly());
    assert.deepEqual(verdict.problems, [{ code: 'KATA_ERR_CONFIG_VETO', key: 'k', reason: 'r', fix: 'f', plugin: 'alpha', hook: 'validate' }]);
    assert.deepEqual(verdict.requirements, [{ capability: 'x', why: 'why', plugin: 'alpha' }]);
    assert.deepEqual(caps.records(), [{ name: 'x', by: 'beta' }]);
  });

  it('orders handlers by stage, not by registration', () => {
    const hooks = createHooks();
    const order: string[] = [];
    createTapView(hooks, 'late').configParsed.tap({ stage: STAGE.CONFIDENTIAL }, (r) => (order.push('late'), r));
    createTapView(hooks, 'early').configParsed.tap({ stage: STAGE.HYPERVISOR }, (r) => (order.push('early'), r));
    hooks.configParsed.call({});
    assert.deepEqual(order, ['early', 'late']);
  });
});
