/**
 * Container resources end to end, with the real containerd (Debian's 1.6) and the guest image
 * under TCG: limits from `ctr run` reach the container's cgroup v2 in the guest (read inside the
 * container, where its cgroup is mounted read-only on /sys/fs/cgroup), `ctr task metrics` shows
 * the cgroup's usage, a container above its memory limit is OOM-killed by its cgroup with
 * TaskOOM, and through CRI UpdateContainerResources changes a running container's limit and
 * ContainerStats/ListContainerStats are non-zero. containerd 1.6's ctr has no `task update`: the
 * Update path is driven through containerd's own Tasks.Update API (what `ctr task update` of
 * containerd 1.7+ calls) and through CRI, which calls the shim's Update as a kubelet resize does.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { credentials, Client, Metadata, type ServiceError } from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { BUSYBOX_IMAGE, NO_LEFTOVERS, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { CriClient } from '../helpers/cri.js';
import { ensureGuestImage } from '../helpers/guest.js';
import { processesMentioning } from '../helpers/procs.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';
import { TempDir } from '../helpers/tmp.js';
import { until as untilFast } from '../helpers/wait.js';

const RUNTIME = 'io.containerd.kata.v2';
const HANDLER = 'kata';
const MiB = 1024 * 1024;
/** What CRI puts in every container's spec and ctr's default spec lacks: the container's cgroup on /sys/fs/cgroup. */
const CGROUP_MOUNT = ['--mount', 'type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:nodev:noexec'];

/**
 * containerd's `Tasks.Update` (api/services/tasks/v1/tasks.proto, field numbers as there), what
 * `ctr task update` of containerd 1.7+ sends: runtime-spec LinuxResources JSON in an Any.
 */
const TASKS_PROTO = protobuf.parse(`
syntax = "proto3";
package containerd.services.tasks.v1;
message Any { string type_url = 1; bytes value = 2; }
message UpdateTaskRequest { string container_id = 1; Any resources = 2; map<string, string> annotations = 3; }
`, { keepCase: true }).root;

function updateTask(socket: string, namespace: string, id: string, resources: unknown): Promise<void> {
  const Req = TASKS_PROTO.lookupType('containerd.services.tasks.v1.UpdateTaskRequest');
  const client = new Client(`unix://${socket}`, credentials.createInsecure());
  const md = new Metadata();
  md.set('containerd-namespace', namespace);
  const req = { container_id: id, resources: { type_url: 'types.containerd.io/opencontainers/runtime-spec/1/LinuxResources', value: Buffer.from(JSON.stringify(resources)) } };
  return new Promise<void>((resolve, reject) => {
    client.makeUnaryRequest(
      '/containerd.services.tasks.v1.Tasks/Update',
      (m: object) => Buffer.from(Req.encode(Req.fromObject(m)).finish()),
      () => ({}),
      req,
      md,
      { deadline: Date.now() + 60_000 },
      (e: ServiceError | null) => {
        client.close();
        if (e) reject(new Error(`Tasks.Update: ${e.details || e.message}`));
        else resolve();
      },
    );
  });
}

const until = <T>(what: string, ok: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 60_000) => untilFast(what, ok, timeoutMs, 200);

