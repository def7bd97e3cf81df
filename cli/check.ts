/**
 * `kata-runtime check [--json]` (alias `kata-check`): can this host run this configuration?
 *
 * Judges the configuration first (an invalid one is reported, every problem on stderr), then runs
 * the host checks that the configuration calls for: KVM, vhost-vsock, TDX for a confidential guest,
 * the hypervisor binary and its version, and the files the configuration names. Each check is one
 * line with a status:
 *
 *   ok    the requirement is met
 *   info  a fact, nothing to do
 *   WARN  it will run, worse than it could (e.g. QEMU on TCG instead of KVM)
 *   FAIL  it will not run; the line says why and what to do
 *
 * Exit 0 when nothing FAILs and the configuration is valid, 1 otherwise. No root needed: /dev/kvm is
 * opened, never used to create a VM.
 *
 * `KATA_TS_SYSROOT` (tests only) relocates the host facts (/proc, /sys, /dev, /etc) as it relocates
 * the default configuration paths; the files the configuration names are checked as written.
 */
import { accessSync, constants as fsConstants, statSync } from 'node:fs';
import { formatProblem } from '../core/errors.js';
import type { Hooks } from '../core/hooks.js';
import type { CheckStatus, HostCheck } from '../core/host-check.js';
import { chooseAccelerator, detectHost, hypervisorVersion, productName, type AcceleratorChoice, type HostInfo, type HypervisorVersion } from '../core/host.js';
import type { SandboxPlan } from '../core/plan.js';
import { judgeConfigWithHooks, type Judgement } from '../core/runtime.js';
import { EXIT, usageError, type CommandContext } from './main.js';
import { toJson } from './io.js';

export type { CheckStatus, HostCheck };

/** The `check --json` document. */
export interface CheckReport {
  configPath: string | undefined;
  hypervisor: string;
  valid: boolean;
  /** No check failed and the configuration is valid. */
  capable: boolean;
  checks: HostCheck[];
  problems: Judgement['problems'];
}

/** What the host checks look at: the judged configuration and the host facts. */
export interface CheckInputs {
  readonly hypervisor: string;
  /** The hypervisor section (after the shape check, defaults filled in). */
  readonly section: Readonly<Record<string, unknown>>;
  readonly plan: SandboxPlan | undefined;
  readonly host: HostInfo;
}

/** Host root for detection: `/`, or KATA_TS_SYSROOT in tests. */
export function hostRoot(env: NodeJS.ProcessEnv): string {
  return env.KATA_TS_SYSROOT || '/';
}

/** The hypervisor binary this configuration runs: the plan's (what would be executed), else the `path` key. */
export function hypervisorBinary(section: Readonly<Record<string, unknown>>, plan: SandboxPlan | undefined): string {
  const fromPlan = plan?.vm.binary;
  if (typeof fromPlan === 'string' && fromPlan) return fromPlan;
  return typeof section.path === 'string' ? section.path : '';
}

/**
 * The accelerator this configuration gets on this host, from the plan's neutral `vm.accelerator`
 * (the hypervisor plugin says whether its VMs may fall back to TCG; a confidential guest needs
 * KVM), resolved by {@link chooseAccelerator}. Without a plan (an invalid configuration): `auto`.
 */
export function acceleratorFor(section: Readonly<Record<string, unknown>>, plan: SandboxPlan | undefined, host: HostInfo): { accelerator: string; reason: string } {
  const choice = acceleratorChoice(section, plan);
  const r = chooseAccelerator(host, choice);
  if (choice === 'kvm' && plan?.vm.accelerator === 'kvm' && section.confidential_guest !== true) {
    // The hypervisor, not the configuration, asks for KVM (Cloud Hypervisor has no emulation).
    return { accelerator: 'kvm', reason: host.kvmCanRunStandardGuest ? `the "${plan.hypervisor}" hypervisor runs on KVM only; ${host.kvm.reason}` : `the "${plan.hypervisor}" hypervisor runs on KVM only, but ${host.kvm.reason}` };
  }
  return r;
}

