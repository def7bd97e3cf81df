import assert from 'node:assert/strict';
import { KataError } from '../../../core/errors.js';
import { SANDBOX_DIR } from '../../../core/plan.js';
import type { QemuLaunchSpec, QemuOption } from '../../../plugins/qemu/launch-spec.js';
import {
  effectiveDevice,
  escapeOptionValue,
  formatQemuOption,
  isVirtioPciDriver,
  renderQemuArgv,
  substituteTokens,
} from '../../../plugins/qemu/argv.js';
import { IMAGE_SIZE } from '../../../plugins/qemu/config.js';

/** A hand-built spec with what the tdx and virtiofs plugins add: objects, firmware, IOMMU platform, shared memory. */
function handBuilt(): QemuLaunchSpec {
  return {
    hypervisor: 'qemu',
    binary: '/usr/bin/qemu-system-x86_64',
    machine: { type: 'q35', options: { 'confidential-guest-support': 'tdx', 'kernel-irqchip': 'split', accel: 'kvm' } },
    accelerator: 'kvm',
    cpu: { model: 'host', features: 'pmu=off' },
    smp: { cpus: 2, maxcpus: 2 },
    memory: { sizeMiB: 2048, slots: 0, maxMiB: 2048, shared: true },
    kernel: '/k',
    append: 'console=ttyS0',
    bios: '/usr/share/ovmf/OVMF.inteltdx.fd',
    objects: [{ type: 'tdx-guest', id: 'tdx', props: { 'quote-generation-socket.type': 'vsock', 'quote-generation-socket.cid': '2', debug: false } }],
    chardevs: [{ type: 'socket', id: 'vfsd', props: { path: `${SANDBOX_DIR}/virtiofsd.sock` } }],
    devices: [
      { type: 'virtio-serial-pci', id: 'vs0', props: {} },
      { type: 'virtserialport', id: 'port0', props: { bus: 'vs0.0', name: 'agent.channel.0' } },
      { type: 'vhost-user-fs-pci', id: 'fs0', props: { chardev: 'vfsd', tag: 'kataShared', 'queue-size': 1024 } },
      { type: 'virtio-blk-pci', id: 'disk0', props: { drive: 'image' } },
      { type: 'virtio-rng-pci', id: 'rng0', props: { 'disable-legacy': false } },
      { type: 'isa-serial', id: 'serial0', props: { chardev: 'console' } },
    ],
    fsdevs: [],
    hotplugPorts: ['rp0', 'rp1'],
    virtioIommuPlatform: true,
    extraArgs: ['-mon', 'chardev=qmp,mode=control'],
  };
}

const valuesOf = (argv: readonly string[], flag: string) => argv.flatMap((a, i) => (a === flag ? [argv[i + 1] as string] : []));

