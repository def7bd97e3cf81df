/**
 * The configuration phase, from TOML to a frozen ValidatedConfig and SandboxPlan:
 *
 *   parse → pick plugins → load and apply them → configParsed → shape check (core + plugin
 *   schemas) → capabilities → core value rules + validate hook → requirements vs capabilities →
 *   plan.
 *
 * Problems found from the shape check on are collected, not thrown one at a time: the caller gets
 * every problem at once. Errors before that (unreadable file, no hypervisor section, a plugin that
 * will not load) stop the phase immediately, since nothing after them can be judged.
 */
import path from 'node:path';
import { applyAnnotations, type AppliedAnnotation, type ApplyAnnotationsOptions } from './annotations.js';
import { CapabilitySet, type CapabilityRecord, type CapabilityView, type RemovedCapability } from './capabilities.js';
import { checkShape, builtinSchema, isPlainObject, pluginSchema, type TableSchema } from './config/schema.js';
import { coreRuleProblems } from './config/rules.js';
import { parseToml, readConfigFile } from './config/parse.js';
import type { KataConfig, RawConfig } from './config/types.js';
import { ConfigInvalidError, KataError, type Problem } from './errors.js';
import { createHooks, type Hooks } from './hooks.js';
import { silentLogger, type Logger } from './logger.js';
import { availableParallelism } from 'node:os';
import { TEMPLATE_CAPABILITY } from './template-files.js';
import { baseVmDescription, unrenderableIntents, type SandboxPlan } from './plan.js';
import { staticSandboxSizing } from './resources.js';
import { activationOf, applyPlugin, builtinPlugins, checkInProcess, checkPluginSet, importBuiltin, importThirdParty, type LoadedPlugin } from './plugin-loader.js';
import type { PluginManifest, PluginSource } from './plugin-api.js';
import { Verdict, type ConfigWarning, type Requirement } from './verdict.js';

export interface JudgeOptions {
  /** Configuration file to read. */
  file?: string;
  /** TOML text (with `file` used only for messages). */
  text?: string;
  /** An already-parsed configuration. */
  raw?: RawConfig;
  /**
   * The sandbox's OCI annotations (shim). Permitted `io.katacontainers.config.*` overrides are
   * applied to the parsed file before the shape check, so they are judged like file values; refused
   * ones stop the phase with one KATA_ERR_ANNOTATION error listing all of them (core/annotations.ts).
   */
  annotations?: Readonly<Record<string, string>>;
  /** Host facts for annotation checks (`pathExists`, `hostCpus`); see ApplyAnnotationsOptions. */
  annotationOptions?: ApplyAnnotationsOptions;
  /** The built-in plugins offered to this configuration; default: those set by useBuiltinPlugins(). */
  builtins?: readonly PluginSource[];
  /**
   * Plugins handed over in process (the test kit, an embedding program): a module's default export,
   * or a specifier as `[runtime] plugins` takes it (a path, or a package name). Checked and applied
   * like those listed in `[runtime] plugins`, after them. A default export with a schema path needs
   * the specifier form, which tells where its module is.
   */
  plugins?: readonly unknown[];
  log?: Logger;
}

export interface PluginInfo {
  readonly name: string;
  readonly version: string;
  readonly builtin: boolean;
  readonly specifier: string;
  readonly reason: string;
  readonly provides: readonly string[];
}

/** Everything the validated config phase decided, valid or not. */
export interface Judgement {
  readonly valid: boolean;
  readonly configPath: string | undefined;
  readonly hypervisor: string;
  readonly plugins: readonly PluginInfo[];
  readonly capabilities: readonly CapabilityRecord[];
  readonly removedCapabilities: readonly RemovedCapability[];
  readonly requirements: readonly (Requirement & { readonly met: boolean })[];
  readonly problems: readonly Problem[];
  readonly warnings: readonly ConfigWarning[];
  readonly unknownKeys: readonly string[];
  /** Present when the configuration passed the shape check. */
  readonly config: KataConfig | undefined;
  /** Present when the configuration is valid. */
  readonly plan: SandboxPlan | undefined;
}

