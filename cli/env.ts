/**
 * `kata-runtime env [--json]` (alias `kata-env`): the configuration, runtime, hypervisor, agent and
 * host, as TOML (default) or JSON with two-space indentation. Table and field names follow Kata's
 * `EnvInfo` (format 1.0.27) so tools that read Kata's output read ours; fields Kata does not have
 * (plugins, the accelerator choice, KVM/TDX details with reasons) are added, none renamed.
 *
 * It describes the configuration, not whether the host can run it (that is `check`): the files the
 * configuration names need not exist, and no root is needed. An invalid configuration is still
 * shown as far as it can be read, its problems go to stderr and the exit status is 1.
 *
 * `KATA_TS_SYSROOT` (tests only) relocates the host facts, as for `check`.
 */
import path from 'node:path';
import parseSemver from 'semver/functions/parse.js';
import { stringify } from 'smol-toml';
import { formatProblem, isKataError, type KataError, type Problem } from '../core/errors.js';
import { readConfigFile } from '../core/config/parse.js';
import { detectHost, hypervisorVersion, type HostInfo } from '../core/host.js';
import { DIST_ROOT } from '../core/paths.js';
import { PLUGIN_API_VERSION } from '../core/plugin-api.js';
import { judgeConfig, type Judgement } from '../core/runtime.js';
import { runtimeVersion } from '../core/version.js';
import type { Logger } from '../core/logger.js';
import type { ConfigSource } from '../core/config/locate.js';
import { acceleratorFor, hostRoot, hypervisorBinary } from './check.js';
import { describeError, problemsOf, toJson } from './io.js';
import { EXIT, usageError, type CommandContext } from './main.js';

/**
 * Version of this document's format: Kata's 1.0.27 field set, plus our additions (semver build
 * metadata, so it sorts equal to Kata's).
 */
export const ENV_FORMAT_VERSION = '1.0.27+kata-ts.1';

/** The `env` document. Absent values are "" / 0 / false, as in Kata's output. */
export interface EnvInfo {
  Kernel: { Path: string; Parameters: string };
  Meta: { Version: string };
  Image: { Path: string };
  Initrd: { Path: string };
  Hypervisor: {
    /** Ours: the `[hypervisor.<name>]` section name. */
    Name: string;
    MachineType: string;
    Version: string;
    /** Ours: why Version is "" (binary missing, unrecognised output …). */
    VersionReason: string;
    Path: string;
    BlockDeviceDriver: string;
    EntropySource: string;
    SharedFS: string;
    VirtioFSDaemon: string;
    Msize9p: number | bigint;
    MemorySlots: number | bigint;
    HotPlugVFIO: string;
    ColdPlugVFIO: string;
    PCIeRootPort: number | bigint;
    PCIeSwitchPort: number | bigint;
    Debug: boolean;
    SecurityInfo: { Rootless: boolean; DisableSeccomp: boolean; GuestHookPath: string; EnableAnnotations: string[]; ConfidentialGuest: boolean };
  };
  Runtime: {
    /** Source and Valid are ours. */
    Config: { Path: string; Source: string; Valid: boolean };
    Path: string;
    GuestSeLinuxLabel: string;
    Experimental: string[];
    Version: { Version: { Semver: string; Commit: string; Major: number; Minor: number; Patch: number }; PluginAPI: string };
    Debug: boolean;
    Trace: boolean;
    DisableGuestSeccomp: boolean;
    DisableNewNetNs: boolean;
    SandboxCgroupOnly: boolean;
  };
  Host: {
    AvailableGuestProtections: string[];
    Kernel: string;
    Architecture: string;
    VMContainerCapable: boolean;
    SupportVSocks: boolean;
    /** Ours from here on. */
    VSockReason: string;
    KVMUsable: boolean;
    Accelerator: string;
    AcceleratorReason: string;
    Distro: { Name: string; Version: string };
    CPU: { Vendor: string; Model: string; CPUs: number };
    /** kB. */
    Memory: { Total: number; Free: number; Available: number };
    KVM: { DevicePresent: boolean; DeviceUsable: boolean; CPUFlag: string; VendorModule: string; OtherModules: string[]; Reason: string };
    TDX: { Available: boolean; Reason: string };
    SNP: { Available: boolean; Reason: string };
  };
  Agent: { Debug: boolean; Trace: boolean };
  /** Ours: the plugins the configuration loaded. */
  Plugins: { Name: string; Version: string; Builtin: boolean; Source: string; Reason: string; Provides: string[] }[];
  /** Ours, named as in `validate --json` and `check --json`: what is wrong with the configuration; empty when it is valid. */
  problems: Problem[];
}

