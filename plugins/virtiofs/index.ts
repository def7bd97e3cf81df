/**
 * virtiofs: shares host directories with the guest through virtio-fs (a vhost-user-fs device
 * served by virtiofsd). Loaded when `shared_fs` is "virtio-fs" or "virtio-fs-nydus".
 *
 * It never claims VIRTIO_F_ACCESS_PLATFORM on its own: virtiofsd does not offer it, which is why a
 * TDX guest refuses the device. `virtio_fs_access_platform = true` is an explicit opt-in for a VMM
 * that forces the feature on vhost-user devices and a guest kernel that accepts it.
 */
import { mkdir } from 'node:fs/promises';
import { Daemon, definePlugin, fillSandboxDir, hvKey, isClhSpec, isQemuSpec, SANDBOX_DIR, SANDBOX_SHARED_DIR, STAGE, type KataConfig, type VmContext } from '../../core/plugin-api.js';
import type { VirtiofsKeys } from '../../core/config/schema-types.js';

const PLUGIN_NAME = 'virtiofs';

/** The mount tag the guest agent mounts (Kata's). */
export const SHARED_FS_TAG = 'kataShared';
export const VIRTIOFSD_SOCKET = `${SANDBOX_DIR}/virtiofsd.sock`;
export const SHARED_DIR = SANDBOX_SHARED_DIR;

type Section = KataConfig['hypervisor'] & VirtiofsKeys;

/** virtiofsd's command line (the Rust virtiofsd's flags), extra arguments appended as given. */
export function virtiofsdArgs(hv: Section): string[] {
  return ['--socket-path', VIRTIOFSD_SOCKET, '--shared-dir', SHARED_DIR, '--cache', hv.virtio_fs_cache, ...hv.virtio_fs_extra_args];
}

/** Running virtiofsd per sandbox. */
const running = new WeakMap<VmContext, Daemon>();

export default definePlugin({
  manifest: {
    name: PLUGIN_NAME,
    version: '1.0.0',
    runtime: '^1.0.0',
    description: 'virtio-fs shared filesystem (vhost-user-fs + virtiofsd)',
    provides: ['shared-fs:virtio-fs'],
    requires: ['hypervisor'],
    config: { table: 'hypervisor.*', schema: 'virtiofs.schema.json' },
    // Kata's default shared_fs is virtio-fs.
    activation: { when: [{ key: 'hypervisor.*.shared_fs', in: ['virtio-fs', 'virtio-fs-nydus'], default: 'virtio-fs' }] },
  },
  apply({ hooks }) {
    hooks.capabilities.tap({ stage: STAGE.DEVICES }, (caps, cfg) => {
      const hv = cfg.hypervisor as Section;
      if (hv.virtio_fs_access_platform) caps.add('virtio-fs:access-platform', 'opted in with virtio_fs_access_platform = true');
    });

    hooks.validate.tap(PLUGIN_NAME, (cfg, verdict) => {
      const hv = cfg.hypervisor as Section;
      verdict.require('fs-sharing', `shared_fs = "${hv.shared_fs}" shares the container rootfs and volumes with the guest`, {
        key: hvKey(cfg, 'shared_fs'),
        fix: 'use a hypervisor configuration that supports virtio-fs, or set shared_fs = "none"',
      });
      if (!hv.virtio_fs_daemon) {
        verdict.veto({
          code: 'KATA_ERR_CONFIG_VALUE',
          key: hvKey(cfg, 'virtio_fs_daemon'),
          reason: `cannot enable ${hv.shared_fs} without daemon path in configuration file`,
          fix: 'set virtio_fs_daemon to the virtiofsd binary, e.g. "/usr/libexec/virtiofsd"',
        });
      }
      if (hv.shared_fs === 'virtio-fs-nydus') {
        verdict.veto({
          code: 'KATA_ERR_CONFIG_VALUE',
          key: hvKey(cfg, 'shared_fs'),
          value: hv.shared_fs,
          reason: 'virtio-fs-nydus (nydusd) is not supported by this runtime yet',
          fix: 'use shared_fs = "virtio-fs"',
        });
      }
      if (hv.virtio_fs_cache_size > 0) {
        verdict.warn(hvKey(cfg, 'virtio_fs_cache_size'), 'the DAX window is not supported; the value is ignored');
      }
    });

    hooks.plan.tap({ stage: STAGE.DEVICES }, (plan, cfg) => {
      const hv = cfg.hypervisor as Section;
      plan.sharedFs = hv.shared_fs === 'virtio-fs-nydus' ? 'virtio-fs-nydus' : 'virtio-fs';
      plan.sharedFsMount = { driver: 'virtio-fs', source: SHARED_FS_TAG, fstype: 'virtiofs', options: ['nodev'] };
      if (!plan.rootfs.includes('shared-fs')) plan.rootfs.push('shared-fs');
      plan.daemons.push({ by: PLUGIN_NAME, name: 'virtiofsd', binary: hv.virtio_fs_daemon, args: virtiofsdArgs(hv), socket: VIRTIOFSD_SOCKET });
      const vm = plan.vm;
      if (isClhSpec(vm)) {
        // Cloud Hypervisor refuses an fs device unless guest memory is shared (VhostUserRequiresSharedMemory).
        vm.vmConfig.memory = { ...(vm.vmConfig.memory ?? { size: hv.default_memory * 1024 * 1024 }), shared: true };
        vm.vmConfig.fs = [...(vm.vmConfig.fs ?? []), { tag: SHARED_FS_TAG, socket: VIRTIOFSD_SOCKET, num_queues: 1, queue_size: hv.virtio_fs_queue_size, id: 'kata-shared-fs' }];
      } else if (isQemuSpec(vm)) {
        // vhost-user needs the guest RAM in a shared memory backend that virtiofsd can map.
        vm.memory.shared = true;
        vm.chardevs.push({ type: 'socket', id: 'virtiofsd-char', props: { path: VIRTIOFSD_SOCKET } });
        vm.devices.push({ type: 'vhost-user-fs-pci', id: 'virtio-fs0', props: { chardev: 'virtiofsd-char', tag: SHARED_FS_TAG, 'queue-size': hv.virtio_fs_queue_size } });
      } else {
        plan.notes.push({ by: PLUGIN_NAME, level: 'warn', message: `the "${vm.hypervisor}" hypervisor plugin's launch spec is unknown to virtiofs; it must add the vhost-user-fs device itself` });
      }
      return plan;
    });

    // Runtime half: virtiofsd runs from before the VM starts until after it stops.
    hooks.beforeVmStart.tapPromise(PLUGIN_NAME, async (ctx) => {
      const spec = ctx.plan.daemons.find((d) => d.by === PLUGIN_NAME);
      if (!spec) return;
      await mkdir(fillSandboxDir(SHARED_DIR, ctx.runDir), { recursive: true, mode: 0o700 });
      const daemon = await Daemon.start({
        name: spec.name,
        plugin: PLUGIN_NAME,
        binary: spec.binary,
        args: spec.args.map((a) => fillSandboxDir(a, ctx.runDir)),
        socket: fillSandboxDir(spec.socket, ctx.runDir),
        cwd: ctx.runDir,
        log: ctx.log.child({ plugin: PLUGIN_NAME }),
      });
      running.set(ctx, daemon);
    });

    hooks.vmStopped.tapPromise(PLUGIN_NAME, async (ctx) => {
      const daemon = running.get(ctx);
      running.delete(ctx);
      await daemon?.stop();
    });
  },
});
