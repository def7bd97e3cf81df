/**
 * Renders a QemuLaunchSpec to a `qemu-system-x86_64` argv. Pure: no I/O, no host probing; the
 * accelerator is an argument because `auto` is only resolved when the VM starts.
 *
 * The driver reuses this module: it substitutes the run directory (and the image size) into the
 * *spec* with {@link substituteTokens}, then renders. Substituting into the spec rather than into
 * the argv matters: option values are comma-separated, so a path is escaped when it is rendered
 * (`,` becomes `,,`), which a string replace on the finished argv would skip.
 */
import { KataError, SANDBOX_DIR } from '../../core/plugin-api.js';
import type { QemuLaunchSpec, QemuOption, QemuPropValue } from './launch-spec.js';
import { IMAGE_SIZE, QEMU_IDS } from './config.js';

export interface RenderOptions {
  /** The accelerator actually used: `auto` must be resolved by the caller. */
  readonly accelerator: 'kvm' | 'tcg';
}

/** QEMU splits option values on `,`; a literal comma is written twice. */
export function escapeOptionValue(value: string): string {
  return value.replaceAll(',', ',,');
}

export function formatPropValue(value: QemuPropValue): string {
  if (typeof value === 'boolean') return value ? 'on' : 'off';
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw new KataError('KATA_ERR_INTERNAL', `QEMU option value ${value} is not a finite number`);
    return String(value);
  }
  return escapeOptionValue(value);
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;
// QEMU's id_wellformed(): a letter first, then letters, digits, '-', '.', '_'.
const ID = /^[A-Za-z][A-Za-z0-9_.-]*$/;

/** `type[,id=ID][,key=value…]`, the common shape of -object, -device, -chardev and -fsdev. */
export function formatQemuOption(option: QemuOption): string {
  if (!NAME.test(option.type)) throw badOption(option, `type "${option.type}" is not a QEMU driver or backend name`);
  const parts = [option.type];
  if (option.id !== undefined) {
    if (!ID.test(option.id)) throw badOption(option, `id "${option.id}" is not a valid QEMU id (a letter, then letters, digits, '-', '.', '_')`);
    parts.push(`id=${option.id}`);
  }
  for (const [key, value] of Object.entries(option.props)) {
    if (key === 'id') throw badOption(option, 'the id goes in the id field, not in props');
    if (!NAME.test(key)) throw badOption(option, `property "${key}" is not a QEMU property name`);
    parts.push(`${key}=${formatPropValue(value)}`);
  }
  return parts.join(',');
}

function badOption(option: QemuOption, why: string): KataError {
  return new KataError('KATA_ERR_INTERNAL', `QEMU option ${option.type}${option.id ? ` (${option.id})` : ''}: ${why}`);
}

/** virtio devices on the PCI bus (virtio-blk-pci, vhost-user-fs-pci, virtio-9p-pci, …). */
export function isVirtioPciDriver(driver: string): boolean {
  return /^(virtio|vhost)-[a-z0-9-]*-pci(-non-transitional)?$/.test(driver);
}

/**
 * A device as it must be given to QEMU under this spec, for cold-plugged and hot-plugged devices
 * alike (the driver calls this before device_add). With `virtioIommuPlatform` every virtio-pci
 * device gets `iommu_platform=on`, and `disable-legacy=on` with it, because QEMU refuses
 * VIRTIO_F_IOMMU_PLATFORM on a transitional device (the default on pcie.0).
 */
export function effectiveDevice(device: QemuOption, spec: Pick<QemuLaunchSpec, 'virtioIommuPlatform'>): QemuOption {
  if (!spec.virtioIommuPlatform || !isVirtioPciDriver(device.type)) return device;
  return { ...device, props: { iommu_platform: true, 'disable-legacy': true, ...device.props } };
}

/** The pcie-root-port for hot-plug port number `index` (0-based), with the given id. */
/**
 * The pcie.0 slot of hot-plug port `index`: port i sits at 00:(i+1).0 (slot 0 is the q35 host
 * bridge). The address is given explicitly, so the guest PCI paths handed to the agent do not
 * depend on the order devices are rendered in; the integration tests check it with `query-pci`.
 */
export function hotplugPortSlot(index: number): number {
  return index + 1;
}

export function hotplugPortDevice(id: string, index: number): QemuOption {
  // One chassis, slot = the PCI slot: (chassis, slot) pairs must be unique, and distinct slot
  // numbers keep the guest's pciehp slot names distinct. No I/O window: a virtio device behind
  // a PCIe port is modern-only and needs none, and I/O space runs out after a dozen ports.
  const slot = hotplugPortSlot(index);
  return { type: 'pcie-root-port', id, props: { bus: 'pcie.0', addr: `0x${slot.toString(16)}`, chassis: 1, slot, 'io-reserve': 0 } };
}

/**
 * The argv, binary first. Layout: global switches, machine and accelerator, CPU/SMP/memory,
 * objects, firmware and kernel, chardevs, fsdevs, hot-plug ports, devices, then extraArgs.
 */
