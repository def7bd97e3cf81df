/**
 * The configuration as plugins see it. Key names stay Kata's own (snake_case) all the way through,
 * so that a key in an error message, a log line, the README and the TOML file is the same string.
 */
import type { AgentSection, FactorySection, HypervisorCommon, RuntimeSection } from './schema-types.js';

/** Parsed TOML before the shape check: nothing is known about it yet. */
export type RawConfig = Record<string, unknown>;

/**
 * A hypervisor section after the shape check, with schema defaults filled in. Plugin-specific keys
 * are typed by each plugin (e.g. `cfg.hypervisor as ClhSection`).
 */
export type HypervisorSection = HypervisorCommon & { readonly [key: string]: unknown };

export interface KataConfig {
  /** The file the configuration came from (undefined for in-memory configurations). */
  readonly path: string | undefined;
  /** The name in `[hypervisor.<name>]`. */
  readonly hypervisorName: string;
  /** `hypervisor.<name>`: prefix for key paths in messages. */
  readonly hypervisorTable: string;
  readonly hypervisor: HypervisorSection;
  /** The agent section that applies (`[agent.kata]`, or the last agent section, as Kata does). */
  readonly agent: AgentSection;
  readonly runtime: RuntimeSection;
  readonly factory: FactorySection;
  /** The whole configuration after the shape check (defaults filled in). */
  readonly data: Readonly<Record<string, unknown>>;
}

/** `hypervisor.clh.shared_fs` for key `shared_fs`. */
export function hvKey(cfg: Pick<KataConfig, 'hypervisorTable'>, key: string): string {
  return `${cfg.hypervisorTable}.${key}`;
}
