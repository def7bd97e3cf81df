/**
 * tdx: Intel TDX confidential guests. Loaded when `confidential_guest = true` (and no other TEE is
 * asked for).
 *
 * A TD only lets a device reach guest pages the guest explicitly shares, and the guest kernel
 * refuses any virtio device without VIRTIO_F_ACCESS_PLATFORM
 * ("virtiofs virtio2: device must provide VIRTIO_F_ACCESS_PLATFORM"). virtiofsd does not offer it,
 * so this plugin vetoes virtio-fs during the validated config phase, before any VM starts, and
 * requires block-device hot-plug so the devmapper rootfs can reach the guest (virtio-blk, or virtio-scsi on QEMU).
 *
 * It writes intents only: the plan's `vm.confidential` (TEE, firmware, access-platform on every
 * device) and a VM without hot-plug or balloon. Each hypervisor plugin renders them in its own
 * format and says, through `render:*` capabilities, whether it can; one that cannot fails here, in
 * the validated config phase.
 */
import {
  definePlugin,
  hvKey,
  RENDER_ACCESS_PLATFORM,
  renderTeeCapability,
  STAGE,
  type KataConfig,
  type VerdictView,
} from '../../core/plugin-api.js';
import { MANIFEST, PLUGIN_NAME } from './manifest.js';


/** What a TD cannot have, and why. */
const REMOVED = [
  ['cpu-hotplug', 'a TD has a fixed vCPU count (Cloud Hypervisor: TdxNoCpuHotplug)'],
  ['memory-hotplug', 'TDX guests cannot hot-plug memory'],
  ['nvdimm-image', 'an NVDIMM/pmem image would be host-shared memory outside the TD; the image is attached as a read-only virtio-blk disk'],
  ['balloon', 'a balloon would hand private TD memory back to the host'],
] as const;

function vetoSharedFs(cfg: KataConfig, verdict: VerdictView, accessPlatform: boolean): void {
  const sharedFs = cfg.hypervisor.shared_fs;
  const key = hvKey(cfg, 'shared_fs');
  if ((sharedFs === 'virtio-fs' || sharedFs === 'virtio-fs-nydus') && !accessPlatform) {
    verdict.veto({
      key,
      value: sharedFs,
      reason: 'virtio-fs devices do not offer VIRTIO_F_ACCESS_PLATFORM, which a TDX guest requires of every device (the guest fails with "device must provide VIRTIO_F_ACCESS_PLATFORM")',
      fix: 'set shared_fs = "none" and give containers a block-device rootfs (devmapper snapshotter, disable_block_device_use = false)',
    });
  }
  if (sharedFs === 'virtio-9p') {
    verdict.veto({
      key,
      value: sharedFs,
      reason: "virtio-9p serves files from the host process, outside the TD's trust boundary, and the guest cannot verify what it reads",
      fix: 'set shared_fs = "none" and give containers a block-device rootfs (devmapper snapshotter, disable_block_device_use = false)',
    });
  }
}

