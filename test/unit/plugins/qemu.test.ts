import assert from 'node:assert/strict';
import { judgeConfig, loadValidatedConfig, type Judgement } from '../../../core/runtime.js';
import { SANDBOX_DIR, type SandboxPlan } from '../../../core/plan.js';
import { isQemuSpec, type QemuLaunchSpec } from '../../../plugins/qemu/launch-spec.js';
import qemu from '../../../plugins/qemu/index.js';
import { IMAGE_SIZE } from '../../../plugins/qemu/config.js';

type TomlValue = string | number | boolean | string[] | undefined;

/**
 * A `[hypervisor.qemu]` section: an initrd guest without shared fs or block devices (so only the
 * qemu plugin loads), with `keys` overriding or (as undefined) removing keys.
 */
function toml(keys: Record<string, TomlValue> = {}): string {
  const all: Record<string, TomlValue> = { kernel: '/k', initrd: '/i', shared_fs: 'none', disable_block_device_use: true, ...keys };
  const lines = Object.entries(all)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k} = ${JSON.stringify(v)}`);
  // A TD is sized at boot: the tdx plugin vetoes anything else.
  const runtime = all.confidential_guest === true ? '[runtime]\nstatic_sandbox_resource_mgmt = true\n' : '';
  return `[hypervisor.qemu]\n${lines.join('\n')}\n${runtime}`;
}

const IMAGE = { initrd: undefined, image: '/usr/share/kata-containers/kata-containers.img' };
const BLOCK = { disable_block_device_use: false, block_device_driver: 'virtio-blk' };

async function planOf(keys: Record<string, TomlValue> = {}): Promise<{ plan: SandboxPlan; vm: QemuLaunchSpec; argv: string[] }> {
  const { plan } = await loadValidatedConfig({ text: toml(keys) });
  assert.ok(isQemuSpec(plan.vm.native), 'plan.vm.native is a QEMU launch spec');
  assert.ok(plan.vm.native.launch, 'plan.vm.launch is rendered');
  assert.equal(plan.vm.launch, plan.vm.native.launch);
  return { plan, vm: plan.vm.native, argv: plan.vm.native.launch };
}

const capNames = (j: Judgement) => j.capabilities.map((c) => c.name);

/** Values following every occurrence of `flag`. */
function valuesOf(argv: readonly string[], flag: string): string[] {
  return argv.flatMap((a, i) => (a === flag ? [argv[i + 1] as string] : []));
}

interface ParsedOption {
  type: string;
  props: Record<string, string>;
}

/** Splits a QEMU option value on single commas (`,,` is a literal comma). */
function parseOption(value: string): ParsedOption {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < value.length; i++) {
    if (value[i] === ',' && value[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (value[i] === ',') {
      parts.push(cur);
      cur = '';
    } else cur += value[i];
  }
  parts.push(cur);
  const [type = '', ...rest] = parts;
  const props: Record<string, string> = {};
  for (const p of rest) {
    const eq = p.indexOf('=');
    props[eq < 0 ? p : p.slice(0, eq)] = eq < 0 ? '' : p.slice(eq + 1);
  }
  return { type, props };
}

const optionsOf = (argv: readonly string[], flag: string) => valuesOf(argv, flag).map(parseOption);
const devicesOf = (argv: readonly string[], type: string) => optionsOf(argv, '-device').filter((d) => d.type === type);

function only<T>(items: readonly T[], what: string): T {
  assert.equal(items.length, 1, `exactly one ${what}`);
  return items[0] as T;
}

describe('qemu plugin', () => {
  describe('manifest', () => {
    it('serves [hypervisor.qemu] and virtio-9p with its own schema', () => {
      assert.equal(qemu.manifest.name, 'qemu');
      assert.equal(qemu.manifest.version, '1.0.0');
      assert.equal(qemu.manifest.runtime, '^1.0.0');
      assert.deepEqual(qemu.manifest.provides, ['hypervisor', 'hypervisor:qemu', 'shared-fs:virtio-9p']);
      assert.deepEqual(qemu.manifest.config, { table: 'hypervisor.qemu', schema: 'qemu.schema.json' });
    });
  });

  describe('schema', () => {
    it('fills in the QEMU defaults', async () => {
      const { config } = await loadValidatedConfig({ text: toml({ kernel: undefined }) });
      const hv = config.hypervisor;
      assert.equal(hv.path, '/usr/bin/qemu-system-x86_64');
      assert.equal(hv.kernel, '/usr/share/kata-containers/vmlinuz.container');
      assert.equal(hv.machine_type, 'q35');
      assert.equal(hv.block_device_driver, 'virtio-scsi');
      assert.equal(hv.accelerator, 'auto');
      assert.equal(hv.hotplug_root_ports, 8);
    });

    it('rejects an accelerator other than auto, kvm and tcg', async () => {
      const j = await judgeConfig({ text: toml({ accelerator: 'hvf' }) });
      assert.equal(j.valid, false);
      assert.ok(j.problems.some((p) => p.code === 'KATA_ERR_CONFIG_SCHEMA' && p.key === 'hypervisor.qemu.accelerator' && p.plugin === 'qemu'));
    });

    it('rejects more hot-plug root ports than pcie.0 can spare', async () => {
      const j = await judgeConfig({ text: toml({ hotplug_root_ports: 17 }) });
      assert.ok(j.problems.some((p) => p.code === 'KATA_ERR_CONFIG_SCHEMA' && p.key === 'hypervisor.qemu.hotplug_root_ports'));
    });

    it('knows its own keys, so none of them is reported unknown', async () => {
      const j = await judgeConfig({ text: toml({ accelerator: 'tcg', hotplug_root_ports: 2 }) });
      assert.deepEqual(j.unknownKeys, []);
    });
  });

  describe('capabilities', () => {
    it('always offers multi-queue, CPU and memory hot-plug and a balloon, all as qemu', async () => {
      const j = await judgeConfig({ text: toml() });
      assert.equal(j.valid, true);
      for (const c of ['multi-queue', 'cpu-hotplug', 'memory-hotplug', 'balloon']) {
        assert.equal(j.capabilities.find((r) => r.name === c)?.by, 'qemu', c);
      }
    });

    it('offers no block device when disable_block_device_use is true', async () => {
      const names = capNames(await judgeConfig({ text: toml() }));
      for (const c of ['block-device', 'block-device-hotplug', 'virtio-blk']) assert.ok(!names.includes(c), c);
    });

    it('offers virtio-scsi block-device hot-plug with Kata\'s default block_device_driver, without needing root ports', async () => {
      for (const ports of [undefined, 0]) {
        const j = await judgeConfig({ text: toml({ disable_block_device_use: false, hotplug_root_ports: ports }) });
        assert.equal(j.valid, true, JSON.stringify(j.problems));
        const names = capNames(j);
        for (const c of ['block-device', 'block-device-hotplug', 'virtio-scsi']) assert.ok(names.includes(c), c);
        assert.ok(!names.includes('virtio-blk'));
        assert.equal(j.capabilities.find((r) => r.name === 'block-device-hotplug')?.by, 'qemu');
        assert.ok(!j.warnings.some((w) => w.key === 'hypervisor.qemu.block_device_driver'), JSON.stringify(j.warnings));
      }
    });

    it('offers block devices but no hot-plug for nvdimm, and refuses the block rootfs naming the drivers that work', async () => {
      const j = await judgeConfig({ text: toml({ disable_block_device_use: false, block_device_driver: 'nvdimm' }) });
      const names = capNames(j);
      assert.ok(names.includes('block-device'));
      for (const c of ['block-device-hotplug', 'virtio-blk', 'virtio-scsi']) assert.ok(!names.includes(c), c);
      assert.ok(j.warnings.some((w) => w.plugin === 'qemu' && w.key === 'hypervisor.qemu.block_device_driver'));
      const p = j.problems.find((x) => x.code === 'KATA_ERR_CAPABILITY_MISSING');
      assert.deepEqual([p?.plugin, p?.key], ['devmapper', 'hypervisor.qemu.block_device_driver']);
      assert.match(p?.fix ?? '', /"virtio-scsi"/);
    });

    it('offers virtio-blk block-device hot-plug on q35', async () => {
      const j = await judgeConfig({ text: toml(BLOCK) });
      assert.equal(j.valid, true);
      const names = capNames(j);
      for (const c of ['block-device', 'block-device-hotplug', 'virtio-blk']) assert.ok(names.includes(c), c);
      assert.equal(j.capabilities.find((r) => r.name === 'block-device-hotplug')?.by, 'qemu');
    });

    it('offers no hot-plug without reserved root ports', async () => {
      const names = capNames(await judgeConfig({ text: toml({ ...BLOCK, hotplug_root_ports: 0 }) }));
      assert.ok(names.includes('virtio-blk'));
      assert.ok(!names.includes('block-device-hotplug'));
    });

    it('offers no hot-plug on another machine type', async () => {
      const names = capNames(await judgeConfig({ text: toml({ ...BLOCK, machine_type: 'microvm' }) }));
      assert.ok(!names.includes('block-device-hotplug'));
    });

    it('offers virtio-9p sharing for shared_fs = "virtio-9p" and no sharing for "none"', async () => {
      const ninep = capNames(await judgeConfig({ text: toml({ shared_fs: 'virtio-9p' }) }));
      assert.ok(ninep.includes('fs-sharing') && ninep.includes('fs-sharing:virtio-9p'));
      assert.ok(!ninep.includes('fs-sharing:virtio-fs'));
      const none = capNames(await judgeConfig({ text: toml() }));
      for (const c of ['fs-sharing', 'fs-sharing:virtio-9p', 'fs-sharing:virtio-fs']) assert.ok(!none.includes(c), c);
    });

    it('offers an NVDIMM image unless disable_image_nvdimm is true', async () => {
      assert.ok(capNames(await judgeConfig({ text: toml() })).includes('nvdimm-image'));
      assert.ok(!capNames(await judgeConfig({ text: toml({ disable_image_nvdimm: true }) })).includes('nvdimm-image'));
    });
  });

  describe('validation', () => {
    const problemsOf = async (keys: Record<string, TomlValue>) => (await judgeConfig({ text: toml(keys) })).problems;

    it('vetoes a machine type it cannot drive', async () => {
      for (const machine of ['pc', 'microvm']) {
        const p = only(await problemsOf({ machine_type: machine }), 'problem');
        assert.deepEqual([p.code, p.plugin, p.key, p.value], ['KATA_ERR_CONFIG_VALUE', 'qemu', 'hypervisor.qemu.machine_type', machine]);
      }
    });

    it('vetoes a virtio-9p msize above 8 MiB', async () => {
      const p = only(await problemsOf({ shared_fs: 'virtio-9p', msize_9p: 16 * 1024 * 1024 }), 'problem');
      assert.deepEqual([p.code, p.plugin, p.key], ['KATA_ERR_CONFIG_VALUE', 'qemu', 'hypervisor.qemu.msize_9p']);
      assert.deepEqual(await problemsOf({ shared_fs: 'none', msize_9p: 16 * 1024 * 1024 }), []);
      assert.deepEqual(await problemsOf({ shared_fs: 'virtio-9p', msize_9p: 512 * 1024 }), []);
    });

    it('accepts virtio-9p without any daemon, loading no other shared-fs plugin', async () => {
      const j = await judgeConfig({ text: toml({ shared_fs: 'virtio-9p', virtio_fs_daemon: undefined }) });
      assert.equal(j.valid, true);
      assert.deepEqual(j.plugins.map((p) => p.name), ['qemu', 'network']);
    });

    it('vetoes block drivers a q35 machine has no bus for, when block devices are used', async () => {
      for (const driver of ['virtio-mmio', 'virtio-blk-ccw']) {
        const j = await judgeConfig({ text: toml({ disable_block_device_use: false, block_device_driver: driver }) });
        const p = j.problems.find((x) => x.code === 'KATA_ERR_CONFIG_VALUE' && x.plugin === 'qemu' && x.key === 'hypervisor.qemu.block_device_driver');
        assert.ok(p, driver);
        assert.equal(p.value, driver);
        assert.match(p.fix, /"virtio-scsi" or "virtio-blk"/, driver);
      }
      assert.deepEqual(await problemsOf({ block_device_driver: 'virtio-mmio' }), []);
    });

    it('vetoes an accelerator given in machine_accelerators', async () => {
      const p = only(await problemsOf({ machine_accelerators: 'nosmm,accel=tcg' }), 'problem');
      assert.deepEqual([p.code, p.key], ['KATA_ERR_CONFIG_VALUE', 'hypervisor.qemu.machine_accelerators']);
    });

    it('vetoes VFIO hot-plug and cold-plug set together', async () => {
      const p = only(await problemsOf({ hot_plug_vfio: 'root-port', cold_plug_vfio: 'root-port' }), 'problem');
      assert.deepEqual([p.code, p.key], ['KATA_ERR_CONFIG_VALUE', 'hypervisor.qemu.cold_plug_vfio']);
    });

    it('vetoes a sector size that is not 0 or a power of 2 from 512 to 65536', async () => {
      const p = only(await problemsOf({ block_device_logical_sector_size: 1000 }), 'problem');
      assert.deepEqual([p.code, p.key, p.value], ['KATA_ERR_CONFIG_VALUE', 'hypervisor.qemu.block_device_logical_sector_size', 1000]);
      assert.equal((await problemsOf({ block_device_physical_sector_size: 131072 }))[0]?.key, 'hypervisor.qemu.block_device_physical_sector_size');
      assert.deepEqual(await problemsOf({ block_device_logical_sector_size: 512, block_device_physical_sector_size: 4096 }), []);
    });

    it('gives every veto a reason and a fix', async () => {
      const problems = await problemsOf({ machine_type: 'pc', machine_accelerators: 'accel=kvm', hot_plug_vfio: 'root-port', cold_plug_vfio: 'bridge-port' });
      assert.equal(problems.length, 3);
      for (const p of problems) assert.ok(p.reason.length > 0 && p.fix.length > 0, p.key);
    });
  });

  describe('plan', () => {
    it('plans a scsi-controller intent for virtio-scsi block devices, rendered as one virtio-scsi-pci the hot-plug goes onto', async () => {
      const { plan, vm, argv } = await planOf({ disable_block_device_use: false, block_device_driver: 'virtio-scsi' });
      assert.deepEqual(plan.vm.devices.filter((d) => d.kind === 'scsi-controller'), [{ kind: 'scsi-controller', id: 'scsi0' }]);
      assert.equal(plan.blockDriver, 'virtio-scsi');
      assert.deepEqual(plan.rootfs, ['block-hotplug']);
      assert.equal(vm.scsiController, 'scsi0');
      assert.deepEqual(valuesOf(argv, '-device').filter((d) => d.startsWith('virtio-scsi-pci')), ['virtio-scsi-pci,id=scsi0']);
      // Root ports serve virtio-blk hot-plug only.
      assert.deepEqual(vm.hotplugPorts, []);
      assert.ok(!argv.some((a) => a.startsWith('pcie-root-port')));
    });

    it('plans no SCSI controller for virtio-blk, nor when block devices are off', async () => {
      for (const keys of [BLOCK, {}]) {
        const { plan, vm, argv } = await planOf(keys);
        assert.ok(!plan.vm.devices.some((d) => d.kind === 'scsi-controller'));
        assert.equal(vm.scsiController, undefined);
        assert.ok(!argv.some((a) => a.startsWith('virtio-scsi-pci')));
      }
    });

    it('gives the SCSI controller iommu_platform when every virtio device must offer it', async () => {
      const { argv } = await planOf({ disable_block_device_use: false, block_device_driver: 'virtio-scsi', enable_iommu_platform: true });
      assert.deepEqual(valuesOf(argv, '-device').filter((d) => d.startsWith('virtio-scsi-pci')), ['virtio-scsi-pci,id=scsi0,iommu_platform=on,disable-legacy=on']);
    });

    it('launches the configured binary on q35 with no defaults and no display', async () => {
      const { argv, vm } = await planOf({ path: '/opt/qemu/bin/qemu-system-x86_64' });
      assert.equal(argv[0], '/opt/qemu/bin/qemu-system-x86_64');
      assert.equal(vm.binary, '/opt/qemu/bin/qemu-system-x86_64');
      assert.deepEqual(valuesOf(argv, '-machine'), ['q35']);
      for (const flag of ['-nodefaults', '-no-user-config', '-no-reboot']) assert.ok(argv.includes(flag), flag);
      assert.deepEqual(valuesOf(argv, '-display'), ['none']);
    });

    it('renders auto as KVM in the plan and notes that the choice is made at start', async () => {
      const { argv, vm, plan } = await planOf({ cpu_features: 'pmu=off' });
      assert.equal(vm.accelerator, 'auto');
      assert.deepEqual(valuesOf(argv, '-accel'), ['kvm']);
      assert.deepEqual(valuesOf(argv, '-cpu'), ['host,pmu=off']);
      assert.ok(plan.notes.some((n) => n.by === 'qemu' && n.level === 'info' && n.message.includes('auto')));
    });

    it('renders an explicit TCG accelerator with the max CPU model', async () => {
      const { argv, plan } = await planOf({ accelerator: 'tcg', cpu_features: 'pmu=off' });
      // vCPUs may be hot-plugged (maxcpus above cpus): one TCG thread (argv.ts says why).
      assert.deepEqual(valuesOf(argv, '-smp'), ['cpus=1,maxcpus=2']);
      assert.deepEqual(valuesOf(argv, '-accel'), ['tcg,thread=single']);
      assert.deepEqual(valuesOf(argv, '-cpu'), ['max,pmu=off']);
      assert.ok(!plan.notes.some((n) => n.by === 'qemu' && n.message.includes('auto')));
    });

    it('turns machine_accelerators into machine options', async () => {
      const { argv, vm } = await planOf({ machine_accelerators: 'nosmm,smbus=off,pit' });
      assert.deepEqual(vm.machine.options, { smm: false, smbus: 'off', pit: true });
      assert.deepEqual(valuesOf(argv, '-machine'), ['q35,smm=off,smbus=off,pit=on']);
    });

    it('rounds boot vCPUs up and keeps the maximum at least at boot vCPUs', async () => {
      assert.deepEqual((await planOf({ default_vcpus: 1.5, default_maxvcpus: 4 })).vm.smp, { cpus: 2, maxcpus: 4 });
      assert.deepEqual((await planOf({ default_vcpus: 3, default_maxvcpus: 2 })).vm.smp, { cpus: 3, maxcpus: 3 });
      const { argv } = await planOf({ default_vcpus: 0, default_maxvcpus: 4 });
      assert.deepEqual(valuesOf(argv, '-smp'), ['cpus=1,maxcpus=4']);
    });

    it('sizes memory with hot-plug slots up to default_maxmemory, unshared', async () => {
      const { argv, vm } = await planOf({ default_memory: 1024, default_maxmemory: 4096, memory_slots: 4 });
      assert.deepEqual(vm.memory, { sizeMiB: 1024, slots: 4, maxMiB: 4096, shared: false });
      assert.deepEqual(valuesOf(argv, '-m'), ['size=1024M,slots=4,maxmem=4096M']);
      assert.ok(!optionsOf(argv, '-machine')[0]?.props['memory-backend']);
      assert.ok(!optionsOf(argv, '-object').some((o) => o.type.startsWith('memory-backend')));
    });

    it('reserves the pcie-root-ports for block hot-plug, rp0 first, each on its own slot', async () => {
      const { argv, vm, plan } = await planOf(BLOCK);
      const ids = ['rp0', 'rp1', 'rp2', 'rp3', 'rp4', 'rp5', 'rp6', 'rp7'];
      assert.deepEqual(vm.hotplugPorts, ids);
      const ports = devicesOf(argv, 'pcie-root-port');
      assert.deepEqual(ports.map((p) => p.props.id), ids);
      assert.deepEqual(ports.map((p) => p.props.slot), ['1', '2', '3', '4', '5', '6', '7', '8']);
      assert.ok(ports.every((p) => p.props.bus === 'pcie.0' && p.props.chassis === '1'));
      // The ports come before every other device, so they take the first free slots of pcie.0.
      assert.equal(parseOption(valuesOf(argv, '-device')[0] as string).type, 'pcie-root-port');
      assert.equal(plan.blockDriver, 'virtio-blk');
    });

    it('reserves as many ports as hotplug_root_ports, and none without block hot-plug', async () => {
      assert.deepEqual((await planOf({ ...BLOCK, hotplug_root_ports: 3 })).vm.hotplugPorts, ['rp0', 'rp1', 'rp2']);
      const { argv, vm, plan } = await planOf();
      assert.deepEqual(vm.hotplugPorts, []);
      assert.deepEqual(devicesOf(argv, 'pcie-root-port'), []);
      assert.equal(plan.blockDriver, null);
    });

    it('connects the agent over a virtio-serial port named agent.channel.0 in the sandbox directory', async () => {
      const { argv } = await planOf();
      const serial = only(devicesOf(argv, 'virtio-serial-pci'), 'virtio-serial-pci');
      const chardev = only(optionsOf(argv, '-chardev').filter((c) => c.props.id === 'agent'), 'agent chardev');
      assert.deepEqual(chardev, { type: 'socket', props: { id: 'agent', path: `${SANDBOX_DIR}/agent.sock`, server: 'on', wait: 'off' } });
      const port = only(devicesOf(argv, 'virtserialport'), 'virtserialport');
      assert.equal(port.props.chardev, 'agent');
      assert.equal(port.props.name, 'agent.channel.0');
      assert.equal(port.props.bus, `${serial.props.id}.0`);
    });

    it('serves QMP on a socket in the sandbox directory', async () => {
      const { argv } = await planOf();
      const qmp = only(optionsOf(argv, '-chardev').filter((c) => c.props.id === 'qmp'), 'qmp chardev');
      assert.deepEqual(qmp.props, { id: 'qmp', path: `${SANDBOX_DIR}/qmp.sock`, server: 'on', wait: 'off' });
      assert.deepEqual(valuesOf(argv, '-mon'), ['chardev=qmp,mode=control']);
    });

    it('puts the guest console on the serial port and logs it in the sandbox directory', async () => {
      const { argv, vm } = await planOf();
      const console = only(optionsOf(argv, '-chardev').filter((c) => c.props.id === 'console'), 'console chardev');
      assert.equal(console.props.logfile, `${SANDBOX_DIR}/console.log`);
      assert.equal(only(devicesOf(argv, 'isa-serial'), 'isa-serial').props.chardev, 'console');
      assert.ok(vm.append.split(' ').includes('console=ttyS0'));
    });

    it('starts the kernel with Kata\'s base parameters, then kernel_params last', async () => {
      const { argv } = await planOf({ kernel_params: 'cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1' });
      const append = only(valuesOf(argv, '-append'), '-append').split(' ');
      for (const p of ['console=ttyS0', 'panic=1', 'no_timer_check', 'reboot=k', 'quiet']) assert.ok(append.includes(p), p);
      assert.deepEqual(append.slice(-2), ['cgroup_no_v1=all', 'systemd.unified_cgroup_hierarchy=1']);
      assert.ok(!append.includes('debug'));
      assert.ok((await planOf({ enable_debug: true })).vm.append.split(' ').includes('debug'));
    });

    it('boots an initrd without root parameters or an image device', async () => {
      const { argv, vm } = await planOf();
      assert.deepEqual(valuesOf(argv, '-kernel'), ['/k']);
      assert.deepEqual(valuesOf(argv, '-initrd'), ['/i']);
      assert.ok(!vm.append.includes('root='));
      assert.deepEqual(devicesOf(argv, 'nvdimm'), []);
      assert.deepEqual(devicesOf(argv, 'virtio-blk-pci'), []);
      assert.deepEqual(valuesOf(argv, '-blockdev'), []);
    });

    it('attaches the image as a read-only NVDIMM whose size the driver fills in', async () => {
      const { argv, vm } = await planOf(IMAGE);
      assert.deepEqual(valuesOf(argv, '-initrd'), []);
      const mem = only(optionsOf(argv, '-object').filter((o) => o.type === 'memory-backend-file'), 'image memory backend');
      assert.equal(mem.props['mem-path'], IMAGE.image);
      assert.equal(mem.props.size, IMAGE_SIZE);
      assert.equal(mem.props.readonly, 'on');
      // Shared: a VM template's x-ignore-shared migration leaves it out of the stream.
      assert.equal(mem.props.share, 'on');
      assert.equal(only(devicesOf(argv, 'nvdimm'), 'nvdimm').props.memdev, mem.props.id);
      assert.equal(optionsOf(argv, '-machine')[0]?.props.nvdimm, 'on');
      assert.ok(vm.memory.maxMiB >= vm.memory.sizeMiB + 1024, 'room for the NVDIMM above the RAM');
      assert.ok(vm.append.includes('root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4'));
      assert.deepEqual(devicesOf(argv, 'virtio-blk-pci'), []);
    });

    it('attaches the image as a read-only virtio-blk disk with disable_image_nvdimm', async () => {
      const { argv, vm } = await planOf({ ...IMAGE, disable_image_nvdimm: true });
      const node = parseOption(only(valuesOf(argv, '-blockdev'), '-blockdev'));
      assert.equal(node.props['read-only'], 'on');
      assert.equal(node.props['file.filename'], IMAGE.image);
      assert.equal(only(devicesOf(argv, 'virtio-blk-pci'), 'virtio-blk-pci').props.drive, node.props['node-name']);
      assert.ok(vm.append.includes('root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4'));
      assert.deepEqual(devicesOf(argv, 'nvdimm'), []);
      assert.equal(optionsOf(argv, '-machine')[0]?.props.nvdimm, undefined);
    });

    it('shares the sandbox directory over virtio-9p with the kataShared tag', async () => {
      const { argv, plan } = await planOf({ shared_fs: 'virtio-9p' });
      const fsdev = only(optionsOf(argv, '-fsdev'), '-fsdev');
      assert.equal(fsdev.type, 'local');
      assert.equal(fsdev.props.path, `${SANDBOX_DIR}/shared`);
      assert.equal(fsdev.props.security_model, 'none');
      const dev = only(devicesOf(argv, 'virtio-9p-pci'), 'virtio-9p-pci');
      assert.equal(dev.props.fsdev, fsdev.props.id);
      assert.equal(dev.props.mount_tag, 'kataShared');
      assert.equal(plan.sharedFs, 'virtio-9p');
      assert.deepEqual(plan.rootfs, ['shared-fs']);
    });

    it('shares nothing with shared_fs = "none"', async () => {
      const { argv, plan } = await planOf();
      assert.deepEqual(valuesOf(argv, '-fsdev'), []);
      assert.equal(plan.sharedFs, 'none');
      assert.deepEqual(plan.rootfs, []);
    });

    it('adds an RNG device fed by entropy_source, and none when it is empty', async () => {
      const { argv } = await planOf({ entropy_source: '/dev/random' });
      const rng = only(optionsOf(argv, '-object').filter((o) => o.type === 'rng-random'), 'rng object');
      assert.equal(rng.props.filename, '/dev/random');
      assert.equal(only(devicesOf(argv, 'virtio-rng-pci'), 'virtio-rng-pci').props.rng, rng.props.id);
      assert.deepEqual(devicesOf((await planOf({ entropy_source: '' })).argv, 'virtio-rng-pci'), []);
    });

    it('sets iommu_platform on virtio devices with enable_iommu_platform', async () => {
      const { argv } = await planOf({ enable_iommu_platform: true, shared_fs: 'virtio-9p' });
      for (const type of ['virtio-serial-pci', 'virtio-rng-pci', 'virtio-9p-pci']) {
        assert.equal(only(devicesOf(argv, type), type).props.iommu_platform, 'on', type);
      }
      assert.equal(only(devicesOf(argv, 'virtserialport'), 'virtserialport').props.iommu_platform, undefined);
    });
  });

  // These load the virtiofs, devmapper and tdx plugins next to qemu.
  describe('with the device and TEE plugins', () => {
    it('renders the virtio-fs device and a shared memory backend that virtiofs asked for', async () => {
      const { argv, plan } = await planOf({ ...BLOCK, shared_fs: 'virtio-fs', virtio_fs_daemon: '/usr/libexec/virtiofsd' });
      assert.equal(plan.sharedFs, 'virtio-fs');
      assert.deepEqual(plan.rootfs, ['block-hotplug', 'shared-fs']);
      only(devicesOf(argv, 'vhost-user-fs-pci'), 'vhost-user-fs-pci');
      const backend = only(optionsOf(argv, '-object').filter((o) => o.type === 'memory-backend-memfd'), 'memfd backend');
      assert.equal(backend.props.share, 'on');
      assert.equal(backend.props.size, '2048M');
      assert.equal(optionsOf(argv, '-machine')[0]?.props['memory-backend'], backend.props.id);
      assert.equal(devicesOf(argv, 'pcie-root-port').length, 8);
    });

    it('renders the TDX settings the tdx plugin made', async () => {
      const { argv, vm } = await planOf({
        ...BLOCK,
        ...IMAGE,
        confidential_guest: true,
        firmware: '/usr/share/ovmf/OVMF.inteltdx.fd',
      });
      assert.deepEqual(valuesOf(argv, '-accel'), ['kvm']);
      assert.deepEqual(valuesOf(argv, '-bios'), ['/usr/share/ovmf/OVMF.inteltdx.fd']);
      const machine = optionsOf(argv, '-machine')[0];
      assert.equal(machine?.props['confidential-guest-support'], 'tdx');
      assert.equal(machine?.props['kernel-irqchip'], 'split');
      assert.ok(optionsOf(argv, '-object').some((o) => o.type === 'tdx-guest'));
      // No NVDIMM in a TD: the image is a virtio-blk disk, and like every virtio device it offers ACCESS_PLATFORM.
      assert.deepEqual(devicesOf(argv, 'nvdimm'), []);
      const virtio = optionsOf(argv, '-device').filter((d) => /^(virtio|vhost)-.*-pci$/.test(d.type));
      assert.ok(virtio.some((d) => d.type === 'virtio-blk-pci'));
      assert.ok(virtio.every((d) => d.props.iommu_platform === 'on' && d.props['disable-legacy'] === 'on'));
      assert.deepEqual(valuesOf(argv, '-m'), [`${vm.memory.sizeMiB}M`]);
      assert.deepEqual(vm.hotplugPorts.length, 8);
    });
  });
});
