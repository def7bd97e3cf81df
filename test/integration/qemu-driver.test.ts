/**
 * The QEMU driver (plugins/qemu/driver.ts, hotplug.ts) against the real qemu-system-x86_64, with
 * VMs started paused (-S appended to the plan's argv): no guest code runs, so a synthetic kernel
 * suffices and each start takes a fraction of a second. What needs a guest that sees the disks
 * (sizes, unplug, power-down) is in qemu-guest.test.ts.
 *
 * Most VMs go through the core (loadValidatedConfig → launchVm → the plugin's createVm tap); the
 * stop-escalation and not-started cases construct a QemuVm directly to pass short timeouts.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { OWNER_FILE } from '../../core/run-dirs.js';
import { setTimeout as delay } from 'node:timers/promises';
import { KataError } from '../../core/errors.js';
import { chooseAccelerator, detectHost } from '../../core/host.js';
import { createLogger, silentLogger } from '../../core/logger.js';
import type { QemuLaunchSpec } from '../../plugins/qemu/launch-spec.js';
import { loadValidatedConfig, type ValidatedConfig } from '../../core/runtime.js';
import { launchVm, type RunningVm } from '../../core/vm-lifecycle.js';
import type { VmContext } from '../../core/vm.js';
import { PID_FILE, QemuVm } from '../../plugins/qemu/driver.js';
import { QmpError } from '../../plugins/qemu/qmp.js';
import { fakeGuest, killQemuMentioning, qemuBinary, qemuConfigText, qemuLeftBehind, qemuProcessesMentioning } from '../helpers/qemu.js';
import { TempDir } from '../helpers/tmp.js';

interface LogLine {
  level: number;
  msg: string;
  [k: string]: unknown;
}

interface PciDevice {
  qdev_id: string;
  slot: number;
  pci_bridge?: { devices?: PciDevice[] };
}

interface BlockNode {
  'node-name': string;
  drv: string;
  ro: boolean;
  file: string;
}

const isCode = (code: string) => (e: unknown) => e instanceof KataError && e.code === code && e.plugin === 'qemu';

/** The plan with `-S` appended: QEMU starts paused and never runs the (synthetic) kernel. */
function paused(v: ValidatedConfig, edit: (spec: QemuLaunchSpec) => void = () => undefined): ValidatedConfig {
  const native = structuredClone(v.plan.vm.native) as QemuLaunchSpec;
  native.extraArgs.push('-S');
  edit(native);
  return { ...v, plan: { ...v.plan, vm: { ...v.plan.vm, native } } } as ValidatedConfig;
}

/**
 * Where QEMU put disk `id`, in Kata's `<root port slot>/<slot behind it>` form: the port's slot on
 * pcie.0 from query-pci, the port and the disk's slot from QOM. (Paused before the firmware ran,
 * the ports have no bus numbers yet, so query-pci does not list what is behind them; the guest
 * test reads the whole path from query-pci.)
 */
async function pciPathFromQemu(vm: QemuVm, id: string): Promise<string> {
  const qmp = vm.qmp as NonNullable<QemuVm['qmp']>;
  const buses = await qmp.execute<{ devices: PciDevice[] }[]>('query-pci');
  const parentBus = await qmp.execute<string>('qom-get', { path: `/machine/peripheral/${id}`, property: 'parent_bus' });
  const port = parentBus.split('/').at(-1) as string; // /machine/peripheral/rp1/rp1: the port's bus is named after it
  const portSlot = buses[0]?.devices.find((d) => d.qdev_id === port)?.slot;
  const devfn = await qmp.execute<number>('qom-get', { path: `/machine/peripheral/${id}`, property: 'addr' });
  assert.ok(portSlot !== undefined, `no ${port} on pcie.0`);
  const hex = (n: number) => n.toString(16).padStart(2, '0');
  return `${hex(portSlot)}/${hex(devfn >> 3)}`;
}

