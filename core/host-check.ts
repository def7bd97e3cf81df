/**
 * One line of `kata-runtime check`, and what plugins receive to add their own lines through the
 * `hostChecks` hook (probes only a plugin can make, e.g. asking the hypervisor binary itself).
 */
import type { KataConfig } from './config/types.js';
import type { Logger } from './logger.js';
import { productName, type HypervisorProduct, type HypervisorVersion } from './host.js';
import type { SandboxPlan } from './plan.js';

export type CheckStatus = 'ok' | 'info' | 'WARN' | 'FAIL';

export interface HostCheck {
  /** Stable identifier: kvm, vhost-vsock, tdx, hypervisor-binary, hypervisor-version, kernel, image, initrd, firmware, virtio-fs-daemon; plugins add their own. */
  readonly id: string;
  readonly status: CheckStatus;
  /** What was checked, for people. */
  readonly subject: string;
  readonly message: string;
}

/** What `hostChecks` handlers receive. */
export interface HostCheckContext {
  readonly config: KataConfig;
  /** The plan, when the configuration is valid. */
  readonly plan: SandboxPlan | undefined;
  /** The core's checks so far (a handler may skip its probe when, say, the binary check failed). */
  readonly checks: readonly HostCheck[];
  /**
   * Adds a line after the core's checks; a line with the id of a core check replaces it (a plugin
   * refines what only it can judge, e.g. whether the binary is its own hypervisor).
   */
  add(check: HostCheck): void;
  /** What the hypervisor binary said to `--version`, when the core asked it (the binary check passed). */
  readonly version: HypervisorVersion | undefined;
  readonly log: Logger;
}

/**
 * For a hypervisor plugin's `hostChecks` tap: a `hypervisor-version` line that replaces the core's
 * when the binary answered `--version` as another product than the plugin's own; else undefined.
 */
export function productMismatch(ctx: HostCheckContext, own: HypervisorProduct): HostCheck | undefined {
  const v = ctx.version;
  if (!v?.product || v.product === own || !v.version) return undefined;
  const binary = ctx.plan?.vm.binary ?? '(the hypervisor binary)';
  return { id: 'hypervisor-version', status: 'WARN', subject: 'hypervisor version', message: `${binary} is ${productName(v.product)} ${v.version}, not the hypervisor of [${ctx.config.hypervisorTable}] (${productName(own)})` };
}