export async function envCommand(ctx: CommandContext): Promise<number> {
  if (ctx.args.length > 0) throw usageError(`env takes no arguments (got ${ctx.args.join(' ')}); name the file with --config`);
  const located = ctx.locate();
  const host = detectHost({ root: hostRoot(ctx.io.env) });
  const judged = await judgeOrExplain(located.path, ctx.log);
  const doc = await buildEnvInfo({ configPath: located.path, configSource: located.source, host, ...judged });
  if (judged.error) doc.problems = problemsOf(judged.error);

  ctx.io.out(ctx.flags.json ? toJson(doc) + '\n' : stringify(doc) + '\n');

  if (judged.error) {
    ctx.io.err(describeError(judged.error));
    return EXIT.FAILED;
  }
  const j = judged.judgement;
  if (j && !j.valid) {
    ctx.io.err(`kata-runtime: ${located.path}: invalid configuration (${j.problems.length} problem${j.problems.length === 1 ? '' : 's'}):\n${j.problems.map((p: Problem) => `  - ${formatProblem(p)}\n`).join('')}`);
    return EXIT.FAILED;
  }
  return EXIT.OK;
}

interface Judged {
  judgement: Judgement | undefined;
  /** The error that stopped the configuration phase early (unreadable file, no hypervisor section …). */
  error: KataError | undefined;
  /** The raw configuration, when it parsed but did not pass the shape check. */
  raw: Record<string, unknown> | undefined;
}

/**
 * Judges the configuration. An error that stops the phase early becomes something to report rather
 * than the end of the command, so the rest of the document can still be shown; an internal error
 * (a bug) is not hidden.
 */
async function judgeOrExplain(file: string, log: Logger): Promise<Judged> {
  let judgement: Judgement | undefined;
  let error: KataError | undefined;
  try {
    judgement = await judgeConfig({ file, log });
  } catch (e) {
    if (!isKataError(e) || e.code === 'KATA_ERR_INTERNAL') throw e;
    error = e;
  }
  let raw: Record<string, unknown> | undefined;
  if (!judgement?.config) {
    try {
      raw = readConfigFile(file);
    } catch {
      raw = undefined; // already reported through `error`
    }
  }
  return { judgement, error, raw };
}

export interface EnvInputs extends Judged {
  configPath: string;
  configSource: ConfigSource;
  host: HostInfo;
}

