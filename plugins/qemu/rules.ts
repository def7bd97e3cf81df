/**
 * Kata's QEMU value rules that apply to this plugin, as vetoes (code KATA_ERR_CONFIG_VALUE), plus
 * warnings for settings that are valid but will not do what the user may expect. Pure.
 */
import { hvKey, type KataConfig, type ReadonlyCapabilities, type Veto } from '../../core/plugin-api.js';
import { blockHotplugMissing } from './capabilities.js';
import { MSIZE_9P_MAX, MSIZE_9P_MIN, SUPPORTED_MACHINE, qemuSection } from './config.js';

export interface RuleWarning {
  readonly key: string;
  readonly message: string;
}

export interface RuleResult {
  readonly vetoes: Veto[];
  readonly warnings: RuleWarning[];
}

export function qemuValueRules(cfg: KataConfig, caps: ReadonlyCapabilities): RuleResult {
  const hv = qemuSection(cfg);
  const vetoes: Veto[] = [];
  const warnings: RuleWarning[] = [];
  const veto = (key: string, value: unknown, reason: string, fix: string) =>
    vetoes.push({ code: 'KATA_ERR_CONFIG_VALUE', key: hvKey(cfg, key), value, reason, fix });

  if (hv.machine_type !== SUPPORTED_MACHINE) {
    veto(
      'machine_type',
      hv.machine_type,
      `the qemu plugin drives only the "${SUPPORTED_MACHINE}" machine: its devices are virtio-pci devices and block hot-plug uses pcie-root-ports, which need a PCI Express machine (Kata on x86_64 knows only q35 and microvm)`,
      `set machine_type = "${SUPPORTED_MACHINE}"`,
    );
  }

  if (hv.shared_fs === 'virtio-9p' && (hv.msize_9p < MSIZE_9P_MIN || hv.msize_9p > MSIZE_9P_MAX)) {
    veto(
      'msize_9p',
      hv.msize_9p,
      `the 9p payload size must be between ${MSIZE_9P_MIN} and ${MSIZE_9P_MAX} bytes`,
      `set msize_9p within ${MSIZE_9P_MIN}..${MSIZE_9P_MAX} (Kata's default is 8192)`,
    );
  }

  if (!hv.disable_block_device_use && (hv.block_device_driver === 'virtio-mmio' || hv.block_device_driver === 'virtio-blk-ccw')) {
    const bus = hv.block_device_driver === 'virtio-mmio' ? 'virtio-mmio transports (microvm, arm virt)' : 'a CCW bus (s390x)';
    veto(
      'block_device_driver',
      hv.block_device_driver,
      `a QEMU q35 machine has no ${bus}, so block devices cannot be attached with this driver`,
      'set block_device_driver = "virtio-scsi" or "virtio-blk" (the drivers the qemu plugin hot-plugs), or disable_block_device_use = true',
    );
  }

  const accel = hv.machine_accelerators
    .split(',')
    .map((s) => s.trim())
    .find((s) => s === 'accel' || s.startsWith('accel='));
  if (accel !== undefined) {
    veto(
      'machine_accelerators',
      hv.machine_accelerators,
      'the accelerator is chosen by the accelerator key (auto picks KVM when the host can run a standard guest, else TCG); a second one in the machine options would conflict',
      `remove "${accel}" from machine_accelerators and set accelerator = "kvm", "tcg" or "auto"`,
    );
  }

  if (hv.hot_plug_vfio !== 'no-port' && hv.cold_plug_vfio !== 'no-port') {
    veto(
      'cold_plug_vfio',
      hv.cold_plug_vfio,
      `hot_plug_vfio = "${hv.hot_plug_vfio}" and cold_plug_vfio = "${hv.cold_plug_vfio}": only one of them can be set`,
      'set hot_plug_vfio or cold_plug_vfio to "no-port"',
    );
  }

  for (const key of ['block_device_logical_sector_size', 'block_device_physical_sector_size'] as const) {
    const n = hv[key];
    if (n !== 0 && !(n >= 512 && n <= 65536 && (n & (n - 1)) === 0)) {
      veto(key, n, 'a sector size must be 0 (the default) or a power of 2 between 512 and 65536', `set ${key} to 0, 512, 4096 …`);
    }
  }

  if (!hv.disable_block_device_use && !caps.has('block-device-hotplug')) {
    const why = blockHotplugMissing(cfg) ?? 'another plugin removed the capability';
    warnings.push({
      key: hvKey(cfg, 'block_device_driver'),
      message: `block devices are enabled but cannot be hot-plugged (${why}); a block-device container rootfs needs block_device_driver = "virtio-scsi" on q35, or "virtio-blk" on q35 with hotplug_root_ports > 0`,
    });
  }
  return { vetoes, warnings };
}
