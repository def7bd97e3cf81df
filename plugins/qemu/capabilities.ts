/**
 * What a QEMU VM can do for a given configuration (Kata's `qemuAmd64.capabilities`, made finer).
 */
import { RENDER_ACCESS_PLATFORM, TEMPLATE_CAPABILITY, renderDeviceCapability, renderTeeCapability, type CapabilityView, type KataConfig } from '../../core/plugin-api.js';
import { SCSI_MAX_DISKS, SUPPORTED_MACHINE, qemuSection } from './config.js';
import { QEMU_DEVICE_KINDS } from './launch-spec.js';

export function declareCapabilities(caps: CapabilityView, cfg: KataConfig): void {
  const hv = qemuSection(cfg);
  if (!hv.disable_block_device_use) {
    caps.add('block-device', `block_device_driver = "${hv.block_device_driver}"`);
    if (hv.block_device_driver === 'virtio-blk') caps.add('virtio-blk', 'block devices are virtio-blk-pci devices');
    if (hv.block_device_driver === 'virtio-scsi') caps.add('virtio-scsi', 'block devices are scsi-hd disks on a virtio-scsi-pci controller');
    const why = blockHotplugMissing(cfg);
    if (why === undefined) {
      caps.add(
        'block-device-hotplug',
        hv.block_device_driver === 'virtio-scsi'
          ? `scsi-hd hot-plugged onto the virtio-scsi-pci controller planned at boot (up to ${SCSI_MAX_DISKS} disks)`
          : `virtio-blk-pci hot-plugged into one of ${hv.hotplug_root_ports} reserved pcie-root-ports`,
      );
    }
  }
  caps.add('multi-queue');
  if (hv.shared_fs !== 'none') {
    caps.add('fs-sharing', `shared_fs = "${hv.shared_fs}"`);
    if (hv.shared_fs === 'virtio-9p') caps.add('fs-sharing:virtio-9p', 'served by QEMU itself (-fsdev local + virtio-9p-pci)');
    else caps.add('fs-sharing:virtio-fs', 'vhost-user-fs-pci; the daemon belongs to the virtiofs plugin');
  }
  caps.add('cpu-hotplug');
  caps.add('memory-hotplug');
  if (!hv.disable_image_nvdimm) caps.add('nvdimm-image', 'disable_image_nvdimm = false');
  caps.add('balloon');
  // A clone's RAM is a private mapping of the template's file; vhost-user (virtio-fs) needs RAM its daemon can map.
  if (hv.shared_fs !== 'virtio-fs' && hv.shared_fs !== 'virtio-fs-nydus') caps.add(TEMPLATE_CAPABILITY, 'memory-backend-file on the template memory, device state by migration (x-ignore-shared)');
  // The plan intents launch-spec.ts renders.
  for (const kind of QEMU_DEVICE_KINDS) caps.add(renderDeviceCapability(kind));
  caps.add(renderTeeCapability('tdx'), 'tdx-guest object, confidential-guest-support=tdx, the firmware as -bios, KVM');
  caps.add(RENDER_ACCESS_PLATFORM, 'iommu_platform=on on every virtio-pci device, hot-plugged ones included');
}

/** The block_device_driver values whose disks the plugin hot-plugs. */
export const HOTPLUG_BLOCK_DRIVERS: readonly string[] = Object.freeze(['virtio-blk', 'virtio-scsi']);

/**
 * Why this configuration offers no block-device hot-plug, or undefined when it does. The plugin's
 * driver hot-plugs two kinds of device: virtio-blk-pci into a pcie-root-port, which exists on q35
 * only (pcie.0 itself is not hot-pluggable), and scsi-hd onto the virtio-scsi-pci controller the
 * VM boots with (no root port needed).
 */
export function blockHotplugMissing(cfg: KataConfig): string | undefined {
  const hv = qemuSection(cfg);
  if (hv.disable_block_device_use) return 'disable_block_device_use = true';
  if (hv.machine_type !== SUPPORTED_MACHINE) return `machine_type = "${hv.machine_type}": hot-plug into a pcie-root-port needs q35`;
  if (!HOTPLUG_BLOCK_DRIVERS.includes(hv.block_device_driver)) {
    return `block_device_driver = "${hv.block_device_driver}": the qemu plugin hot-plugs virtio-blk and virtio-scsi disks only`;
  }
  if (hv.block_device_driver === 'virtio-blk' && hv.hotplug_root_ports === 0) return 'hotplug_root_ports = 0: no pcie-root-port is reserved for hot-plug';
  return undefined;
}
