import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { judgeConfig, loadValidatedConfig, type Judgement } from '../../../core/runtime.js';
import { SANDBOX_DIR, type SandboxPlan } from '../../../core/plan.js';
import { isClhSpec, type ClhLaunchSpec, type ClhVmConfig } from '../../../plugins/clh/vm-config.js';
import type { ReadonlyCapabilities } from '../../../core/capabilities.js';
import type { KataConfig } from '../../../core/config/types.js';
import clh, { buildVmConfig, CLH_DEVICE_KINDS, describeClhVm, hotplugDriverError, IMAGE_DISK_ID, renderClhLaunchSpec, renderVmConfig } from '../../../plugins/clh/index.js';
import { renderClhNets } from '../../../plugins/clh/vm-config.js';
import { CLH_API_SUBSET, CLH_OPENAPI, compileComponent, referenceFile, type OpenApiValidator } from '../../helpers/openapi.js';

const IMAGE = '/usr/share/kata-containers/kata-containers.img';
const MIB = 1024 * 1024;

/** A `[hypervisor.clh]` config without shared fs or block devices (so only clh is loaded), plus `extra` lines. */
function toml(extra = '', base = 'shared_fs = "none"\ndisable_block_device_use = true'): string {
  // A TD is sized at boot: the tdx plugin vetoes anything else.
  const runtime = extra.includes('confidential_guest = true') ? '[runtime]\nstatic_sandbox_resource_mgmt = true\n' : '';
  return `[hypervisor.clh]\nimage = "${IMAGE}"\n${base}\n${extra}\n${runtime}`;
}

async function planOf(text: string): Promise<{ plan: SandboxPlan; vm: ClhLaunchSpec; body: ClhVmConfig; config: KataConfig }> {
  const { plan, config } = await loadValidatedConfig({ text });
  assert.ok(isClhSpec(plan.vm.native), 'plan.vm.native is a Cloud Hypervisor launch spec');
  const vm = plan.vm.native;
  assert.ok(vm.launch, 'plan.vm.launch is rendered');
  assert.equal(plan.vm.launch, vm.launch);
  return { plan, vm, body: vm.launch, config };
}

const capNames = (j: Judgement) => j.capabilities.map((c) => c.name);

function caps(...names: string[]): ReadonlyCapabilities {
  return { has: (n) => names.includes(n), list: () => names };
}

