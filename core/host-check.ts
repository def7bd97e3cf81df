/**
 * One line of `kata-runtime check`, and what plugins receive to add their own lines through the
 * `hostChecks` hook (probes only a plugin can make, e.g. asking the hypervisor binary itself).
 */
import type { KataConfig } from './config/types.js';
import type { Logger } from './logger.js';
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
  /** Adds a line after the core's checks. */
  add(check: HostCheck): void;
  readonly log: Logger;
}
