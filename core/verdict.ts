/**
 * The verdict of the validated config phase. Each plugin's `validate` handler receives a view that
 * stamps every veto, requirement and warning with the plugin's name and the hook, so a plugin can
 * neither forget its name nor claim another's.
 */
import { KataError, dropUndefined, type ErrorCode, type Problem } from './errors.js';
import type { CapabilityName } from './capabilities.js';
import { SCOPE_FOR_PLUGIN } from './capabilities.js';

/** Codes a plugin may raise through the verdict. */
export type VetoCode = Extract<ErrorCode, 'KATA_ERR_CONFIG_VETO' | 'KATA_ERR_CONFIG_VALUE' | 'KATA_ERR_TEE_UNSUPPORTED' | 'KATA_ERR_NETWORK_MODEL'>;

export interface Veto {
  /** Dotted key path, e.g. `hypervisor.clh.shared_fs`. */
  key: string;
  value?: unknown;
  /** Why the value is not allowed here. */
  reason: string;
  /** What the user should change. */
  fix: string;
  /** Defaults to KATA_ERR_CONFIG_VETO. */
  code?: VetoCode;
}

export interface Requirement {
  readonly capability: CapabilityName;
  readonly why: string;
  readonly plugin: string;
  /** The key whose value makes the capability appear; named in the error when it is missing. */
  readonly key?: string;
  readonly fix?: string;
}

export interface ConfigWarning {
  readonly plugin: string | undefined;
  readonly key: string;
  readonly message: string;
}

/** What a plugin's `validate` handler receives. */
export interface VerdictView {
  veto(v: Veto): void;
  require(capability: CapabilityName, why: string, opts?: { key?: string; fix?: string }): void;
  warn(key: string, message: string): void;
}

export class Verdict {
  readonly problems: Problem[] = [];
  readonly requirements: Requirement[] = [];
  readonly warnings: ConfigWarning[] = [];

  veto(v: Veto, plugin?: string, hook?: string): void {
    this.problems.push(dropUndefined({
      code: v.code ?? 'KATA_ERR_CONFIG_VETO',
      key: v.key,
      value: v.value,
      reason: v.reason,
      fix: v.fix,
      plugin,
      hook,
    }));
  }

  require(capability: CapabilityName, why: string, plugin: string, opts: { key?: string; fix?: string } = {}): void {
    this.requirements.push(dropUndefined({ capability, why, plugin, key: opts.key, fix: opts.fix }));
  }

  warn(key: string, message: string, plugin?: string): void {
    this.warnings.push({ plugin, key, message });
  }

  [SCOPE_FOR_PLUGIN](plugin: string, hook: string): VerdictView {
    return {
      veto: (v) => {
        // A veto the user cannot act on is the plugin's bug, not the user's: refuse it as such.
        const lacking = (['key', 'reason', 'fix'] as const).filter((f) => typeof v?.[f] !== 'string' || v[f].trim() === '');
        if (lacking.length > 0) {
          throw new KataError('KATA_ERR_PLUGIN_BAD_VETO', `vetoed ${typeof v?.key === 'string' && v.key ? v.key : 'a configuration'} without ${lacking.map((f) => `a ${f}`).join(' or ')}`, { plugin, hook });
        }
        this.veto(v, plugin, hook);
      },
      require: (c, why, opts) => this.require(c, why, plugin, opts),
      warn: (key, message) => this.warn(key, message, plugin),
    };
  }
}

