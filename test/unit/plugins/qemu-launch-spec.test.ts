import assert from 'node:assert/strict';
import { loadValidatedConfig } from '../../../core/runtime.js';
import type { ReadonlyCapabilities } from '../../../core/capabilities.js';
import type { KataConfig } from '../../../core/config/types.js';
import type { KataError } from '../../../core/errors.js';
import { renderQemuArgv } from '../../../plugins/qemu/argv.js';
import { buildQemuLaunchSpec, describeQemuVm, hotplugPortIds, parseMachineAccelerators, QEMU_DEVICE_KINDS, renderQemuLaunchSpec } from '../../../plugins/qemu/launch-spec.js';

const HOST = { cpus: 4, memoryMiB: 8192 };
const ALL = ['cpu-hotplug', 'memory-hotplug', 'nvdimm-image', 'block-device', 'block-device-hotplug', 'virtio-blk'];

function caps(...names: string[]): ReadonlyCapabilities {
  return { has: (n) => names.includes(n), list: () => names };
}

async function configOf(extra = ''): Promise<KataConfig> {
  const text = `[hypervisor.qemu]\nkernel = "/k"\nshared_fs = "none"\ndisable_block_device_use = true\n${extra}\n`;
  return (await loadValidatedConfig({ text: extra.includes('image =') ? text : `${text}initrd = "/i"\n` })).config;
}

describe('buildQemuLaunchSpec', () => {
  it('depends only on its arguments', async () => {
    const cfg = await configOf('image = "/img"');
    assert.deepEqual(buildQemuLaunchSpec(cfg, caps(...ALL), HOST), buildQemuLaunchSpec(cfg, caps(...ALL), HOST));
  });

  it('takes the host CPU count as the maximum when default_maxvcpus is 0', async () => {
    assert.deepEqual(buildQemuLaunchSpec(await configOf('default_vcpus = 2'), caps(...ALL), HOST).spec.smp, { cpus: 2, maxcpus: 4 });
  });

  it('pins the maximum to the boot vCPUs without cpu-hotplug', async () => {
    assert.deepEqual(buildQemuLaunchSpec(await configOf('default_vcpus = 2\ndefault_maxvcpus = 8'), caps(), HOST).spec.smp, { cpus: 2, maxcpus: 2 });
  });

  it('caps vCPUs at 240 and says so', async () => {
    const { spec, notes } = buildQemuLaunchSpec(await configOf('default_maxvcpus = 1000'), caps(...ALL), HOST);
    assert.equal(spec.smp.maxcpus, 240);
    assert.equal(notes.length, 1);
  });

  it('takes the host memory as the maximum when default_maxmemory is 0, with Kata\'s 10 slots for memory_slots = 0', async () => {
    const { spec } = buildQemuLaunchSpec(await configOf('default_memory = 1024\nmemory_slots = 0'), caps('memory-hotplug'), HOST);
    assert.deepEqual(spec.memory, { sizeMiB: 1024, slots: 10, maxMiB: 8192, shared: false });
  });

  it('reserves no hot-plug memory without memory-hotplug', async () => {
    const { spec } = buildQemuLaunchSpec(await configOf('default_maxmemory = 4096'), caps(), HOST);
    assert.deepEqual(spec.memory, { sizeMiB: 2048, slots: 0, maxMiB: 2048, shared: false });
  });

  it('reserves 1 GiB plus memory_offset above the maximum for an NVDIMM image, even without memory hot-plug', async () => {
    const { spec } = buildQemuLaunchSpec(await configOf('image = "/img"\nmemory_offset = 512'), caps('nvdimm-image'), HOST);
    assert.deepEqual(spec.memory, { sizeMiB: 2048, slots: 10, maxMiB: 2048 + 1024 + 512, shared: false });
  });

  it('uses Kata\'s 2048 MiB for less than 256 MiB of memory, with a warning', async () => {
    const { spec, notes } = buildQemuLaunchSpec(await configOf('default_memory = 128'), caps(), HOST);
    assert.equal(spec.memory.sizeMiB, 2048);
    assert.deepEqual(notes.map((n) => n.level), ['warn']);
  });

  it('mounts xfs and erofs images read-only without ext4 flags', async () => {
    const xfs = buildQemuLaunchSpec(await configOf('image = "/img"\nrootfs_type = "xfs"'), caps('nvdimm-image'), HOST).spec.append;
    assert.ok(xfs.includes('root=/dev/pmem0p1 rootflags=dax ro rootfstype=xfs'));
    const erofs = buildQemuLaunchSpec(await configOf('image = "/img"\nrootfs_type = "erofs"'), caps(), HOST).spec.append;
    assert.ok(erofs.includes('root=/dev/vda1 ro rootfstype=erofs'));
    assert.ok(!erofs.includes('rootflags'));
  });

  it('passes firmware as the BIOS and enable_iommu_platform as virtioIommuPlatform', async () => {
    const { spec } = buildQemuLaunchSpec(await configOf('firmware = "/fw.fd"\nenable_iommu_platform = true'), caps(), HOST);
    assert.equal(spec.bios, '/fw.fd');
    assert.equal(spec.virtioIommuPlatform, true);
  });

  it('adds no virtio-fs device and no TDX settings of its own', async () => {
    const { spec } = buildQemuLaunchSpec(await configOf(), caps(...ALL, 'fs-sharing', 'fs-sharing:virtio-fs'), HOST);
    assert.ok(!spec.devices.some((d) => d.type === 'vhost-user-fs-pci'));
    assert.equal(spec.memory.shared, false);
    assert.deepEqual(spec.machine.options, {});
    assert.equal(spec.bios, undefined);
  });
});

