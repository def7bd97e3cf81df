/**
 * The `validate --json` document: what the CLI prints and what the test kit (`kata-ts/testing`)
 * answers, built in one place so that the two cannot differ.
 */
import { ConfigInvalidError, type KataError, type Problem } from './errors.js';
import type { SandboxPlan } from './plan.js';
import type { Judgement } from './runtime.js';

/** The `validate --json` document (documented in the README). */
export interface ValidateReport {
  valid: boolean;
  configPath: string | undefined | null;
  hypervisor: string;
  plugins: Judgement['plugins'];
  capabilities: Judgement['capabilities'];
  removedCapabilities: Judgement['removedCapabilities'];
  requirements: Judgement['requirements'];
  problems: Judgement['problems'];
  warnings: Judgement['warnings'];
  unknownKeys: Judgement['unknownKeys'];
  plan: Omit<SandboxPlan, 'vm'> | null;
  /** The hypervisor launch spec: Cloud Hypervisor's vm.create body, or QEMU's argv. */
  vm: unknown;
}

export function toReport(j: Judgement): ValidateReport {
  const { vm, ...plan } = j.plan ?? ({} as SandboxPlan);
  return {
    valid: j.valid,
    configPath: j.configPath,
    hypervisor: j.hypervisor,
    plugins: j.plugins,
    capabilities: j.capabilities,
    removedCapabilities: j.removedCapabilities,
    requirements: j.requirements,
    problems: j.problems,
    warnings: j.warnings,
    unknownKeys: j.unknownKeys,
    plan: j.plan ? plan : null,
    vm: j.plan ? vm.launch : null,
  };
}

/** The report of a judgement that stopped early (a plugin that will not load, no hypervisor section …): nothing found, the error as `problems[]`. */
export function errorReport(err: KataError, configPath: string | undefined | null): ValidateReport {
  return { valid: false, configPath, hypervisor: '', plugins: [], capabilities: [], removedCapabilities: [], requirements: [], problems: problemsOf(err), warnings: [], unknownKeys: [], plan: null, vm: null };
}

/** A coded error as `problems[]` entries: a ConfigInvalidError's own list, else the error as one problem. */
export function problemsOf(e: KataError): Problem[] {
  if (e instanceof ConfigInvalidError) return [...e.problems];
  // The plugin is its own field (formatProblem prefixes it when printed): the reason is the words alone.
  const p: Problem = { code: e.code, key: e.key ?? '', reason: e.text, fix: e.fix };
  return [{ ...p, ...(e.value !== undefined ? { value: e.value } : {}), ...(e.plugin ? { plugin: e.plugin } : {}), ...(e.hook ? { hook: e.hook } : {}) }];
}