async function blockNodes(vm: QemuVm): Promise<BlockNode[]> {
  return (await vm.qmp?.execute<BlockNode[]>('query-named-block-nodes', { flat: true })) ?? [];
}

function losetupAvailable(): boolean {
  return process.getuid?.() === 0 && spawnSync('losetup', ['--version']).status === 0 && existsSync('/dev/loop-control');
}

describe('QEMU driver on paused VMs (qemu-system-x86_64 -S) @integration', function () {
  this.timeout(60_000);
  let binary: string | undefined;
  let tmp: TempDir;
  let runRoot: string;
  let guest: { kernel: string; initrd: string };
  let logs: LogLine[];
  let running: RunningVm[];

  before(function () {
    binary = qemuBinary();
    if (!binary) this.skip();
  });

  beforeEach(() => {
    tmp = new TempDir('kata-ts-qemu-drv-');
    runRoot = path.join(tmp.path, 'run');
    guest = fakeGuest(tmp.path);
    logs = [];
    running = [];
  });

  afterEach(async () => {
    for (const r of running) await r.stop().catch(() => undefined);
    const left = await qemuLeftBehind(tmp.path);
    killQemuMentioning(tmp.path);
    tmp.cleanup();
    assert.deepEqual(left, [], 'a QEMU process was left running');
  });

  const log = () => createLogger({ level: 'info', stream: { write: (line: string) => logs.push(JSON.parse(line) as LogLine) } });
  const config = (extra = '', overrides: { binary?: string; kernel?: string } = {}) =>
    loadValidatedConfig({ text: qemuConfigText({ binary: overrides.binary ?? (binary as string), kernel: overrides.kernel ?? guest.kernel, initrd: guest.initrd, extra }) });
  async function launch(v: ValidatedConfig, sandboxId = 'sb'): Promise<{ r: RunningVm; vm: QemuVm }> {
    const r = await launchVm(v, { sandboxId, runRoot, log: log() });
    running.push(r);
    assert.ok(r.vm instanceof QemuVm);
    return { r, vm: r.vm };
  }
  function disk(name: string, bytes = 1024 * 1024): string {
    const p = path.join(tmp.path, name);
    writeFileSync(p, '');
    truncateSync(p, bytes);
    return p;
  }

  it('starts QEMU under the accelerator chosen for this host, records the pid, answers QMP, and stop leaves nothing behind', async () => {
    const { r, vm } = await launch(paused(await config()));
    const expected = chooseAccelerator(detectHost(), 'auto');
    assert.deepEqual(vm.accelerator, expected);
    if (!detectHost().kvmCanRunStandardGuest) assert.equal(vm.accelerator?.accelerator, 'tcg');
    const choice = logs.filter((l) => l.msg.startsWith('QEMU accelerator'));
    assert.equal(choice.length, 1);
    assert.equal(choice[0]?.reason, expected.reason);
    assert.equal(choice[0]?.level, 30);

    const pid = vm.pid as number;
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'latin1').split('\0');
    assert.equal(argv[argv.indexOf('-accel') + 1], expected.accelerator);
    assert.equal(readFileSync(`/proc/${pid}/cwd/${PID_FILE}`, 'utf8'), `${pid}\n`); // cwd = run dir
    assert.equal(readFileSync(path.join(r.ctx.runDir, PID_FILE), 'utf8'), `${pid}\n`);
    for (const f of ['qmp.sock', 'console.sock', 'agent.sock', 'console.log']) assert.ok(existsSync(path.join(r.ctx.runDir, f)), f);
    assert.equal(vm.qmp?.version, execFileSync(binary as string, ['--version'], { encoding: 'utf8' }).match(/version (\d+\.\d+\.\d+)/)?.[1]);
    assert.deepEqual(await vm.qmp?.execute('query-status'), { status: 'prelaunch', singlestep: false, running: false });

    // The driver's own stop removes what it and QEMU created; concurrent calls share one stop.
    const [a, b] = await Promise.all([vm.stop(), vm.stop()]);
    assert.equal(a, b);
    assert.equal(a.expected, true);
    assert.equal(a.code, 0);
    assert.equal(a.signal, null);
    assert.equal(await vm.exited, a);
    // Only the core's owner record is left; the core removes it with the run directory.
    assert.deepEqual(readdirSync(r.ctx.runDir), [OWNER_FILE]);
    assert.deepEqual(qemuProcessesMentioning(tmp.path), []);
    await r.stop();
    assert.equal(existsSync(r.ctx.runDir), false);
  });

  it('fails with KATA_ERR_VM_START when the binary does not exist, and leaves no run directory', async () => {
    const v = await config('', { binary: '/nonexistent/qemu' });
    await assert.rejects(launchVm(v, { sandboxId: 'nobin', runRoot, log: log() }), (e: KataError) => {
      assert.equal(e.code, 'KATA_ERR_VM_START');
      assert.equal(e.plugin, 'qemu');
      assert.equal(e.key, 'hypervisor.qemu.path');
      assert.match(e.message, /\/nonexistent\/qemu does not exist \(spawn ENOENT\)/);
      return true;
    });
    assert.equal(existsSync(path.join(runRoot, 'nobin')), false);
  });

  it("fails with KATA_ERR_VM_START and QEMU's own error when the kernel path is wrong", async () => {
    const v = await config('', { kernel: path.join(tmp.path, 'no-such-vmlinuz') });
    await assert.rejects(launchVm(v, { sandboxId: 'nokernel', runRoot, log: log() }), (e: KataError) => {
      assert.equal(e.code, 'KATA_ERR_VM_START');
      assert.match(e.message, /QEMU exited during start \(exit status 1\)/);
      assert.match(e.message, /QEMU stderr:\n.*could not open kernel file '.*no-such-vmlinuz'/);
      return true;
    });
    assert.equal(existsSync(path.join(runRoot, 'nokernel')), false);
  });

  it('hot-plugs eight concurrent disks into eight distinct ports whose PCI paths match where QEMU put them; a ninth gets KATA_ERR_HOTPLUG_NO_SLOT', async () => {
    const { vm } = await launch(paused(await config()));
    const ids = Array.from({ length: 9 }, (_, i) => `disk${i}`);
    const results = await Promise.allSettled(ids.map((id) => vm.hotplugBlock({ id, path: disk(`${id}.img`) })));
    const plugged = results.slice(0, 8).map((r) => (r.status === 'fulfilled' ? r.value : assert.fail(String((r as PromiseRejectedResult).reason))));
    // Ports go to callers in call order.
    assert.deepEqual(plugged.map((p) => p.pciPath), ['01/00', '02/00', '03/00', '04/00', '05/00', '06/00', '07/00', '08/00']);
    const ninth = results[8] as PromiseRejectedResult;
    assert.equal(ninth.status, 'rejected');
    assert.ok(isCode('KATA_ERR_HOTPLUG_NO_SLOT')(ninth.reason), String(ninth.reason));

    for (const p of plugged) assert.equal(await pciPathFromQemu(vm, p.id), p.pciPath, p.id);
    const nodes = (await blockNodes(vm)).map((n) => n['node-name']);
    assert.ok(!nodes.includes('disk8'), 'the ninth disk got no block node');

    await assert.rejects(vm.hotplugBlock({ id: 'disk3', path: disk('again.img') }), (e: KataError) => isCode('KATA_ERR_HOTPLUG')(e) && /already hot-plugged/.test(e.message));
    await assert.rejects(vm.hotplugBlock({ id: '1bad id', path: disk('bad.img') }), isCode('KATA_ERR_HOTPLUG'));
    await assert.rejects(vm.hotplugBlock({ id: 'missing', path: path.join(tmp.path, 'missing.img') }), (e: KataError) => isCode('KATA_ERR_HOTPLUG')(e) && /does not exist/.test(e.message));
  });

  it('uses the file driver for an image and host_device for a block device, read-only as asked', async function () {
    const { vm } = await launch(paused(await config()));
    await vm.hotplugBlock({ id: 'rw', path: disk('rw.img') });
    await vm.hotplugBlock({ id: 'ro', path: disk('ro.img'), readonly: true });
    let loop: string | undefined;
    if (losetupAvailable()) {
      loop = execFileSync('losetup', ['-f', '--show', disk('loop.img', 2 * 1024 * 1024)], { encoding: 'utf8' }).trim();
    }
    try {
      if (loop) await vm.hotplugBlock({ id: 'blk', path: loop });
      const nodes = await blockNodes(vm);
      const top = (id: string) => nodes.find((n) => n['node-name'] === id);
      const protocol = (id: string) => nodes.find((n) => n['node-name'] !== id && n.file === top(id)?.file && n.drv !== 'raw');
      assert.equal(top('rw')?.drv, 'raw');
      assert.equal(top('rw')?.ro, false);
      assert.equal(top('ro')?.ro, true);
      assert.equal(protocol('rw')?.drv, 'file');
      if (loop) {
        assert.equal(protocol('blk')?.drv, 'host_device');
        assert.equal(top('blk')?.file, loop);
      }
    } finally {
      await vm.stop();
      if (loop) execFileSync('losetup', ['-d', loop]);
    }
    if (!loop) this.skip(); // the host_device half could not run here
  });

  it('removes the block node again when device_add fails (port occupied behind its back)', async () => {
    const { vm } = await launch(paused(await config()));
    const qmp = vm.qmp as NonNullable<QemuVm['qmp']>;
    // Someone else puts a disk on rp0, which the driver believes free.
    await qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'intruder', file: { driver: 'file', filename: disk('intruder.img') } });
    await qmp.execute('device_add', { driver: 'virtio-blk-pci', id: 'intruder', drive: 'intruder', bus: 'rp0', addr: '0' });

    const err = await vm.hotplugBlock({ id: 'victim', path: disk('victim.img') }).then(
      () => assert.fail('hot-plug succeeded'),
      (e: KataError) => e,
    );
    assert.equal(err.code, 'KATA_ERR_HOTPLUG');
    assert.ok(err.cause instanceof QmpError);
    assert.equal(err.cause.command, 'device_add');
    assert.match(err.message, /device_add on rp0 failed: GenericError: .*removed again/);
    const nodes = (await blockNodes(vm)).map((n) => n['node-name']);
    assert.ok(nodes.includes('intruder'));
    assert.ok(!nodes.includes('victim'), `victim still has a block node: ${nodes.join(', ')}`);
  });

  it('sets iommu_platform and disable-legacy on a hot-plugged disk when the spec asks for the IOMMU platform', async () => {
    const { vm } = await launch(paused(await config(), (spec) => (spec.virtioIommuPlatform = true)));
    await vm.hotplugBlock({ id: 'td', path: disk('td.img') });
    const qmp = vm.qmp as NonNullable<QemuVm['qmp']>;
    assert.equal(await qmp.execute('qom-get', { path: '/machine/peripheral/td', property: 'iommu_platform' }), true);
    assert.equal(await qmp.execute('qom-get', { path: '/machine/peripheral/td', property: 'disable-legacy' }), 'on');
  });

  it('times out an unplug the guest never acknowledges, keeping the port taken', async () => {
    const { vm } = await launch(paused(await config()));
    assert.equal((await vm.hotplugBlock({ id: 'stuck', path: disk('stuck.img') })).pciPath, '01/00');
    const t = Date.now();
    await assert.rejects(vm.unplugBlock('stuck', { timeoutMs: 300 }), (e: KataError) => isCode('KATA_ERR_UNPLUG_TIMEOUT')(e) && /stuck/.test(e.message));
    assert.ok(Date.now() - t < 2000);
    // Still in QEMU, still holding rp0: the next disk goes to rp1.
    assert.equal(await pciPathFromQemu(vm, 'stuck'), '01/00');
    assert.equal((await vm.hotplugBlock({ id: 'next', path: disk('next.img') })).pciPath, '02/00');
    // A retry waits again (QEMU says the unplug is already under way) and times out again.
    await assert.rejects(vm.unplugBlock('stuck', { timeoutMs: 200 }), isCode('KATA_ERR_UNPLUG_TIMEOUT'));
    await assert.rejects(vm.unplugBlock('unknown'), isCode('KATA_ERR_HOTPLUG'));
  });

  it('reports a QEMU killed from outside as an unexpected exit with its stderr, fails pending QMP commands, and still cleans up', async () => {
    // +vmx makes QEMU under TCG warn on stderr, so there is a tail to report.
    const { r, vm } = await launch(paused(await config('cpu_features = "+vmx"')));
    const pid = vm.pid as number;
    process.kill(pid, 'SIGSTOP'); // QEMU cannot answer: the command stays pending
    const pending = (vm.qmp as NonNullable<QemuVm['qmp']>).execute('query-status');
    await delay(50);
    process.kill(pid, 'SIGKILL');

    await assert.rejects(pending, isCode('KATA_ERR_QMP_CLOSED'));
    const exit = await vm.exited;
    assert.equal(exit.expected, false);
    assert.equal(exit.signal, 'SIGKILL');
    assert.equal(exit.code, null);
    assert.equal(exit.error?.code, 'KATA_ERR_VM_EXITED');
    assert.ok(exit.stderrTail.some((l) => /vmx/.test(l)), exit.stderrTail.join('\n'));
    assert.match(exit.error?.message ?? '', /killed by SIGKILL[\s\S]*vmx/);
    const reported = logs.filter((l) => l.msg === 'QEMU exited unexpectedly');
    assert.equal(reported.length, 1);
    assert.equal(reported[0]?.level, 50);

    await assert.rejects(vm.hotplugBlock({ id: 'late', path: disk('late.img') }), (e: KataError) => isCode('KATA_ERR_HOTPLUG')(e) && /no longer running/.test(e.message));
    const stopped = await r.stop();
    assert.equal(stopped.expected, false);
    assert.equal(existsSync(r.ctx.runDir), false);
  });

  describe('without the core', () => {
    function context(sandboxId: string, v: ValidatedConfig): VmContext {
      const runDir = path.join(runRoot, sandboxId);
      mkdirSync(runDir, { recursive: true });
      return { sandboxId, runDir, plan: v.plan, config: v.config, log: silentLogger(), network: { devices: [], interfaces: [], routes: [], neighbors: [], timings: { host: 0, guest: 0 } } };
    }

    it('escalates to SIGKILL when QEMU neither powers down nor quits, and says so', async () => {
      const v = paused(await config());
      const ctx = context('frozen', v);
      const vm = new QemuVm(ctx, { powerdownTimeoutMs: 150, quitTimeoutMs: 150, commandTimeoutMs: 150 });
      try {
        await vm.start();
        process.kill(vm.pid as number, 'SIGSTOP');
        const exit = await vm.stop();
        assert.equal(exit.expected, true);
        assert.equal(exit.signal, 'SIGKILL');
        assert.equal(exit.error?.code, 'KATA_ERR_VM_STOP');
        assert.deepEqual(readdirSync(ctx.runDir), []);
      } finally {
        await vm.stop();
      }
    });

    it('refuses hot-plug before start, and stops a VM that never started', async () => {
      const vm = new QemuVm(context('never', await config()));
      await assert.rejects(vm.hotplugBlock({ id: 'x', path: disk('x.img') }), (e: KataError) => isCode('KATA_ERR_HOTPLUG')(e) && /not started/.test(e.message));
      const exit = await vm.stop();
      assert.deepEqual({ ...exit }, { expected: true, code: null, signal: null, stderrTail: [] });
      assert.equal(await vm.exited, exit);
      assert.equal(vm.pid, undefined);
    });
  });
});
