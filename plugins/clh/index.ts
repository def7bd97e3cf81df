/**
 * clh: the Cloud Hypervisor hypervisor plugin. Serves `[hypervisor.clh]`: declares what a Cloud
 * Hypervisor VM can do for the configuration (including the `render:*` capabilities: which plan
 * intents it can render), applies Kata's Cloud Hypervisor value rules, describes the VM as neutral
 * intents at STAGE.HYPERVISOR and renders the finished plan into a `vm.create` body at
 * STAGE.FINALIZE (vm-config.ts), and drives the VMM through its REST API: `createVm` answers a plan
 * it rendered with a ClhVm (driver.ts, api.ts).
 */
import { AGENT_VSOCK_PORT, definePlugin, hvKey, RENDER_ACCESS_PLATFORM, renderDeviceCapability, renderTeeCapability, STAGE, type KataConfig, type VerdictView } from '../../core/plugin-api.js';
import { ClhVm, PLUGIN_NAME } from './driver.js';
import { clhHostChecks } from './probe.js';
import { CLH_DEVICE_KINDS, describeClhVm, isClhSpec, renderClhLaunchSpec, VSOCK_SOCKET, type ClhSection } from './vm-config.js';
import { MANIFEST } from './manifest.js';

export {
  buildVmConfig,
  describeClhVm,
  renderClhLaunchSpec,
  renderVmConfig,
  isClhSpec,
  clhArgs,
  kernelCmdline,
  rootParams,
  vcpuCounts,
  currentHost,
  IMAGE_DISK_ID,
  VSOCK_SOCKET,
  GUEST_VSOCK_CID,
  CLH_API_TIMEOUT_MS,
  CLH_TDX_API_TIMEOUT_MS,
  CLH_DEVICE_KINDS,
} from './vm-config.js';
export type { ClhSection, HostInfo, ClhLaunchSpec, ClhVmConfig, ClhDiskConfig, ClhFsConfig, ClhPayloadConfig } from './vm-config.js';
export { ClhVm, CLH_VM_DEFAULTS, CLH_FILES, TDX_FEATURE, bdfToPciPath, fillVmConfig, type ClhVmOptions } from './driver.js';
export { probeVmm, clhHostChecks, PROBE_TIMEOUT_MS } from './probe.js';
export { ClhApiClient, errorBodyMessage, clhApiFailure, API_ROOT, type VmmPing, type PciDeviceInfo, type VmInfo, type ClhApiFailure } from './api.js';

/** The only block driver Cloud Hypervisor hot-plugs (vm.add-disk adds a virtio-blk PCI device). */
const HOTPLUG_BLOCK_DRIVER = 'virtio-blk';

/** Kata's error for a hot-plug with any other driver (`clh.go` hotplugAddBlockDevice). */
export function hotplugDriverError(driver: string): string {
  return `incorrect hypervisor configuration on 'block_device_driver': using '${driver}' but only support '${HOTPLUG_BLOCK_DRIVER}'`;
}

/** VFIO port settings Cloud Hypervisor accepts (it has no PCIe bridges or switches). */
const CLH_VFIO_PORTS: readonly string[] = ['no-port', 'root-port'];

function validate(cfg: KataConfig, verdict: VerdictView): void {
  const hv = cfg.hypervisor as ClhSection;

  if (hv.shared_fs === 'virtio-9p') {
    verdict.veto({
      code: 'KATA_ERR_CONFIG_VALUE',
      key: hvKey(cfg, 'shared_fs'),
      value: hv.shared_fs,
      reason: 'Cloud Hypervisor does not support virtio-9p shared filesystem option',
      fix: 'set shared_fs = "virtio-fs" (with virtio_fs_daemon), or "none" to share nothing',
    });
  }

  const hot = hv.hot_plug_vfio;
  const cold = hv.cold_plug_vfio;
  if (hot !== 'no-port' && cold !== 'no-port') {
    verdict.veto({
      code: 'KATA_ERR_CONFIG_VALUE',
      key: hvKey(cfg, 'cold_plug_vfio'),
      value: cold,
      reason: `invalid hot-plug=${hot} and cold-plug=${cold} settings, only one of them can be set`,
      fix: 'set hot_plug_vfio or cold_plug_vfio (or both) to "no-port"',
    });
  }
  for (const [key, kind, value] of [['cold_plug_vfio', 'cold-plug', cold], ['hot_plug_vfio', 'hot-plug', hot]] as const) {
    if (!CLH_VFIO_PORTS.includes(value)) {
      verdict.veto({
        code: 'KATA_ERR_CONFIG_VALUE',
        key: hvKey(cfg, key),
        value,
        reason: `only ${kind}=no-port or root-port supported on CLH`,
        fix: `set ${key} = "root-port", or "no-port"`,
      });
    }
  }

  if (hv.enable_guest_swap) {
    verdict.warn(hvKey(cfg, 'enable_guest_swap'), "cloudHypervisor doesn't support swap: no swap device will be added to the guest");
  }
}