export interface ValidatedConfig {
  readonly config: KataConfig;
  readonly plan: SandboxPlan;
  readonly judgement: Judgement;
  /** The hook table the plugins tapped; the sandbox lifecycle goes on using it. */
  readonly hooks: Hooks;
  readonly plugins: readonly LoadedPlugin[];
  /** The annotation overrides applied before validation (empty without annotations). */
  readonly annotations: readonly AppliedAnnotation[];
}

interface PhaseState {
  judgement: Judgement;
  hooks: Hooks;
  plugins: LoadedPlugin[];
  annotations: readonly AppliedAnnotation[];
}

/** Runs the validated config phase and reports every decision; throws only for errors that stop it early. */
export async function judgeConfig(opts: JudgeOptions): Promise<Judgement> {
  return (await runPhase(opts)).judgement;
}

/** {@link judgeConfig}, with the hook table the plugins tapped (for hooks that run later, e.g. `hostChecks`). */
export async function judgeConfigWithHooks(opts: JudgeOptions): Promise<{ judgement: Judgement; hooks: Hooks }> {
  const { judgement, hooks } = await runPhase(opts);
  return { judgement, hooks };
}

/** Runs the validated config phase; throws ConfigInvalidError listing every problem when invalid. */
export async function loadValidatedConfig(opts: JudgeOptions): Promise<ValidatedConfig> {
  const { judgement, hooks, plugins, annotations } = await runPhase(opts);
  if (!judgement.valid || !judgement.config || !judgement.plan) throw new ConfigInvalidError(judgement.problems, judgement.configPath);
  return Object.freeze({ config: judgement.config, plan: judgement.plan, judgement, hooks, plugins, annotations });
}

