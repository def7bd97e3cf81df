/**
 * The shim binary as containerd runs it, without containerd: `start` prints only the address and
 * leaves a daemon serving the task API; `delete` prints a DeleteResponse and can run any number of
 * times; bad invocations get a coded message. No VM is booted here (containerd tests do that).
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Any, DeleteResponse, Options, RuntimeInfo, Task } from '../../../wire/containerd/proto.gen.js';
import { GrpcCode, TtrpcClient, TtrpcError } from '../../../wire/ttrpc/index.js';
import { TempDir } from '../../helpers/tmp.js';
import { pidAlive } from '../../helpers/wait.js';
import { SHIM } from '../../helpers/shim.js';


function shim(args: string[], opts: { cwd: string; env: NodeJS.ProcessEnv; input?: Uint8Array }) {
  const r = spawnSync(process.execPath, [SHIM, ...args], { cwd: opts.cwd, env: opts.env, input: opts.input ?? new Uint8Array(0), timeout: 30_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr.toString() };
}

async function connect(sock: string): Promise<TtrpcClient> {
  const s = net.connect(sock);
  await new Promise<void>((resolve, reject) => s.once('connect', resolve).once('error', reject));
  return new TtrpcClient(s, { defaultTimeoutMs: 10_000 });
}

describe('containerd-shim-kata-v2 start/delete protocol', function () {
  this.timeout(60_000);
  let tmp: TempDir;
  let env: NodeJS.ProcessEnv;
  let bundle: string;
  const base = ['-namespace', 'testns', '-address', '/nonexistent/containerd.sock', '-publish-binary', '/usr/bin/containerd', '-id'];

  beforeEach(() => {
    tmp = new TempDir();
    env = {
      ...process.env,
      KATA_TS_SHIM_SOCKET_DIR: path.join(tmp.path, 's'),
      KATA_TS_RUN_ROOT: path.join(tmp.path, 'run'),
      KATA_TS_SBS_ROOT: path.join(tmp.path, 'sbs'),
      TTRPC_ADDRESS: path.join(tmp.path, 'no-containerd.ttrpc'),
    };
    tmp.file('bundle/config.json', JSON.stringify({ ociVersion: '1.0.2', process: { args: ['true'] }, root: { path: 'rootfs' } }));
    bundle = path.join(tmp.path, 'bundle');
  });
  afterEach(() => tmp.cleanup());

  it('start prints only the unix:// address, writes it to the bundle, and leaves a daemon serving the Task API', async () => {
    const r = shim([...base, 'c1', 'start'], { cwd: bundle, env });
    assert.equal(r.stderr, '');
    assert.equal(r.code, 0);
    const address = r.stdout.toString();
    assert.match(address, /^unix:\/\/\/.+\/s\/[0-9a-f]{64}$/);
    assert.equal(readFileSync(path.join(bundle, 'address'), 'utf8'), address);

    const sock = address.slice('unix://'.length);
    const client = await connect(sock);
    const task = client.service(Task);
    const info = await task.Connect({ id: 'c1' });
    assert.ok(pidAlive(info.shimPid), 'the daemon runs on after start exited');
    assert.notEqual(info.shimPid, process.pid);
    await assert.rejects(task.State({ id: 'nope' }), (e: unknown) => e instanceof TtrpcError && e.code === GrpcCode.NOT_FOUND && /KATA_ERR_TASK_NOT_FOUND/.test(e.message));
    await assert.rejects(task.Stats({ id: 'c1' }), (e: unknown) => e instanceof TtrpcError && e.code === GrpcCode.NOT_FOUND && /KATA_ERR_TASK_NOT_FOUND/.test(e.message));

    // A second start for the same sandbox answers with the same address (pods group this way).
    const again = shim([...base, 'c1', 'start'], { cwd: bundle, env });
    assert.equal(again.stdout.toString(), address);

    await task.Shutdown({ id: 'c1' });
    await client.closed;
    for (let i = 0; i < 50 && pidAlive(info.shimPid); i++) await new Promise((res) => setTimeout(res, 100));
    assert.equal(pidAlive(info.shimPid), false, 'the daemon exits after Shutdown');
    assert.equal(existsSync(sock), false, 'and removes its socket');
  });

  it('refuses a hostile hypervisor annotation at Create, naming it, before any VM starts', async () => {
    tmp.file(
      'bundle/config.json',
      JSON.stringify({ process: { args: ['true'] }, annotations: { 'io.katacontainers.config.hypervisor.path': '/tmp/evil-qemu', 'io.katacontainers.config.hypervisor.default_memory': '99999999' } }),
    );
    const r = shim([...base, 'c2', 'start'], { cwd: bundle, env });
    assert.equal(r.code, 0, r.stderr);
    const client = await connect(r.stdout.toString().slice('unix://'.length));
    const task = client.service(Task);
    await assert.rejects(
      task.Create({ id: 'c2', bundle }),
      (e: unknown) =>
        e instanceof TtrpcError &&
        e.code === GrpcCode.INVALID_ARGUMENT &&
        /io\.katacontainers\.config\.hypervisor\.path/.test(e.message) &&
        /io\.katacontainers\.config\.hypervisor\.default_memory/.test(e.message) &&
        /KATA_ERR_ANNOTATION/.test(e.message),
    );
    assert.equal(existsSync(path.join(tmp.path, 'run', 'testns', 'c2')), false, 'no sandbox run directory was made');
    await task.Shutdown({ id: 'c2' });
    await client.closed;
  });

  it('start for a pod container whose sandbox has no shim fails with a coded message', () => {
    tmp.file('bundle/config.json', JSON.stringify({ process: { args: ['app'] }, annotations: { 'io.kubernetes.cri.container-type': 'container', 'io.kubernetes.cri.sandbox-id': 'pod9' } }));
    const r = shim([...base, 'app1', 'start'], { cwd: bundle, env });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /joins pod sandbox pod9, but no shim serves that sandbox \[KATA_ERR_SHIM\]/);
  });

  it('delete prints a DeleteResponse and is idempotent', () => {
    for (let i = 0; i < 2; i++) {
      const r = shim([...base, 'c1', '-bundle', bundle, 'delete'], { cwd: bundle, env });
      assert.equal(r.code, 0, r.stderr);
      const res = DeleteResponse.decode(r.stdout);
      assert.equal(res.exitStatus, 137);
      assert.ok(res.exitedAt && res.exitedAt.seconds > 0n);
    }
  });

  it("delete kills what a dead shim left of its own sandbox, and nothing of another namespace's", async () => {
    // Stand-ins for a VM left behind: processes started in a sandbox run directory, with a pid file there, as the drivers start QEMU.
    const mine = path.join(tmp.path, 'run', 'testns', 'c1');
    const theirs = path.join(tmp.path, 'run', 'otherns', 'c1');
    tmp.file('run/testns/c1/console.log', 'x');
    tmp.file('run/otherns/c1/console.log', 'x');
    const leftover = (dir: string) => {
      const p = spawn('sleep', ['1000'], { cwd: dir, stdio: 'ignore' });
      writeFileSync(path.join(dir, 'qemu.pid'), `${p.pid}\n`);
      return p;
    };
    const a = leftover(mine);
    const b = leftover(theirs);
    try {
      const r = shim([...base, 'c1', '-bundle', bundle, 'delete'], { cwd: bundle, env });
      assert.equal(r.code, 0, r.stderr);
      await new Promise((res) => setTimeout(res, 200));
      assert.equal(a.exitCode !== null || a.signalCode !== null, true, 'the leftover of this sandbox was killed');
      assert.equal(b.exitCode === null && b.signalCode === null, true, "the other namespace's process lives");
      assert.equal(existsSync(mine), false, 'the run directory is removed');
    } finally {
      a.kill('SIGKILL');
      b.kill('SIGKILL');
    }
  });

  it("delete leaves the management socket of a live shim of the same sandbox id (another namespace) alone, and removes a dead one's", async () => {
    const dir = path.join(tmp.path, 'sbs', 'c1');
    const sock = path.join(dir, 'shim-monitor.sock');
    mkdirSync(dir, { recursive: true });
    const live = net.createServer((c) => c.destroy());
    await new Promise<void>((resolve) => live.listen(sock, resolve));
    try {
      const r = shim([...base, 'c1', '-bundle', bundle, 'delete'], { cwd: bundle, env });
      assert.equal(r.code, 0, r.stderr);
      assert.equal(statSync(sock).isSocket(), true, "the live shim's management socket is left");
    } finally {
      await new Promise((resolve) => live.close(resolve));
    }
    // What a killed shim leaves: a socket file nobody listens on.
    writeFileSync(sock, '');
    const r = shim([...base, 'c1', '-bundle', bundle, 'delete'], { cwd: bundle, env });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(existsSync(dir), false, "the dead shim's directory is removed");
  });

  it('-info prints a RuntimeInfo with the runtime name and version, and the options it was given (containerd 2.x)', () => {
    const options = Any.encode({ type_url: 'runtimeoptions.v1.Options', value: Options.encode({ configPath: '/etc/kata-containers/configuration.toml' }) });
    const r = shim(['-info'], { cwd: bundle, env, input: options });
    assert.equal(r.code, 0, r.stderr);
    const info = RuntimeInfo.decode(r.stdout);
    assert.equal(info.name, 'io.containerd.kata.v2');
    assert.match(info.version?.version ?? '', /^\d+\.\d+\.\d+/);
    assert.equal(info.options?.type_url, 'runtimeoptions.v1.Options');
    assert.equal(Options.decode(info.options!.value).configPath, '/etc/kata-containers/configuration.toml');
    assert.equal(RuntimeInfo.decode(shim(['-info'], { cwd: bundle, env }).stdout).options, undefined, 'no options on stdin, none echoed');
  });

  it('refuses a bad command line with exit code 2 and a message, no stack trace', () => {
    const r = shim(['-namespace', 'n', '-id', 'c', 'frobnicate'], { cwd: bundle, env });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /unknown action "frobnicate".*\[KATA_ERR_SHIM\]/);
    assert.doesNotMatch(r.stderr, /^\s+at /m);
  });
});
