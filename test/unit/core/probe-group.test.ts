/**
 * Hypervisor probes (`--version` for check and env) run in a process group of their own: a probe
 * that hangs, or forks and exits, leaves nothing running after a timeout, after it answered, or
 * after the runtime was interrupted.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { DIST_ROOT } from '../../../core/paths.js';
import { hypervisorVersion } from '../../../core/host.js';
import { TempDir } from '../../helpers/tmp.js';
import { pidAlive, until } from '../../helpers/wait.js';

describe('core: hypervisor probes in their own process group', function () {
  this.timeout(20_000);
  let tmp: TempDir;
  const grandchildren: number[] = [];
  beforeEach(() => (tmp = new TempDir('kata-probe-')));
  afterEach(() => {
    for (const pid of grandchildren.splice(0)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone, as it should be */
      }
    }
    tmp.cleanup();
  });

  /** A "hypervisor" that starts a grandchild (writing its pid to `pidfile`), then does `then`. */
  function fakeHypervisor(then: string): { bin: string; pidfile: string } {
    const pidfile = path.join(tmp.path, 'grandchild.pid');
    const bin = tmp.file('qemu-system-x86_64', `#!/bin/sh\nsleep 1000 >/dev/null 2>&1 &\necho $! > ${pidfile}\n${then}\n`);
    chmodSync(bin, 0o755);
    return { bin, pidfile };
  }
  const grandchild = (pidfile: string) => {
    const pid = Number(readFileSync(pidfile, 'utf8').trim());
    grandchildren.push(pid);
    return pid;
  };

  it('kills the whole group when the probe times out', async () => {
    const { bin, pidfile } = fakeHypervisor('sleep 1000');
    const v = await hypervisorVersion(bin, { timeoutMs: 500 });
    assert.equal(v.version, null);
    assert.match(v.reason, /did not answer within 0.5 s/);
    const pid = grandchild(pidfile);
    await until('the grandchild to be killed with its group', () => !pidAlive(pid), 3_000);
  });

  it('kills what the probe left behind once it has answered', async () => {
    const { bin, pidfile } = fakeHypervisor('echo "QEMU emulator version 7.2.0"');
    const v = await hypervisorVersion(bin, { timeoutMs: 5_000 });
    assert.equal(v.version, '7.2.0');
    const pid = grandchild(pidfile);
    await until('the grandchild to be killed with its group', () => !pidAlive(pid), 3_000);
  });

  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    it(`kills the group when the runtime gets ${signal} during the probe`, async () => {
      const { bin, pidfile } = fakeHypervisor('sleep 1000');
      const parent = tmp.file(
        'parent.mjs',
        `import { hypervisorVersion } from ${JSON.stringify(path.join(DIST_ROOT, 'core', 'host.js'))};
         await hypervisorVersion(${JSON.stringify(bin)}, { timeoutMs: 60000 });`,
      );
      const p = spawn(process.execPath, [parent], { stdio: 'ignore' });
      await until('the probe to start its grandchild', () => existsSync(pidfile) && readFileSync(pidfile, 'utf8').endsWith('\n'), 5_000);
      const pid = grandchild(pidfile);
      p.kill(signal);
      const exit = await new Promise<NodeJS.Signals | null>((resolve) => p.once('exit', (_c, s) => resolve(s)));
      assert.equal(exit, signal, 'the runtime still ends by the signal');
      await until('the grandchild to be killed with its group', () => !pidAlive(pid), 3_000);
    });
  }
});