async function runPhase(opts: JudgeOptions): Promise<PhaseState> {
  const log = opts.log ?? silentLogger();
  const configPath = opts.file;
  const fromFile = opts.raw ?? (opts.text !== undefined ? parseToml(opts.text, opts.file) : configPath ? readConfigFile(configPath) : undefined);
  if (!fromFile) throw new KataError('KATA_ERR_INTERNAL', 'judgeConfig needs a file, a text or a raw configuration');
  if (configPath) log.info({ path: configPath }, 'configuration loaded');

  const hypervisorName = pickHypervisorSection(fromFile, configPath);
  // Annotations first: they may change which plugins load (shared_fs, disable_block_device_use).
  let parsed = fromFile;
  let applied: readonly AppliedAnnotation[] = [];
  if (opts.annotations) {
    const r = applyAnnotations(fromFile, opts.annotations, hypervisorName, opts.annotationOptions);
    parsed = r.config;
    applied = r.applied;
    for (const a of r.applied) log.info({ annotation: a.annotation, key: a.key, value: a.value, previous: a.previous }, `annotation ${a.annotation} overrides ${a.key}`);
    for (const i of r.ignored) log.warn({ annotation: i.annotation }, `annotation ${i.annotation} ignored: ${i.why}`);
  }
  const hypervisorTable = `hypervisor.${hypervisorName}`;
  const problems: Problem[] = [];

  // Plugins: the hypervisor's driver first, then the third-party plugins, then the other built-ins,
  // each where its manifest's activation matches this configuration.
  // A built-in offered with its manifest is imported only when its activation matches.
  const offered = await Promise.all(
    (opts.builtins ?? builtinPlugins()).map(async (source) => ({ source, manifest: source.manifest ?? (await importBuiltin(source)).manifest })),
  );
  const thirdParty: LoadedPlugin[] = [];
  for (const spec of thirdPartySpecs(parsed)) {
    const p = await importThirdParty(spec, 'listed in runtime.plugins', configPath ? path.dirname(path.resolve(configPath)) : undefined);
    const act = activationOf(p.manifest.activation, parsed, hypervisorName);
    if (act.active) thirdParty.push(act.reason ? { ...p, reason: `listed in runtime.plugins; ${act.reason}` } : p);
    else log.info({ plugin: p.manifest.name, why: act.reason }, `plugin ${p.manifest.name} does not apply to this configuration`);
  }
  for (const plugin of opts.plugins ?? []) {
    const p = typeof plugin === 'string' ? await importThirdParty(plugin, 'handed over in process', configPath ? path.dirname(path.resolve(configPath)) : process.cwd()) : await checkInProcess(plugin, 'handed over in process');
    const act = activationOf(p.manifest.activation, parsed, hypervisorName);
    if (act.active) thirdParty.push(act.reason ? { ...p, reason: `handed over in process; ${act.reason}` } : p);
  }
  const active: LoadedPlugin[] = [];
  for (const o of offered) {
    const act = activationOf(o.manifest.activation, parsed, hypervisorName);
    if (act.active && o.manifest.activation) active.push({ ...(await importBuiltin(o.source)), reason: act.reason });
  }
  const driver = active.filter((p) => p.manifest.activation?.hypervisor !== undefined);
  const plugins: LoadedPlugin[] = [...driver, ...thirdParty, ...active.filter((p) => !driver.includes(p))];
  if (driver.length === 0 && !thirdParty.some((p) => p.manifest.provides?.includes(`hypervisor:${hypervisorName}`))) {
    const available = [
      ...offered.flatMap((o) => (o.manifest.activation?.hypervisor ? [o.manifest.activation.hypervisor] : [])),
      ...thirdParty.flatMap((p) => (p.manifest.provides ?? []).filter((r) => r.startsWith('hypervisor:')).map((r) => r.slice(11))),
    ];
    throw new KataError('KATA_ERR_HYPERVISOR_UNSUPPORTED', `configuration file contains hypervisor section [${hypervisorTable}], but no plugin provides the "${hypervisorName}" hypervisor (available: ${available.join(', ')})`, {
      key: hypervisorTable,
      value: hypervisorName,
      fix: `Use a configuration for one of: ${available.join(', ')}; or list a plugin providing "hypervisor:${hypervisorName}" in [runtime] plugins.`,
    });
  }
  const hvSection = parsed.hypervisor && (parsed.hypervisor as Record<string, unknown>)[hypervisorName];
  const hv = (isPlainObject(hvSection) ? hvSection : {}) as Record<string, unknown>;
  problems.push(...teeProblems(hv, hypervisorTable, plugins, offered.map((o) => o.manifest)));
  checkPluginSet(plugins);

  const hooks = createHooks();
  for (const p of plugins) applyPlugin(p, hooks, log);

  const raw = hooks.configParsed.call(structuredClone(parsed)) ?? parsed;

  // Shape check. Missing tables are created first so that their defaults are filled in.
  const data = raw as Record<string, unknown>;
  for (const t of ['runtime', 'factory'] as const) if (!isPlainObject(data[t])) data[t] ??= {};
  if (!isPlainObject(data.agent)) data.agent ??= { kata: {} };
  // A plugin's own table too, so that its schema's defaults are filled in when the file has none.
  for (const p of plugins) if (p.manifest.config && !p.manifest.config.table.includes('*')) createTable(data, p.manifest.config.table);
  const schemas = await schemasFor(plugins);
  const shape = checkShape(data, schemas, hypervisorTable);
  for (const key of shape.unknownKeys) log.warn({ key, path: configPath }, `unknown configuration key ${key} (ignored)`);
  problems.push(...shape.problems);

  const info = plugins.map(pluginInfo);
  if (shape.problems.length > 0) {
    // Values of the wrong type would mislead every later rule: report the shape problems alone.
    return {
      judgement: freezeJudgement({ valid: false, configPath, hypervisor: hypervisorName, plugins: info, capabilities: [], removedCapabilities: [], requirements: [], problems, warnings: [], unknownKeys: shape.unknownKeys, config: undefined, plan: undefined }),
      hooks,
      plugins,
      annotations: applied,
    };
  }

  const sizing = applyStaticSizing(data, hypervisorName, opts.annotations ?? {}, log);
  problems.push(...sizing.problems);
  const config = deepFreeze(buildConfig(data, configPath, hypervisorName, hypervisorTable));
  const caps = new CapabilitySet();
  // The hook's handlers receive per-plugin views of `caps` (see createTapView).
  const asView = caps as unknown as CapabilityView;
  hooks.capabilities.call(asView, config);

  const verdict = new Verdict();
  problems.push(...coreRuleProblems(config));
  if (config.factory.enable_template) {
    verdict.require(TEMPLATE_CAPABILITY, 'sandboxes start as clones of a VM template ([factory] enable_template = true), which the hypervisor plugin must be able to save and restore', 'core', {
      key: 'factory.enable_template',
      fix: 'set enable_template = false, or use a hypervisor whose plugin declares "vm:template" (qemu without virtio-fs)',
    });
  }
  hooks.validate.call(config, verdict as unknown as Parameters<Hooks['validate']['call']>[1], caps.readonly());
  problems.push(...verdict.problems);

  const requirements: (Requirement & { readonly met: boolean })[] = verdict.requirements.map((r) => ({ ...r, met: caps.has(r.capability) }));
  for (const r of requirements) if (!r.met) problems.push(unmetRequirement(r, caps, hypervisorTable, 'validate'));

  let plan: SandboxPlan | undefined;
  const warnings = [...verdict.warnings];
  if (problems.length === 0) {
    const built = buildPlan(hooks, config, caps, verdict, sizing.added);
    problems.push(...built.problems);
    if (built.problems.length === 0) {
      // The final check sees the plan as it will be launched; its vetoes stop the phase like any other.
      const last = new Verdict();
      hooks.checkPlan.call(built.plan, config, last as unknown as Parameters<Hooks['checkPlan']['call']>[2]);
      problems.push(...last.problems);
      for (const r of last.requirements) {
        const met = caps.has(r.capability);
        requirements.push({ ...r, met });
        if (!met) problems.push(unmetRequirement(r, caps, hypervisorTable, 'checkPlan'));
      }
      warnings.push(...last.warnings);
      if (problems.length === 0) plan = built.plan;
    }
  }

  return {
    judgement: freezeJudgement({
      valid: problems.length === 0,
      configPath,
      hypervisor: hypervisorName,
      plugins: info,
      capabilities: caps.records(),
      removedCapabilities: caps.removed(),
      requirements,
      problems,
      warnings,
      unknownKeys: shape.unknownKeys,
      config,
      plan,
    }),
    hooks,
    plugins,
    annotations: applied,
  };
}

