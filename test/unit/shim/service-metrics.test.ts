/**
 * What the task service gives the management socket for /metrics (shim/service.ts), on a fake
 * sandbox: the hypervisor pid while the VM runs and none once it has ended (its pid may then be
 * another process's), the pod's CRI labels from the sandbox container's annotations, the
 * sandbox's start phases and the guest's answer.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { silentLogger } from '../../../core/logger.js';
import type { SandboxFigures } from '../../../shim/metrics.js';
import type { MonitorSource } from '../../../shim/monitor.js';
import { TaskService } from '../../../shim/service.js';
import { FakeSandboxFactory } from '../../helpers/fake-sandbox.js';
import { TempDir } from '../../helpers/tmp.js';
import { until } from '../../helpers/wait.js';

describe('shim: task service figures for /metrics', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir('kata-service-metrics-')));
  afterEach(() => tmp.cleanup());

  it('reports the VM pid while it runs and none after, the CRI labels of the sandbox container, and its start phases', async () => {
    const factory = new FakeSandboxFactory({ pid: 4343 });
    let source: MonitorSource | undefined;
    const service = new TaskService({
      createSandbox: factory.createSandbox,
      namespace: 'default',
      events: { publish: () => undefined } as never,
      log: silentLogger(),
      runRoot: path.join(tmp.path, 'run'),
      onShutdown: () => undefined,
      startMonitor: async (_id, s) => {
        source = s;
        return { close: async () => undefined };
      },
    });
    const bundle = path.join(tmp.path, 'bundle');
    mkdirSync(path.join(bundle, 'rootfs'), { recursive: true });
    const annotations = { 'io.kubernetes.cri.container-type': 'sandbox', 'io.kubernetes.cri.sandbox-id': 'pod1', 'io.kubernetes.cri.sandbox-name': 'web', 'io.kubernetes.cri.sandbox-namespace': 'shop', 'io.kubernetes.cri.sandbox-uid': 'u-1' };
    writeFileSync(path.join(bundle, 'config.json'), JSON.stringify({ ociVersion: '1.0.2', process: { args: ['/bin/true'], cwd: '/' }, root: { path: path.join(bundle, 'rootfs') }, annotations }));
    await service.create({ id: 'pod1', bundle, rootfs: [], stdin: '', stdout: '', stderr: '', terminal: false, checkpoint: '', parentCheckpoint: '' } as never);
    const figures: SandboxFigures = source!.figures!;
    assert.equal(figures.hypervisorPid(), 4343);
    assert.deepEqual(figures.podLabels(), { cri_name: 'web', cri_namespace: 'shop', cri_uid: 'u-1' });
    assert.deepEqual(figures.startPhases(), {});
    await assert.rejects(figures.guestMetrics({ timeoutMs: 100 }), 'the fake sandbox has no agent metrics');
    factory.sandboxes[0]!.crash();
    await until('the VM end to be seen', () => figures.hypervisorPid() === undefined);
  });
});