/** Builds the document. Values come from the validated configuration when there is one, else from the raw file where their types fit. */
export async function buildEnvInfo(inputs: EnvInputs): Promise<EnvInfo> {
  const { judgement: j, host, raw } = inputs;
  const data = j?.config?.data ?? raw ?? {};
  const hvName = j?.hypervisor ?? onlyHypervisorName(data) ?? '';
  const hvSection = j?.config?.hypervisor ?? table(table(data, 'hypervisor'), hvName) ?? {};
  const hv = reader(hvSection);
  const rt = reader(j?.config?.runtime ?? table(data, 'runtime'));
  const agentTables = table(data, 'agent');
  const ag = reader(j?.config?.agent ?? table(agentTables, 'kata'));
  const plan = j?.plan;

  const binary = hypervisorBinary(hvSection, plan);
  const version = binary ? await hypervisorVersion(binary) : { version: null, reason: 'no hypervisor path in the configuration' };
  const accel = hvName ? acceleratorFor(hvSection, plan, host) : { accelerator: '', reason: 'no hypervisor in the configuration' };
  const rv = runtimeVersion();
  const sv = parseSemver(rv);

  return {
    Kernel: { Path: hv.str('kernel'), Parameters: hv.str('kernel_params') },
    Meta: { Version: ENV_FORMAT_VERSION },
    Image: { Path: hv.str('image') },
    Initrd: { Path: hv.str('initrd') },
    Hypervisor: {
      Name: hvName,
      MachineType: hv.str('machine_type'),
      Version: version.version ?? '',
      VersionReason: version.version === null ? version.reason : '',
      Path: binary,
      BlockDeviceDriver: hv.str('block_device_driver'),
      EntropySource: hv.str('entropy_source'),
      SharedFS: hv.str('shared_fs'),
      VirtioFSDaemon: hv.str('virtio_fs_daemon'),
      Msize9p: hv.num('msize_9p'),
      MemorySlots: hv.num('memory_slots'),
      HotPlugVFIO: hv.str('hot_plug_vfio'),
      ColdPlugVFIO: hv.str('cold_plug_vfio'),
      PCIeRootPort: hv.num('pcie_root_port'),
      PCIeSwitchPort: hv.num('pcie_switch_port'),
      Debug: hv.bool('enable_debug'),
      SecurityInfo: {
        Rootless: hv.bool('rootless'),
        DisableSeccomp: hv.bool('disable_seccomp'),
        GuestHookPath: hv.str('guest_hook_path'),
        EnableAnnotations: hv.strs('enable_annotations'),
        ConfidentialGuest: hv.bool('confidential_guest'),
      },
    },
    Runtime: {
      Config: { Path: inputs.configPath, Source: inputs.configSource, Valid: j?.valid ?? false },
      Path: path.join(DIST_ROOT, 'bin', 'kata-runtime.js'),
      GuestSeLinuxLabel: rt.str('guest_selinux_label'),
      Experimental: rt.strs('experimental'),
      Version: {
        Version: { Semver: rv, Commit: '', Major: sv?.major ?? 0, Minor: sv?.minor ?? 0, Patch: sv?.patch ?? 0 },
        PluginAPI: PLUGIN_API_VERSION,
      },
      Debug: rt.bool('enable_debug'),
      Trace: rt.bool('enable_tracing'),
      DisableGuestSeccomp: rt.bool('disable_guest_seccomp'),
      DisableNewNetNs: rt.bool('disable_new_netns'),
      SandboxCgroupOnly: rt.bool('sandbox_cgroup_only'),
    },
    Host: {
      AvailableGuestProtections: [...host.guestProtections],
      Kernel: host.kernel,
      Architecture: host.architecture,
      // This configuration's VMs can run here: on KVM, or on TCG when the hypervisor falls back to it.
      VMContainerCapable: host.kvmCanRunStandardGuest || accel.accelerator === 'tcg',
      SupportVSocks: host.vhostVsock.available,
      VSockReason: host.vhostVsock.reason,
      KVMUsable: host.kvmCanRunStandardGuest,
      Accelerator: accel.accelerator,
      AcceleratorReason: accel.reason,
      Distro: { Name: host.distro.name, Version: host.distro.version },
      CPU: { Vendor: host.cpu.vendor, Model: host.cpu.model, CPUs: host.cpu.count },
      Memory: { Total: host.memory.total, Free: host.memory.free, Available: host.memory.available },
      KVM: {
        DevicePresent: host.kvm.devicePresent,
        DeviceUsable: host.kvm.deviceUsable,
        CPUFlag: host.kvm.virtFlag ?? '',
        VendorModule: host.kvm.vendorModule ?? '',
        OtherModules: [...host.kvm.otherModules],
        Reason: host.kvm.reason,
      },
      TDX: { Available: host.tdx.available, Reason: host.tdx.reason },
      SNP: { Available: host.snp.available, Reason: host.snp.reason },
    },
    Agent: { Debug: ag.bool('enable_debug'), Trace: ag.bool('enable_tracing') },
    Plugins: (j?.plugins ?? []).map((p) => ({ Name: p.name, Version: p.version, Builtin: p.builtin, Source: p.specifier, Reason: p.reason, Provides: [...p.provides] })),
    problems: [...(j?.problems ?? [])],
  };
}

/** Typed reads that ignore values of the wrong type (an invalid file is shown as far as it goes). */
function reader(section: object | undefined) {
  const s = (section ?? {}) as Readonly<Record<string, unknown>>;
  return {
    str: (k: string): string => (typeof s[k] === 'string' ? (s[k] as string) : ''),
    num: (k: string): number | bigint => (typeof s[k] === 'number' || typeof s[k] === 'bigint' ? (s[k] as number | bigint) : 0),
    bool: (k: string): boolean => s[k] === true,
    strs: (k: string): string[] => (Array.isArray(s[k]) ? (s[k] as unknown[]).filter((x): x is string => typeof x === 'string') : []),
  };
}

function table(data: Readonly<Record<string, unknown>> | undefined, key: string): Record<string, unknown> | undefined {
  const v = data?.[key];
  return v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Date) ? (v as Record<string, unknown>) : undefined;
}

function onlyHypervisorName(data: Readonly<Record<string, unknown>>): string | undefined {
  const hv = table(data, 'hypervisor');
  const names = hv ? Object.keys(hv).filter((k) => table(hv, k)) : [];
  return names.length === 1 ? names[0] : undefined;
}