/**
 * Creates the dotted table `dotted` where it and its parents are absent; a value of another type is
 * left for the shape check to report. Own properties only, defined rather than assigned, so that a
 * table named `__proto__` or `constructor` never reaches a prototype.
 */
function createTable(data: Record<string, unknown>, dotted: string): void {
  let cur = data;
  for (const part of dotted.split('.')) {
    if (!Object.hasOwn(cur, part)) Object.defineProperty(cur, part, { value: {}, enumerable: true, writable: true, configurable: true });
    const next = cur[part];
    if (!isPlainObject(next)) return;
    cur = next;
  }
}

function pickHypervisorSection(raw: RawConfig, file: string | undefined): string {
  const where = file ? `${file}: ` : '';
  const hv = raw.hypervisor;
  const names = isPlainObject(hv) ? Object.keys(hv).filter((k) => isPlainObject(hv[k])) : [];
  if (names.length === 0) {
    throw new KataError('KATA_ERR_CONFIG_NO_HYPERVISOR', `${where}the configuration has no [hypervisor.<name>] section`, { key: 'hypervisor' });
  }
  if (names.length > 1) {
    throw new KataError('KATA_ERR_CONFIG_MULTIPLE_HYPERVISORS', `${where}the configuration has ${names.length} hypervisor sections (${names.map((n) => `[hypervisor.${n}]`).join(', ')}); exactly one is allowed`, {
      key: 'hypervisor',
      value: names,
    });
  }
  return names[0] as string;
}

function thirdPartySpecs(raw: RawConfig): string[] {
  const list = isPlainObject(raw.runtime) ? raw.runtime.plugins : undefined;
  // A malformed list is reported by the shape check; nothing is loaded from it.
  return Array.isArray(list) && list.every((s) => typeof s === 'string' && s.length > 0) ? (list as string[]) : [];
}

/**
 * A confidential guest needs a plugin that provides its TEE (`confidential-guest:<tee>`). Reads
 * raw values (before the shape check); a value of the wrong type is reported by the shape check.
 */
/**
 * `static_sandbox_resource_mgmt = true`: the pod's limits (its sandbox annotations) are added to
 * default_vcpus and default_memory at boot, as Kata does, and the maxima are set to that size so the
 * VM reserves no hot-plug room (it never hot-plugs).
 */
