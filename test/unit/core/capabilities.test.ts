import assert from 'node:assert/strict';
import { CapabilitySet, SCOPE_FOR_PLUGIN } from '../../../core/capabilities.js';

describe('CapabilitySet', () => {
  it('records who added and who removed a capability, and why', () => {
    const caps = new CapabilitySet();
    caps[SCOPE_FOR_PLUGIN]('hv').add('cpu-hotplug', 'note');
    caps[SCOPE_FOR_PLUGIN]('tee').remove('cpu-hotplug', 'fixed vCPUs');
    assert.equal(caps.has('cpu-hotplug'), false);
    assert.deepEqual(caps.removed(), [{ name: 'cpu-hotplug', by: 'tee', why: 'fixed vCPUs' }]);
  });

  it('ignores the removal of a capability that is not there', () => {
    const caps = new CapabilitySet();
    caps.remove('balloon', 'tee', 'x');
    assert.deepEqual(caps.removed(), []);
  });

  it('hands out a read-only view that cannot change the set', () => {
    const caps = new CapabilitySet();
    caps.add('a', 'hv');
    const ro = caps.readonly();
    assert.equal(ro.has('a'), true);
    assert.deepEqual(ro.list(), ['a']);
    assert.equal((ro as unknown as { add?: unknown }).add, undefined);
  });
});