describe('renderQemuArgv', () => {
  it('puts the binary first and extraArgs last', () => {
    const argv = renderQemuArgv(handBuilt(), { accelerator: 'kvm' });
    assert.equal(argv[0], '/usr/bin/qemu-system-x86_64');
    assert.deepEqual(argv.slice(-2), ['-mon', 'chardev=qmp,mode=control']);
  });

  it('renders machine options but takes the accelerator only from its argument', () => {
    const argv = renderQemuArgv(handBuilt(), { accelerator: 'tcg' });
    assert.deepEqual(valuesOf(argv, '-machine'), ['q35,confidential-guest-support=tdx,kernel-irqchip=split,memory-backend=guest-ram']);
    assert.deepEqual(valuesOf(argv, '-accel'), ['tcg']);
  });

  it('runs TCG in one thread when vCPUs may be hot-plugged (QEMU 7.2 aborts plugging one into a full MTTCG buffer), and never says so to KVM', () => {
    const pluggable = { ...handBuilt(), smp: { cpus: 1, maxcpus: 4 }, tcgTbSizeMiB: 40 };
    assert.deepEqual(valuesOf(renderQemuArgv(pluggable, { accelerator: 'tcg' }), '-accel'), ['tcg,tb-size=40,thread=single']);
    assert.deepEqual(valuesOf(renderQemuArgv(pluggable, { accelerator: 'kvm' }), '-accel'), ['kvm']);
    assert.deepEqual(valuesOf(renderQemuArgv({ ...pluggable, smp: { cpus: 2, maxcpus: 2 } }, { accelerator: 'tcg' }), '-accel'), ['tcg,tb-size=40']);
  });

  it('backs shared memory with a shareable memfd covering all of -m', () => {
    const argv = renderQemuArgv(handBuilt(), { accelerator: 'kvm' });
    assert.equal(valuesOf(argv, '-object')[0], 'memory-backend-memfd,id=guest-ram,size=2048M,share=on');
    assert.deepEqual(valuesOf(argv, '-m'), ['2048M']);
  });

  it('renders objects as given, booleans as on/off and dotted keys as they are', () => {
    const argv = renderQemuArgv(handBuilt(), { accelerator: 'kvm' });
    assert.ok(valuesOf(argv, '-object').includes('tdx-guest,id=tdx,quote-generation-socket.type=vsock,quote-generation-socket.cid=2,debug=off'));
  });

  it('passes the firmware with -bios', () => {
    assert.deepEqual(valuesOf(renderQemuArgv(handBuilt(), { accelerator: 'kvm' }), '-bios'), ['/usr/share/ovmf/OVMF.inteltdx.fd']);
  });

  it('sets iommu_platform and disable-legacy on every virtio-pci device only, keeping explicit values', () => {
    const devices = valuesOf(renderQemuArgv(handBuilt(), { accelerator: 'kvm' }), '-device');
    assert.ok(devices.includes('virtio-serial-pci,id=vs0,iommu_platform=on,disable-legacy=on'));
    assert.ok(devices.includes('vhost-user-fs-pci,id=fs0,iommu_platform=on,disable-legacy=on,chardev=vfsd,tag=kataShared,queue-size=1024'));
    assert.ok(devices.includes('virtio-blk-pci,id=disk0,iommu_platform=on,disable-legacy=on,drive=image'));
    assert.ok(devices.includes('virtio-rng-pci,id=rng0,iommu_platform=on,disable-legacy=off'));
    assert.ok(devices.includes('virtserialport,id=port0,bus=vs0.0,name=agent.channel.0'));
    assert.ok(devices.includes('isa-serial,id=serial0,chardev=console'));
  });

  it('leaves virtio devices alone without virtioIommuPlatform', () => {
    const spec = { ...handBuilt(), virtioIommuPlatform: false };
    const devices = valuesOf(renderQemuArgv(spec, { accelerator: 'kvm' }), '-device');
    assert.ok(devices.every((d) => !d.includes('iommu_platform')));
  });

  it('renders the hot-plug ports first, in order, at fixed addresses with unique slots and no I/O window', () => {
    const devices = valuesOf(renderQemuArgv(handBuilt(), { accelerator: 'kvm' }), '-device');
    assert.deepEqual(devices.slice(0, 2), [
      'pcie-root-port,id=rp0,bus=pcie.0,addr=0x1,chassis=1,slot=1,io-reserve=0',
      'pcie-root-port,id=rp1,bus=pcie.0,addr=0x2,chassis=1,slot=2,io-reserve=0',
    ]);
  });

  it('uses the host CPU under KVM and max under TCG, keeping a named model', () => {
    assert.deepEqual(valuesOf(renderQemuArgv(handBuilt(), { accelerator: 'kvm' }), '-cpu'), ['host,pmu=off']);
    assert.deepEqual(valuesOf(renderQemuArgv(handBuilt(), { accelerator: 'tcg' }), '-cpu'), ['max,pmu=off']);
    const named = { ...handBuilt(), cpu: { model: 'Skylake-Server', features: '' } };
    assert.deepEqual(valuesOf(renderQemuArgv(named, { accelerator: 'tcg' }), '-cpu'), ['Skylake-Server']);
  });

  it('renders hot-pluggable memory with slots and maxmem, and vCPUs with their maximum', () => {
    const spec = { ...handBuilt(), memory: { sizeMiB: 512, slots: 4, maxMiB: 8192, shared: false }, smp: { cpus: 1, maxcpus: 4 } };
    const argv = renderQemuArgv(spec, { accelerator: 'kvm' });
    assert.deepEqual(valuesOf(argv, '-m'), ['size=512M,slots=4,maxmem=8192M']);
    assert.deepEqual(valuesOf(argv, '-smp'), ['cpus=1,maxcpus=4']);
    assert.ok(!valuesOf(argv, '-machine')[0]?.includes('memory-backend'));
  });

  it('renders -append only with a kernel, and -initrd after -kernel', () => {
    const withInitrd = renderQemuArgv({ ...handBuilt(), initrd: '/i' }, { accelerator: 'kvm' });
    assert.ok(withInitrd.indexOf('-initrd') > withInitrd.indexOf('-kernel'));
    const noKernel = { ...handBuilt(), kernel: undefined, initrd: '/i' };
    const argv = renderQemuArgv(noKernel, { accelerator: 'kvm' });
    for (const flag of ['-kernel', '-initrd', '-append']) assert.ok(!argv.includes(flag), flag);
  });

  it('doubles commas inside values', () => {
    assert.equal(escapeOptionValue('/a,b/c'), '/a,,b/c');
    assert.equal(formatQemuOption({ type: 'local', id: 'fs', props: { path: '/run/x,y' } }), 'local,id=fs,path=/run/x,,y');
  });

  it('refuses ids and names QEMU would misparse', () => {
    const bad: QemuOption[] = [
      { type: 'virtio-blk-pci', id: '0disk', props: {} },
      { type: 'virtio-blk-pci,x=1', props: {} },
      { type: 'virtio-blk-pci', props: { 'a=b': 1 } },
      { type: 'virtio-blk-pci', props: { id: 'x' } },
      { type: 'virtio-blk-pci', props: { size: Number.NaN } },
    ];
    for (const o of bad) assert.throws(() => formatQemuOption(o), (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_INTERNAL', JSON.stringify(o));
  });

  it('does not change the spec it renders', () => {
    const spec = handBuilt();
    const copy = structuredClone(spec);
    renderQemuArgv(spec, { accelerator: 'tcg' });
    assert.deepEqual(spec, copy);
  });
});

describe('isVirtioPciDriver', () => {
  it('recognises virtio and vhost PCI devices only', () => {
    for (const d of ['virtio-blk-pci', 'virtio-serial-pci', 'vhost-user-fs-pci', 'virtio-9p-pci', 'virtio-rng-pci', 'vhost-vsock-pci', 'virtio-net-pci-non-transitional']) {
      assert.ok(isVirtioPciDriver(d), d);
    }
    for (const d of ['virtserialport', 'pcie-root-port', 'nvdimm', 'isa-serial', 'virtio-blk-device', 'scsi-hd']) assert.ok(!isVirtioPciDriver(d), d);
  });
});

describe('effectiveDevice', () => {
  it('gives a hot-plugged virtio device the same IOMMU platform setting as cold-plugged ones', () => {
    const disk = { type: 'virtio-blk-pci', id: 'virtio-drive0', props: { drive: 'drive0', bus: 'rp0' } };
    assert.deepEqual(effectiveDevice(disk, { virtioIommuPlatform: true }).props, { iommu_platform: true, 'disable-legacy': true, drive: 'drive0', bus: 'rp0' });
    assert.equal(effectiveDevice(disk, { virtioIommuPlatform: false }), disk);
  });
});

describe('substituteTokens', () => {
  const withImage = (): QemuLaunchSpec => ({
    ...handBuilt(),
    objects: [{ type: 'memory-backend-file', id: 'image-mem', props: { 'mem-path': '/img', size: IMAGE_SIZE, readonly: true } }],
    fsdevs: [{ type: 'local', id: 'fs', props: { path: `${SANDBOX_DIR}/shared`, security_model: 'none' } }],
    launch: ['stale'],
  });

  it('replaces the sandbox directory everywhere and the image size by a number', () => {
    const spec = substituteTokens(withImage(), { sandboxDir: '/run/kata/sb1', imageSizeBytes: 134217728 });
    assert.equal(spec.chardevs[0]?.props.path, '/run/kata/sb1/virtiofsd.sock');
    assert.equal(spec.fsdevs[0]?.props.path, '/run/kata/sb1/shared');
    assert.equal(spec.objects[0]?.props.size, 134217728);
    assert.equal(spec.launch, undefined);
  });

  it('escapes a substituted directory with a comma when rendered', () => {
    const argv = renderQemuArgv(substituteTokens(withImage(), { sandboxDir: '/run/a,b', imageSizeBytes: 1 }), { accelerator: 'kvm' });
    assert.ok(valuesOf(argv, '-fsdev').includes('local,id=fs,path=/run/a,,b/shared,security_model=none'));
  });

  it('leaves the original spec untouched', () => {
    const original = withImage();
    const copy = structuredClone(original);
    substituteTokens(original, { sandboxDir: '/x', imageSizeBytes: 1 });
    assert.deepEqual(original, copy);
  });

  it('refuses a spec that needs the image size when none is given', () => {
    assert.throws(() => substituteTokens(withImage(), { sandboxDir: '/x' }), (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_INTERNAL');
    assert.doesNotThrow(() => substituteTokens(handBuilt(), { sandboxDir: '/x' }));
  });
});
