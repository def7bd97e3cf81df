/**
 * The Kubernetes path without a kubelet: containerd's CRI plugin (Debian's containerd 1.6) driven
 * over CRI's gRPC API (`runtime.v1`) the way a kubelet drives it, with a runtime handler `kata` of
 * type io.containerd.kata.v2, so that CRI starts our shim for a pod and puts the pod's containers
 * in it. containerd, the shim and the guest are the same as in shim-containerd.test.ts; the images
 * are imported into CRI's namespace (k8s.io) without a registry, and the pod uses the host network,
 * with no CNI network configured. What this does not cover: the kubelet itself; CNI networking is
 * cri-network.test.ts.
 */
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { BUSYBOX_IMAGE, CRI_NAMESPACE, NO_LEFTOVERS, PAUSE_IMAGE, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { CriClient, CriExecStream, exitCodeOf } from '../helpers/cri.js';
import { ensureGuestImage } from '../helpers/guest.js';
import { processesMentioning } from '../helpers/procs.js';
import { TempDir } from '../helpers/tmp.js';
import { until as untilFast, within } from '../helpers/wait.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';

const RUNTIME = 'io.containerd.kata.v2';
const HANDLER = 'kata';

/** Polls every 200 ms (probes here call CRI or scan /proc), for up to a minute unless told. */
const until = <T>(what: string, ok: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 60_000) => untilFast(what, ok, timeoutMs, 200);

interface ContainerStatus {
  state: string;
  exit_code: number;
  reason: string;
  log_path: string;
  started_at: number;
  finished_at: number;
}

describe("containerd-shim-kata-v2 under containerd's CRI plugin @integration", function () {
  this.timeout(180_000);
  let tmp: TempDir;
  let runTmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let cri: CriClient | undefined;
  let runRoot: string;
  let logDir: string;
  let sysroot: string;

  before(async function () {
    this.timeout(600_000);
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-shim-cri-');
    // CRI's ids have 64 characters: `<run root>/k8s.io/<id>/qmp.sock` must stay under the 108
    // bytes of a unix socket path, so the run root is a short directory of its own.
    runTmp = new TempDir('kc-');
    runRoot = runTmp.path;
    logDir = path.join(tmp.path, 'pods', 'pod-uid-1');
    mkdirSync(logDir, { recursive: true });
    // As the README tells an administrator: pods may pass io.katacontainers.* annotations, and the
    // handler names its configuration by ConfigPath; this one lets pods choose among the
    // configurations in the standard directories (relocated under sysroot).
    sysroot = path.join(tmp.path, 'sysroot');
    const adminConfig = tmp.file('admin/configuration.toml', readFileSync(shimConfig(tmp, image), 'utf8').replace(/^enable_annotations = \[\]$/m, 'enable_annotations = ["config_path"]'));
    ctrd = await startContainerd(this, {
      pathPrefix: [shimBinDir(tmp)],
      env: { KATA_TS_RUN_ROOT: runRoot, KATA_TS_SYSROOT: sysroot },
      image: false,
      cri: { runtimes: { [HANDLER]: RUNTIME }, handlers: { [HANDLER]: { podAnnotations: ['io.katacontainers.*'], configPath: adminConfig } } },
    });
    cri = new CriClient(ctrd.socket);
  });

  after(async () => {
    cri?.close();
    await ctrd?.stop();
    tmp?.cleanup();
    runTmp?.cleanup();
  });

  const c = () => ctrd!;
  const api = () => cri!;
  /** The shim's run directory for a pod: `<run root>/k8s.io/<sandbox id>`. */
  const sandboxDir = (id: string) => path.join(runRoot, CRI_NAMESPACE, id);
  const qemusOf = (id: string) => processesMentioning(`${sandboxDir(id)}/`).filter((p) => p.argv[0]?.includes('qemu-system'));
  const log = () => `--- containerd log ---\n${c().logTail(60)}`;

  it('serves runtime.v1 and sees the images imported into k8s.io', async () => {
    const v = await api().runtime('Version', { version: 'v1' });
    assert.equal(v.runtime_name, 'containerd');
    assert.equal(v.runtime_api_version, 'v1');
    for (const name of [PAUSE_IMAGE, BUSYBOX_IMAGE]) {
      const s = await api().image('ImageStatus', { image: { image: name } });
      assert.deepEqual((s.image as { repo_tags: string[] }).repo_tags, [name], `${name}\n${log()}`);
    }
  });

  describe('a hostile pod choosing its configuration (pod_annotations = ["io.katacontainers.*"], ConfigPath enabling config_path)', () => {
    const hostilePod = (name: string, annotations: Record<string, string>) => ({
      metadata: { name, uid: `uid-${name}`, namespace: 'default', attempt: 0 },
      log_directory: path.join(tmp.path, 'pods', name),
      annotations,
      linux: { security_context: { namespace_options: { network: 'NODE', pid: 'CONTAINER', ipc: 'POD' } } },
    });
    /** A plugin that, imported, leaves `marker` behind (as root). */
    const evilPlugin = (rel: string, marker: string) =>
      tmp.file(rel, `import { writeFileSync } from 'node:fs';\nwriteFileSync(${JSON.stringify(marker)}, 'imported as uid ' + process.getuid());\nexport default {};\n`);
    const namingPlugin = (plugin: string) => readFileSync(path.join(tmp.path, 'admin/configuration.toml'), 'utf8').replace(/^\[runtime\]$/m, `[runtime]\nplugins = [${JSON.stringify(plugin)}]`);
    const refused = async (name: string, annotations: Record<string, string>, expected: RegExp) => {
      const before = existsSync(path.join(runRoot, CRI_NAMESPACE)) ? readdirSync(path.join(runRoot, CRI_NAMESPACE)) : [];
      await assert.rejects(api().runtime('RunPodSandbox', { config: hostilePod(name, annotations), runtime_handler: HANDLER }), (e: Error) => {
        assert.match(e.message, expected, `${e.message}\n${log()}`);
        return true;
      });
      assert.deepEqual(existsSync(path.join(runRoot, CRI_NAMESPACE)) ? readdirSync(path.join(runRoot, CRI_NAMESPACE)) : [], before, 'no run directory left');
      assert.deepEqual(processesMentioning(`${runRoot}/`).filter((p) => p.argv[0]?.includes('qemu-system')), [], 'no VM');
    };

    it('RunPodSandbox naming a configuration outside the standard directories is refused; the plugin it names never runs', async () => {
      const marker = path.join(tmp.path, 'evil-imported-cri-1');
      const evilToml = tmp.file('x/evil.toml', namingPlugin(evilPlugin('x/evil.mjs', marker)));
      await refused('evil-outside', { 'io.katacontainers.config_path': evilToml }, /io\.katacontainers\.config_path.*not directly inside.*KATA_ERR_ANNOTATION/s);
      await refused('evil-relative', { 'io.katacontainers.config_path': `../../../../../../../..${evilToml}` }, /io\.katacontainers\.config_path.*not absolute.*KATA_ERR_ANNOTATION/s);
      assert.equal(existsSync(marker), false, 'the plugin named by the pod ran as root');
    });

    it('RunPodSandbox naming a placed configuration whose plugin is untrusted is refused before the plugin is imported', async () => {
      const marker = path.join(tmp.path, 'evil-imported-cri-2');
      const open = path.join(tmp.path, 'open');
      mkdirSync(open, { recursive: true });
      chmodSync(open, 0o777);
      const placed = tmp.file(path.relative(tmp.path, path.join(sysroot, 'etc/kata-containers/configuration-evil.toml')), namingPlugin(evilPlugin('open/evil.mjs', marker)));
      await refused('evil-untrusted', { 'io.katacontainers.config_path': placed }, /plugin module ".*\/open\/evil\.mjs".*KATA_ERR_UNTRUSTED_PATH/s);
      assert.equal(existsSync(marker), false, 'the untrusted plugin ran as root');
    });
  });

  describe('a pod on the kata handler, host network', () => {
    /** A function: logDir exists only once the outer before hook ran. */
    const sandboxConfig = () => ({
      metadata: { name: 'pod1', uid: 'pod-uid-1', namespace: 'default', attempt: 0 },
      log_directory: logDir,
      linux: { security_context: { namespace_options: { network: 'NODE', pid: 'CONTAINER', ipc: 'POD' } } },
    });
    let podId = '';
    const containers: Record<string, string> = {};

    const containerConfig = (name: string, script: string, extra: Record<string, unknown> = {}) => ({
      metadata: { name, attempt: 0 },
      image: { image: BUSYBOX_IMAGE },
      command: ['sh', '-c', script],
      log_path: `${name}_0.log`,
      ...extra,
    });
    const create = async (name: string, script: string, extra?: Record<string, unknown>) => {
      const r = await api().runtime('CreateContainer', { pod_sandbox_id: podId, config: containerConfig(name, script, extra), sandbox_config: sandboxConfig() });
      containers[name] = r.container_id as string;
      await api().runtime('StartContainer', { container_id: containers[name] });
      return containers[name]!;
    };
    const status = async (name: string) => (await api().runtime('ContainerStatus', { container_id: containers[name] })).status as ContainerStatus;
    const exited = (name: string, timeoutMs?: number) =>
      until(`container ${name} to exit`, async () => {
        const s = await status(name);
        return s.state === 'CONTAINER_EXITED' && s;
      }, timeoutMs);
    /** The CRI log file's lines, `<RFC 3339 time> <stream> <F|P> <text>`, without the time. */
    const logLines = (name: string) =>
      readFileSync(path.join(logDir, `${name}_0.log`), 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => l.replace(/^\S+ /, ''));

    it('RunPodSandbox boots one VM through the shim and the sandbox is READY', async () => {
      const r = await api().runtime('RunPodSandbox', { config: sandboxConfig(), runtime_handler: HANDLER }).catch((e: Error) => assert.fail(`${e.message}\n${log()}`));
      podId = r.pod_sandbox_id as string;
      const s = (await api().runtime('PodSandboxStatus', { pod_sandbox_id: podId })).status as { state: string; runtime_handler: string };
      assert.deepEqual([s.state, s.runtime_handler], ['SANDBOX_READY', HANDLER]);
      assert.equal(qemusOf(podId).length, 1, 'one VM for the pod');
    });

    it('runs a container whose output reaches the CRI log file', async () => {
      await create('hello', 'trap "exit 143" TERM; echo hello from a pod; sleep 1000 & wait');
      const s = await status('hello');
      assert.equal(s.state, 'CONTAINER_RUNNING', log());
      assert.equal(s.log_path, path.join(logDir, 'hello_0.log'));
      await until('the log line', () => existsSync(path.join(logDir, 'hello_0.log')) && logLines('hello').length > 0, 30_000);
      assert.deepEqual(logLines('hello'), ['stdout F hello from a pod']);
      assert.match(readFileSync(path.join(logDir, 'hello_0.log'), 'utf8'), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) stdout F /);
    });

    it('runs a second container in the same VM; its exit code 3 reaches ContainerStatus', async () => {
      await create('exit3', 'echo bye >&2; exit 3');
      const s = await exited('exit3');
      assert.deepEqual([s.exit_code, s.reason], [3, 'Error']);
      assert.ok(s.finished_at >= s.started_at && s.started_at > 0);
      assert.deepEqual(logLines('exit3'), ['stderr F bye']);
      assert.equal(qemusOf(podId).length, 1, 'both containers in the pod VM');
      assert.equal((await status('hello')).state, 'CONTAINER_RUNNING', 'the first container is unaffected');
    });

    it('ExecSync runs a command in the running container (the shim\'s Exec) with its output and exit code', async () => {
      const r = await api().runtime('ExecSync', { container_id: containers.hello, cmd: ['sh', '-c', 'echo out; echo err >&2; exit 4'], timeout: 30 });
      assert.deepEqual([Buffer.from(r.stdout as Uint8Array).toString(), Buffer.from(r.stderr as Uint8Array).toString(), r.exit_code], ['out\n', 'err\n', 4], log());
      assert.equal((await status('hello')).state, 'CONTAINER_RUNNING', 'the container goes on');
    });

    // Exec streamed by containerd (tty: true), as kubelet uses it for `kubectl exec -it`: plain
    // tests, not a nested suite, which mocha would run after this suite's StopContainer.
    /** The script's own marker: finds its shell in `ps` afterwards. */
    const marker = 'cri-tty-exec-marker';
    const script = [
      `: ${marker}`,
      '[ -t 0 ] && [ -t 1 ] && echo "stdio: terminal"',
      'echo "tty: $(tty)"',
      'echo "fd 0: $(readlink /proc/self/fd/0)"',
      'echo "TERM=$TERM"',
      'echo "size: $(stty size) got: start"',
      'while read line; do [ "$line" = done ] && break; echo "size: $(stty size) got: $line"; done',
      'exit 7',
    ].join('; ');

    it('runs the command on a terminal whose size follows resize messages, echoes input and sends the exit code on channel 3', async () => {
      const r = await api().runtime('Exec', { container_id: containers.hello, cmd: ['sh', '-c', script], tty: true, stdin: true, stdout: true, stderr: false });
      assert.match(r.url as string, /^http:\/\/127\.0\.0\.1:\d+\/exec\/\S+$/);
      const stream = await CriExecStream.open(r.url as string);
      let ended = false;
      try {
        await stream.waitFor(/got: start\r\n/);
        assert.match(stream.stdout, /^stdio: terminal\r$/m, 'stdin and stdout are a terminal');
        assert.match(stream.stdout, /^TERM=xterm\r$/m);
        // ttyname(3) fails in a container with its own devpts: the pty is the guest's devpts
        // instance's, as with kata-agent (README, "Terminals"). Kept on purpose.
        assert.match(stream.stdout, /^tty: not a tty\r$/m);
        assert.match(stream.stdout, /^fd 0: \/dev\/pts\/\d+\r$/m);
        // No resize message yet: the guest pty's default size.
        assert.match(stream.stdout, /^size: 24 80 got: start\r$/m);
        stream.resize(101, 33);
        // The resize travels containerd → shim (ResizePty) → agent (TtyWinResize), stdin through
        // a FIFO: ask again until the new size shows.
        for (let i = 0; !/size: 33 101 got: probe/.test(stream.stdout); i++) {
          assert.ok(i < 100, `the resize did not reach the process: ${JSON.stringify(stream.stdout)}`);
          stream.write('probe\r');
          await new Promise((res) => setTimeout(res, 300));
        }
        stream.write('typed by hand\r');
        await stream.waitFor(/size: 33 101 got: typed by hand\r\n/);
        // The terminal echoes what was typed before the process answers.
        assert.match(stream.stdout, /typed by hand\r\nsize: 33 101 got: typed by hand/);
        stream.write('done\r');
        ended = true;
        const status = await within(stream.status, 'the status on channel 3', 30_000);
        assert.deepEqual([status.status, status.reason, exitCodeOf(status)], ['Failure', 'NonZeroExitCode', 7], JSON.stringify(status));
        await within(stream.closed, 'the server closing the stream', 10_000);
        assert.equal(stream.stderr, '', 'a terminal has one output stream');
      } finally {
        // A client leaving is no EOF (as with runc): end the script, or the later tests find its marker.
        if (!ended) stream.write('done\r');
        stream.close();
      }
    });

    it('a tty exec ending at once delivers its last output before Success on channel 3', async () => {
      // stdin too, as `kubectl exec -it`: without it containerd 1.6 hands its WebSocket path a stdin
      // that is at end of file from the start, and for a tty it then closes the output at once
      // (pkg/cri/io/exec_io.go), whatever the runtime.
      const r = await api().runtime('Exec', { container_id: containers.hello, cmd: ['sh', '-c', `: ${marker}; echo "size: $(stty size)"; echo last words`], tty: true, stdin: true, stdout: true, stderr: false });
      const stream = await CriExecStream.open(r.url as string);
      try {
        const status = await within(stream.status, 'the status on channel 3', 30_000);
        assert.deepEqual([status.status, exitCodeOf(status)], ['Success', 0], JSON.stringify(status));
        assert.equal(stream.stdout, 'size: 24 80\r\nlast words\r\n');
      } finally {
        stream.close();
      }
    });

    it('a client going away mid-session leaves the shim serving: the process ends when killed and a new tty exec works', async () => {
      const r = await api().runtime('Exec', { container_id: containers.hello, cmd: ['sh', '-c', `: ${marker}; echo "pid: $$"; while read l; do echo "got: $l"; done`], tty: true, stdin: true, stdout: true, stderr: false });
      const stream = await CriExecStream.open(r.url as string);
      const pid = (await stream.waitFor(/pid: (\d+)\r\n/))[1]!;
      stream.write('alive\r');
      await stream.waitFor(/got: alive\r\n/);
      // As kubectl killed: the connection drops without a word. containerd keeps a terminal
      // process running when its client goes (as with runc); it must still see its end.
      stream.close();
      await within(stream.closed, 'the connection to close', 10_000);
      const kill = await api().runtime('ExecSync', { container_id: containers.hello, cmd: ['kill', pid], timeout: 30 });
      assert.equal(kill.exit_code, 0, Buffer.from(kill.stderr as Uint8Array).toString());
      await until('the killed exec to be gone from the container', async () => {
        const ps = await api().runtime('ExecSync', { container_id: containers.hello, cmd: ['ps', '-o', 'pid,args'], timeout: 30 });
        return !Buffer.from(ps.stdout as Uint8Array).toString().includes(marker);
      }, 20_000);
      const again = await api().runtime('Exec', { container_id: containers.hello, cmd: ['sh', '-c', 'echo still served'], tty: true, stdin: true, stdout: true, stderr: false });
      const next = await CriExecStream.open(again.url as string);
      try {
        assert.equal(exitCodeOf(await within(next.status, 'the status on channel 3', 30_000)), 0);
        assert.equal(next.stdout, 'still served\r\n');
      } finally {
        next.close();
      }
    });

    it('Exec with stdin and no terminal (kubectl exec -i): the client leaving ends the process\'s stdin (containerd sends CloseIO) after what it sent', async () => {
      const r = await api().runtime('Exec', { container_id: containers.hello, cmd: ['sh', '-c', `: ${marker}; cat > /tmp/exec-stdin; echo eof >> /tmp/exec-stdin`], tty: false, stdin: true, stdout: true, stderr: true });
      const stream = await CriExecStream.open(r.url as string);
      stream.write('from the client\n');
      stream.close();
      await until('the exec to read to EOF', async () => {
        const cat = await api().runtime('ExecSync', { container_id: containers.hello, cmd: ['cat', '/tmp/exec-stdin'], timeout: 30 });
        return Buffer.from(cat.stdout as Uint8Array).toString() === 'from the client\neof\n';
      }, 30_000);
    });

    it('leaves no exec process behind in the container; ExecSync still works after them', async () => {
      await until('the streamed execs to be gone from the container', async () => {
        const r = await api().runtime('ExecSync', { container_id: containers.hello, cmd: ['ps', '-o', 'pid,args'], timeout: 30 });
        assert.equal(r.exit_code, 0);
        const ps = Buffer.from(r.stdout as Uint8Array).toString();
        assert.match(ps, /sleep 1000/, 'the container\'s own process is there');
        return !ps.includes(marker);
      }, 20_000);
      assert.equal((await status('hello')).state, 'CONTAINER_RUNNING', 'the container goes on');
    });

    it('Attach streams a tty: true container\'s terminal: input, resize, its output in the log, Success on channel 3 when it exits', async () => {
      await create('tty', 'echo started; while read l; do [ "$l" = done ] && exit 5; echo "size: $(stty size) got: $l"; done', { stdin: true, stdin_once: false, tty: true });
      const r = await api().runtime('Attach', { container_id: containers.tty, stdin: true, tty: true, stdout: true, stderr: false });
      const stream = await CriExecStream.open(r.url as string);
      try {
        stream.write('one\r');
        await stream.waitFor(/size: 24 80 got: one\r\n/);
        stream.resize(90, 20);
        for (let i = 0; !/size: 20 90 got: probe/.test(stream.stdout); i++) {
          assert.ok(i < 100, `the resize did not reach the container: ${JSON.stringify(stream.stdout)}`);
          stream.write('probe\r');
          await new Promise((res) => setTimeout(res, 300));
        }
        stream.write('done\r');
        const status = await within(stream.status, 'the status on channel 3', 30_000);
        assert.equal(status.status, 'Success', JSON.stringify(status));
        const s = await exited('tty');
        assert.equal(s.exit_code, 5, log());
        // The log gets everything, a terminal's output all as "stdout".
        const lines = logLines('tty');
        for (const line of ['stdout F started', 'stdout F size: 24 80 got: one', 'stdout F size: 20 90 got: probe']) assert.ok(lines.includes(line), `${line} in ${JSON.stringify(lines)}`);
      } finally {
        stream.close();
      }
    });

    it('Attach with stdin_once to a container without a terminal: input reaches it, and the client leaving ends its stdin (CloseIO), so it exits', async () => {
      await create('once', 'while read -r l; do echo "got: $l"; done; echo "stdin ended"; exit 4', { stdin: true, stdin_once: true, tty: false });
      const r = await api().runtime('Attach', { container_id: containers.once, stdin: true, tty: false, stdout: true, stderr: true });
      const stream = await CriExecStream.open(r.url as string);
      try {
        stream.write('one\n');
        await stream.waitFor(/got: one\n/);
      } finally {
        stream.close();
      }
      const s = await exited('once', 60_000);
      assert.equal(s.exit_code, 4, log());
      assert.deepEqual(logLines('once'), ['stdout F got: one', 'stdout F stdin ended']);
    });

    it('StopContainer delivers SIGTERM before the timeout; the container is EXITED with 143', async () => {
      const t0 = Date.now();
      await api().runtime('StopContainer', { container_id: containers.hello, timeout: 30 });
      assert.ok(Date.now() - t0 < 30_000, 'stopped by SIGTERM, not by the SIGKILL after the timeout');
      const s = await status('hello');
      assert.deepEqual([s.state, s.exit_code], ['CONTAINER_EXITED', 143]);
    });

    it('reports OOMKilled for a container the guest OOM-kills', async () => {
      await create('oom', 'a=xxxxxxxxxxxxxxxx; while true; do a=$a$a; done');
      const s = await exited('oom', 120_000);
      assert.deepEqual([s.reason, s.exit_code], ['OOMKilled', 137], log());
    });

    it('RemoveContainer removes the containers; the pod VM keeps running', async () => {
      for (const name of Object.keys(containers)) await api().runtime('RemoveContainer', { container_id: containers[name] });
      await assert.rejects(status('hello'), /not found|does not exist/);
      assert.equal(qemusOf(podId).length, 1);
    });

    it('StopPodSandbox stops the VM and RemovePodSandbox forgets the pod', async () => {
      await api().runtime('StopPodSandbox', { pod_sandbox_id: podId });
      await until('the pod VM to go', () => qemusOf(podId).length === 0, 30_000);
      await api().runtime('RemovePodSandbox', { pod_sandbox_id: podId });
      await assert.rejects(api().runtime('PodSandboxStatus', { pod_sandbox_id: podId }), /not found|does not exist/);
      await until('the run directory to go', () => !existsSync(sandboxDir(podId)), 30_000);
    });
  });

  // Mocha runs a suite's own tests before its nested suites: this one goes in a suite of its own,
  // defined last, so that it runs after everything else.
  describe('at the end', () => {
    it('leaves no shim, VM, mount, socket or run directory', async () => {
      assert.deepEqual(processesMentioning(`${runRoot}/`).map((p) => p.argv.slice(0, 3).join(' ')), []);
      const nsRoot = path.join(runRoot, CRI_NAMESPACE);
      assert.deepEqual(existsSync(nsRoot) ? readdirSync(nsRoot) : [], []);
      assert.deepEqual(await c().stop(), NO_LEFTOVERS);
    });
  });
});
