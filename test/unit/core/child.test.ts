/**
 * Children started with spawnTied die with the runtime process, even when it is SIGKILLed; the
 * program runs under its own pid; a missing program fails as spawn does.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, readFileSync } from 'node:fs';
import type { KataError } from '../../../core/errors.js';
import path from 'node:path';
import { DIST_ROOT } from '../../../core/paths.js';
import { findExecutable, spawnTied } from '../../../core/child.js';
import { TempDir } from '../../helpers/tmp.js';
import { pidAlive, until } from '../../helpers/wait.js';

describe('core: children tied to the runtime process', function () {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir()));
  afterEach(() => tmp.cleanup());

  it('kills the child when the runtime is SIGKILLed, and the child runs under its own pid', async function () {
    if (!findExecutable('setpriv')) this.skip();
    const parent = tmp.file(
      'parent.mjs',
      `import { spawnTied } from ${JSON.stringify(path.join(DIST_ROOT, 'core', 'child.js'))};
       const c = spawnTied('sleep', ['1000'], { stdio: 'ignore' });
       process.stdout.write(String(c.pid) + '\\n');
       setInterval(() => {}, 1000);`,
    );
    const p = spawn(process.execPath, [parent], { stdio: ['ignore', 'pipe', 'inherit'] });
    const pid = await new Promise<number>((resolve) => p.stdout.once('data', (d: Buffer) => resolve(Number(d.toString().trim()))));
    try {
      await until('setpriv to exec sleep', () => path.basename(readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0]!) === 'sleep', 3_000);
      assert.ok(pidAlive(pid));
      p.kill('SIGKILL');
      await until('the child to die with its parent', () => !pidAlive(pid), 5_000);
    } finally {
      p.kill('SIGKILL');
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone, as it should be */
      }
    }
  });

  it('fails a missing program the way spawn does (an ENOENT error event)', async () => {
    const c = spawnTied(path.join(tmp.path, 'no-such-program'), [], { stdio: 'ignore' });
    const err = await new Promise<NodeJS.ErrnoException>((resolve) => c.once('error', resolve));
    assert.equal(err.code, 'ENOENT');
  });

  it('refuses, as root, a program in a world-writable directory before running it', function () {
    if (process.geteuid?.() !== 0) this.skip();
    const marker = path.join(tmp.path, 'ran');
    const script = tmp.file('open/fake-qemu', `#!/bin/sh\necho ran > ${marker}\n`);
    chmodSync(script, 0o755);
    chmodSync(path.dirname(script), 0o777);
    assert.throws(() => spawnTied(script, [], { stdio: 'ignore' }, 'the hypervisor binary'), (e: KataError) => e.code === 'KATA_ERR_UNTRUSTED_PATH' && e.value === script && e.message.includes('the hypervisor binary'));
    assert.equal(existsSync(marker), false);
  });

  it('runs, as root, a program from a root-owned directory', async function () {
    if (process.geteuid?.() !== 0) this.skip();
    const marker = path.join(tmp.path, 'ran');
    const script = tmp.file('safe/fake-qemu', `#!/bin/sh\necho ran > ${marker}\n`);
    chmodSync(script, 0o755);
    const c = spawnTied(script, [], { stdio: 'ignore' });
    await new Promise((r) => c.once('close', r));
    assert.equal(readFileSync(marker, 'utf8'), 'ran\n');
  });
});