describe('container resources: guest cgroups, Update and Stats @integration', function () {
  this.timeout(240_000);
  let tmp: TempDir;
  let runTmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let cri: CriClient | undefined;
  let logDir: string;

  before(async function () {
    this.timeout(600_000);
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-resources-');
    // CRI ids are 64 characters: keep `<run root>/k8s.io/<id>/qmp.sock` under 108 bytes.
    runTmp = new TempDir('kr-');
    logDir = path.join(tmp.path, 'pods', 'res');
    mkdirSync(logDir, { recursive: true });
    ctrd = await startContainerd(this, {
      pathPrefix: [shimBinDir(tmp)],
      env: { KATA_CONF_FILE: shimConfig(tmp, image), KATA_TS_RUN_ROOT: runTmp.path, KATA_TS_SBS_ROOT: path.join(tmp.path, 'sbs') },
      cri: { runtimes: { [HANDLER]: RUNTIME } },
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
  const why = (r: { stdout: string; stderr: string }) => `stdout: ${r.stdout}\nstderr: ${r.stderr}\n--- containerd log ---\n${c().logTail(40)}`;
  const stopTask = async (id: string) => {
    await c().ctr(['task', 'kill', '-s', 'SIGKILL', id]);
    await until('the task to stop', async () => !new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm').test((await c().ctr(['task', 'ls'])).stdout));
    await c().ctr(['task', 'rm', id]);
    await c().ctr(['container', 'rm', id]);
  };

  it('ctr run --memory-limit N --cpus 2: memory.max and cpu.max inside the container, which sits in kata-ts/<id>', async () => {
    const script = 'cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/pids.current; cat /proc/self/cgroup; mkdir /sys/fs/cgroup/sub 2>/dev/null && echo writable || echo read-only';
    const r = await c().run('limits', ['sh', '-c', script], { runtime: RUNTIME, flags: [...CGROUP_MOUNT, '--memory-limit', String(96 * MiB), '--cpus', '2'], timeoutMs: 120_000 });
    assert.equal(r.code, 0, why(r));
    const lines = r.stdout.trim().split('\n');
    assert.equal(lines[0], String(96 * MiB), why(r));
    assert.equal(lines[1], '200000 100000', why(r));
    assert.match(lines[2] ?? '', /^[1-9]\d*$/, why(r));
    assert.equal(lines[3], '0::/kata-ts/limits', why(r));
    assert.equal(lines[4], 'read-only', why(r));
  });

  it('ctr task metrics shows the cgroup v2 usage of a running container (CPU, memory, pids); containerd\'s Tasks.Update changes its limits', async () => {
    const id = 'metrics';
    const r = await c().ctr(['run', '-d', '--runtime', RUNTIME, ...CGROUP_MOUNT, '--memory-limit', String(128 * MiB), BUSYBOX_IMAGE, id, 'sh', '-c', 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1000'], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, why(r));
    try {
      type M = { pids?: { current?: number; limit?: number }; cpu?: { usage_usec?: number }; memory?: { usage?: number; usage_limit?: number } };
      const m = await until('CPU usage in the metrics', async () => {
        const out = await c().ctr(['task', 'metrics', '--format', 'json', id]);
        if (out.code !== 0) assert.fail(why(out));
        const parsed = JSON.parse(out.stdout) as M;
        return (parsed.cpu?.usage_usec ?? 0) > 0 && parsed;
      });
      assert.ok((m.memory?.usage ?? 0) > 0, JSON.stringify(m));
      assert.equal(m.memory?.usage_limit, 128 * MiB, JSON.stringify(m));
      assert.ok((m.pids?.current ?? 0) >= 1, JSON.stringify(m));
      const table = await c().ctr(['task', 'metrics', id]);
      assert.equal(table.code, 0, why(table));
      assert.match(table.stdout, /^cpu\.usage_usec\s+[1-9]/m, table.stdout);
      assert.match(table.stdout, /^memory\.usage\s+[1-9]/m, table.stdout);
      assert.match(table.stdout, /^pids\.current\s+[1-9]/m, table.stdout);

      // containerd's Tasks.Update (ctr task update in containerd 1.7+) reaches the running container's cgroup.
      await updateTask(c().socket, c().namespace, id, { memory: { limit: 80 * MiB }, pids: { limit: 50 } });
      const seen = await c().ctr(['task', 'exec', '--exec-id', 'look', id, 'cat', '/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/pids.max']);
      assert.equal(seen.stdout, `${80 * MiB}\n50\n`, why(seen));
      const after = JSON.parse((await c().ctr(['task', 'metrics', '--format', 'json', id])).stdout) as M;
      assert.equal(after.memory?.usage_limit, 80 * MiB, JSON.stringify(after));
      // A value the guest refuses comes back to containerd as InvalidArgument, and nothing changes.
      await assert.rejects(updateTask(c().socket, c().namespace, id, { cpu: { cpus: '0;reboot' } }), /invalid|cpuset cpus/i);
    } finally {
      await stopTask(id);
    }
  });

  it('OOM-kills a process above the container\'s memory limit in its cgroup (memory.events) and publishes TaskOOM before the exit', async () => {
    const events = spawn('ctr', ['-a', c().socket, 'events'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let seen = '';
    events.stdout.on('data', (d: Buffer) => (seen += d.toString()));
    let r;
    try {
      await new Promise((res) => setTimeout(res, 500));
      // The child grows until the 32 MiB cgroup limit kills it; the parent then reads the cgroup's count and ends.
      const script = 'sh -c "a=xxxxxxxxxxxxxxxx; while true; do a=\\$a\\$a; done"; echo "child $?"; grep -E "^(oom|oom_kill) " /sys/fs/cgroup/memory.events';
      r = await c().run('oomcg', ['sh', '-c', script], { runtime: RUNTIME, flags: [...CGROUP_MOUNT, '--memory-limit', String(32 * MiB)], timeoutMs: 120_000 });
      await until('the delete event', () => /\/tasks\/delete.*"oomcg"/.test(seen), 10_000);
    } finally {
      events.kill();
    }
    assert.equal(r.code, 0, why(r));
    assert.match(r.stdout, /^child 137$/m, why(r));
    assert.match(r.stdout, /^oom [1-9]\d*$/m, `the cgroup's own limit was hit: ${why(r)}`);
    assert.match(r.stdout, /^oom_kill [1-9]\d*$/m, why(r));
    const mine = seen.split('\n').filter((l) => l.includes(`${c().namespace} /tasks/`) && l.includes('"oomcg"'));
    const at = (topic: string) => mine.findIndex((l) => l.includes(` ${topic} `));
    assert.ok(at('/tasks/oom') >= 0, `no /tasks/oom event:\n${seen}`);
    assert.ok(at('/tasks/oom') < at('/tasks/exit'), `the OOM event comes before the exit:\n${mine.join('\n')}`);
  });

  describe('through CRI', () => {
    const sandboxConfig = () => ({
      metadata: { name: 'respod', uid: 'respod-uid', namespace: 'default', attempt: 0 },
      log_directory: logDir,
      linux: { security_context: { namespace_options: { network: 'NODE', pid: 'CONTAINER', ipc: 'POD' } } },
    });
    let podId = '';
    let ctrId = '';
    const api = () => cri!;
    const exec = async (cmd: string) => {
      const r = await api().runtime('ExecSync', { container_id: ctrId, cmd: ['sh', '-c', cmd], timeout: 60 });
      return Buffer.from(r.stdout as Uint8Array).toString().trim();
    };

    before(async function () {
      this.timeout(300_000);
      podId = (await api().runtime('RunPodSandbox', { config: sandboxConfig(), runtime_handler: HANDLER })).pod_sandbox_id as string;
      const config = {
        metadata: { name: 'worker', attempt: 0 },
        image: { image: BUSYBOX_IMAGE },
        command: ['sh', '-c', 'trap "exit 143" TERM; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1000 & wait'],
        log_path: 'worker_0.log',
        linux: { resources: { memory_limit_in_bytes: 200 * MiB, cpu_period: 100000, cpu_quota: 50000 } },
      };
      ctrId = (await api().runtime('CreateContainer', { pod_sandbox_id: podId, config, sandbox_config: sandboxConfig() })).container_id as string;
      await api().runtime('StartContainer', { container_id: ctrId });
    });

    after(async function () {
      this.timeout(120_000);
      if (ctrId) await api().runtime('StopContainer', { container_id: ctrId, timeout: 10 }).catch(() => undefined);
      if (ctrId) await api().runtime('RemoveContainer', { container_id: ctrId }).catch(() => undefined);
      if (podId) await api().runtime('StopPodSandbox', { pod_sandbox_id: podId }).catch(() => undefined);
      if (podId) await api().runtime('RemovePodSandbox', { pod_sandbox_id: podId }).catch(() => undefined);
    });

    it('applies the container config\'s limits', async () => {
      assert.equal(await exec('cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max'), `${200 * MiB}\n50000 100000`);
    });

    it('UpdateContainerResources changes the running container\'s memory limit (the shim\'s Update)', async () => {
      await api().runtime('UpdateContainerResources', { container_id: ctrId, linux: { memory_limit_in_bytes: 150 * MiB, cpu_period: 100000, cpu_quota: 70000 } });
      assert.equal(await exec('cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max'), `${150 * MiB}\n70000 100000`);
    });

    it('ContainerStats and ListContainerStats report non-zero CPU and memory', async () => {
      type S = { attributes: { id: string }; cpu: { usage_core_nano_seconds?: { value: number } }; memory: { working_set_bytes?: { value: number }; usage_bytes?: { value: number } } };
      const s = await until('non-zero CPU usage', async () => {
        const one = (await api().runtime('ContainerStats', { container_id: ctrId })).stats as S;
        return (one.cpu?.usage_core_nano_seconds?.value ?? 0) > 0 && one;
      });
      assert.equal(s.attributes.id, ctrId);
      assert.ok((s.memory?.working_set_bytes?.value ?? 0) > 0, JSON.stringify(s));
      const list = (await api().runtime('ListContainerStats', { filter: { pod_sandbox_id: podId } })).stats as S[];
      const mine = list.find((x) => x.attributes.id === ctrId);
      assert.ok(mine, JSON.stringify(list));
      assert.ok((mine.cpu?.usage_core_nano_seconds?.value ?? 0) > 0, JSON.stringify(mine));
      assert.ok((mine.memory?.working_set_bytes?.value ?? 0) > 0, JSON.stringify(mine));
    });
  });

  describe('at the end', () => {
    it('leaves no shim, VM, mount, socket or cgroup behind', async () => {
      await until('the VMs to go', () => processesMentioning(`${runTmp.path}/`).length === 0, 30_000);
      assert.deepEqual(await c().stop(), NO_LEFTOVERS);
    });
  });
});
