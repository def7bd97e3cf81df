/**
 * Timers for ttrpc deadlines, which may be longer than setTimeout can wait (2^31-1 ms): the fake
 * clock fires an over-long setTimeout after 1 ms, as Node does.
 */
import assert from 'node:assert/strict';
import sinon from 'sinon';
import { MAX_TIMER_MS, setLongTimeout } from '../../../wire/ttrpc/timer.js';

const DAY_MS = 24 * 3600 * 1000;

describe('ttrpc long timers', () => {
  let clock: sinon.SinonFakeTimers;
  beforeEach(() => (clock = sinon.useFakeTimers({ now: 1_700_000_000_000 })));
  afterEach(() => clock.restore());

  it('waits 30 days (beyond one timer) to the millisecond, not 1 ms', () => {
    const fn = sinon.spy();
    setLongTimeout(fn, 30 * DAY_MS);
    clock.tick(1);
    assert.equal(fn.callCount, 0, 'fired at once, as a single over-long setTimeout does');
    clock.tick(MAX_TIMER_MS);
    assert.equal(fn.callCount, 0);
    clock.tick(30 * DAY_MS - MAX_TIMER_MS - 2);
    assert.equal(fn.callCount, 0);
    clock.tick(1);
    assert.equal(fn.callCount, 1);
    clock.tick(100 * DAY_MS);
    assert.equal(fn.callCount, 1);
  });

  it('fires a short delay once, and never once cancelled, even across the chain', () => {
    const short = sinon.spy();
    setLongTimeout(short, 50);
    clock.tick(50);
    assert.equal(short.callCount, 1);

    const long = sinon.spy();
    const cancel = setLongTimeout(long, 60 * DAY_MS);
    clock.tick(MAX_TIMER_MS + 5);
    cancel();
    clock.tick(60 * DAY_MS);
    assert.equal(long.callCount, 0);
  });
});
