/**
 * The Cloud Hypervisor driver against the Cloud Hypervisor API simulator
 * (test/fixtures/standins/cloud-hypervisor → test/helpers/clh-simulator.ts), spawned and supervised
 * by the driver as it would spawn `cloud-hypervisor`. The simulator checks every request body
 * against the OpenAPI spec and models the VM's states; behind it, a real QEMU guest with the
 * project's guest agent, reached through the simulator's hybrid vsock socket.
 *
 * This verifies the driver against Cloud Hypervisor's published API contract, not against a real
 * cloud-hypervisor (which cannot be installed here).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { KataError } from '../../core/errors.js';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { loadValidatedConfig } from '../../core/runtime.js';
import { Sandbox } from '../../core/sandbox.js';
import { launchVm } from '../../core/vm-lifecycle.js';
import type { ClhVm } from '../../plugins/clh/driver.js';
import { clhApiFailure } from '../../plugins/clh/api.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { qemuBinary, qemuLeftBehind } from '../helpers/qemu.js';
import { TempDir } from '../helpers/tmp.js';
import { pidAlive as alive } from '../helpers/wait.js';
import { text } from 'node:stream/consumers';

export const CLH_STANDIN = path.join(PACKAGE_ROOT, 'test', 'fixtures', 'standins', 'cloud-hypervisor');
const VIRTIOFSD_STANDIN = path.join(PACKAGE_ROOT, 'test', 'fixtures', 'standins', 'virtiofsd.mjs');

interface LoggedRequest {
  method: string;
  endpoint: string;
  body?: Record<string, unknown>;
  status: number;
  reply?: unknown;
}


function clhConfig(opts: { kernel: string; initrd?: string; image?: string; extra: string }): string {
  return `[hypervisor.clh]
path = "${CLH_STANDIN}"
kernel = "${opts.kernel}"
${opts.initrd ? `initrd = "${opts.initrd}"` : ''}
${opts.image ? `image = "${opts.image}"` : ''}
default_memory = 512
default_vcpus = 1
default_maxvcpus = 1
${opts.extra}

[agent.kata]
dial_timeout = 120
${opts.extra.includes('confidential_guest = true') ? '\n[runtime]\n# A TD is sized at boot: the tdx plugin vetoes anything else.\nstatic_sandbox_resource_mgmt = true\n' : ''}`;
}

const BLOCK = 'shared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"';

/** Sets the simulator's environment for one test and puts the old one back. */
function simEnv(vars: Record<string, string>): () => void {
  const old = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  Object.assign(process.env, vars);
  return () => {
    for (const [k, v] of Object.entries(old)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  };
}

function requests(file: string): LoggedRequest[] {
  return existsSync(file) ? readFileSync(file, 'utf8').trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as LoggedRequest) : [];
}

