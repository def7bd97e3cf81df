/**
 * Stale run directories: only a directory whose owner is provably gone and that no live process
 * uses is removed, after what is mounted under it is unmounted; a live sandbox is never touched.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { OWNER_FILE, judgeRunDir, processStartTime, reapStaleRunDirs, writeOwner } from '../../../core/run-dirs.js';
import { isMountPoint } from '../../../core/mounts.js';
import { TempDir } from '../../helpers/tmp.js';

/** The owner record of a process that has ended (a real pid and start time, of a process now gone). */
async function deadOwner(): Promise<string> {
  const p = spawn('true');
  const pid = p.pid as number;
  const startTime = processStartTime(pid) ?? '1';
  await new Promise((resolve) => p.once('exit', resolve));
  return JSON.stringify({ pid, startTime });
}

describe('core: stale run directories', function () {
  this.timeout(20_000);
  let tmp: TempDir;
  const children: ChildProcess[] = [];
  let root: string;
  beforeEach(() => {
    tmp = new TempDir('kata-run-dirs-');
    root = path.join(tmp.path, 'run');
  });
  afterEach(() => {
    for (const c of children.splice(0)) c.kill('SIGKILL');
    tmp.cleanup();
  });

  const runDir = (rel: string, owner: string | undefined) => {
    const d = path.join(root, rel);
    mkdirSync(d, { recursive: true });
    if (owner !== undefined) writeFileSync(path.join(d, OWNER_FILE), owner);
    writeFileSync(path.join(d, 'qmp.sock'), '');
    return d;
  };

  it('writes an owner record naming this process and its start time', async () => {
    const d = runDir('mine', undefined);
    await writeOwner(d);
    const owner = JSON.parse(readFileSync(path.join(d, OWNER_FILE), 'utf8')) as { pid: number; startTime: string };
    assert.equal(owner.pid, process.pid);
    assert.equal(owner.startTime, processStartTime(process.pid));
    assert.equal(judgeRunDir(d).stale, false);
  });

  it('removes a directory whose owner has ended, and keeps one whose owner runs', async () => {
    const dead = runDir('run-dead', await deadOwner());
    const live = runDir('run-live', undefined);
    await writeOwner(live);
    const r = await reapStaleRunDirs(root);
    assert.deepEqual(r.reaped, [dead]);
    assert.deepEqual(r.kept.map((k) => k.dir), [live]);
    assert.equal(existsSync(dead), false);
    assert.equal(existsSync(path.join(live, 'qmp.sock')), true);
  });

  it('takes a recycled pid (same pid, another start time) for a gone owner', async () => {
    const d = runDir('run-recycled', JSON.stringify({ pid: process.pid, startTime: '1' }));
    assert.equal(judgeRunDir(d).stale, true);
  });

  it('keeps a directory whose owner has ended while a process (its hypervisor) still uses it', async () => {
    const d = runDir('run-orphan-vm', await deadOwner());
    // A hypervisor started without pdeathsig outlives its runtime; its argv names the run directory.
    const vm = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1e6)', `${d}/qmp.sock`], { stdio: 'ignore' });
    children.push(vm);
    writeFileSync(path.join(d, 'qemu.pid'), String(vm.pid));
    const r = await reapStaleRunDirs(root);
    assert.deepEqual([r.reaped, r.kept.map((k) => k.dir)], [[], [d]]);
    assert.match(r.kept[0]?.reason ?? '', new RegExp(`process ${vm.pid}`));
  });

  it('does not let a pid file that names some other live process keep a directory', async () => {
    const d = runDir('run-pid-reused', await deadOwner());
    writeFileSync(path.join(d, 'qemu.pid'), String(process.pid)); // alive, but not a process of that sandbox
    assert.equal(judgeRunDir(d).stale, true);
  });

  it('keeps a directory without an owner record, or with an unreadable one (one being created)', () => {
    const none = runDir('run-new', undefined);
    const bad = runDir('run-bad', '{"pid":');
    assert.deepEqual([judgeRunDir(none).stale, judgeRunDir(bad).stale], [false, false]);
  });

  it("reaps the shim's <namespace>/<sandbox> layout, keeping the namespace and live sandboxes in it", async () => {
    const dead = runDir('k8s.io/0123abcd', await deadOwner());
    const live = runDir('k8s.io/4567cdef', undefined);
    await writeOwner(live);
    const r = await reapStaleRunDirs(root);
    assert.deepEqual([r.reaped, r.kept.map((k) => k.dir)], [[dead], [live]]);
    assert.equal(existsSync(path.join(root, 'k8s.io')), true);
    assert.equal(existsSync(live), true);
  });

  it('lists without removing with dryRun', async () => {
    const dead = runDir('run-dead', await deadOwner());
    const r = await reapStaleRunDirs(root, { dryRun: true });
    assert.deepEqual(r.reaped, [dead]);
    assert.equal(existsSync(dead), true);
  });

  it('unmounts a bind mount left under a stale directory before removing it, and the host data survives', async function () {
    if (process.getuid?.() !== 0) this.skip();
    const data = tmp.file('host-data/precious.txt', 'keep me\n');
    const dead = runDir('run-with-share', await deadOwner());
    const target = path.join(dead, 'shared', 'run', 'rootfs');
    mkdirSync(target, { recursive: true });
    execFileSync('mount', ['--bind', path.dirname(data), target]);
    try {
      const r = await reapStaleRunDirs(root);
      assert.deepEqual(r.reaped, [dead]);
      assert.equal(await isMountPoint(target), false);
      assert.equal(existsSync(dead), false);
      assert.equal(readFileSync(data, 'utf8'), 'keep me\n');
    } finally {
      if (await isMountPoint(target)) execFileSync('umount', ['-l', target]);
    }
  });
});
