/**
 * The shim binary against ids, addresses and log pipes that point outside what it owns (issue 11,
 * item 4): `delete -id ../../x`, an `address` file naming any file, a `log` symlink. Each attack
 * is run for real against the bundled shim; the test checks that the victim is untouched.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, constants as fsc, mkdirSync, openSync, readFileSync, readSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { DeleteResponse, Task } from '../../../wire/containerd/proto.gen.js';
import { GrpcCode, TtrpcClient, TtrpcError } from '../../../wire/ttrpc/index.js';
import { SHIM } from '../../helpers/shim.js';
import { TempDir } from '../../helpers/tmp.js';
import { pidAlive, until } from '../../helpers/wait.js';

function shim(args: string[], opts: { cwd: string; env: NodeJS.ProcessEnv }) {
  const r = spawnSync(process.execPath, [SHIM, ...args], { cwd: opts.cwd, env: opts.env, input: new Uint8Array(0), timeout: 30_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr.toString() };
}

async function connect(sock: string): Promise<TtrpcClient> {
  const s = net.connect(sock);
  await new Promise<void>((resolve, reject) => s.once('connect', resolve).once('error', reject));
  return new TtrpcClient(s, { defaultTimeoutMs: 10_000 });
}

const invalidId = (key: string) => (e: unknown) => e instanceof TtrpcError && e.code === GrpcCode.INVALID_ARGUMENT && e.message.includes('[KATA_ERR_INVALID_ID]') && e.message.includes(key);

describe('containerd-shim-kata-v2 against hostile ids, addresses and log pipes', function () {
  this.timeout(60_000);
  let tmp: TempDir;
  let env: NodeJS.ProcessEnv;
  let bundle: string;
  let socketDir: string;
  const children: ChildProcess[] = [];
  const base = ['-address', '/nonexistent/containerd.sock', '-publish-binary', '/usr/bin/containerd'];

  /** A process that has nothing to do with the shim but names `dir` in its argv. */
  const bystander = (dir: string): ChildProcess => {
    const p = spawn('sh', ['-c', 'sleep 1000', `${dir}/qmp.sock`], { stdio: 'ignore' });
    children.push(p);
    return p;
  };

  beforeEach(() => {
    tmp = new TempDir();
    socketDir = path.join(tmp.path, 's');
    env = { ...process.env, KATA_TS_SHIM_SOCKET_DIR: socketDir, KATA_TS_RUN_ROOT: path.join(tmp.path, 'run'), TTRPC_ADDRESS: path.join(tmp.path, 'no-containerd.ttrpc') };
    tmp.file('bundle/config.json', JSON.stringify({ ociVersion: '1.0.2', process: { args: ['true'] }, root: { path: 'rootfs' } }));
    bundle = path.join(tmp.path, 'bundle');
  });
  afterEach(() => {
    for (const c of children.splice(0)) c.kill('SIGKILL');
    tmp.cleanup();
  });

  it('refuses delete -id ../../x with KATA_ERR_INVALID_ID, leaving the directory it names and the processes naming it alone', async () => {
    // run/testns/../../x is <tmp>/x: outside the run root.
    const outside = path.join(tmp.path, 'x');
    tmp.file('x/keep.txt', 'mine');
    const p = bystander(outside);
    for (const args of [['-namespace', 'testns', '-id', '../../x'], ['-namespace', '../..', '-id', 'x'], ['-namespace', 'testns', '-id', 'x/../../../x']]) {
      const r = shim([...base, ...args, '-bundle', bundle, 'delete'], { cwd: bundle, env });
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /\[KATA_ERR_INVALID_ID\]/);
      assert.equal(r.stdout.length, 0, 'no DeleteResponse');
    }
    await new Promise((res) => setTimeout(res, 200));
    assert.equal(readFileSync(path.join(outside, 'keep.txt'), 'utf8'), 'mine', 'the outside directory is still there');
    assert.ok(pidAlive(p.pid), 'the unrelated process lives');
  });

  it('refuses start with a bad -id or a bad sandbox-id annotation before it spawns or writes anything', () => {
    const r = shim([...base, '-namespace', 'testns', '-id', '../x', 'start'], { cwd: bundle, env });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /-id "\.\.\/x" .*\[KATA_ERR_INVALID_ID\]/);
    tmp.file('bundle/config.json', JSON.stringify({ process: { args: ['app'] }, annotations: { 'io.kubernetes.cri.container-type': 'container', 'io.kubernetes.cri.sandbox-id': '../../pod' } }));
    const a = shim([...base, '-namespace', 'testns', '-id', 'app1', 'start'], { cwd: bundle, env });
    assert.equal(a.code, 1);
    assert.match(a.stderr, /io\.kubernetes\.cri\.sandbox-id "\.\.\/\.\.\/pod" .*\[KATA_ERR_INVALID_ID\]/);
    const d = shim([...base, '-namespace', 'testns', '-id', 'app1', '-bundle', bundle, 'delete'], { cwd: bundle, env });
    assert.equal(d.code, 1);
    assert.match(d.stderr, /\[KATA_ERR_INVALID_ID\]/);
    assert.equal(existsSync(path.join(bundle, 'address')), false);
    assert.equal(existsSync(socketDir), false, 'no socket directory was made');
  });

  it('kills on delete only processes its run directory proves are its own, never by argv', async () => {
    const runDir = path.join(tmp.path, 'run', 'testns', 'c1');
    tmp.file('run/testns/c1/console.log', 'x');
    const elsewhere = path.join(tmp.path, 'elsewhere');
    mkdirSync(elsewhere);
    // Names the run directory in its argv: the old substring match killed it.
    const named = bystander(runDir);
    // A pid file naming a process that does not run in the run directory (a recycled pid, say).
    const stranger = spawn('sleep', ['1000'], { cwd: elsewhere, stdio: 'ignore' });
    children.push(stranger);
    writeFileSync(path.join(runDir, 'qemu.pid'), `${stranger.pid}\n`);
    // A pid file that is a symlink to another sandbox's pid file.
    const other = spawn('sleep', ['1000'], { cwd: elsewhere, stdio: 'ignore' });
    children.push(other);
    writeFileSync(path.join(elsewhere, 'qemu.pid'), `${other.pid}\n`);
    symlinkSync(path.join(elsewhere, 'qemu.pid'), path.join(runDir, 'clh.pid'));
    // The one that is ours: started in the run directory, before its pid file was written.
    const ours = spawn('sleep', ['1000'], { cwd: runDir, stdio: 'ignore' });
    children.push(ours);
    writeFileSync(path.join(runDir, 'virtiofsd.pid'), `${ours.pid}\n`);

    const r = shim([...base, '-namespace', 'testns', '-id', 'c1', '-bundle', bundle, 'delete'], { cwd: bundle, env });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(DeleteResponse.decode(r.stdout).exitStatus, 137);
    await until('our process to die', () => !pidAlive(ours.pid));
    await new Promise((res) => setTimeout(res, 200));
    assert.ok(pidAlive(named.pid), 'a process naming the run directory in argv lives');
    assert.ok(pidAlive(stranger.pid), 'a process a pid file names but that does not run in the run directory lives');
    assert.ok(pidAlive(other.pid), 'a process named through a symlinked pid file lives');
    assert.equal(existsSync(runDir), false, 'the run directory is removed');
  });

  it("delete removes only a stale socket in the shim socket directory, never the file an address file names", () => {
    mkdirSync(socketDir);
    const victim = tmp.file('victim.txt', 'precious');
    const inDir = tmp.file('s/not-a-socket', 'also precious');
    // A stale shim socket: bound by a process that died without removing it.
    const stale = path.join(socketDir, 'stale');
    const bound = spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => process.kill(process.pid, 'SIGKILL'))`]);
    assert.equal(bound.signal, 'SIGKILL');
    const elsewhereSock = path.join(tmp.path, 'elsewhere.sock');
    spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(elsewhereSock)}, () => process.kill(process.pid, 'SIGKILL'))`]);
    symlinkSync(elsewhereSock, path.join(socketDir, 'link'));

    const del = (address: string) => {
      writeFileSync(path.join(bundle, 'address'), address);
      const r = shim([...base, '-namespace', 'testns', '-id', 'c1', '-bundle', bundle, 'delete'], { cwd: bundle, env });
      assert.equal(r.code, 0, r.stderr);
      return r.stderr;
    };
    assert.match(del(`unix://${victim}`), /ignoring .*address: .*victim\.txt is not directly in the shim socket directory/);
    assert.match(del(victim), /not directly in the shim socket directory/);
    assert.match(del(`unix://${socketDir}/../victim.txt`), /not directly in the shim socket directory/);
    assert.match(del(`unix://${inDir}`), /not-a-socket is not a socket/);
    assert.match(del(`unix://${socketDir}/link`), /link is not a socket/);
    assert.equal(readFileSync(victim, 'utf8'), 'precious');
    assert.equal(readFileSync(inDir, 'utf8'), 'also precious');
    assert.ok(existsSync(elsewhereSock), 'a socket outside, reached through a symlink, is left');
    assert.ok(existsSync(path.join(socketDir, 'link')), 'the symlink itself is left');

    assert.ok(existsSync(stale));
    assert.equal(del(`unix://${stale}`), '');
    assert.equal(existsSync(stale), false, 'a stale shim socket is removed');
  });

  describe('the log pipe', () => {
    let client: TtrpcClient | undefined;
    afterEach(async () => {
      if (client && !client.isClosed) {
        await client.service(Task).Shutdown({ id: 'c1' }).catch(() => undefined);
        await client.closed;
      }
      client = undefined;
    });

    /** Starts the daemon, makes it log a few lines, and shuts it down. */
    async function runDaemon(): Promise<void> {
      const r = shim([...base, '-namespace', 'testns', '-id', 'c1', 'start'], { cwd: bundle, env });
      assert.equal(r.code, 0, r.stderr);
      client = await connect(r.stdout.toString().slice('unix://'.length));
      const task = client.service(Task);
      const { shimPid } = await task.Connect({ id: 'c1' });
      for (let i = 0; i < 3; i++) await task.State({ id: `nope${i}` }).catch(() => undefined);
      await task.Shutdown({ id: 'c1' });
      await client.closed;
      await until('the daemon to exit', () => !pidAlive(shimPid), 10_000);
    }

    it('writes its lines into a FIFO named log (the control)', async () => {
      execFileSync('mkfifo', [path.join(bundle, 'log')]);
      const fd = openSync(path.join(bundle, 'log'), fsc.O_RDONLY | fsc.O_NONBLOCK);
      try {
        await runDaemon();
        const buf = Buffer.alloc(1 << 20);
        const n = readSync(fd, buf, 0, buf.length, null);
        assert.match(buf.subarray(0, n).toString(), /"msg":"shim serving"/);
      } finally {
        closeSync(fd);
      }
    });

    it('never writes through a log symlink to a file, nor into a regular file named log', async () => {
      const text = tmp.file('notes.txt', 'a text file the shim must not touch\n');
      symlinkSync(text, path.join(bundle, 'log'));
      await runDaemon();
      assert.equal(readFileSync(text, 'utf8'), 'a text file the shim must not touch\n');

      unlinkSync(path.join(bundle, 'log'));
      writeFileSync(path.join(bundle, 'log'), 'not a pipe either\n');
      await runDaemon();
      assert.equal(readFileSync(path.join(bundle, 'log'), 'utf8'), 'not a pipe either\n');
    });
  });

  it('answers task API requests with bad ids INVALID_ARGUMENT, a 4 MiB one too, before touching anything', async () => {
    const r = shim([...base, '-namespace', 'testns', '-id', 'c1', 'start'], { cwd: bundle, env });
    assert.equal(r.code, 0, r.stderr);
    const client = await connect(r.stdout.toString().slice('unix://'.length));
    const task = client.service(Task);
    try {
      await assert.rejects(task.Create({ id: '../../../tmp/x', bundle }), invalidId('Create.id'));
      assert.equal(existsSync(path.join(tmp.path, 'run')), false, 'no run directory was made');
      await assert.rejects(task.Exec({ id: 'c1', execId: '../e' }), invalidId('Exec.exec_id'));
      // Before: NOT_FOUND quoting the whole id, a reply over 4 MiB, never sent.
      await assert.rejects(task.State({ id: 'x'.repeat((4 << 20) - 100) }), invalidId('State.id'));
      assert.equal((await task.Connect({ id: 'c1' })).shimPid > 0, true, 'the connection still serves');
    } finally {
      await task.Shutdown({ id: 'c1' }).catch(() => undefined);
      await client.closed;
    }
  });

  it('the daemon refuses a -socket outside the shim socket directory', () => {
    const elsewhere = path.join(tmp.path, 'elsewhere.sock');
    const r = shim([...base, '-namespace', 'testns', '-id', 'c1', '-bundle', bundle, '-socket', elsewhere], { cwd: bundle, env });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /not directly in the shim socket directory.*\[KATA_ERR_SHIM\]/);
    assert.equal(existsSync(elsewhere), false);
  });
});