function acceleratorChoice(section: Readonly<Record<string, unknown>>, plan: SandboxPlan | undefined): AcceleratorChoice {
  if (section.confidential_guest === true) return 'kvm';
  return plan?.vm.accelerator ?? 'auto';
}

export async function checkCommand(ctx: CommandContext): Promise<number> {
  if (ctx.args.length > 0) throw usageError(`check takes no arguments (got ${ctx.args.join(' ')}); name the file with --config`);
  const located = ctx.locate();
  const { judgement: j, hooks } = await judgeConfigWithHooks({ file: located.path, log: ctx.log });
  const host = detectHost({ root: hostRoot(ctx.io.env) });
  const core = j.config ? await coreHostChecks({ hypervisor: j.hypervisor, section: j.config.hypervisor, plan: j.plan, host }) : undefined;
  const checks = core ? mergeChecks(core.checks, await pluginChecks(hooks, j, core.checks, core.version, ctx)) : [];
  const failures = checks.filter((c) => c.status === 'FAIL');
  const capable = j.valid && failures.length === 0;

  if (ctx.flags.json) {
    const report: CheckReport = { configPath: located.path, hypervisor: j.hypervisor, valid: j.valid, capable, checks, problems: j.problems };
    ctx.io.out(toJson(report) + '\n');
  } else {
    ctx.io.out(renderChecks(located.path, j, checks));
  }

  const errors: string[] = [];
  if (!j.valid) {
    errors.push(`kata-runtime: ${located.path}: invalid configuration (${plural(j.problems.length, 'problem')}):\n${j.problems.map((p) => `  - ${formatProblem(p)}\n`).join('')}`);
  }
  if (failures.length > 0) {
    errors.push(`kata-runtime: ERROR: System is not capable of running this configuration (${plural(failures.length, 'failed check')}):\n${failures.map((c) => `  - ${c.subject}: ${c.message}\n`).join('')}`);
  }
  if (errors.length > 0) {
    ctx.io.err(errors.join(''));
    return EXIT.FAILED;
  }
  return EXIT.OK;
}

/** The lines plugins add through the `hostChecks` hook, after the core's. */
async function pluginChecks(hooks: Hooks, j: Judgement, core: readonly HostCheck[], version: HypervisorVersion | undefined, ctx: CommandContext): Promise<HostCheck[]> {
  const added: HostCheck[] = [];
  if (!j.config) return added;
  await hooks.hostChecks.promise({ config: j.config, plan: j.plan, checks: core, add: (c) => void added.push(Object.freeze({ ...c })), version, log: ctx.log });
  return added;
}

/** The core's lines, each refined by a plugin's line of the same id, then the plugins' other lines. */
export function mergeChecks(core: readonly HostCheck[], fromPlugins: readonly HostCheck[]): HostCheck[] {
  const refined = core.map((c) => [...fromPlugins].reverse().find((p) => p.id === c.id) ?? c);
  return [...refined, ...fromPlugins.filter((p) => !core.some((c) => c.id === p.id))];
}

/** Runs every host check this configuration calls for, in a fixed order. */
export async function hostChecks(inputs: CheckInputs): Promise<HostCheck[]> {
  return (await coreHostChecks(inputs)).checks;
}

