/**
 * The QEMU hypervisor plugin: capabilities (including the `render:*` ones: which plan intents it
 * can render), Kata's QEMU value rules, QEMU's neutral VM description at STAGE.HYPERVISOR, the
 * rendering of the finished plan into a QemuLaunchSpec and its argv at STAGE.FINALIZE, and the
 * driver: `createVm` answers a plan it rendered with a QemuVm (driver.ts: process, QMP, hot-plug).
 *
 * It also provides `shared-fs:virtio-9p`: a 9p share is served by QEMU itself (-fsdev + virtio-9p-pci),
 * with no daemon of its own, so there is nothing for a separate plugin to own.
 */
import { STAGE, definePlugin, productMismatch } from '../../core/plugin-api.js';
import { SANDBOX_PATHS, SHARED_MOUNT_TAG } from './config.js';
import { renderQemuArgv } from './argv.js';
import { declareCapabilities } from './capabilities.js';
import { PLAN_ACCELERATOR, PLUGIN_NAME, qemuSection } from './config.js';
import { QemuVm } from './driver.js';
import { describeQemuVm, isQemuSpec, renderQemuLaunchSpec } from './launch-spec.js';
import { qemuValueRules } from './rules.js';
import { MANIFEST } from './manifest.js';

export default definePlugin({
  manifest: MANIFEST,
  apply(ctx) {
    const { hooks } = ctx;

    hooks.capabilities.tap({ stage: STAGE.HYPERVISOR }, (caps, cfg) => declareCapabilities(caps, cfg));

    hooks.validate.tap({ stage: STAGE.HYPERVISOR }, (cfg, verdict, caps) => {
      const { vetoes, warnings } = qemuValueRules(cfg, caps);
      for (const v of vetoes) verdict.veto(v);
      for (const w of warnings) verdict.warn(w.key, w.message);
    });

    hooks.plan.tap({ stage: STAGE.HYPERVISOR }, (plan, cfg, caps) => {
      const hv = qemuSection(cfg);
      const { vm, notes } = describeQemuVm(cfg, caps);
      plan.vm = vm;
      plan.agent = { address: `unix://${SANDBOX_PATHS.agentSocket}` };
      for (const n of notes) plan.notes.push({ by: PLUGIN_NAME, ...n });
      if (hv.shared_fs === 'virtio-9p') {
        plan.sharedFs = 'virtio-9p';
        // Kata's 9p storage: the agent mounts the tag with these options.
        plan.sharedFsMount = { driver: '9p', source: SHARED_MOUNT_TAG, fstype: '9p', options: ['trans=virtio', 'version=9p2000.L', `msize=${hv.msize_9p}`, 'cache=mmap', 'nodev'] };
        if (!plan.rootfs.includes('shared-fs')) plan.rootfs.push('shared-fs');
      }
      if (caps.has('block-device')) plan.blockDriver = hv.block_device_driver;
      return plan;
    });

    // The whole plan, whoever wrote its intents, becomes QEMU's launch description.
    hooks.plan.tap({ stage: STAGE.FINALIZE }, (plan, cfg, caps) => {
      if (plan.vm.hypervisor !== PLUGIN_NAME) return plan;
      const vm = renderQemuLaunchSpec(plan.vm, cfg, caps);
      if (vm.accelerator === 'auto') {
        plan.notes.push({
          by: PLUGIN_NAME,
          level: 'info',
          message: `accelerator "auto" is resolved when the VM starts (KVM when the host can run a standard guest, else TCG); the command line shown assumes ${PLAN_ACCELERATOR}`,
        });
      }
      vm.launch = renderQemuArgv(vm, { accelerator: vm.accelerator === 'auto' ? PLAN_ACCELERATOR : vm.accelerator });
      plan.vm.native = vm;
      plan.vm.launch = vm.launch;
      return plan;
    });

    // `kata-runtime check`: the binary must be QEMU.
    hooks.hostChecks.tapPromise(PLUGIN_NAME, async (check) => {
      const mismatch = productMismatch(check, 'qemu');
      if (mismatch) check.add(mismatch);
    });

    // The VM for a QEMU plan, created but not started: the core calls start() next.
    hooks.createVm.tapPromise(PLUGIN_NAME, async (vmCtx) => (isQemuSpec(vmCtx.plan.vm.native) ? new QemuVm(vmCtx) : undefined));
  },
});

export { renderQemuArgv, substituteTokens, effectiveDevice, formatQemuOption, hotplugPortDevice } from './argv.js';
export {
  buildQemuLaunchSpec,
  describeQemuVm,
  renderQemuLaunchSpec,
  isQemuSpec,
  hostResources,
  kernelCommandLine,
  parseMachineAccelerators,
  QEMU_DEVICE_KINDS,
  type QemuLaunchSpec,
  type QemuOption,
  type QemuPropValue,
} from './launch-spec.js';
export { declareCapabilities, blockHotplugMissing } from './capabilities.js';
export { qemuValueRules } from './rules.js';
export { QemuVm, QEMU_VM_DEFAULTS, PID_FILE, type QemuVmExit, type QemuVmOptions } from './driver.js';
export { QmpClient, QmpError, type QmpEvent } from './qmp.js';
export { hotplugPciPath } from './hotplug.js';
export { IMAGE_SIZE, PLUGIN_NAME, QEMU_IDS, SANDBOX_PATHS } from './config.js';