export function renderQemuArgv(spec: QemuLaunchSpec, opts: RenderOptions): string[] {
  const argv: string[] = [spec.binary];
  // No user config files, no default devices (NIC, VGA, serial, parallel, monitor), no window;
  // a guest reboot ends QEMU (panic=1 makes a panicking guest reboot, hence exit).
  argv.push('-no-user-config', '-nodefaults', '-display', 'none', '-no-reboot');

  const machineOptions: Record<string, QemuPropValue> = {};
  for (const [k, v] of Object.entries(spec.machine.options)) if (k !== 'accel') machineOptions[k] = v;
  const objects: QemuOption[] = [];
  if (spec.memory.file) {
    // VM templating: the RAM is the template's file (see template.ts).
    objects.push({ type: 'memory-backend-file', id: QEMU_IDS.ramBackend, props: { size: `${spec.memory.sizeMiB}M`, 'mem-path': spec.memory.file.path, share: spec.memory.file.share } });
    machineOptions['memory-backend'] = QEMU_IDS.ramBackend;
  } else if (spec.memory.shared) {
    // Guest RAM every vhost-user daemon (virtiofsd) can map: a shareable memfd backend covering
    // all of -m, attached as the machine's RAM.
    objects.push({ type: 'memory-backend-memfd', id: QEMU_IDS.ramBackend, props: { size: `${spec.memory.sizeMiB}M`, share: true } });
    machineOptions['memory-backend'] = QEMU_IDS.ramBackend;
  }
  argv.push('-machine', formatQemuOption({ type: spec.machine.type, props: machineOptions }));
  // The translation buffer only exists under TCG; QEMU's default (1 GiB) fills up as the guest runs
  // new code and is never given back, so a small guest is better served by a small one.
  const tb = spec.tcgTbSizeMiB ?? 0;
  const tcg: string[] = ['tcg'];
  if (tb > 0) tcg.push(`tb-size=${tb}`);
  // Multi-threaded TCG gives each vCPU thread its own regions of that buffer, handed out in turn
  // and all given back only when it is flushed; a vCPU hot-plugged while every region is taken
  // aborts QEMU 7.2 (tcg/region.c: tcg_region_initial_alloc__locked: assertion failed). That
  // happened in about half the hot-plugs with a 40 MiB buffer. One TCG thread for all vCPUs has
  // one context and nothing to hand out: where vCPUs may be hot-plugged, that is what QEMU gets.
  if (spec.smp.maxcpus > spec.smp.cpus) tcg.push('thread=single');
  argv.push('-accel', opts.accelerator === 'tcg' ? tcg.join(',') : opts.accelerator);

  // `-cpu host` needs KVM; `max` is TCG's "everything it can emulate".
  const model = spec.cpu.model === 'host' && opts.accelerator === 'tcg' ? 'max' : spec.cpu.model;
  argv.push('-cpu', spec.cpu.features ? `${model},${spec.cpu.features}` : model);
  argv.push('-smp', `cpus=${spec.smp.cpus},maxcpus=${Math.max(spec.smp.maxcpus, spec.smp.cpus)}`);
  const m = spec.memory;
  argv.push('-m', m.maxMiB > m.sizeMiB ? `size=${m.sizeMiB}M,slots=${m.slots},maxmem=${m.maxMiB}M` : `${m.sizeMiB}M`);

  for (const o of [...objects, ...spec.objects]) argv.push('-object', formatQemuOption(o));
  if (spec.bios) argv.push('-bios', spec.bios);
  if (spec.kernel) {
    argv.push('-kernel', spec.kernel);
    if (spec.initrd) argv.push('-initrd', spec.initrd);
    if (spec.append) argv.push('-append', spec.append);
  }
  for (const c of spec.chardevs) argv.push('-chardev', formatQemuOption(c));
  for (const f of spec.fsdevs) argv.push('-fsdev', formatQemuOption(f));
  // Ports first, so that they take the first free slots of pcie.0 (00:01.0 …) whatever else the
  // configuration adds: a hot-plugged disk's guest PCI path is then `<port slot>/00`.
  spec.hotplugPorts.forEach((id, i) => argv.push('-device', formatQemuOption(hotplugPortDevice(id, i))));
  for (const d of spec.devices) argv.push('-device', formatQemuOption(effectiveDevice(d, spec)));
  argv.push(...spec.extraArgs);
  return argv;
}

export interface TokenValues {
  /** Replaces {@link SANDBOX_DIR}. */
  readonly sandboxDir: string;
  /** Replaces {@link IMAGE_SIZE} (bytes), when the spec uses it. */
  readonly imageSizeBytes?: number;
}

/**
 * A copy of `spec` with the plan's tokens replaced, ready for {@link renderQemuArgv}. A property
 * that is exactly the image-size token becomes a number. `launch` is dropped: it was rendered
 * from the unsubstituted spec.
 */
export function substituteTokens(spec: QemuLaunchSpec, values: TokenValues): QemuLaunchSpec {
  const replace = (s: string): string | number => {
    if (s === IMAGE_SIZE) return requireImageSize(values);
    let out = s.replaceAll(SANDBOX_DIR, values.sandboxDir);
    if (out.includes(IMAGE_SIZE)) out = out.replaceAll(IMAGE_SIZE, String(requireImageSize(values)));
    return out;
  };
  const walk = (v: unknown): unknown => {
    if (typeof v === 'string') return replace(v);
    if (Array.isArray(v)) return v.map((x) => (typeof x === 'string' ? String(replace(x)) : walk(x)));
    if (v !== null && typeof v === 'object') {
      const out: Record<string, unknown> = {};
      for (const [k, x] of Object.entries(v)) out[k] = walk(x);
      return out;
    }
    return v;
  };
  const out = walk(spec) as QemuLaunchSpec;
  delete out.launch;
  return out;
}

function requireImageSize(values: TokenValues): number {
  if (values.imageSizeBytes === undefined) {
    throw new KataError('KATA_ERR_INTERNAL', `the QEMU launch description uses ${IMAGE_SIZE} but no image size was given`);
  }
  return values.imageSizeBytes;
}
