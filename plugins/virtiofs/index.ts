/**
 * virtiofs: shares host directories with the guest through virtio-fs (a vhost-user-fs device
 * served by virtiofsd). Loaded when `shared_fs` is "virtio-fs" or "virtio-fs-nydus".
 *
 * It never claims VIRTIO_F_ACCESS_PLATFORM on its own: virtiofsd does not offer it, which is why a
 * TDX guest refuses the device. `virtio_fs_access_platform = true` is an explicit opt-in for a VMM
 * that forces the feature on vhost-user devices and a guest kernel that accepts it.
 *
 * It writes intents only (a vhost-user-fs device, shared guest memory); the hypervisor plugin
 * renders them, and must declare `render:device:vhost-user-fs` to be used with this plugin.
 */
import { mkdir } from 'node:fs/promises';
import { Daemon, definePlugin, fillSandboxDir, hvKey, renderDeviceCapability, SANDBOX_DIR, SANDBOX_SHARED_DIR, STAGE, type KataConfig, type VmContext } from '../../core/plugin-api.js';
import type { VirtiofsKeys } from '../../core/config/schema-types.js';
import { MANIFEST, PLUGIN_NAME } from './manifest.js';


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
  manifest: MANIFEST,
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
      verdict.require(renderDeviceCapability('vhost-user-fs'), `shared_fs = "${hv.shared_fs}" adds a vhost-user-fs device, which the hypervisor plugin must render`, {
        key: hvKey(cfg, 'shared_fs'),
        fix: 'use a hypervisor whose plugin renders vhost-user-fs devices (qemu, clh), or set shared_fs = "none"',
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
      // vhost-user: the daemon maps guest RAM, so it must be shared (Cloud Hypervisor refuses the
      // device otherwise: VhostUserRequiresSharedMemory).
      plan.vm.memory = { ...plan.vm.memory, shared: true };
      // No DAX window: virtio_fs_cache_size is warned about and ignored (see validate).
      plan.vm.devices.push({ kind: 'vhost-user-fs', socket: VIRTIOFSD_SOCKET, tag: SHARED_FS_TAG, queues: 1, queueSize: hv.virtio_fs_queue_size, cacheSizeMiB: 0 });
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
