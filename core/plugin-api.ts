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
export type { Stage, TapOnlyHooks, TapOptions } from './hooks.js';
export type { CapabilityView, CapabilityName, ReadonlyCapabilities } from './capabilities.js';
export { KNOWN_CAPABILITIES } from './capabilities.js';
export type { VerdictView, Veto } from './verdict.js';
export type { KataConfig, HypervisorSection } from './config/types.js';
export { hvKey } from './config/types.js';
export type * from './plan.js';
export { isClhSpec, isQemuSpec, SANDBOX_DIR, SANDBOX_SHARED_DIR, GUEST_SHARED_DIR, GUEST_CONTAINERS_DIR, AGENT_VSOCK_PORT, fillSandboxDir } from './plan.js';
export type { VmContext, VmHandle, VmExit, BlockDeviceSpec, HotpluggedBlock, UnplugOptions, ContainerContext, RootfsAttachment, RootfsSource, GuestStorage } from './vm.js';
export { detectHost, chooseAccelerator, type HostInfo, type Accelerator } from './host.js';
export { Daemon, type DaemonOptions, type DaemonExit } from './daemon.js';
export { silentLogger, type Logger } from './logger.js';
export { LineRing } from './line-ring.js';
export { spawnProbe, spawnTied } from './child.js';
export { KataError } from './errors.js';
export type { HostCheck, HostCheckContext, CheckStatus } from './host-check.js';
