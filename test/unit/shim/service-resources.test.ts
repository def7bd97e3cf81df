/**
 * The task service's resource calls (shim/service.ts Create with linux.resources, Update, Stats)
 * on the fake sandbox: what reaches the sandbox's container, what containerd gets back, refusals.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { KataError } from '../../../core/errors.js';
import { silentLogger } from '../../../core/logger.js';
import { EventPublisher } from '../../../shim/events.js';
import { TaskService } from '../../../shim/service.js';
import { StatsContainerResponse } from '../../../wire/agent/proto.gen.js';
import { Metrics } from '../../../wire/containerd/proto.gen.js';
import { FakeSandboxFactory } from '../../helpers/fake-sandbox.js';
import { TempDir } from '../../helpers/tmp.js';

const SPEC_URL = 'types.containerd.io/opencontainers/runtime-spec/1/LinuxResources';

describe('shim: task service resources (Update, Stats) on a fake sandbox', () => {
  let tmp: TempDir;
  let factory: FakeSandboxFactory;
  let service: TaskService;
  let publisher: EventPublisher;

  beforeEach(() => {
    tmp = new TempDir('kata-ts-shim-res-');
    factory = new FakeSandboxFactory();
    publisher = new EventPublisher({ address: path.join(tmp.path, 'none.sock.ttrpc'), namespace: 'default', log: silentLogger() });
    service = new TaskService({ createSandbox: factory.createSandbox, namespace: 'default', events: publisher, log: silentLogger(), runRoot: path.join(tmp.path, 'run'), onShutdown: () => undefined });
  });
  afterEach(async () => {
    await service.close();
    await publisher.close(100);
    tmp.cleanup();
  });

  const create = async (id: string, linux?: unknown) => {
    const bundle = path.join(tmp.path, id);
    mkdirSync(path.join(bundle, 'rootfs'), { recursive: true });
    writeFileSync(path.join(bundle, 'config.json'), JSON.stringify({ process: { args: ['true'], cwd: '/' }, root: { path: 'rootfs' }, ...(linux ? { linux } : {}) }));
    await service.create({ id, bundle, rootfs: [], stdin: '', stdout: '', stderr: '', terminal: false, checkpoint: '', parentCheckpoint: '' } as Parameters<TaskService['create']>[0]);
  };
  const json = (v: unknown) => ({ type_url: SPEC_URL, value: new TextEncoder().encode(JSON.stringify(v)) });

  it('passes the spec\'s linux.resources to the sandbox at Create', async () => {
    await create('c1', { resources: { memory: { limit: 1048576 }, pids: { limit: 10 } } });
    assert.deepEqual(factory.sandbox.container('c1').spec.resources, { Memory: { Limit: 1048576n, Reservation: 0n, Swap: 0n }, Pids: { Limit: 10n } });
  });

  it('Update hands the parsed resources to the container', async () => {
    await create('c1');
    await service.update({ id: 'c1', resources: json({ memory: { limit: 2097152 }, cpu: { quota: 50000, period: 100000 } }), annotations: {} });
    assert.deepEqual(factory.sandbox.container('c1').updates, [{ Memory: { Limit: 2097152n, Reservation: 0n, Swap: 0n }, CPU: { Shares: 0n, Quota: 50000n, Period: 100000n, Cpus: '', Mems: '' } }]);
  });

  it('Update refuses resources that are not runtime-spec LinuxResources with KATA_ERR_OCI_SPEC, and an unknown task with KATA_ERR_TASK_NOT_FOUND', async () => {
    await create('c1');
    await assert.rejects(service.update({ id: 'c1', resources: { type_url: 'x/WindowsResources', value: new Uint8Array([123, 125]) }, annotations: {} }), (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_OCI_SPEC');
    await assert.rejects(service.update({ id: 'c1', resources: json({ memory: { limit: 'lots' } }), annotations: {} }), (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_OCI_SPEC');
    await assert.rejects(service.update({ id: 'nope', resources: json({}), annotations: {} }), (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_TASK_NOT_FOUND');
    assert.deepEqual(factory.sandbox.container('c1').updates, []);
  });

  it('Stats answers the container\'s figures as io.containerd.cgroups.v2.Metrics', async () => {
    await create('c1');
    factory.sandbox.container('c1').statsAnswer = StatsContainerResponse.decode(
      StatsContainerResponse.encode({ cgroupStats: { cpuStats: { cpuUsage: { totalUsage: 5_000_000n } }, memoryStats: { usage: { usage: 4096n, limit: 8192n } }, pidsStats: { current: 2n } } }),
    );
    const r = await service.stats({ id: 'c1' });
    assert.equal(r.stats.type_url, 'io.containerd.cgroups.v2.Metrics');
    const m = Metrics.decode(r.stats.value);
    assert.deepEqual([m.cpu?.usageUsec, m.memory?.usage, m.memory?.usageLimit, m.pids?.current], [5000n, 4096n, 8192n, 2n]);
  });
});