describe('Cloud Hypervisor driver against the API simulator @integration', function () {
  this.timeout(300_000);
  let tmp: TempDir;
  let restoreEnv: (() => void) | undefined;

  before(async function () {
    if (!existsSync(path.join(PACKAGE_ROOT, 'dist', 'test', 'helpers', 'clh-simulator-main.js'))) this.skip();
    tmp = new TempDir('kata-clh-');
  });
  afterEach(() => {
    restoreEnv?.();
    restoreEnv = undefined;
  });
  after(() => tmp?.cleanup());

  describe('a sandbox with a real guest behind the simulator', () => {
    let image: GuestImage;
    const log = () => path.join(tmp.path, 'lifecycle.jsonl');
    const runRoot = () => path.join(tmp.path, 'run-lifecycle');

    before(async function () {
      if (!qemuBinary()) this.skip();
      image = await ensureGuestImage();
      if (!image.busyboxRootfs) this.skip();
    });

    /** A private copy of the busybox rootfs with a marker file only this copy has. */
    function markedImage(name: string): string {
      const p = path.join(tmp.path, `${name}.ext4`);
      copyFileSync(image.busyboxRootfs as string, p);
      const marker = path.join(tmp.path, `${name}.marker`);
      writeFileSync(marker, `rootfs of ${name}\n`);
      execFileSync('debugfs', ['-w', '-R', `write ${marker} /marker`, p], { stdio: 'ignore' });
      return p;
    }

    it('creates, boots, hot-plugs a block rootfs whose bdf reaches the agent, unplugs it and shuts down through the API', async () => {
      restoreEnv = simEnv({ CLH_SIM_GUEST: 'qemu', CLH_SIM_REQUEST_LOG: log(), CLH_SIM_FEATURES: 'kvm' });
      const validated = await loadValidatedConfig({ text: clhConfig({ kernel: image.kernel, initrd: image.initrd, extra: BLOCK }) });
      const sandbox = await Sandbox.create(validated, { sandboxId: 'clh-life', runRoot: runRoot() });
      const vm = sandbox.running.vm as ClhVm;
      const pciPaths: string[] = [];
      try {
        assert.equal(vm.hypervisor, 'clh');
        for (const id of ['blk-one', 'blk-two']) {
          const c = await sandbox.createContainer({
            id,
            rootfs: { kind: 'block', path: markedImage(id), fstype: 'ext4' },
            // Which device the container's / is mounted from, and where that device sits on the PCI bus.
            process: { args: ['sh', '-c', 'cat /marker; dev=$(awk \'$2=="/"{print $1}\' /proc/self/mounts); echo $dev; readlink -f /sys/class/block/${dev#/dev/}'] },
          });
          const [disk] = vm.disks;
          assert.ok(disk, 'the rootfs is hot-plugged');
          pciPaths.push(disk.pciPath ?? '');
          const out = text(c.stdout);
          await c.start();
          c.stdin.end();
          assert.equal(await c.wait(), 0);
          const [marker, rootDevice, sysfsPath] = (await out).trim().split('\n');
          assert.equal(marker, `rootfs of ${id}`);
          assert.match(rootDevice ?? '', /^\/dev\/vd[a-z]$/);
          assert.ok(sysfsPath?.includes(`/pci0000:00/0000:00:${disk.pciPath}.0/`), `${rootDevice} is at ${sysfsPath}, expected PCI path ${disk.pciPath}`);
          await c.delete();
          assert.deepEqual(vm.disks, []);
        }
      } finally {
        await sandbox.stop();
      }

      const calls = requests(log());
      assert.equal(calls[0]?.endpoint, 'vmm.ping');
      const seq = calls.filter((r) => r.endpoint !== 'vmm.ping').map((r) => `${r.endpoint} ${r.status}`);
      assert.deepEqual(seq, [
        'vm.create 204', 'vm.boot 204',
        'vm.add-disk 200', 'vm.remove-device 204',
        'vm.add-disk 200', 'vm.remove-device 204',
        'vm.shutdown 204', 'vm.delete 204', 'vmm.shutdown 204',
      ]);
      const adds = calls.filter((r) => r.endpoint === 'vm.add-disk');
      assert.equal(adds.length, 2);
      adds.forEach((add, i) => {
        assert.deepEqual(Object.keys(add.body ?? {}).sort(), ['id', 'image_type', 'path', 'readonly']);
        assert.equal(add.body?.readonly, false);
        const reply = add.reply as { id: string; bdf: string };
        assert.equal(reply.id, add.body?.id);
        assert.equal(reply.bdf, `0000:00:${pciPaths[i]}.0`);
      });
      assert.equal(calls.filter((r) => r.endpoint === 'vm.remove-device' && r.status === 204).length, 2);
      assert.deepEqual(await qemuLeftBehind(runRoot()), [], 'no QEMU left');
      assert.equal(existsSync(path.join(runRoot(), 'clh-life')), false, 'run dir removed');
    });

    it('detects the VMM dying under a waiting container, and the guest dies with it', async () => {
      restoreEnv = simEnv({ CLH_SIM_GUEST: 'qemu', CLH_SIM_FEATURES: 'kvm' });
      const root = path.join(tmp.path, 'run-die');
      const sandbox = await Sandbox.create(await loadValidatedConfig({ text: clhConfig({ kernel: image.kernel, initrd: image.initrd, extra: BLOCK }) }), { sandboxId: 'clh-die', runRoot: root });
      try {
        const c = await sandbox.createContainer({ id: 'victim', rootfs: { kind: 'block', path: markedImage('victim'), fstype: 'ext4' }, process: { args: ['sleep', '100'] } });
        await c.start();
        c.stdin.end();
        const waited = c.wait();
        process.kill(sandbox.running.vm.pid as number, 'SIGKILL');
        await assert.rejects(waited, (e: KataError) => e.code === 'KATA_ERR_AGENT_CLOSED');
        const exit = await sandbox.running.exited;
        assert.deepEqual([exit.expected, exit.signal, exit.error?.code], [false, 'SIGKILL', 'KATA_ERR_VM_EXITED']);
        assert.equal(sandbox.failure?.code, 'KATA_ERR_VM_EXITED');
      } finally {
        await sandbox.stop();
      }
      assert.deepEqual(await qemuLeftBehind(root), [], 'the guest died with its VMM');
      assert.equal(existsSync(path.join(root, 'clh-die')), false);
    });
  });

  describe('without a guest (CLH_SIM_GUEST=none)', () => {
    const fakeKernel = () => tmp.file('vmlinux', 'not a kernel: the simulator boots no guest here\n');

    it('sends a TDX VmConfig: platform.tdx, payload.firmware, the image as a read-only disk, no fs, no hot-plug; the refusal to boot is surfaced', async () => {
      const log = path.join(tmp.path, 'tdx.jsonl');
      restoreEnv = simEnv({ CLH_SIM_GUEST: 'none', CLH_SIM_REQUEST_LOG: log, CLH_SIM_FEATURES: 'kvm,tdx' });
      const firmware = tmp.file('td-shim.bin', 'firmware');
      const image = tmp.file('guest.img', 'image');
      const validated = await loadValidatedConfig({
        text: clhConfig({ kernel: fakeKernel(), image, extra: `${BLOCK}\nconfidential_guest = true\nfirmware = "${firmware}"\ndefault_maxmemory = 2048` }),
      });
      const root = path.join(tmp.path, 'run-tdx');
      await assert.rejects(launchVm(validated, { sandboxId: 'clh-tdx', runRoot: root }), (e: KataError) => {
        assert.equal(e.code, 'KATA_ERR_CLH_API');
        assert.match(e.message, /vm\.boot failed \(HTTP 500\): Error booting VM: Error creating TDX VM: /);
        return true;
      });
      const create = requests(log).find((r) => r.endpoint === 'vm.create');
      assert.equal(create?.status, 204);
      const body = create?.body as Record<string, any>;
      assert.equal(body.platform.tdx, true);
      assert.equal(body.payload.firmware, firmware);
      assert.equal(body.fs, undefined);
      assert.deepEqual(body.disks, [{ path: image, readonly: true, image_type: 'Raw', id: 'rootfs-image' }]);
      assert.equal(body.memory.hotplug_size, undefined);
      assert.equal(body.cpus.max_vcpus, body.cpus.boot_vcpus);
      assert.equal(existsSync(path.join(root, 'clh-tdx')), false, 'run dir removed');
    });

    it('refuses a TDX guest before vm.create when vmm.ping does not list the tdx feature', async () => {
      const log = path.join(tmp.path, 'no-tdx.jsonl');
      restoreEnv = simEnv({ CLH_SIM_GUEST: 'none', CLH_SIM_REQUEST_LOG: log, CLH_SIM_FEATURES: 'kvm,io_uring' });
      const validated = await loadValidatedConfig({
        text: clhConfig({ kernel: fakeKernel(), image: tmp.file('guest.img', 'image'), extra: `${BLOCK}\nconfidential_guest = true\nfirmware = "${tmp.file('fw', 'x')}"` }),
      });
      await assert.rejects(launchVm(validated, { sandboxId: 'clh-notdx', runRoot: path.join(tmp.path, 'run-notdx') }), (e: KataError) => {
        assert.equal(e.code, 'KATA_ERR_CLH_NO_TDX');
        assert.equal(e.key, 'hypervisor.clh.path');
        assert.match(e.message, /\[kvm, io_uring\], without "tdx"/);
        return true;
      });
      const endpoints = requests(log).map((r) => r.endpoint);
      assert.equal(endpoints.includes('vm.create'), false, endpoints.join(', '));
      assert.ok(endpoints.includes('vmm.ping'));
    });

    it('starts virtiofsd (a stand-in) before vm.create and sends an fs entry with shared memory', async () => {
      const log = path.join(tmp.path, 'virtiofs.jsonl');
      const argsFile = path.join(tmp.path, 'virtiofsd-args.json');
      restoreEnv = simEnv({ CLH_SIM_GUEST: 'none', CLH_SIM_REQUEST_LOG: log, STANDIN_ARGS_FILE: argsFile });
      const validated = await loadValidatedConfig({
        text: clhConfig({
          kernel: fakeKernel(),
          initrd: tmp.file('initrd', 'x'),
          extra: `shared_fs = "virtio-fs"\nvirtio_fs_daemon = "${VIRTIOFSD_STANDIN}"\nvirtio_fs_cache = "never"\nvirtio_fs_extra_args = ["--thread-pool-size=1"]\ndisable_block_device_use = true`,
        }),
      });
      const root = path.join(tmp.path, 'run-fs');
      const running = await launchVm(validated, { sandboxId: 'clh-fs', runRoot: root });
      const runDir = running.ctx.runDir;
      try {
        const args = JSON.parse(readFileSync(argsFile, 'utf8')) as string[];
        assert.deepEqual(args, ['--socket-path', `${runDir}/virtiofsd.sock`, '--shared-dir', `${runDir}/shared`, '--cache', 'never', '--thread-pool-size=1']);
        const create = requests(log).find((r) => r.endpoint === 'vm.create');
        const body = create?.body as Record<string, any>;
        assert.deepEqual(body.fs, [{ tag: 'kataShared', socket: `${runDir}/virtiofsd.sock`, num_queues: 1, queue_size: 1024, id: 'kata-shared-fs' }]);
        assert.equal(body.memory.shared, true);
        // The simulator's vm.boot connects to the fs socket, as Cloud Hypervisor's vhost-user-fs device does.
        assert.equal(requests(log).find((r) => r.endpoint === 'vm.boot')?.status, 204);
      } finally {
        await running.stop();
      }
      assert.equal(existsSync(runDir), false, 'run dir removed, virtiofsd socket with it');
    });

    it('resizes the VM with vm.resize (desired_vcpus, desired_ram), bodies valid against the OpenAPI spec, within max_vcpus and size + hotplug_size', async () => {
      const log = path.join(tmp.path, 'resize.jsonl');
      restoreEnv = simEnv({ CLH_SIM_GUEST: 'none', CLH_SIM_REQUEST_LOG: log, CLH_SIM_FEATURES: 'kvm' });
      const text = clhConfig({ kernel: fakeKernel(), initrd: tmp.file('initrd', 'x'), extra: `${BLOCK}\ndefault_maxmemory = 2048` }).replace('default_maxvcpus = 1', 'default_maxvcpus = 4');
      const running = await launchVm(await loadValidatedConfig({ text }), { sandboxId: 'clh-resize', runRoot: path.join(tmp.path, 'run-resize') });
      const vm = running.vm as ClhVm;
      try {
        assert.equal(await vm.resizeVcpus(3), 3);
        assert.equal(await vm.resizeMemory(1024), 1024);
        assert.equal(await vm.resizeMemory(768), 1024, 'memory is not taken back');
        assert.equal(await vm.resizeVcpus(2), 2);
        await assert.rejects(vm.resizeVcpus(5), (e: KataError) => e.code === 'KATA_ERR_HOTPLUG' && /max_vcpus = 4/.test(e.message));
        await assert.rejects(vm.resizeMemory(4096), (e: KataError) => e.code === 'KATA_ERR_HOTPLUG' && /2048 MiB at most/.test(e.message));
        const resizes = requests(log).filter((r) => r.endpoint === 'vm.resize');
        assert.deepEqual(resizes.map((r) => [r.body, r.status]), [
          [{ desired_vcpus: 3 }, 204],
          [{ desired_ram: 1024 * 1024 * 1024 }, 204],
          [{ desired_vcpus: 2 }, 204],
        ]);
        const info = await vm.api.info();
        assert.equal((info.config as any).cpus.boot_vcpus, 2);
        assert.equal((info.config as any).memory.hotplugged_size, 512 * 1024 * 1024);
      } finally {
        await running.stop();
      }
    });

    for (const format of ['json', 'text'] as const) {
      it(`surfaces Cloud Hypervisor's error message from a ${format === 'json' ? 'JSON array' : 'plain-text'} body, and out-of-order calls fail as they do there`, async () => {
        restoreEnv = simEnv({ CLH_SIM_GUEST: 'none', CLH_SIM_ERROR_FORMAT: format, CLH_SIM_FEATURES: 'kvm' });
        const validated = await loadValidatedConfig({ text: clhConfig({ kernel: fakeKernel(), initrd: tmp.file('initrd', 'x'), extra: BLOCK }) });
        const running = await launchVm(validated, { sandboxId: `clh-err-${format}`, runRoot: path.join(tmp.path, 'run-err') });
        const vm = running.vm as ClhVm;
        try {
          await assert.rejects(running.hotplugBlock({ id: 'missing', path: path.join(tmp.path, 'no-such-disk') }), (e: KataError) => {
            assert.equal(e.code, 'KATA_ERR_HOTPLUG');
            assert.deepEqual(clhApiFailure(e.cause), {
              endpoint: 'vm.add-disk',
              status: 500,
              vmmMessage: `Error adding disk: Failed to open disk image ${path.join(tmp.path, 'no-such-disk')}: No such file or directory (os error 2)`,
            });
            assert.match(e.message, /vm\.add-disk failed \(HTTP 500\): Error adding disk: Failed to open disk image/);
            return true;
          });
          await assert.rejects(vm.api.bootVm(), (e: KataError) => e.code === 'KATA_ERR_CLH_API' && clhApiFailure(e)?.status === 500 && /already booted/.test(e.message));
          await assert.rejects(vm.api.removeDevice('nothing-here'), (e: KataError) => clhApiFailure(e)?.status === 404 && /Unknown device id nothing-here/.test(e.message));
          await assert.rejects(vm.api.createVm({ payload: { kernel: '/k' }, memroy: { size: 1 } }), (e: KataError) => clhApiFailure(e)?.status === 400 && /memroy/.test(e.message));
          await vm.api.shutdownVm();
          await vm.api.deleteVm();
          await assert.rejects(vm.api.bootVm(), (e: KataError) => clhApiFailure(e)?.status === 404 && /VM is not created/.test(e.message));
        } finally {
          await running.stop();
        }
        assert.equal(alive(vm.pid), false);
      });
    }

    it('reports a VMM that exits during start with its last words (KATA_ERR_VM_START)', async () => {
      const broken = tmp.file('broken-clh', '#!/bin/sh\necho "error: the VMM cannot start here" >&2\nexit 1\n');
      chmodSync(broken, 0o755);
      const text = clhConfig({ kernel: fakeKernel(), initrd: tmp.file('initrd', 'x'), extra: BLOCK }).replace(`path = "${CLH_STANDIN}"`, `path = "${broken}"`);
      const root = path.join(tmp.path, 'run-broken');
      await assert.rejects(launchVm(await loadValidatedConfig({ text }), { sandboxId: 'clh-broken', runRoot: root }), (e: KataError) => {
        assert.equal(e.code, 'KATA_ERR_VM_START');
        assert.match(e.message, /exited during start \(exit status 1\).*the VMM cannot start here/s);
        return true;
      });
      assert.equal(existsSync(path.join(root, 'clh-broken')), false);
    });
  });
});
