/**
 * The plugin API: what a plugin module exports and what its apply() receives. This module is the
 * package's `./plugin` entry point for third-party plugin authors.
 *
 * A plugin is an ES module whose default export is `definePlugin({ manifest, apply })`. The core
 * checks the manifest (shape, unique name, API range, requirements) before calling apply(), and
 * apply() only taps hooks: it does no I/O.
 */
import type { Logger } from './logger.js';
import type { TapOnlyHooks } from './hooks.js';

/** Version of the plugin API this runtime implements; manifests name a semver range of it. */
export const PLUGIN_API_VERSION = '1.0.0';

export interface PluginManifest {
  /** Unique plugin name: also its tap name, its log binding and `error.plugin` on its errors. */
  readonly name: string;
  /** The plugin's own semver version. */
  readonly version: string;
  /** Semver range of the plugin API the plugin works with, e.g. `^1.0.0`. */
  readonly runtime: string;
  /** One line shown by `kata-runtime validate`. */
  readonly description?: string;
  /**
   * Roles this plugin fills, e.g. `hypervisor`, `hypervisor:clh`, `shared-fs:virtio-fs`,
   * `block-rootfs`, `confidential-guest:tdx`. A third-party plugin providing `hypervisor:<name>`
   * serves a `[hypervisor.<name>]` section.
   */
  readonly provides?: readonly string[];
  /** Roles that must be provided by some loaded plugin, or loading fails. */
  readonly requires?: readonly string[];
  /**
   * The plugin's configuration keys: a JSON Schema (an object, or a path relative to the plugin
   * module) applied to `table`, a dotted TOML path where `hypervisor.*` is the active hypervisor
   * section. Keys it declares are no longer reported as unknown.
   */
  readonly config?: { readonly table: string; readonly schema: string | object };
  /**
   * When the plugin applies to a configuration, declared on its keys so that the core never names
   * a plugin. The executables offer the built-in plugins to every configuration and each applies
   * only where its activation matches; a plugin listed in `[runtime] plugins` without one always
   * applies, and with one is skipped (and logged) where it does not match.
   */
  readonly activation?: PluginActivation;
}

/** A value an activation condition compares with (TOML's scalars). */
export type ActivationValue = string | number | boolean;

/** One condition on a configuration key. */
export interface ActivationCondition {
  /** Dotted key path; `hypervisor.*` is the configuration's hypervisor section, e.g. `hypervisor.*.shared_fs`. */
  readonly key: string;
  /** The condition holds when the key's value is one of these. */
  readonly in: readonly ActivationValue[];
  /** The value an absent key stands for (Kata's default); without it an absent key does not match. */
  readonly default?: ActivationValue;
}

/** When a plugin applies: all of `hypervisor`, every `when` and no `unless` must hold. */
export interface PluginActivation {
  /** The plugin is the driver of `[hypervisor.<name>]`. */
  readonly hypervisor?: string;
  /** Conditions that must all hold. */
  readonly when?: readonly ActivationCondition[];
  /** Conditions none of which may hold. */
  readonly unless?: readonly ActivationCondition[];
}

/**
 * A plugin the executables hand to the runtime: its name and how to import it (built-ins are
 * imported statically by `plugins/builtin.ts`, outside the core, so a bundler sees them).
 */
export interface PluginSource {
  readonly name: string;
  /**
   * The plugin's manifest, when it can be had without importing its code (a built-in's
   * `manifest.ts`): activation is then judged before the import, so an inactive plugin costs nothing.
   * The module's own manifest must be the same.
   */
  readonly manifest?: PluginManifest;
  load(): Promise<unknown>;
}

export interface PluginContext {
  /** The plugin's name, as in its manifest. */
  readonly name: string;
  /** Tap-only view of the hook table. */
  readonly hooks: TapOnlyHooks;
  /** Logger bound to `{ plugin: name }`. */
  readonly log: Logger;
  /** The plugin API version of this runtime. */
  readonly apiVersion: string;
}

export interface KataPlugin {
  readonly manifest: PluginManifest;
  /** Registers the plugin's hook handlers. Only taps; no I/O. */
  apply(ctx: PluginContext): void;
}

/** Identity helper that types (and freezes) a plugin definition. */
export function definePlugin<T extends KataPlugin>(plugin: T): T {
  return Object.freeze(plugin);
}

export { STAGE } from './hooks.js';
export type { Stage, TapOnlyHooks, TapOptions, ContainerEvent } from './hooks.js';
export type { CapabilityView, CapabilityName, ReadonlyCapabilities } from './capabilities.js';
export { KNOWN_CAPABILITIES } from './capabilities.js';
export type { VerdictView, Veto } from './verdict.js';
export type { KataConfig, HypervisorSection } from './config/types.js';
export { hvKey } from './config/types.js';
export type * from './plan.js';
export {
  SANDBOX_DIR,
  SANDBOX_SHARED_DIR,
  GUEST_SHARED_DIR,
  GUEST_CONTAINERS_DIR,
  AGENT_CHANNEL_NAME,
  AGENT_VSOCK_PORT,
  DEBUG_CONSOLE_CHANNEL_NAME,
  DEBUG_CONSOLE_KERNEL_PARAM,
  RENDER_ACCESS_PLATFORM,
  fillSandboxDir,
  renderDeviceCapability,
  renderTeeCapability,
} from './plan.js';
export type { VmContext, VmTemplateFiles, VmTemplateRole, SandboxNetwork, GuestInterface, GuestIpAddress, GuestNeighbor, GuestRoute, VmHandle, VmExit, BlockDeviceSpec, HotpluggedBlock, PciHotpluggedBlock, ScsiHotpluggedBlock, UnplugOptions, ContainerContext, RootfsAttachment, RootfsMount, RootfsSource, GuestStorage } from './vm.js';
export { guestBlockSource } from './vm.js';
export { inNetns } from './netns.js';
export { detectHost, chooseAccelerator, type HostInfo, type Accelerator } from './host.js';
export { Daemon, type DaemonOptions, type DaemonExit } from './daemon.js';
export { silentLogger, type Logger } from './logger.js';
export { LineRing } from './line-ring.js';
export { spawnProbe, spawnTied } from './child.js';
export { SupervisedProcess, describeExit, type SupervisedOptions, type ProcessExit, type StopStep } from './supervised.js';
export { assertTrustedPath } from './trusted-path.js';
export { KataError, errorText, pluginErrorCodePrefix, type PluginErrorCode } from './errors.js';
export type { HostCheck, HostCheckContext, CheckStatus } from './host-check.js';
export { productMismatch } from './host-check.js';
export { TEMPLATE_CAPABILITY } from './template-files.js';