function applyStaticSizing(
  data: Record<string, unknown>,
  hypervisorName: string,
  annotations: Readonly<Record<string, string>>,
  log: Logger,
): { problems: Problem[]; added?: { vcpus: number; memoryMiB: number } } {
  const runtime = data.runtime as Record<string, unknown>;
  const hv = (data.hypervisor as Record<string, Record<string, unknown>> | undefined)?.[hypervisorName];
  if (runtime.static_sandbox_resource_mgmt !== true || !hv) return { problems: [] };
  try {
    const defaults = { default_vcpus: Math.max(1, Math.ceil(Number(hv.default_vcpus))), default_memory: Number(hv.default_memory) };
    const size = staticSandboxSizing(defaults, annotations);
    log.info({ vcpus: size.vcpus, memoryMiB: size.memoryMiB }, 'static_sandbox_resource_mgmt: the VM is sized at boot from the pod\'s annotations');
    hv.default_vcpus = size.vcpus;
    hv.default_maxvcpus = size.vcpus;
    hv.default_memory = size.memoryMiB;
    hv.default_maxmemory = size.memoryMiB;
    return { problems: [], added: { vcpus: size.vcpus - defaults.default_vcpus, memoryMiB: size.memoryMiB - defaults.default_memory } };
  } catch (e) {
    const err = e instanceof KataError ? e : new KataError('KATA_ERR_ANNOTATION', String(e));
    return { problems: [{ code: err.code, key: err.key ?? 'runtime.static_sandbox_resource_mgmt', reason: err.text, fix: err.fix }] };
  }
}

function teeProblems(hv: Record<string, unknown>, table: string, active: readonly LoadedPlugin[], offered: readonly PluginManifest[]): Problem[] {
  if (hv.confidential_guest !== true) return [];
  const tee = (m: PluginManifest) => (m.provides ?? []).filter((r) => r.startsWith('confidential-guest:')).map((r) => r.slice('confidential-guest:'.length));
  if (active.some((p) => tee(p.manifest).length > 0)) return [];
  const available = [...new Set(offered.flatMap((m) => tee(m).map((t) => `${t} (plugin ${m.name})`)))].join(', ') || 'none';
  const snp = hv.sev_snp_guest === true;
  return [
    {
      code: 'KATA_ERR_TEE_UNSUPPORTED',
      key: snp ? `${table}.sev_snp_guest` : `${table}.confidential_guest`,
      value: true,
      reason: snp
        ? `AMD SEV-SNP confidential guests are not supported: no plugin provides SEV-SNP (available: ${available})`
        : `no loaded plugin provides a confidential guest for this configuration (available: ${available})`,
      fix: snp ? 'remove sev_snp_guest to run an Intel TDX guest, or set confidential_guest = false' : 'set confidential_guest = false, or load a plugin that provides the TEE',
    },
  ];
}

async function schemasFor(plugins: readonly LoadedPlugin[]): Promise<TableSchema[]> {
  const schemas = [await builtinSchema('configuration.schema.json', '', 'core'), await builtinSchema('hypervisor-common.schema.json', 'hypervisor.*', 'core')];
  for (const p of plugins) {
    const c = p.manifest.config;
    if (!c) continue;
    schemas.push(
      p.builtin && typeof c.schema === 'string' ? await builtinSchema(c.schema, c.table, p.manifest.name) : await pluginSchema(c.schema, c.table, p.manifest.name, p.moduleUrl),
    );
  }
  return schemas;
}

function buildConfig(data: Record<string, unknown>, path: string | undefined, hypervisorName: string, hypervisorTable: string): KataConfig {
  const agents = data.agent as Record<string, KataConfig['agent']>;
  const agentNames = Object.keys(agents);
  // Kata reads every [agent.*] table and the last one wins; prefer [agent.kata] when present.
  const agent = agents.kata ?? agents[agentNames[agentNames.length - 1] ?? 'kata'] ?? ({} as KataConfig['agent']);
  return {
    path,
    hypervisorName,
    hypervisorTable,
    hypervisor: (data.hypervisor as Record<string, KataConfig['hypervisor']>)[hypervisorName] as KataConfig['hypervisor'],
    agent,
    runtime: data.runtime as KataConfig['runtime'],
    factory: data.factory as KataConfig['factory'],
    data,
  };
}