export default definePlugin({
  manifest: MANIFEST,
  apply({ hooks }) {
    hooks.capabilities.tap({ stage: STAGE.HYPERVISOR }, (caps, cfg) => {
      const hv = cfg.hypervisor as ClhSection;
      if (!hv.disable_block_device_use) {
        const driver = hv.block_device_driver;
        caps.add('block-device', `block_device_driver = "${driver}"`);
        // Added and then removed, so that the reason is recorded and named by whatever requires it.
        caps.add('block-device-hotplug', 'vm.add-disk hot-plugs a virtio-blk PCI device');
        if (driver === HOTPLUG_BLOCK_DRIVER) caps.add('virtio-blk');
        else caps.remove('block-device-hotplug', hotplugDriverError(driver));
      }
      if (hv.shared_fs === 'virtio-fs' || hv.shared_fs === 'virtio-fs-nydus') {
        caps.add('fs-sharing', `shared_fs = "${hv.shared_fs}"`);
        caps.add('fs-sharing:virtio-fs', 'vhost-user-fs device (fs entry of vm.create)');
      }
      caps.add('cpu-hotplug', 'vm.resize desired_vcpus, up to max_vcpus');
      caps.add('memory-hotplug', 'vm.resize desired_ram, up to size + hotplug_size');
      caps.add('balloon', 'virtio-balloon (used for free-page reporting)');
      // The plan intents vm-config.ts renders.
      for (const kind of CLH_DEVICE_KINDS) caps.add(renderDeviceCapability(kind));
      caps.add(renderTeeCapability('tdx'), 'platform.tdx, the firmware (td-shim) as the payload');
      caps.add(RENDER_ACCESS_PLATFORM, 'for a TD: Cloud Hypervisor offers VIRTIO_F_ACCESS_PLATFORM on every device of a TD itself');
    });

    hooks.validate.tap(PLUGIN_NAME, (cfg, verdict) => validate(cfg, verdict));

    hooks.plan.tap({ stage: STAGE.HYPERVISOR }, (plan, cfg, caps) => {
      const hv = cfg.hypervisor as ClhSection;
      plan.vm = describeClhVm(cfg, caps);
      plan.agent = { address: `hvsock://${VSOCK_SOCKET}:${AGENT_VSOCK_PORT}` };
      if (!hv.disable_block_device_use) plan.blockDriver = hv.block_device_driver;
      if (hv.image && !hv.disable_image_nvdimm) {
        plan.notes.push({ by: PLUGIN_NAME, level: 'info', message: 'the guest image is attached as a read-only virtio-blk disk: Cloud Hypervisor does not use NVDIMM (disable_image_nvdimm is ignored)' });
      }
      return plan;
    });

    // The whole plan, whoever wrote its intents, becomes the vm.create body.
    hooks.plan.tap({ stage: STAGE.FINALIZE }, (plan, cfg) => {
      if (plan.vm.hypervisor !== PLUGIN_NAME) return plan;
      const spec = renderClhLaunchSpec(plan.vm, cfg);
      plan.vm.native = spec;
      plan.vm.launch = spec.launch;
      return plan;
    });

    // The VM for a plan this plugin rendered, created but not started: the core calls start() next.
    hooks.createVm.tapPromise(PLUGIN_NAME, async (vmCtx) => (isClhSpec(vmCtx.plan.vm.native) ? new ClhVm(vmCtx) : undefined));

    // kata-runtime check: the binary's own vmm.ping (version, features, TDX).
    hooks.hostChecks.tapPromise(PLUGIN_NAME, (check) => clhHostChecks(check));
  },
});