describe('renderQemuLaunchSpec', () => {
  /** The QEMU device each intent kind becomes. */
  const RENDERED_AS: Record<(typeof QEMU_DEVICE_KINDS)[number], string> = {
    disk: 'virtio-blk-pci',
    'vhost-user-fs': 'vhost-user-fs-pci',
    '9p': 'virtio-9p-pci',
    'agent-channel': 'virtserialport',
    console: 'isa-serial',
    rng: 'virtio-rng-pci',
    'scsi-controller': 'virtio-scsi-pci',
    net: 'virtio-net-pci',
    'debug-console': 'virtserialport',
    balloon: 'virtio-balloon-pci',
  };

  it('renders a device for every intent kind it declares it can render', async () => {
    const cfg = await configOf();
    const { vm } = describeQemuVm(cfg, caps(), HOST);
    vm.devices.push(
      { kind: 'disk', id: 'data', path: '/srv/data.img', readonly: false },
      { kind: 'vhost-user-fs', socket: '/run/fs.sock', tag: 'share', queues: 1, queueSize: 256, cacheSizeMiB: 0 },
      { kind: '9p', path: '/srv/shared', tag: 'nine' },
      { kind: 'scsi-controller', id: 'scsi0' },
      { kind: 'net', id: 'net0', tap: 'tap0_kata', mac: '02:42:c0:00:02:02', mtu: 1500 },
      { kind: 'balloon', freePageReporting: false },
    );
    const spec = renderQemuLaunchSpec(vm, cfg, caps());
    assert.deepEqual(Object.keys(RENDERED_AS).sort(), [...QEMU_DEVICE_KINDS].sort());
    for (const kind of QEMU_DEVICE_KINDS) assert.ok(spec.devices.some((d) => d.type === RENDERED_AS[kind]), kind);
    assert.deepEqual(spec.devices.find((d) => d.id === 'data')?.props, { drive: 'data-node' });
    assert.ok(spec.extraArgs.includes('driver=raw,node-name=data-node,file.driver=file,file.filename=/srv/data.img'));
    assert.deepEqual(spec.devices.find((d) => d.type === 'virtio-9p-pci')?.props, { fsdev: 'fs-kataShared', mount_tag: 'nine' });
  });

  it('renders the debug console as a second virtio-serial port and tells the agent on the kernel command line, only when enabled', async () => {
    const on = await configOf('image = "/img"\n[agent.kata]\ndebug_console_enabled = true');
    const argv = renderQemuArgv(buildQemuLaunchSpec(on, caps(), HOST).spec, { accelerator: 'tcg' });
    assert.ok(argv.includes('socket,id=debug-console,path={sandbox_dir}/debug-console.sock,server=on,wait=off'), argv.join(' '));
    assert.ok(argv.includes('virtserialport,id=debug-console-port,bus=virtio-serial0.0,chardev=debug-console,name=debug.console.0'), argv.join(' '));
    assert.equal(argv.filter((a) => a.startsWith('virtio-serial-pci')).length, 1);
    assert.match(argv[argv.indexOf('-append') + 1] as string, /(^| )agent\.debug_console( |$)/);
    const off = renderQemuArgv(buildQemuLaunchSpec(await configOf(), caps(), HOST).spec, { accelerator: 'tcg' });
    assert.ok(!off.some((a) => a.includes('debug')), off.join(' '));
  });

  it('sizes the TCG translation buffer with tcg_tb_size under TCG only, and leaves QEMU\'s default for 0', async () => {
    const accel = (argv: string[]) => argv[argv.indexOf('-accel') + 1];
    const small = buildQemuLaunchSpec(await configOf('tcg_tb_size = 48'), caps(), HOST).spec;
    assert.equal(accel(renderQemuArgv(small, { accelerator: 'tcg' })), 'tcg,tb-size=48');
    assert.equal(accel(renderQemuArgv(small, { accelerator: 'kvm' })), 'kvm');
    const unset = buildQemuLaunchSpec(await configOf(), caps(), HOST).spec;
    assert.equal(accel(renderQemuArgv(unset, { accelerator: 'tcg' })), 'tcg');
  });

  it('adds a free-page-reporting virtio-balloon for reclaim_guest_freed_memory when the balloon capability is there', async () => {
    const on = await configOf('reclaim_guest_freed_memory = true');
    const argv = renderQemuArgv(buildQemuLaunchSpec(on, caps('balloon'), HOST).spec, { accelerator: 'tcg' });
    assert.ok(argv.includes('virtio-balloon-pci,id=balloon0,free-page-reporting=on'), argv.join(' '));
    // tdx removes the capability (a TD's private memory never goes back to the host).
    assert.ok(!buildQemuLaunchSpec(on, caps(), HOST).spec.devices.some((d) => d.type === 'virtio-balloon-pci'));
    assert.ok(!buildQemuLaunchSpec(await configOf(), caps('balloon'), HOST).spec.devices.some((d) => d.type === 'virtio-balloon-pci'));
  });

  it('turns the guest\'s swiotlb off (swiotlb=noforce), except for a confidential guest or a swiotlb= the user gave', async () => {
    const words = (spec: { append: string }) => spec.append.split(' ');
    const cfg = await configOf();
    assert.ok(words(buildQemuLaunchSpec(cfg, caps(), HOST).spec).includes('swiotlb=noforce'));
    const own = buildQemuLaunchSpec(await configOf('kernel_params = "swiotlb=4096"'), caps(), HOST).spec;
    assert.deepEqual(words(own).filter((w) => w.startsWith('swiotlb')), ['swiotlb=4096']);
    const { vm } = describeQemuVm(cfg, caps(), HOST);
    vm.confidential = { tee: 'tdx', firmware: '/fw/tdvf.fd', accessPlatform: true };
    assert.ok(!words(renderQemuLaunchSpec(vm, cfg, caps())).some((w) => w.startsWith('swiotlb')));
  });

  it('renders a net intent as a tap netdev without scripts and a virtio-net-pci device with its MAC and MTU', async () => {
    const cfg = await configOf();
    const { vm } = describeQemuVm(cfg, caps(), HOST);
    vm.devices.push({ kind: 'net', id: 'net0', tap: 'tap0_kata', mac: '02:42:c0:00:02:02', mtu: 1400 });
    const argv = renderQemuArgv(renderQemuLaunchSpec(vm, cfg, caps()), { accelerator: 'tcg' });
    const netdev = argv.indexOf('-netdev');
    assert.equal(argv[netdev + 1], 'tap,id=net0-tap,ifname=tap0_kata,script=no,downscript=no');
    assert.ok(argv.includes('virtio-net-pci,id=net0,netdev=net0-tap,mac=02:42:c0:00:02:02,host_mtu=1400'), argv.join(' '));
  });

  it('gives a net device iommu_platform=on under the confidential intent', async () => {
    const cfg = await configOf();
    const { vm } = describeQemuVm(cfg, caps(), HOST);
    vm.confidential = { tee: 'tdx', firmware: '/fw/tdvf.fd', accessPlatform: true };
    vm.devices.push({ kind: 'net', id: 'net0', tap: 'tap0_kata', mac: '02:42:c0:00:02:02', mtu: 1500 });
    const argv = renderQemuArgv(renderQemuLaunchSpec(vm, cfg, caps()), { accelerator: 'kvm' });
    assert.ok(argv.some((a) => a.startsWith('virtio-net-pci,') && a.includes('iommu_platform=on') && a.includes('disable-legacy=on')), argv.join(' '));
  });

  it('refuses a net intent whose tap name could be read as an option', async () => {
    const cfg = await configOf();
    const { vm } = describeQemuVm(cfg, caps(), HOST);
    vm.devices.push({ kind: 'net', id: 'net0', tap: 'x,script=/tmp/evil', mac: '02:42:c0:00:02:02', mtu: 1500 });
    assert.throws(() => renderQemuLaunchSpec(vm, cfg, caps()), (e: KataError) => e.code === 'KATA_ERR_INTERNAL');
  });

  it('gives a vhost-user-fs share shared guest RAM when the intent asks for it', async () => {
    const cfg = await configOf();
    const { vm } = describeQemuVm(cfg, caps(), HOST);
    vm.memory.shared = true;
    vm.devices.push({ kind: 'vhost-user-fs', socket: '/run/fs.sock', tag: 'share', queues: 1, queueSize: 256, cacheSizeMiB: 0 });
    const argv = renderQemuArgv(renderQemuLaunchSpec(vm, cfg, caps()), { accelerator: 'kvm' });
    assert.ok(argv.includes('memory-backend-memfd,id=guest-ram,size=2048M,share=on'), argv.join(' '));
  });

  it('renders the confidential intent as a TDX guest on KVM with access-platform on every device', async () => {
    const cfg = await configOf();
    const { vm } = describeQemuVm(cfg, caps(), HOST);
    vm.confidential = { tee: 'tdx', firmware: '/fw/tdvf.fd', accessPlatform: true };
    const spec = renderQemuLaunchSpec(vm, cfg, caps());
    assert.equal(spec.accelerator, 'kvm');
    assert.deepEqual(spec.machine.options, { 'confidential-guest-support': 'tdx', 'kernel-irqchip': 'split' });
    assert.ok(spec.objects.some((o) => o.type === 'tdx-guest'));
    assert.equal(spec.bios, '/fw/tdvf.fd');
    assert.equal(spec.virtioIommuPlatform, true);
  });
});

describe('parseMachineAccelerators', () => {
  it('reads key=value, bare name (on) and noname (off) as QEMU does', () => {
    assert.deepEqual(parseMachineAccelerators('nosmm, smbus=off ,pit,,usb=on'), { smm: false, smbus: 'off', pit: true, usb: 'on' });
    assert.deepEqual(parseMachineAccelerators(''), {});
  });
});

describe('hotplugPortIds', () => {
  it('names the ports rp0 … in order', () => {
    assert.deepEqual(hotplugPortIds(3), ['rp0', 'rp1', 'rp2']);
    assert.deepEqual(hotplugPortIds(0), []);
  });
});