/**
 * Runs the plan hook from the core's starting point. An intent the hypervisor plugin did not declare
 * it can render (`render:*` capabilities) is a problem of the validated config phase, never a
 * failure at VM start.
 */
function buildPlan(hooks: Hooks, config: KataConfig, caps: CapabilitySet, verdict: Verdict, staticSizing: SandboxPlan['staticSizing']): { plan: SandboxPlan; problems: Problem[] } {
  const readonlyCaps = caps.readonly();
  const initial: SandboxPlan = {
    hypervisor: config.hypervisorName,
    sharedFs: 'none',
    rootfs: [],
    blockDriver: null,
    confidential: null,
    vm: baseVmDescription(config, readonlyCaps, availableParallelism()),
    agent: null,
    sharedFsMount: null,
    daemons: [],
    ...(staticSizing ? { staticSizing } : {}),
    notes: verdict.warnings.map((w) => ({ by: w.plugin ?? 'core', level: 'warn' as const, message: `${w.key}: ${w.message}` })),
  };
  const plan = hooks.plan.call(initial, config, readonlyCaps) ?? initial;
  if (plan.vm === null || typeof plan.vm !== 'object' || !Array.isArray(plan.vm.devices)) {
    // A plugin replaced the neutral description instead of editing it (plugins add intents and render plan.vm.launch).
    throw new KataError('KATA_ERR_PLUGIN_HOOK', 'the plan hook left plan.vm without its device list: a plugin replaced the VM description instead of adding to it', {
      hook: 'plan',
      key: config.hypervisorTable,
      fix: 'Edit plan.vm in place (push intents to plan.vm.devices, set plan.vm.launch); never assign a new object to plan.vm.',
    });
  }
  const problems = unrenderableIntents(plan.vm, readonlyCaps).map(
    (u): Problem => ({
      code: 'KATA_ERR_CAPABILITY_MISSING',
      hook: 'plan',
      key: config.hypervisorTable,
      reason: `the plan asks for ${u.intent}, which the plugin serving [${config.hypervisorTable}] cannot render: it does not declare capability "${u.capability}"`,
      fix: `use a hypervisor whose plugin declares "${u.capability}", or change the configuration so that no plugin asks for ${u.intent}`,
    }),
  );
  if (problems.length > 0) return { plan, problems };
  if (plan.vm.launch === undefined) {
    throw new KataError('KATA_ERR_INTERNAL', `the "${config.hypervisorName}" hypervisor plugin built no launch description in the plan hook`, { key: config.hypervisorTable });
  }
  if (plan.rootfs.length === 0) {
    plan.notes.push({
      by: 'core',
      level: 'warn',
      message: 'no way to deliver a container rootfs: shared_fs is "none" and block devices are disabled; only images pulled inside the guest can run',
    });
  }
  // The capability set is final by now; record what the plan relied on.
  if (caps.has('block-device-hotplug') && plan.rootfs.includes('block-hotplug') && plan.blockDriver === null) {
    throw new KataError('KATA_ERR_INTERNAL', 'the plan delivers the rootfs by block hot-plug but names no block driver');
  }
  return { plan: deepFreeze(plan), problems };
}

function unmetRequirement(r: Requirement, caps: CapabilitySet, hypervisorTable: string, hook: 'validate' | 'checkPlan'): Problem {
  const removed = caps.removed().find((x) => x.name === r.capability);
  const because = removed ? ` (removed by plugin ${removed.by}: ${removed.why})` : '';
  return {
    code: 'KATA_ERR_CAPABILITY_MISSING',
    plugin: r.plugin,
    hook,
    key: r.key ?? hypervisorTable,
    reason: `requires capability "${r.capability}", which this configuration does not provide${because}: ${r.why}`,
    fix: r.fix ?? `change the configuration so that the hypervisor provides "${r.capability}"`,
  };
}

function pluginInfo(p: LoadedPlugin): PluginInfo {
  return { name: p.manifest.name, version: p.manifest.version, builtin: p.builtin, specifier: p.specifier, reason: p.reason, provides: p.manifest.provides ?? [] };
}

function freezeJudgement(j: Judgement): Judgement {
  return Object.freeze(j);
}


export function deepFreeze<T>(o: T): T {
  if (o !== null && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o as Record<string, unknown>)) deepFreeze(v);
  }
  return o;
}
