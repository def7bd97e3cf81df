/**
 * The containerd test harness (test/helpers/containerd.ts) with the runtime containerd ships,
 * runc (io.containerd.runc.v2): the baseline that the kata shim's end-to-end tests repeat with
 * `--runtime io.containerd.kata.v2`.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { BUSYBOX_IMAGE, NO_LEFTOVERS, SHIM_SOCKET_DIR, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { pidAlive as alive } from '../helpers/wait.js';

describe('containerd test harness with runc @integration', function () {
  this.timeout(120_000);
  let ctrd: TestContainerd | undefined;
  const c = () => ctrd as TestContainerd;

  before(async function () {
    ctrd = await startContainerd(this);
  });
  after(async () => {
    await ctrd?.stop();
  });

  it('imports the busybox image under its annotated name', async () => {
    const r = await c().ctr(['images', 'ls', '-q']);
    assert.deepEqual([r.code, r.stdout.split('\n').filter(Boolean)], [0, [BUSYBOX_IMAGE]], r.stderr);
  });

  it('runs a command in the image and returns its output', async () => {
    const r = await c().run('hello', ['echo', 'hello']);
    assert.deepEqual([r.code, r.stdout, r.stderr], [0, 'hello\n', ''], c().logTail());
  });

  it("returns the container's exit status through ctr", async () => {
    const r = await c().run('exit3', ['sh', '-c', 'echo out; echo err >&2; exit 3']);
    assert.deepEqual([r.code, r.stdout, r.stderr], [3, 'out\n', 'err\n'], c().logTail());
  });

  it("pipes ctr's stdin into the container and ends it", async () => {
    const r = await c().run('cat', ['cat'], { input: 'piped in\n', timeoutMs: 20_000 });
    assert.deepEqual([r.code, r.stdout, r.timedOut], [0, 'piped in\n', false], c().logTail());
  });

  it('leaves no shim, mount, FIFO, socket or cgroup behind', async () => {
    const dir = c().dir;
    assert.deepEqual(await c().stop(), NO_LEFTOVERS, c().logTail());
    assert.equal(existsSync(dir), false);
  });
});

describe('containerd test harness cleaning up after a leaked container @integration', function () {
  this.timeout(120_000);
  let ctrd: TestContainerd | undefined;
  const c = () => ctrd as TestContainerd;

  before(async function () {
    ctrd = await startContainerd(this);
  });
  after(async () => {
    await ctrd?.stop();
  });

  it('reports a detached container left running, then removes all of it', async () => {
    const r = await c().ctr(['run', '-d', BUSYBOX_IMAGE, 'leak', 'sleep', '600']);
    assert.equal(r.code, 0, r.stderr);
    const tasks = await c().ctr(['tasks', 'ls']);
    const pid = Number(/^leak\s+(\d+)\s+RUNNING/m.exec(tasks.stdout)?.[1]);
    assert.ok(pid > 0, tasks.stdout);
    const { dir, namespace } = c();

    const left = await c().stop();
    assert.equal(left.shims.length, 1, JSON.stringify(left.shims));
    assert.match(left.shims[0]?.cmdline ?? '', new RegExp(`containerd-shim-runc-v2 -namespace ${namespace} -id leak`));
    assert.equal(left.qemus.length, 0);
    assert.ok(left.mounts.some((m) => m.endsWith(`/${namespace}/leak/rootfs`)), JSON.stringify(left.mounts));
    assert.deepEqual(left.fifos.map((f) => f.replace(/.*\//, '')).sort(), ['leak-stderr', 'leak-stdin', 'leak-stdout']);
    assert.equal(left.sockets.length, 1);
    assert.ok(left.sockets[0]?.startsWith(`${SHIM_SOCKET_DIR}/`), left.sockets[0]);
    assert.ok(left.cgroups.some((g) => g.endsWith(`/${namespace}/leak`)), JSON.stringify(left.cgroups));

    assert.equal(alive(left.shims[0]?.pid ?? 0), false, 'the shim survived');
    assert.equal(alive(pid), false, 'the container process survived');
    assert.equal(existsSync(left.sockets[0] ?? ''), false);
    assert.deepEqual(left.cgroups.filter(existsSync), []);
    assert.equal(readFileSync('/proc/self/mountinfo', 'utf8').includes(dir), false);
    assert.equal(existsSync(dir), false);
  });
});
