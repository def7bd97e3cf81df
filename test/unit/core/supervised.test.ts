import assert from 'node:assert/strict';
import { performance } from 'node:perf_hooks';
import sinon from 'sinon';
import { silentLogger } from '../../../core/logger.js';
import { SupervisedProcess, describeExit } from '../../../core/supervised.js';

const sh = (script: string, extra: Partial<Parameters<typeof SupervisedProcess.start>[0]> = {}) =>
  SupervisedProcess.start({ name: 'test', binary: '/bin/sh', args: ['-c', script], log: silentLogger(), ...extra });

describe('SupervisedProcess', () => {
  it('keeps the last stderr lines and reports an exit nobody asked for as unexpected', async () => {
    const p = sh('for i in 1 2 3 4 5; do echo "line $i" >&2; done; exit 3', { tailLines: 2 });
    const exit = await p.exited;
    assert.deepEqual({ expected: exit.expected, code: exit.code, signal: exit.signal }, { expected: false, code: 3, signal: null });
    assert.deepEqual(exit.stderrTail, ['line 4', 'line 5']);
    assert.equal(describeExit(exit), 'exit status 3');
  });

  it('logs stdout lines at the level asked, and keeps them out of the error tail', async () => {
    const log = { ...silentLogger(), debug: sinon.spy() } as unknown as ReturnType<typeof silentLogger> & { debug: sinon.SinonSpy };
    const p = sh('echo console-line; echo err-line >&2', { log, stdout: { level: 'debug', message: 'guest console' } });
    const exit = await p.exited;
    assert.deepEqual(exit.stderrTail, ['err-line']);
    sinon.assert.calledWithMatch(log.debug, { stdout: 'console-line' }, 'guest console');
  });

  it('reports a program that cannot be started in exited, not as a throw', async () => {
    const p = SupervisedProcess.start({ name: 'missing', binary: '/nonexistent/program', args: [], log: silentLogger() });
    const exit = await p.exited;
    assert.equal((exit.spawnError as NodeJS.ErrnoException | undefined)?.code, 'ENOENT');
    assert.match(describeExit(exit), /could not be started/);
  });

  it('stops by its ladder: a step that ends the process wins, and the exit is expected', async () => {
    const p = sh('trap "exit 0" TERM; while :; do sleep 0.05; done');
    await new Promise((r) => setTimeout(r, 100));
    const graceful = await p.stop(() => [{ name: 'SIGTERM', action: () => p.signal('SIGTERM'), waitMs: 5_000 }], 1_000);
    assert.equal(graceful, true);
    assert.equal((await p.exited).expected, true);
  });

  it('kills a process that ignores every step, and says so', async () => {
    const p = sh('trap "" TERM; while :; do sleep 0.05; done');
    await new Promise((r) => setTimeout(r, 100));
    const graceful = await p.stop(() => [{ name: 'SIGTERM', action: () => p.signal('SIGTERM'), waitMs: 200 }], 2_000);
    assert.equal(graceful, false);
    assert.equal((await p.exited).signal, 'SIGKILL');
  });

  it('goes on at once past a step that does not apply (returns false) or fails', async () => {
    const p = sh('while :; do sleep 0.05; done');
    const t0 = performance.now();
    const graceful = await p.stop(
      () => [
        { name: 'not-applicable', action: () => false, waitMs: 10_000 },
        { name: 'SIGTERM', action: () => p.signal('SIGTERM'), waitMs: 5_000 },
      ],
      1_000,
    );
    assert.equal(graceful, true);
    assert.ok(performance.now() - t0 < 5_000, 'the not-applicable step was not waited for');
  });
});