describe('clh plugin', () => {
  describe('manifest', () => {
    it('serves [hypervisor.clh] with its own schema', () => {
      assert.equal(clh.manifest.name, 'clh');
      assert.deepEqual(clh.manifest.provides, ['hypervisor', 'hypervisor:clh']);
      assert.deepEqual(clh.manifest.config, { table: 'hypervisor.clh', schema: 'clh.schema.json' });
    });
  });

  describe('schema', () => {
    it('fills in the Cloud Hypervisor defaults', async () => {
      const { config } = await loadValidatedConfig({ text: toml() });
      assert.equal(config.hypervisor.path, '/usr/bin/cloud-hypervisor');
      assert.equal(config.hypervisor.kernel, '/usr/share/kata-containers/vmlinux.container');
      assert.equal(config.hypervisor.block_device_driver, 'virtio-blk');
      assert.equal(config.hypervisor.hypervisor_loglevel, 1);
    });

    it('rejects a block driver outside the common list', async () => {
      const j = await judgeConfig({ text: toml('block_device_driver = "ide"') });
      assert.equal(j.valid, false);
      assert.ok(j.problems.some((p) => p.code === 'KATA_ERR_CONFIG_SCHEMA' && p.key === 'hypervisor.clh.block_device_driver'));
    });
  });

  describe('debug console', () => {
    it('refuses debug_console_enabled in the validated config phase (no console channel rendered yet) instead of ignoring it', async () => {
      const text = `[hypervisor.clh]\nkernel = "/k"\ninitrd = "/i"\nshared_fs = "none"\n\n[agent.kata]\ndebug_console_enabled = true\n`;
      const j = await judgeConfig({ text });
      assert.deepEqual(
        j.problems.map((p) => [p.code, p.key]),
        [['KATA_ERR_CAPABILITY_MISSING', 'hypervisor.clh']],
      );
      assert.equal((await judgeConfig({ text: text.replace('= true', '= false') })).valid, true);
    });
  });

  describe('capabilities', () => {
    it('offers CPU and memory hot-plug but no block devices or sharing when both are off', async () => {
      const j = await judgeConfig({ text: toml() });
      assert.equal(j.valid, true);
      const names = capNames(j);
      for (const c of ['cpu-hotplug', 'memory-hotplug']) assert.ok(names.includes(c), c);
      for (const c of ['block-device', 'block-device-hotplug', 'virtio-blk', 'fs-sharing', 'fs-sharing:virtio-fs', 'nvdimm-image', 'multi-queue']) {
        assert.ok(!names.includes(c), c);
      }
      assert.ok(j.capabilities.filter((c) => c.name.includes('hotplug')).every((c) => c.by === 'clh'));
    });

    it('offers block devices with hot-plug as virtio-blk when block devices are enabled', async () => {
      const j = await judgeConfig({ text: toml('', 'shared_fs = "none"\ndisable_block_device_use = false') });
      assert.equal(j.valid, true);
      const names = capNames(j);
      for (const c of ['block-device', 'block-device-hotplug', 'virtio-blk']) assert.ok(names.includes(c), c);
      assert.equal(j.plan?.blockDriver, 'virtio-blk');
      assert.ok(j.plan?.rootfs.includes('block-hotplug'));
    });

    it('withholds block-device hot-plug with any driver but virtio-blk, giving Kata\'s reason', async () => {
      const j = await judgeConfig({ text: toml('block_device_driver = "virtio-scsi"', 'shared_fs = "none"\ndisable_block_device_use = false') });
      const names = capNames(j);
      assert.ok(names.includes('block-device'));
      assert.ok(!names.includes('block-device-hotplug'));
      assert.ok(!names.includes('virtio-blk'));
      assert.deepEqual(j.removedCapabilities, [{ name: 'block-device-hotplug', by: 'clh', why: hotplugDriverError('virtio-scsi') }]);
      // The block-rootfs plugin needs hot-plug, so the configuration is refused.
      assert.equal(j.valid, false);
      assert.ok(j.problems.some((p) => p.code === 'KATA_ERR_CAPABILITY_MISSING' && p.key === 'hypervisor.clh.block_device_driver'));
    });

    it('offers virtio-fs sharing for shared_fs = "virtio-fs"', async () => {
      const j = await judgeConfig({ text: toml('virtio_fs_daemon = "/usr/libexec/virtiofsd"', 'shared_fs = "virtio-fs"\ndisable_block_device_use = true') });
      assert.equal(j.valid, true);
      const names = capNames(j);
      assert.ok(names.includes('fs-sharing'));
      assert.ok(names.includes('fs-sharing:virtio-fs'));
      assert.equal(j.capabilities.find((c) => c.name === 'fs-sharing')?.by, 'clh');
    });
  });

  describe('validation', () => {
    it('vetoes virtio-9p', async () => {
      const j = await judgeConfig({ text: toml('', 'shared_fs = "virtio-9p"\ndisable_block_device_use = true') });
      assert.equal(j.valid, false);
      assert.deepEqual(
        j.problems.map((p) => ({ code: p.code, plugin: p.plugin, hook: p.hook, key: p.key, value: p.value })),
        [{ code: 'KATA_ERR_CONFIG_VALUE', plugin: 'clh', hook: 'validate', key: 'hypervisor.clh.shared_fs', value: 'virtio-9p' }],
      );
      assert.ok(j.problems[0]?.fix);
    });

    it('vetoes VFIO hot-plug and cold-plug set together', async () => {
      const j = await judgeConfig({ text: toml('hot_plug_vfio = "root-port"\ncold_plug_vfio = "root-port"') });
      assert.deepEqual(j.problems.map((p) => [p.code, p.plugin, p.key]), [['KATA_ERR_CONFIG_VALUE', 'clh', 'hypervisor.clh.cold_plug_vfio']]);
    });

    it('vetoes VFIO ports Cloud Hypervisor does not have', async () => {
      const j = await judgeConfig({ text: toml('hot_plug_vfio = "bridge-port"') });
      assert.deepEqual(j.problems.map((p) => [p.code, p.plugin, p.key, p.value]), [['KATA_ERR_CONFIG_VALUE', 'clh', 'hypervisor.clh.hot_plug_vfio', 'bridge-port']]);
    });

    it('accepts VFIO on a root port', async () => {
      const j = await judgeConfig({ text: toml('hot_plug_vfio = "root-port"') });
      assert.equal(j.valid, true);
    });

    it('warns that guest swap is not supported', async () => {
      const j = await judgeConfig({ text: toml('enable_guest_swap = true') });
      assert.equal(j.valid, true);
      assert.deepEqual(j.warnings.map((w) => [w.plugin, w.key]), [['clh', 'hypervisor.clh.enable_guest_swap']]);
    });
  });

  describe('plan', () => {
    it('launches the configured binary with Kata\'s API timeout', async () => {
      const { vm, plan } = await planOf(toml('path = "/opt/clh/cloud-hypervisor"'));
      assert.equal(vm.hypervisor, 'clh');
      assert.equal(vm.binary, '/opt/clh/cloud-hypervisor');
      assert.deepEqual(vm.args, []);
      assert.equal(vm.apiTimeoutMs, 1000);
      assert.equal(plan.blockDriver, null);
      assert.equal(plan.sharedFs, 'none');
    });

    it('passes verbosity with enable_debug and turns seccomp off on request', async () => {
      const { vm } = await planOf(toml('enable_debug = true\nhypervisor_loglevel = 2\ndisable_seccomp = true'));
      assert.deepEqual(vm.args, ['-vv', '--seccomp', 'false']);
    });

    it('renders launch as a copy of the vm.create body', async () => {
      const { vm } = await planOf(toml());
      assert.deepEqual(vm.launch, vm.vmConfig);
      assert.notEqual(vm.launch, vm.vmConfig);
    });

    it('boots the kernel from the image on a read-only raw virtio-blk disk', async () => {
      const { body } = await planOf(toml('kernel_params = "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1"'));
      assert.equal(body.payload.kernel, '/usr/share/kata-containers/vmlinux.container');
      assert.equal(body.payload.initramfs, undefined);
      assert.equal(
        body.payload.cmdline,
        'root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4 panic=1 no_timer_check noreplace-smp quiet cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1',
      );
      assert.deepEqual(body.disks, [{ path: IMAGE, readonly: true, image_type: 'Raw', id: IMAGE_DISK_ID }]);
      assert.equal(body.pmem, undefined);
    });

    it('mounts an erofs image read-only without ext4 flags', async () => {
      const { body } = await planOf(toml('rootfs_type = "erofs"'));
      assert.match(body.payload.cmdline ?? '', /^root=\/dev\/vda1 rootflags=ro rootfstype=erofs /);
    });

    it('boots an initrd without a disk or root parameters', async () => {
      const { body } = await planOf('[hypervisor.clh]\ninitrd = "/boot/kata-initrd.img"\nshared_fs = "none"\ndisable_block_device_use = true\n');
      assert.equal(body.payload.initramfs, '/boot/kata-initrd.img');
      assert.equal(body.disks, undefined);
      assert.doesNotMatch(body.payload.cmdline ?? '', /root=/);
    });

    it('rounds boot vCPUs up and takes max vCPUs from the host when default_maxvcpus is 0', async () => {
      const { body } = await planOf(toml('default_vcpus = 1.5'));
      assert.deepEqual(body.cpus, { boot_vcpus: 2, max_vcpus: Math.max(2, availableParallelism()) });
    });

    it('keeps max vCPUs at least at boot vCPUs', async () => {
      const { body } = await planOf(toml('default_vcpus = 3\ndefault_maxvcpus = 2'));
      assert.deepEqual(body.cpus, { boot_vcpus: 3, max_vcpus: 3 });
    });

    it('uses default_maxvcpus when set', async () => {
      const { body } = await planOf(toml('default_vcpus = 1\ndefault_maxvcpus = 4'));
      assert.deepEqual(body.cpus, { boot_vcpus: 1, max_vcpus: 4 });
    });

    it('sizes memory in bytes, unshared without a shared fs, and reserves no hot-plug without a maximum', async () => {
      const { body } = await planOf(toml('default_memory = 1024'));
      assert.deepEqual(body.memory, { size: 1024 * MIB, shared: false, hugepages: false });
    });

    it('reserves the difference up to default_maxmemory for memory hot-plug', async () => {
      const { body } = await planOf(toml('default_memory = 2048\ndefault_maxmemory = 8192'));
      assert.equal(body.memory?.hotplug_size, 6144 * MIB);
    });

    it('adds the entropy source, the vsock in the sandbox directory and quiet consoles', async () => {
      const { body } = await planOf(toml('entropy_source = "/dev/random"'));
      assert.deepEqual(body.rng, { src: '/dev/random' });
      assert.deepEqual(body.vsock, { cid: 3, socket: `${SANDBOX_DIR}/clh.vsock` });
      assert.deepEqual(body.serial, { mode: 'Off' });
      assert.deepEqual(body.console, { mode: 'Off' });
      assert.equal(body.iommu, false);
      assert.equal(body.balloon, undefined);
      assert.equal(body.platform, undefined);
      assert.equal(body.fs, undefined);
    });

    it('sends guest output to the serial port with enable_debug', async () => {
      const { body } = await planOf(toml('enable_debug = true'));
      assert.deepEqual(body.serial, { mode: 'Tty' });
      assert.deepEqual(body.console, { mode: 'Off' });
      assert.match(body.payload.cmdline ?? '', / console=(ttyS0|ttyAMA0),115200n8 systemd\.log_target=console$/);
    });

    it('puts every device behind the virtual IOMMU with enable_iommu', async () => {
      const { body } = await planOf(toml('enable_iommu = true'));
      assert.equal(body.iommu, true);
      for (const dev of [body.rng, body.console, body.vsock, body.disks?.[0]]) assert.equal(dev?.iommu, true);
      assert.match(body.payload.cmdline ?? '', / iommu=pt /);
    });

    it('adds a free-page-reporting balloon for reclaim_guest_freed_memory', async () => {
      const { body } = await planOf(toml('reclaim_guest_freed_memory = true'));
      assert.deepEqual(body.balloon, { size: 0, free_page_reporting: true });
    });

    it('notes that the image is never an NVDIMM', async () => {
      const { plan } = await planOf(toml('disable_image_nvdimm = false'));
      assert.ok(plan.notes.some((n) => n.by === 'clh' && n.level === 'info'));
    });
  });

  describe('buildVmConfig', () => {
    const cfg = (over: Record<string, unknown> = {}) =>
      ({
        hypervisor: {
          path: '/usr/bin/cloud-hypervisor',
          kernel: '/k',
          image: '/i',
          block_device_driver: 'virtio-blk',
          hypervisor_loglevel: 1,
          rootfs_type: 'ext4',
          kernel_params: '',
          default_vcpus: 2,
          default_maxvcpus: 0,
          default_memory: 512,
          default_maxmemory: 1024,
          shared_fs: 'none',
          enable_hugepages: false,
          enable_iommu: false,
          enable_debug: false,
          confidential_guest: false,
          reclaim_guest_freed_memory: false,
          entropy_source: '/dev/urandom',
          ...over,
        },
      }) as unknown as KataConfig;
    const host = { cpus: 16, arch: 'x64' };

    it('depends only on its arguments', () => {
      const a = buildVmConfig(cfg(), caps('cpu-hotplug', 'memory-hotplug'), host);
      assert.deepEqual(a.cpus, { boot_vcpus: 2, max_vcpus: 16 });
      assert.equal(a.memory?.hotplug_size, 512 * MIB);
      assert.deepEqual(buildVmConfig(cfg(), caps('cpu-hotplug', 'memory-hotplug'), host), a);
    });

    it('pins max vCPUs to boot vCPUs without cpu-hotplug', () => {
      assert.deepEqual(buildVmConfig(cfg(), caps(), host).cpus, { boot_vcpus: 2, max_vcpus: 2 });
    });

    it('reserves no hot-plug memory without memory-hotplug', () => {
      assert.equal(buildVmConfig(cfg(), caps('cpu-hotplug'), host).memory?.hotplug_size, undefined);
    });

    it('never boots fewer than one vCPU', () => {
      assert.equal(buildVmConfig(cfg({ default_vcpus: 0 }), caps(), host).cpus?.boot_vcpus, 1);
    });

    it('shares memory for a virtio-fs guest and for hugepages', () => {
      assert.equal(buildVmConfig(cfg({ shared_fs: 'virtio-fs' }), caps(), host).memory?.shared, true);
      assert.deepEqual(buildVmConfig(cfg({ enable_hugepages: true }), caps(), host).memory, { size: 512 * MIB, shared: true, hugepages: true });
    });

    it('uses the virtio console of a confidential guest for debug output', () => {
      const body = buildVmConfig(cfg({ confidential_guest: true, enable_debug: true }), caps(), host);
      assert.deepEqual([body.serial?.mode, body.console?.mode], ['Off', 'Tty']);
      assert.match(body.payload.cmdline ?? '', / console=hvc0 /);
    });

    it('adds no balloon when the capability was removed', () => {
      assert.equal(buildVmConfig(cfg({ reclaim_guest_freed_memory: true }), caps(), host).balloon, undefined);
    });
  });

  describe('renderVmConfig', () => {
    const cfg = (over: Record<string, unknown> = {}) =>
      ({
        hypervisor: {
          path: '/usr/bin/cloud-hypervisor', kernel: '/k', image: '/i', rootfs_type: 'ext4', kernel_params: '', hypervisor_loglevel: 1,
          default_vcpus: 2, default_maxvcpus: 4, default_memory: 512, default_maxmemory: 1024, shared_fs: 'none', enable_hugepages: false,
          enable_iommu: false, enable_debug: true, confidential_guest: false, reclaim_guest_freed_memory: true, entropy_source: '/dev/urandom', ...over,
        },
      }) as unknown as KataConfig;
    const host = { cpus: 16, arch: 'x64' };
    /** Where each intent kind lands in the vm.create body. */
    const RENDERED_AS: Record<(typeof CLH_DEVICE_KINDS)[number], (b: ClhVmConfig) => boolean> = {
      disk: (b) => b.disks?.some((d) => d.id === 'data' && d.path === '/srv/data.img' && d.readonly === false) === true,
      'vhost-user-fs': (b) => b.fs?.[0]?.tag === 'share' && b.fs[0].socket === '/run/fs.sock' && b.fs[0].queue_size === 256,
      'agent-channel': (b) => b.vsock?.socket === `${SANDBOX_DIR}/clh.vsock` && b.vsock.cid === 3,
      console: (b) => b.serial?.mode === 'Tty',
      rng: (b) => b.rng?.src === '/dev/urandom',
      balloon: (b) => (b.balloon as { free_page_reporting?: boolean } | undefined)?.free_page_reporting === true,
      net: (b) => b.net?.[0]?.tap === 'tap0_kata' && b.net[0].mac === '02:42:c0:00:02:02' && b.net[0].mtu === 1400,
    };

    it('renders every intent kind it declares it can render', () => {
      const vm = describeClhVm(cfg(), caps('balloon'), host);
      vm.devices.push(
        { kind: 'disk', id: 'data', path: '/srv/data.img', readonly: false },
        { kind: 'vhost-user-fs', socket: '/run/fs.sock', tag: 'share', queues: 1, queueSize: 256, cacheSizeMiB: 0 },
        { kind: 'net', id: 'net0', tap: 'tap0_kata', mac: '02:42:c0:00:02:02', mtu: 1400 },
      );
      const body = renderVmConfig(vm, cfg(), host);
      assert.deepEqual(Object.keys(RENDERED_AS).sort(), [...CLH_DEVICE_KINDS].sort());
      for (const kind of CLH_DEVICE_KINDS) assert.ok(RENDERED_AS[kind](body), `${kind}: ${JSON.stringify(body)}`);
    });

    it('renders the confidential intent as a TD booted through its firmware, with the longer API timeout', () => {
      const vm = describeClhVm(cfg(), caps(), host);
      vm.confidential = { tee: 'tdx', firmware: '/fw/td-shim.bin', accessPlatform: true };
      const spec = renderClhLaunchSpec(vm, cfg(), host);
      assert.equal(spec.vmConfig.platform?.tdx, true);
      assert.equal(spec.vmConfig.payload.firmware, '/fw/td-shim.bin');
      assert.equal(spec.apiTimeoutMs, 20_000);
      assert.deepEqual(spec.launch, spec.vmConfig);
    });
  });

  describe('with the device and TEE plugins', () => {
    it('leaves the virtio-fs device and shared memory to the virtiofs plugin', async () => {
      const { body, plan } = await planOf(toml('virtio_fs_daemon = "/usr/libexec/virtiofsd"', 'shared_fs = "virtio-fs"\ndisable_block_device_use = true'));
      assert.equal(plan.sharedFs, 'virtio-fs');
      assert.equal(body.memory?.shared, true);
      assert.equal(body.fs?.length, 1);
    });

    it('renders launch after the tdx plugin edited the body', async () => {
      const { body, vm } = await planOf(
        toml('confidential_guest = true\nfirmware = "/usr/share/td-shim/td-shim.bin"\ndefault_maxmemory = 4096\ndefault_maxvcpus = 8', 'shared_fs = "none"\ndisable_block_device_use = false'),
      );
      assert.equal(body.platform?.tdx, true);
      assert.equal(body.payload.firmware, '/usr/share/td-shim/td-shim.bin');
      assert.equal(body.cpus?.max_vcpus, body.cpus?.boot_vcpus);
      assert.equal(body.memory?.hotplug_size, undefined);
      assert.ok(vm.apiTimeoutMs > 1000);
    });
  });

  // The published spec when ../shared is there, and always the pinned subset the API simulator
  // falls back to without it: a body one accepts and the other refuses is a drift to fix.
  for (const [name, file] of [
    ['the published Cloud Hypervisor OpenAPI spec', referenceFile(CLH_OPENAPI)],
    ['the pinned subset of it (test/fixtures/clh-api-subset.json)', CLH_API_SUBSET],
  ] as const) {
    describe(`vm.create body against ${name}`, function () {
      let validate: OpenApiValidator;

      before(async function () {
        if (!file) this.skip();
        validate = await compileComponent(file, 'VmConfig', { closed: true });
      });

      const check = (body: unknown) => assert.ok(validate(body), validate.messages().join('\n'));

      it('accepts the body of a minimal configuration', async () => {
        check((await planOf(toml())).body);
      });

      it('accepts the body with debug, IOMMU, hot-plug memory and a balloon', async () => {
        check((await planOf(toml('enable_debug = true\nenable_iommu = true\ndefault_maxmemory = 4096\nreclaim_guest_freed_memory = true\nenable_hugepages = true'))).body);
      });

      it('accepts the body of an initrd guest', async () => {
        check((await planOf('[hypervisor.clh]\ninitrd = "/boot/kata-initrd.img"\nshared_fs = "none"\ndisable_block_device_use = true\n')).body);
      });

      it('accepts the body with a virtio-fs share', async () => {
        check((await planOf(toml('virtio_fs_daemon = "/usr/libexec/virtiofsd"', 'shared_fs = "virtio-fs"\ndisable_block_device_use = false'))).body);
      });

      it('accepts the body of a TDX guest', async () => {
        check((await planOf(toml('confidential_guest = true\nfirmware = "/usr/share/td-shim/td-shim.bin"', 'shared_fs = "none"\ndisable_block_device_use = false'))).body);
      });

      it('accepts net entries for the interfaces of a pod network, with IOMMU', async () => {
        const planned = (await planOf(toml('enable_iommu = true'))).body;
        const body = { ...planned, net: renderClhNets([{ kind: 'net', id: 'net0', tap: 'tap0_kata', mac: '02:42:c0:00:02:02', mtu: 1500 }, { kind: 'net', id: 'net1', tap: 'tap1_kata', mac: '02:42:c0:00:02:03', mtu: 9000 }], true) };
        check(body);
        assert.equal(validate({ ...body, net: [{ tap: 'tap0_kata', mac: '02:42:c0:00:02:02', mtus: 1500 }] }), false);
      });

      it('refuses a body with a misspelt field', () => {
        assert.equal(validate({ payload: { kernel: '/k' }, memory: { size: 1, hotplug_sz: 2 } }), false);
        assert.equal(validate({ payload: { kernel: '/k' }, cpus: { boot_vcpus: 0, max_vcpus: 1 } }), false);
      });
    });
  }
});