/** {@link hostChecks}, with what the hypervisor binary said to `--version` (for the plugins' `hostChecks` context). */
async function coreHostChecks(inputs: CheckInputs): Promise<{ checks: HostCheck[]; version: HypervisorVersion | undefined }> {
  const { hypervisor, section, plan, host } = inputs;
  const checks: HostCheck[] = [];
  let version: HypervisorVersion | undefined;
  const confidential = section.confidential_guest === true;

  checks.push(kvmCheck(hypervisor, section, plan, host, confidential));
  checks.push(vsockCheck(plan, host));
  if (confidential) {
    checks.push(
      host.tdx.available
        ? { id: 'tdx', status: 'ok', subject: 'Intel TDX', message: `available for confidential_guest = true (${host.tdx.reason})` }
        : { id: 'tdx', status: 'FAIL', subject: 'Intel TDX', message: `confidential_guest = true needs Intel TDX, but ${host.tdx.reason}; run on a TDX host or set confidential_guest = false` },
    );
  }

  const binary = hypervisorBinary(section, plan);
  const binaryCheck = executableCheck('hypervisor-binary', 'hypervisor binary', binary, `${hypervisorTable(hypervisor)}.path`);
  checks.push(binaryCheck);
  if (binaryCheck.status === 'ok') {
    version = await hypervisorVersion(binary);
    checks.push(versionCheck(version));
  }

  checks.push(...fileCheck('kernel', 'guest kernel', section.kernel, `${hypervisorTable(hypervisor)}.kernel`));
  checks.push(...fileCheck('image', 'guest image', section.image, `${hypervisorTable(hypervisor)}.image`));
  checks.push(...fileCheck('initrd', 'guest initrd', section.initrd, `${hypervisorTable(hypervisor)}.initrd`));
  checks.push(...fileCheck('firmware', 'guest firmware', section.firmware, `${hypervisorTable(hypervisor)}.firmware`));

  const sharedFs = section.shared_fs;
  if (sharedFs === 'virtio-fs' || sharedFs === 'virtio-fs-nydus') {
    const daemon = typeof section.virtio_fs_daemon === 'string' ? section.virtio_fs_daemon : '';
    checks.push(
      daemon
        ? executableCheck('virtio-fs-daemon', 'virtio-fs daemon', daemon, `${hypervisorTable(hypervisor)}.virtio_fs_daemon`)
        : { id: 'virtio-fs-daemon', status: 'FAIL', subject: 'virtio-fs daemon', message: `shared_fs = "${sharedFs}" needs virtio_fs_daemon (the virtiofsd binary), which is not set` },
    );
  }
  return { checks, version };
}

function kvmCheck(hypervisor: string, section: Readonly<Record<string, unknown>>, plan: SandboxPlan | undefined, host: HostInfo, confidential: boolean): HostCheck {
  const base = { id: 'kvm', subject: 'KVM' } as const;
  if (host.kvmCanRunStandardGuest) return { ...base, status: 'ok', message: host.kvm.reason };
  if (confidential) return { ...base, status: 'FAIL', message: `a confidential (TDX) guest needs KVM, but ${host.kvm.reason}` };
  if (!plan) return { ...base, status: 'WARN', message: `${host.kvm.reason}; whether the "${hypervisor}" hypervisor can do without is up to its plugin` };
  const choice = acceleratorChoice(section, plan);
  if (choice === 'kvm') {
    const why = plan.vm.accelerator === 'kvm' && section.accelerator !== 'kvm' ? `the "${hypervisor}" hypervisor needs KVM` : 'the configuration forces accelerator = "kvm"';
    return { ...base, status: 'FAIL', message: `${why}, but ${host.kvm.reason}; use a host with hardware virtualisation${section.accelerator === 'kvm' ? ', or set accelerator = "auto" to fall back to TCG' : ', or a hypervisor that falls back to TCG (QEMU)'}` };
  }
  if (choice === 'tcg') return { ...base, status: 'info', message: `not used: TCG (software emulation) requested by the configuration (${host.kvm.reason})` };
  return { ...base, status: 'WARN', message: `${host.kvm.reason}; the VM falls back to TCG (software emulation): guests run, but slowly` };
}

