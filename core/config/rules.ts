/**
 * The core's own cross-field rules: Kata's value rules that belong to no single plugin. Each
 * returns problems (never throws), so they are reported together with the plugins' vetoes.
 * Hypervisor-, shared-fs- and TEE-specific rules live in their plugins.
 */
import type { Problem } from '../errors.js';
import { hvKey, type KataConfig } from './types.js';

/**
 * A template directory the runtime accepts: absolute, letters, digits and `/._-` only, no `.` or
 * `..` component, no empty one (`//`) and no trailing `/`, so that the path is written one way
 * only (the mount table and the init lock beside the directory compare it as a string). Its files
 * reach QEMU's `exec:` migration URI, which QEMU hands to /bin/sh.
 */
export const TEMPLATE_PATH = /^(?!.*\/\.\.?(\/|$))(?!.*\/\/)(?!.*\/$)\/[A-Za-z0-9._\/-]{1,200}$/;

type Rule = (cfg: KataConfig) => Problem | undefined;

const RULES: readonly Rule[] = [
  (cfg) =>
    cfg.hypervisor.default_memory === 0
      ? { code: 'KATA_ERR_CONFIG_VALUE', key: hvKey(cfg, 'default_memory'), value: 0, reason: 'VM memory cannot be zero', fix: 'set default_memory to the guest memory in MiB, e.g. 2048' }
      : undefined,
  // Unlike Kata, image and initrd may both be set: Debian's kernel has its NVDIMM and ext4 drivers
  // as modules, so the initramfs boots and mounts the image (the guest image builder's agent disk).
  (cfg) =>
    !nonEmpty(cfg.hypervisor.image) && !nonEmpty(cfg.hypervisor.initrd)
      ? { code: 'KATA_ERR_CONFIG_VALUE', key: hvKey(cfg, 'image'), reason: 'missing image and initrd path: the guest needs a root filesystem', fix: 'set image (a guest disk image) or initrd (a guest initramfs)' }
      : undefined,
  (cfg) =>
    !nonEmpty(cfg.hypervisor.kernel)
      ? { code: 'KATA_ERR_CONFIG_VALUE', key: hvKey(cfg, 'kernel'), reason: 'missing kernel path', fix: 'set kernel to the guest kernel image' }
      : undefined,
  (cfg) =>
    cfg.runtime.disable_new_netns && cfg.runtime.internetworking_model !== 'none'
      ? {
          code: 'KATA_ERR_CONFIG_VALUE',
          key: 'runtime.disable_new_netns',
          value: true,
          reason: "disable_new_netns only works with the 'none' internetworking_model",
          fix: 'set internetworking_model = "none", or disable_new_netns = false',
        }
      : undefined,
  (cfg) =>
    cfg.factory.vm_cache_number > 0 && cfg.hypervisorName !== 'qemu'
      ? { code: 'KATA_ERR_CONFIG_VALUE', key: 'factory.vm_cache_number', value: cfg.factory.vm_cache_number, reason: 'the VM cache only supports qemu', fix: 'set vm_cache_number = 0' }
      : undefined,
  (cfg) =>
    cfg.factory.enable_template && !TEMPLATE_PATH.test(cfg.factory.template_path)
      ? {
          code: 'KATA_ERR_CONFIG_VALUE',
          key: 'factory.template_path',
          value: cfg.factory.template_path,
          reason: 'the template path must be absolute and hold only letters, digits, "/", ".", "_" and "-" (no "." or ".." component, no "//", no trailing "/"): it reaches the hypervisor\'s migration command',
          fix: 'use a plain absolute directory such as /run/vc/vm/template',
        }
      : undefined,
];

export function coreRuleProblems(cfg: KataConfig): Problem[] {
  const out: Problem[] = [];
  for (const rule of RULES) {
    const p = rule(cfg);
    if (p) out.push(p);
  }
  return out;
}

function nonEmpty(v: unknown): v is string {
  return typeof v === 'string' && v.length > 0;
}
