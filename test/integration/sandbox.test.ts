/**
 * The sandbox lifecycle end to end: real QEMU, the project's guest image with its agent, the core's
 * Sandbox API. The block-device rootfs (an ext4 image hot-plugged as virtio-blk: the devmapper /
 * TDX data path) and the shared-filesystem rootfs (a directory over virtio-9p).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { loadValidatedConfig } from '../../core/runtime.js';
import { Sandbox, type Container } from '../../core/sandbox.js';
import type { KataError } from '../../core/errors.js';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { guestImageSuite } from '../helpers/guest.js';
import { qemuLeftBehind, sandboxConfigText } from '../helpers/qemu.js';
import { text } from 'node:stream/consumers';



const BLOCK = 'shared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"';
const NINEP = 'shared_fs = "virtio-9p"\ndisable_block_device_use = true';

function mountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n').filter((l) => l.split(' ')[1]?.startsWith(dir));
}

describe('sandbox lifecycle @integration', function () {
  this.timeout(600_000);
  const suite = guestImageSuite('kata-sandbox-');
  let rootfsDir: string;


  /** A private copy of the busybox rootfs image, so containers can write to it. */
  function freshImage(name: string): string {
    const p = path.join(suite.tmp.path, `${name}.ext4`);
    copyFileSync(suite.image.busyboxRootfs as string, p);
    return p;
  }

  describe('with a block-device rootfs (hot-plugged virtio-blk)', () => {
    let sandbox: Sandbox;
    const runRoot = () => path.join(suite.tmp.path, 'run-block');
    before(async () => {
      const validated = await loadValidatedConfig({ text: sandboxConfigText(suite.image, BLOCK) });
      sandbox = await Sandbox.create(validated, { sandboxId: 'sb-block', runRoot: runRoot() });
    });
    after(async () => {
      await sandbox?.stop();
      assert.deepEqual(await qemuLeftBehind(runRoot()), [], 'no QEMU left');
      assert.equal(existsSync(path.join(runRoot(), 'sb-block')), false, 'run dir removed');
    });

    async function runIn(id: string, args: string[], input?: string): Promise<{ status: number; stdout: string; stderr: string; c: Container }> {
      const c = await sandbox.createContainer({ id, rootfs: { kind: 'block', path: freshImage(id), fstype: 'ext4' }, process: { args } });
      const out = text(c.stdout);
      const err = text(c.stderr);
      await c.start();
      c.stdin.end(input);
      const status = await c.wait();
      const r = { status, stdout: await out, stderr: await err, c };
      await c.delete();
      return r;
    }

    it('runs a process whose stdout and stderr arrive separately, and whose exit code comes back', async () => {
      const r = await runIn('out-err', ['sh', '-c', 'echo out; echo err >&2; exit 3']);
      assert.deepEqual([r.status, r.stdout, r.stderr], [3, 'out\n', 'err\n']);
    });

    it('pipes stdin through', async () => {
      const r = await runIn('stdin', ['cat'], 'hello through the agent\n');
      assert.deepEqual([r.status, r.stdout], [0, 'hello through the agent\n']);
    });

    it('reports SIGKILL as 137', async () => {
      const c = await sandbox.createContainer({ id: 'kill', rootfs: { kind: 'block', path: freshImage('kill'), fstype: 'ext4' }, process: { args: ['sleep', '100'] } });
      await c.start();
      c.stdin.end();
      const waited = c.wait();
      await new Promise((r) => setTimeout(r, 300));
      await c.signal(9);
      assert.equal(await waited, 137);
      await c.delete();
    });

    it('delivers SIGTERM to a process that traps it (143)', async () => {
      const c = await sandbox.createContainer({
        id: 'term',
        rootfs: { kind: 'block', path: freshImage('term'), fstype: 'ext4' },
        process: { args: ['sh', '-c', 'trap "exit 143" TERM; sleep 100 & wait'] },
      });
      await c.start();
      c.stdin.end();
      const waited = c.wait();
      await new Promise((r) => setTimeout(r, 500));
      await c.signal(15);
      assert.equal(await waited, 143);
      await c.delete();
    });

    it('reports a process killed by the guest OOM killer as 137 and as an OOM event naming its container, first; the sandbox goes on', async () => {
      const seen: string[] = [];
      const off = sandbox.onOOM((id) => seen.push(`oom:${id}`));
      const run = async (id: string, script: string): Promise<string> => {
        const c = await sandbox.createContainer({ id, rootfs: { kind: 'block', path: freshImage(id), fstype: 'ext4' }, process: { args: ['sh', '-c', script] } });
        const out = text(c.stdout);
        await c.start();
        c.stdin.end();
        seen.push(`exit:${await c.wait()}`);
        const stdout = await out;
        await c.delete();
        return stdout;
      };
      try {
        await run('oom', 'a=xxxxxxxxxxxxxxxx; while true; do a=$a$a; done');
        assert.deepEqual(seen, ['oom:oom', 'exit:137'], 'the OOM event, then the exit');
        // The victim is a child of the container's process, reaped by it at once: still this container's.
        seen.length = 0;
        assert.equal(await run('oom-child', 'sh -c "a=xxxxxxxxxxxxxxxx; while true; do a=\\$a\\$a; done"; echo child $?'), 'child 137\n');
        assert.deepEqual(seen, ['oom:oom-child', 'exit:0']);
      } finally {
        off();
      }
      assert.equal((await runIn('after-oom', ['true'])).status, 0);
    });

    it('runs two containers side by side and execs into a running one', async () => {
      const a = await sandbox.createContainer({ id: 'two-a', rootfs: { kind: 'block', path: freshImage('two-a'), fstype: 'ext4' }, process: { args: ['sleep', '100'] } });
      const b = await sandbox.createContainer({ id: 'two-b', rootfs: { kind: 'block', path: freshImage('two-b'), fstype: 'ext4' }, process: { args: ['sh', '-c', 'echo b is here'] } });
      const bOut = text(b.stdout);
      await a.start();
      a.stdin.end();
      await b.start();
      b.stdin.end();
      assert.equal(await b.wait(), 0);
      assert.equal(await bOut, 'b is here\n');
      const e = await a.exec({ args: ['sh', '-c', 'echo exec says $((6*7)); exit 5'] });
      const eOut = text(e.stdout);
      e.stdin.end();
      assert.equal(await e.wait(), 5);
      assert.equal(await eOut, 'exec says 42\n');
      await a.signal(9);
      assert.equal(await a.wait(), 137);
      await a.delete();
      await b.delete();
    });

    it('creates and deletes 20 containers leaving no disk, mount or file behind', async () => {
      for (let i = 0; i < 20; i++) {
        const r = await runIn(`cycle-${i}`, ['true']);
        assert.equal(r.status, 0);
      }
      const disks = (await (sandbox.running.vm as unknown as { disks?: unknown[] }).disks) ?? [];
      assert.deepEqual(disks, [], 'every hot-plugged disk was unplugged');
      assert.deepEqual(mountsUnder(suite.tmp.path), []);
      const left = readdirSync(path.join(runRoot(), 'sb-block')).sort();
      assert.ok(!left.some((f) => f.startsWith('rootfs')), `run dir: ${left.join(', ')}`);
    });
  });

  describe('with a directory rootfs (virtio-9p)', () => {
    let sandbox: Sandbox;
    const runRoot = () => path.join(suite.tmp.path, 'run-9p');
    before(async function () {
      if (process.getuid?.() !== 0) this.skip(); // the shared rootfs is a bind mount
      rootfsDir = path.join(suite.tmp.path, 'rootfs-dir');
      execFileSync('mkdir', ['-p', rootfsDir]);
      const mnt = path.join(suite.tmp.path, 'mnt');
      execFileSync('mkdir', ['-p', mnt]);
      // Unpack the busybox image into a directory (debugfs needs no mount).
      execFileSync('debugfs', ['-R', `rdump / ${rootfsDir}`, suite.image.busyboxRootfs as string], { stdio: 'ignore' });
      const validated = await loadValidatedConfig({ text: sandboxConfigText(suite.image, NINEP) });
      sandbox = await Sandbox.create(validated, { sandboxId: 'sb-9p', runRoot: runRoot() });
    });
    after(async () => {
      await sandbox?.stop();
      assert.deepEqual(await qemuLeftBehind(runRoot()), []);
      assert.deepEqual(mountsUnder(suite.tmp.path), []);
    });

    it('runs a container whose rootfs directory is shared, and sees its files', async () => {
      cpSync(path.join(PACKAGE_ROOT, 'package.json'), path.join(rootfsDir, 'marker.json'));
      const c = await sandbox.createContainer({ id: 'shared', rootfs: { kind: 'dir', path: rootfsDir }, process: { args: ['sh', '-c', 'grep -c kata-ts /marker.json; echo written > /from-guest'] } });
      const out = text(c.stdout);
      await c.start();
      c.stdin.end();
      assert.equal(await c.wait(), 0);
      assert.equal((await out).trim().length > 0, true);
      await c.delete();
      assert.equal(readFileSync(path.join(rootfsDir, 'from-guest'), 'utf8'), 'written\n');
    });

    it('refuses a block-device rootfs when block devices are disabled, with a coded error', async () => {
      await assert.rejects(sandbox.createContainer({ id: 'noblk', rootfs: { kind: 'block', path: freshImage('noblk'), fstype: 'ext4' }, process: { args: ['true'] } }), (e: KataError) => e.code === 'KATA_ERR_ROOTFS');
    });
  });

  describe('failures', () => {
    it('reports an unreachable agent clearly and tears the VM down', async () => {
      const runRoot = path.join(suite.tmp.path, 'run-unreachable');
      const validated = await loadValidatedConfig({ text: sandboxConfigText(suite.image, BLOCK) });
      await assert.rejects(Sandbox.create(validated, { sandboxId: 'sb-noagent', runRoot, agentDialTimeoutMs: 200 }), (e: KataError) => e.code === 'KATA_ERR_AGENT_UNREACHABLE');
      assert.deepEqual(await qemuLeftBehind(runRoot), []);
      assert.equal(existsSync(path.join(runRoot, 'sb-noagent')), false);
    });

    it('makes a waiting container fail, not hang, when the agent dies', async () => {
      const runRoot = path.join(suite.tmp.path, 'run-agent-dies');
      const sandbox = await Sandbox.create(await loadValidatedConfig({ text: sandboxConfigText(suite.image, BLOCK) }), { sandboxId: 'sb-agent-dies', runRoot });
      try {
        const c = await sandbox.createContainer({ id: 'bystander', rootfs: { kind: 'block', path: freshImage('bystander'), fstype: 'ext4' }, process: { args: ['sleep', '100'] } });
        await c.start();
        c.stdin.end();
        const waited = c.wait();
        // SysRq f makes the guest kernel OOM-kill its largest process: the agent (node), since the
        // container only runs sleep. The agent's /agent/start then powers the VM off.
        const killer = await c.exec({ args: ['sh', '-c', 'echo f > /proc/sysrq-trigger'] });
        killer.stdin.end();
        await assert.rejects(waited, (e: KataError) => e.code === 'KATA_ERR_AGENT_CLOSED');
        assert.equal((await sandbox.running.exited).expected, false);
      } finally {
        await sandbox.stop();
      }
      assert.deepEqual(await qemuLeftBehind(runRoot), []);
      assert.equal(existsSync(path.join(runRoot, 'sb-agent-dies')), false);
    });

    it('makes a waiting container fail, not hang, when the VM dies', async () => {
      const runRoot = path.join(suite.tmp.path, 'run-die');
      const sandbox = await Sandbox.create(await loadValidatedConfig({ text: sandboxConfigText(suite.image, BLOCK) }), { sandboxId: 'sb-die', runRoot });
      try {
        const c = await sandbox.createContainer({ id: 'victim', rootfs: { kind: 'block', path: freshImage('victim'), fstype: 'ext4' }, process: { args: ['sleep', '100'] } });
        await c.start();
        c.stdin.end();
        const waited = c.wait();
        process.kill(sandbox.running.vm.pid as number, 'SIGKILL');
        await assert.rejects(waited, (e: KataError) => e.code === 'KATA_ERR_AGENT_CLOSED');
        assert.equal((await sandbox.running.exited).expected, false);
        assert.equal(sandbox.failure?.code, 'KATA_ERR_VM_EXITED');
      } finally {
        await sandbox.stop();
      }
      assert.deepEqual(await qemuLeftBehind(runRoot), []);
    });
  });
});