/** vhost-vsock matters only for an agent channel over AF_VSOCK; the plan says which channel the VM has. */
function vsockCheck(plan: SandboxPlan | undefined, host: HostInfo): HostCheck {
  const base = { id: 'vhost-vsock', subject: 'vhost-vsock' } as const;
  if (host.vhostVsock.available) return { ...base, status: 'ok', message: host.vhostVsock.reason };
  const channel = plan?.vm.devices.find((d) => d.kind === 'agent-channel');
  if (channel?.transport === 'hybrid-vsock') return { ...base, status: 'info', message: 'not needed: the hypervisor serves the guest vsock itself, over a unix socket on the host (hybrid vsock)' };
  if (channel?.transport === 'virtio-serial') return { ...base, status: 'WARN', message: `${host.vhostVsock.reason}; the agent channel uses virtio-serial instead` };
  if (channel?.transport === 'vsock') return { ...base, status: 'FAIL', message: `the agent channel is AF_VSOCK, but ${host.vhostVsock.reason}; load vhost_vsock (modprobe vhost_vsock)` };
  return { ...base, status: 'WARN', message: host.vhostVsock.reason };
}

/** What the binary says it is; the hypervisor plugin refines this line when it is not its own product. */
function versionCheck(v: HypervisorVersion): HostCheck {
  const base = { id: 'hypervisor-version', subject: 'hypervisor version' } as const;
  if (v.version === null) return { ...base, status: 'info', message: `unknown: ${v.reason}` };
  return { ...base, status: 'info', message: `${productName(v.product)} ${v.version}` };
}

/** A binary: exists, is a regular file, is executable. */
function executableCheck(id: string, subject: string, file: string, key: string): HostCheck {
  if (!file) return { id, status: 'FAIL', subject, message: `${key} is not set` };
  const problem = fileProblem(file, fsConstants.X_OK);
  return problem
    ? { id, status: 'FAIL', subject, message: `${file} ${problem} (${key}); install it or correct the path` }
    : { id, status: 'ok', subject, message: `${file} is executable` };
}

/** A file the guest needs, checked when the key is set (an unset kernel or image is a configuration problem). */
function fileCheck(id: string, subject: string, value: unknown, key: string): HostCheck[] {
  if (typeof value !== 'string' || value === '') return [];
  const problem = fileProblem(value, fsConstants.R_OK);
  return [
    problem
      ? { id, status: 'FAIL', subject, message: `${value} ${problem} (${key}); install it or correct the path` }
      : { id, status: 'ok', subject, message: `${value} exists` },
  ];
}

function fileProblem(file: string, mode: number): string | undefined {
  try {
    if (!statSync(file).isFile()) return 'is not a regular file';
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return code === 'ENOENT' || code === 'ENOTDIR' ? 'does not exist' : `cannot be read (${code ?? String(e)})`;
  }
  try {
    accessSync(file, mode);
    return undefined;
  } catch {
    return mode === fsConstants.X_OK ? 'is not executable' : 'is not readable';
  }
}

export function renderChecks(configPath: string, j: Judgement, checks: readonly HostCheck[]): string {
  const lines = [`configuration: ${configPath}`, `hypervisor:    ${j.hypervisor}`, `verdict:       ${j.valid ? 'valid' : `INVALID (${plural(j.problems.length, 'problem')}, see stderr)`}`, ''];
  for (const c of checks) lines.push(`${c.status.padEnd(4)}  ${c.subject}: ${c.message}`);
  if (checks.length > 0) lines.push('');
  const failed = checks.filter((c) => c.status === 'FAIL').length;
  const warned = checks.filter((c) => c.status === 'WARN').length;
  if (!j.config) lines.push('Host not checked: the configuration could not be read as a whole (see stderr)');
  else if (failed === 0 && j.valid) lines.push(`System is capable of running this configuration${warned > 0 ? ` (${plural(warned, 'warning')})` : ''}`);
  else if (failed === 0) lines.push('The host passes every check, but the configuration is invalid (see stderr)');
  else lines.push(`System is not capable of running this configuration (${plural(failed, 'failed check')}, see stderr)`);
  return lines.join('\n') + '\n';
}

function hypervisorTable(hypervisor: string): string {
  return `hypervisor.${hypervisor}`;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}