export default definePlugin({
  manifest: MANIFEST,
  apply({ hooks }) {
    hooks.capabilities.tap({ stage: STAGE.CONFIDENTIAL }, (caps) => {
      caps.add('confidential-guest:tdx');
      for (const [name, why] of REMOVED) caps.remove(name, why);
    });

    hooks.validate.tap(PLUGIN_NAME, (cfg, verdict, caps) => {
      const hv = cfg.hypervisor;
      const fix = 'use a hypervisor whose plugin can launch TDX guests (qemu, clh), or set confidential_guest = false';
      verdict.require(renderTeeCapability('tdx'), 'the VM is an Intel TDX trust domain, which the hypervisor plugin must launch', { key: hvKey(cfg, 'confidential_guest'), fix });
      verdict.require(RENDER_ACCESS_PLATFORM, 'a TDX guest refuses every virtio device without VIRTIO_F_ACCESS_PLATFORM', { key: hvKey(cfg, 'confidential_guest'), fix });
      vetoSharedFs(cfg, verdict, caps.has('virtio-fs:access-platform'));
      if (!hv.firmware) {
        verdict.veto({
          key: hvKey(cfg, 'firmware'),
          reason: 'firmware path is not specified: a TD boots through TDX firmware (TDVF, or td-shim on Cloud Hypervisor)',
          fix: 'set firmware, e.g. "/usr/share/ovmf/OVMF.inteltdx.fd" (QEMU) or "/usr/share/td-shim/td-shim.bin" (Cloud Hypervisor)',
        });
      }
      if (!cfg.runtime.static_sandbox_resource_mgmt) {
        verdict.veto({
          key: 'runtime.static_sandbox_resource_mgmt',
          value: false,
          reason: "a TD cannot hot-plug vCPUs or memory, so it must be sized at boot for the pod's containers (Kata's TDX configurations set static_sandbox_resource_mgmt = true)",
          fix: "set static_sandbox_resource_mgmt = true in [runtime]: the VM then boots with default_vcpus / default_memory plus the pod's limits from its sandbox annotations",
        });
      }
      if (cfg.agent.debug_console_enabled) {
        verdict.veto({
          key: 'agent.kata.debug_console_enabled',
          value: true,
          reason: "the debug console is a root shell in the guest that the host can reach, which breaks the TD's trust boundary (the host could read and change everything the TD protects)",
          fix: 'set debug_console_enabled = false in [agent.kata]; debug a TD through its logs, or debug the workload in a non-confidential sandbox',
        });
      }
      if (cfg.factory.enable_template) {
        verdict.veto({
          key: 'factory.enable_template',
          value: true,
          reason: "a TD's private memory is encrypted with a key of that TD alone: it cannot be saved as a template and mapped into another TD, and sharing one TD's memory image between sandboxes would break the isolation TDX exists for",
          fix: 'set enable_template = false in [factory] for confidential sandboxes (each TD boots cold)',
        });
      }
      if (hv.block_device_driver === 'virtio-mmio') {
        verdict.veto({
          key: hvKey(cfg, 'block_device_driver'),
          value: hv.block_device_driver,
          reason: 'confidential guests must not use virtio-mmio, which is not hardened for confidential computing',
          fix: 'set block_device_driver = "virtio-blk" (or "virtio-scsi" with QEMU)',
        });
      }
      if (!hv.disable_block_device_use) {
        verdict.require('block-device-hotplug', 'the container rootfs reaches a TDX guest only as a hot-plugged block device (devmapper snapshotter)', {
          key: hvKey(cfg, 'block_device_driver'),
          fix: 'set block_device_driver = "virtio-blk" (or "virtio-scsi" with QEMU)',
        });
        if (cfg.hypervisorName === 'clh') {
          verdict.require('virtio-blk', 'Cloud Hypervisor hot-plugs block devices only as virtio-blk', {
            key: hvKey(cfg, 'block_device_driver'),
            fix: 'set block_device_driver = "virtio-blk"',
          });
        }
      }
    });

    hooks.plan.tap({ stage: STAGE.CONFIDENTIAL }, (plan, cfg) => {
      const firmware = cfg.hypervisor.firmware;
      plan.confidential = { tee: 'tdx', firmware };
      const vm = plan.vm;
      vm.confidential = { tee: 'tdx', firmware, accessPlatform: true };
      vm.firmware = firmware;
      // A TD has a fixed size: no vCPU or memory hot-plug, no balloon (see REMOVED).
      vm.cpus = { boot: vm.cpus.boot, max: vm.cpus.boot, hotplug: false };
      vm.memory = { ...vm.memory, maxMiB: vm.memory.bootMiB, hotplug: false };
      vm.devices = vm.devices.filter((d) => d.kind !== 'balloon');
      return plan;
    });
  },
});
