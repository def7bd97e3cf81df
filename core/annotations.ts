/**
 * OCI annotations that override configuration values, under Kata's security model.
 *
 * A pod may carry `io.katacontainers.config.{hypervisor,runtime,agent}.<name>` annotations. The
 * shim hands them, with the parsed configuration, to {@link applyAnnotations}, which returns a copy
 * of the configuration with the overrides applied (the file's own object is never changed) and a
 * record of what was applied. The validated config phase then judges the result exactly like a file
 * (`loadValidatedConfig({ annotations })`), so an overridden value that is out of range gets the usual
 * schema error naming the key.
 *
 * The rules, as the Kata Go runtime applies them (src/runtime/pkg/oci/utils.go), and where we are
 * stricter:
 *
 * - Every annotation whose name starts with `io.katacontainers.config.hypervisor.` must be enabled:
 *   the rest of its name must match one of the regular expressions in `[hypervisor.<name>]
 *   enable_annotations`. An empty list enables none. Kata checks this for every such annotation,
 *   known or not, before anything else. Kata's match is unanchored (Go `regexp.MatchString`,
 *   runtime-rs `RegexSet::is_match`), so Kata's `"kernel"` also enables `kernel_params` and
 *   `kernel_verity_params`; here a pattern must match the WHOLE name (`^(?:re)$`). Write `kernel.*`
 *   to enable both on purpose. A pattern JavaScript cannot compile enables nothing.
 * - A path-valued annotation must also match one of the glob(3) patterns in its `valid_*_paths`
 *   list (table below); an empty list refuses every value. Kata's Go runtime expands the glob against
 *   the file system (`filepath.Glob`) and compares strings exactly, so only existing, clean paths
 *   pass. Here the value must be absolute and clean (no `.` or `..` segment, no `//`, no trailing
 *   `/`), `*` and `?` never match `/`, and, when `pathExists` is given (the shim passes it), the path
 *   must exist. `/usr/bin/qemu-*` therefore refuses `/usr/bin/qemu-x/../../../tmp/evil`, which
 *   runtime-rs's `glob::Pattern::matches` (where `*` crosses `/`) would accept.
 * - Values are converted as Kata converts them: booleans as Go's `strconv.ParseBool`
 *   (`1 t T TRUE true True 0 f F FALSE false False`), unsigned integers as decimal digits,
 *   `default_vcpus` as a non-negative decimal float, `kernel_params` by whitespace (a parameter
 *   replaces one with the same name), `virtio_fs_extra_args` as a JSON array of strings (appended),
 *   `agent.kernel_modules` by `;` (replacing the list), `runtime.experimental` by spaces.
 * - Annotations under the three prefixes that Kata does not know are ignored, as Kata ignores them
 *   (reported in `ignored` so the shim can log them). Annotations Kata knows but this runtime does
 *   not implement are refused rather than silently dropped: Kata would act on them (e.g.
 *   `kernel_verity_params`), and a sandbox without the asked-for behaviour is worse than no sandbox.
 *   Settings that decide the sandbox's security posture (`confidential_guest`, `sev_snp_guest`,
 *   `enable_annotations` and the `valid_*` lists themselves) are refused: Kata has no annotation for
 *   them, and ignoring a request for a confidential guest would run an ordinary one.
 * - Kata stops at the first bad annotation; here every refused annotation is listed in one
 *   `KATA_ERR_ANNOTATION` error.
 *
 * Supported hypervisor annotations (name = config key unless shown, path lists in brackets):
 * `path` [valid_hypervisor_paths], `jailer_path` [valid_jailer_paths], `ctlpath` [valid_ctlpaths],
 * `virtio_fs_daemon` [valid_virtio_fs_daemon_paths], `entropy_source` [valid_entropy_sources],
 * `file_mem_backend` [valid_file_mem_backends], `vhost_user_store_path`
 * [valid_vhost_user_store_paths], `kernel`, `image`, `initrd`, `firmware`, `firmware_volume`,
 * `kernel_params`, `machine_type`, `machine_accelerators`, `cpu_features`, `guest_hook_path`,
 * `default_vcpus`, `default_max_vcpus` (→ `default_maxvcpus`), `default_memory` (≥ 256 MiB, Kata's
 * minimum), `memory_slots`, `memory_offset`, `enable_virtio_mem`, `enable_mem_prealloc`,
 * `enable_hugepages`, `enable_iommu`, `enable_iommu_platform`, `enable_guest_swap`, `rootless`,
 * `reclaim_guest_freed_memory`, `msize_9p`, `shared_fs` (`virtio-fs`, `virtio-9p`), `virtio_fs_cache`,
 * `virtio_fs_cache_size`, `virtio_fs_extra_args`, `block_device_driver`, `block_device_aio`,
 * `disable_block_device_use`, `block_device_cache_set`, `block_device_cache_direct`,
 * `block_device_cache_noflush`, `enable_iothreads`, `disable_image_nvdimm`, `disable_vhost_net`,
 * `enable_vhost_user_store`, `use_legacy_serial`, `pcie_root_port`, `rx_rate_limiter_max_rate`,
 * `tx_rate_limiter_max_rate`. Runtime: `disable_guest_seccomp`, `sandbox_cgroup_only`,
 * `enable_pprof`, `disable_new_netns`, `internetworking_model`, `experimental`,
 * `create_container_timeout`, `experimental_force_guest_pull`, `vfio_mode`, and
 * `io.katacontainers.enable_vcpus_pinning` (Kata's name has no `config.runtime.`). Agent:
 * `kernel_modules`, `enable_tracing`, `container_pipe_size`. Kata has no agent annotation for
 * `debug` or `dial_timeout`.
 *
 * `io.katacontainers.config_path` chooses the file (core/config/locate.ts `configFromAnnotation`) and
 * is not an override; it too must be enabled, as `config_path` in the same list.
 */
import { KataError, formatValue } from './errors.js';
import type { RawConfig } from './config/types.js';

export const ANNOTATION_PREFIX = 'io.katacontainers.';
export const HYPERVISOR_ANNOTATION_PREFIX = 'io.katacontainers.config.hypervisor.';
export const RUNTIME_ANNOTATION_PREFIX = 'io.katacontainers.config.runtime.';
export const AGENT_ANNOTATION_PREFIX = 'io.katacontainers.config.agent.';

/** Kata's `vc.MinHypervisorMemory`: an annotation may not ask for less guest memory (MiB). */
export const MIN_ANNOTATION_MEMORY_MIB = 256;

export type PathList =
  | 'valid_hypervisor_paths'
  | 'valid_jailer_paths'
  | 'valid_ctlpaths'
  | 'valid_virtio_fs_daemon_paths'
  | 'valid_entropy_sources'
  | 'valid_file_mem_backends'
  | 'valid_vhost_user_store_paths';

type Section = 'hypervisor' | 'runtime' | 'agent';

type Kind =
  | { t: 'string'; skipEmpty?: boolean }
  | { t: 'path'; list: PathList }
  | { t: 'bool' }
  | { t: 'uint'; min?: number; skipZero?: boolean }
  | { t: 'float' }
  | { t: 'enum'; values: readonly string[] }
  | { t: 'kernel-params' }
  | { t: 'json-strings-append' }
  | { t: 'semicolon-list' }
  | { t: 'experimental' };

interface Spec {
  readonly section: Section;
  /** The configuration key it overrides. */
  readonly key: string;
  readonly kind: Kind;
}

const BOOL: Kind = { t: 'bool' };
const UINT: Kind = { t: 'uint' };
const STR: Kind = { t: 'string' };
const STR_NONEMPTY: Kind = { t: 'string', skipEmpty: true };

const hv = (key: string, kind: Kind): Spec => ({ section: 'hypervisor', key, kind });
const rt = (key: string, kind: Kind): Spec => ({ section: 'runtime', key, kind });
const ag = (key: string, kind: Kind): Spec => ({ section: 'agent', key, kind });

/** Supported annotations by full name. */
const SPECS: ReadonlyMap<string, Spec> = new Map<string, Spec>([
  ...(
    [
      ['path', hv('path', { t: 'path', list: 'valid_hypervisor_paths' })],
      ['jailer_path', hv('jailer_path', { t: 'path', list: 'valid_jailer_paths' })],
      ['ctlpath', hv('ctlpath', { t: 'path', list: 'valid_ctlpaths' })],
      ['virtio_fs_daemon', hv('virtio_fs_daemon', { t: 'path', list: 'valid_virtio_fs_daemon_paths' })],
      ['entropy_source', hv('entropy_source', { t: 'path', list: 'valid_entropy_sources' })],
      ['file_mem_backend', hv('file_mem_backend', { t: 'path', list: 'valid_file_mem_backends' })],
      ['vhost_user_store_path', hv('vhost_user_store_path', { t: 'path', list: 'valid_vhost_user_store_paths' })],
      ['kernel', hv('kernel', STR)],
      ['image', hv('image', STR)],
      ['initrd', hv('initrd', STR)],
      ['firmware', hv('firmware', STR)],
      ['firmware_volume', hv('firmware_volume', STR)],
      ['kernel_params', hv('kernel_params', { t: 'kernel-params' })],
      ['machine_type', hv('machine_type', STR_NONEMPTY)],
      ['machine_accelerators', hv('machine_accelerators', STR_NONEMPTY)],
      ['cpu_features', hv('cpu_features', STR_NONEMPTY)],
      ['guest_hook_path', hv('guest_hook_path', STR_NONEMPTY)],
      ['default_vcpus', hv('default_vcpus', { t: 'float' })],
      ['default_max_vcpus', hv('default_maxvcpus', UINT)],
      ['default_memory', hv('default_memory', { t: 'uint', min: MIN_ANNOTATION_MEMORY_MIB })],
      ['memory_slots', hv('memory_slots', { t: 'uint', skipZero: true })],
      ['memory_offset', hv('memory_offset', { t: 'uint', skipZero: true })],
      ['enable_virtio_mem', hv('enable_virtio_mem', BOOL)],
      ['enable_mem_prealloc', hv('enable_mem_prealloc', BOOL)],
      ['enable_hugepages', hv('enable_hugepages', BOOL)],
      ['enable_iommu', hv('enable_iommu', BOOL)],
      ['enable_iommu_platform', hv('enable_iommu_platform', BOOL)],
      ['enable_guest_swap', hv('enable_guest_swap', BOOL)],
      ['rootless', hv('rootless', BOOL)],
      ['reclaim_guest_freed_memory', hv('reclaim_guest_freed_memory', BOOL)],
      ['msize_9p', hv('msize_9p', { t: 'uint', min: 1 })],
      ['shared_fs', hv('shared_fs', { t: 'enum', values: ['virtio-9p', 'virtio-fs'] })],
      ['virtio_fs_cache', hv('virtio_fs_cache', STR)],
      ['virtio_fs_cache_size', hv('virtio_fs_cache_size', UINT)],
      ['virtio_fs_extra_args', hv('virtio_fs_extra_args', { t: 'json-strings-append' })],
      ['block_device_driver', hv('block_device_driver', { t: 'enum', values: ['virtio-scsi', 'virtio-blk', 'virtio-mmio', 'nvdimm', 'virtio-blk-ccw'] })],
      ['block_device_aio', hv('block_device_aio', { t: 'enum', values: ['native', 'threads', 'io_uring'] })],
      ['disable_block_device_use', hv('disable_block_device_use', BOOL)],
      ['block_device_cache_set', hv('block_device_cache_set', BOOL)],
      ['block_device_cache_direct', hv('block_device_cache_direct', BOOL)],
      ['block_device_cache_noflush', hv('block_device_cache_noflush', BOOL)],
      ['enable_iothreads', hv('enable_iothreads', BOOL)],
      ['disable_image_nvdimm', hv('disable_image_nvdimm', BOOL)],
      ['disable_vhost_net', hv('disable_vhost_net', BOOL)],
      ['enable_vhost_user_store', hv('enable_vhost_user_store', BOOL)],
      ['use_legacy_serial', hv('use_legacy_serial', BOOL)],
      ['pcie_root_port', hv('pcie_root_port', { t: 'uint', skipZero: true })],
      ['rx_rate_limiter_max_rate', hv('rx_rate_limiter_max_rate', UINT)],
      ['tx_rate_limiter_max_rate', hv('tx_rate_limiter_max_rate', UINT)],
    ] as const
  ).map(([n, s]) => [HYPERVISOR_ANNOTATION_PREFIX + n, s] as [string, Spec]),
  ...(
    [
      ['disable_guest_seccomp', rt('disable_guest_seccomp', BOOL)],
      ['sandbox_cgroup_only', rt('sandbox_cgroup_only', BOOL)],
      ['enable_pprof', rt('enable_pprof', BOOL)],
      ['disable_new_netns', rt('disable_new_netns', BOOL)],
      ['internetworking_model', rt('internetworking_model', { t: 'enum', values: ['default', 'macvtap', 'tcfilter', 'none'] })],
      ['experimental', rt('experimental', { t: 'experimental' })],
      ['create_container_timeout', rt('create_container_timeout', UINT)],
      ['experimental_force_guest_pull', rt('experimental_force_guest_pull', BOOL)],
      ['vfio_mode', rt('vfio_mode', { t: 'enum', values: ['guest-kernel', 'vfio'] })],
    ] as const
  ).map(([n, s]) => [RUNTIME_ANNOTATION_PREFIX + n, s] as [string, Spec]),
  [`${ANNOTATION_PREFIX}enable_vcpus_pinning`, rt('enable_vcpus_pinning', BOOL)],
  ...(
    [
      ['kernel_modules', ag('kernel_modules', { t: 'semicolon-list' })],
      ['enable_tracing', ag('enable_tracing', BOOL)],
      ['container_pipe_size', ag('container_pipe_size', UINT)],
    ] as const
  ).map(([n, s]) => [AGENT_ANNOTATION_PREFIX + n, s] as [string, Spec]),
]);

/**
 * Annotations Kata (2.4.0 or current) acts on that this runtime does not implement: refused, not
 * ignored, because Kata's behaviour for them would silently be missing.
 */
const KATA_KNOWN_UNSUPPORTED: ReadonlySet<string> = new Set([
  ...[
    'kernel_verity_params', 'cc_init_data', 'numa_mapping', 'cold_plug_vfio', 'hot_plug_vfio', 'hotplug_vfio_on_root_bus', 'pcie_switch_port',
    'indep_iothreads', 'blk_logical_sector_size', 'blk_physical_sector_size', 'block_device_num_queues', 'block_device_queue_size',
    'vhost_user_reconnect_timeout_sec', 'default_gpus', 'default_gpu_model', 'kernel_hash', 'image_hash', 'initrd_hash', 'firmware_hash',
    'firmware_volume_hash', 'hypervisor_hash', 'jailer_hash', 'hypervisorctl_hash', 'path_hash',
  ].map((n) => HYPERVISOR_ANNOTATION_PREFIX + n),
  ...['guest_selinux_label', 'shared_mounts', 'sandbox_bind_mounts'].map((n) => RUNTIME_ANNOTATION_PREFIX + n),
  ...['policy', 'cdh_api_timeout', 'cdh_api_timeout_ms'].map((n) => AGENT_ANNOTATION_PREFIX + n),
  `${ANNOTATION_PREFIX}asset_hash_type`,
  'sgx.intel.com/epc',
]);

/** Hypervisor keys that decide the sandbox's security posture: never settable by a pod. */
const NEVER_OVERRIDABLE: ReadonlySet<string> = new Set([
  'confidential_guest', 'sev_snp_guest', 'enable_annotations', 'valid_hypervisor_paths', 'valid_jailer_paths', 'valid_ctlpaths',
  'valid_virtio_fs_daemon_paths', 'valid_entropy_sources', 'valid_file_mem_backends', 'valid_vhost_user_store_paths',
]);

export type RefusalReason = 'not-enabled' | 'path-not-allowed' | 'malformed' | 'unsupported' | 'not-overridable';

/** One refused annotation. */
export interface AnnotationRefusal {
  readonly annotation: string;
  readonly value: string;
  readonly reason: RefusalReason;
  /** The configuration key the annotation would set (dotted), when it maps to one. */
  readonly key?: string;
  /** The configuration key whose list decided (`…enable_annotations`, `…valid_hypervisor_paths`). */
  readonly list?: string;
  readonly message: string;
  readonly fix: string;
}

export interface AppliedAnnotation {
  readonly annotation: string;
  /** Dotted configuration key, e.g. `hypervisor.qemu.default_memory`. */
  readonly key: string;
  /** The converted value now in the configuration. */
  readonly value: unknown;
  /** The file's value before the override (undefined when the file did not set it). */
  readonly previous: unknown;
}

export interface IgnoredAnnotation {
  readonly annotation: string;
  readonly why: string;
}

export interface AnnotationResult {
  /** A copy of the configuration with the overrides applied. */
  readonly config: RawConfig;
  readonly applied: readonly AppliedAnnotation[];
  /** Kata-prefixed annotations that configure nothing (Kata ignores them too). */
  readonly ignored: readonly IgnoredAnnotation[];
}

export interface ApplyAnnotationsOptions {
  /**
   * Whether a path exists on the host. Kata's Go runtime only accepts paths that exist (it expands
   * the globs with filepath.Glob); the shim passes `fs.existsSync`. Without it, existence is not
   * checked (the phase judges configurations, not hosts).
   */
  pathExists?: (path: string) => boolean;
  /** Host CPU count: when given, `default_vcpus` and `default_max_vcpus` above it are refused, as Kata does. */
  hostCpus?: number;
}

/** Every refused annotation of one sandbox, at once. */
export class AnnotationError extends KataError {
  readonly refusals: readonly AnnotationRefusal[];
  constructor(refusals: readonly AnnotationRefusal[]) {
    const n = refusals.length;
    const lines = refusals.map((r) => `  - ${r.annotation} = ${formatValue(r.value)}: ${r.message} (fix: ${r.fix})`);
    super('KATA_ERR_ANNOTATION', `${n} OCI annotation${n === 1 ? '' : 's'} refused:\n${lines.join('\n')}`, {
      key: refusals[0]?.annotation,
      fix: refusals.length === 1 ? refusals[0]?.fix : 'Apply the fix given for each annotation listed.',
    });
    this.refusals = refusals;
  }
  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), refusals: this.refusals };
  }
}

/**
 * Applies the permitted overrides in `annotations` to a copy of the parsed configuration `raw`,
 * whose active hypervisor section is `[hypervisor.<hypervisor>]`. Throws one {@link AnnotationError}
 * listing every refused annotation; returns the new configuration and what was applied otherwise.
 * Pure: reads nothing but its arguments (and `opts.pathExists` when given).
 */
export function applyAnnotations(
  raw: RawConfig,
  annotations: Readonly<Record<string, string>>,
  hypervisor: string,
  opts: ApplyAnnotationsOptions = {},
): AnnotationResult {
  const config = structuredClone(raw) as Record<string, unknown>;
  const hvTable = `hypervisor.${hypervisor}`;
  // Read, never created: without the section there is nothing enabled and nothing to override.
  const hvSection = peekTable(peekTable(config, 'hypervisor'), hypervisor);
  const enable = stringList(hvSection.enable_annotations);
  const matchers = compileEnable(enable);

  const refusals: AnnotationRefusal[] = [];
  const applied: AppliedAnnotation[] = [];
  const ignored: IgnoredAnnotation[] = [];
  // Sections are created only when an override lands in them, so an annotation-free run is a pure copy.
  const section = (s: Section): Record<string, unknown> =>
    s === 'hypervisor' ? hvSection : s === 'runtime' ? ensureTable(config, 'runtime') : ensureTable(ensureTable(config, 'agent'), 'kata');
  const keyPath = (s: Section, key: string) => (s === 'hypervisor' ? `${hvTable}.${key}` : s === 'runtime' ? `runtime.${key}` : `agent.kata.${key}`);

  for (const name of Object.keys(annotations).sort()) {
    const value = annotations[name];
    if (typeof value !== 'string') continue;
    const refuse = (r: Omit<AnnotationRefusal, 'annotation' | 'value'>) => refusals.push({ annotation: name, value, ...r });

    const isHv = name.startsWith(HYPERVISOR_ANNOTATION_PREFIX);
    const isConfig = isHv || name.startsWith(RUNTIME_ANNOTATION_PREFIX) || name.startsWith(AGENT_ANNOTATION_PREFIX);
    const spec = SPECS.get(name);
    if (!isConfig && !spec && !KATA_KNOWN_UNSUPPORTED.has(name)) continue; // not an override (config_path, container resources, CRI keys …)

    if (isHv) {
      const short = name.slice(HYPERVISOR_ANNOTATION_PREFIX.length);
      if (!matchers.some((re) => re.test(short))) {
        refuse({
          reason: 'not-enabled',
          key: spec ? keyPath('hypervisor', spec.key) : undefined,
          list: `${hvTable}.enable_annotations`,
          message: `not enabled: "${short}" matches no regular expression in ${hvTable}.enable_annotations ${formatValue(enable)} (each must match the whole name)`,
          fix: `add "${regexQuote(short)}" to enable_annotations in [${hvTable}] if pods may set it, or remove the annotation`,
        });
        continue;
      }
      if (NEVER_OVERRIDABLE.has(short)) {
        refuse({
          reason: 'not-overridable',
          key: keyPath('hypervisor', short),
          message: `${hvTable}.${short} decides the sandbox's security posture and is set only by the configuration file (Kata has no such annotation)`,
          fix: `set ${short} in [${hvTable}] of the configuration file, or use a runtime class whose configuration sets it`,
        });
        continue;
      }
    }
    if (!spec) {
      if (KATA_KNOWN_UNSUPPORTED.has(name)) {
        refuse({ reason: 'unsupported', message: 'unsupported: Kata acts on this annotation, but kata-ts does not implement it yet', fix: 'remove the annotation, or use Kata Containers for this pod' });
      } else {
        ignored.push({ annotation: name, why: 'Kata has no such configuration annotation (ignored, as Kata ignores it)' });
      }
      continue;
    }

    const target = section(spec.section);
    const key = keyPath(spec.section, spec.key);
    const converted = convert(spec, value, target[spec.key], { hvSection, hvTable, opts, name });
    if ('refusal' in converted) {
      const r = converted.refusal;
      refuse({ key, ...r, message: r.reason === 'malformed' ? `malformed value for ${key}: ${r.message}` : r.message });
      continue;
    }
    if (converted.skip) continue;
    applied.push({ annotation: name, key, value: converted.value, previous: target[spec.key] });
    target[spec.key] = converted.value;
  }

  if (refusals.length > 0) throw new AnnotationError(refusals);
  return { config, applied, ignored };
}

type Converted = { value: unknown; skip?: false } | { skip: true } | { refusal: Omit<AnnotationRefusal, 'annotation' | 'value' | 'key'> };

interface ConvertContext {
  hvSection: Record<string, unknown>;
  hvTable: string;
  opts: ApplyAnnotationsOptions;
  name: string;
}

function malformed(message: string, fix: string): Converted {
  return { refusal: { reason: 'malformed', message, fix } };
}

function convert(spec: Spec, value: string, current: unknown, ctx: ConvertContext): Converted {
  const k = spec.kind;
  switch (k.t) {
    case 'string':
      return k.skipEmpty && value === '' ? { skip: true } : { value };
    case 'bool': {
      const b = parseGoBool(value);
      return b === undefined ? malformed(`not a boolean (Kata accepts true/false, 1/0, t/f)`, 'give "true" or "false"') : { value: b };
    }
    case 'uint': {
      const n = parseUint(value);
      if (n === undefined) return malformed('not a non-negative decimal integer', 'give a number of digits only, e.g. "2048"');
      if (k.min !== undefined && n < k.min) {
        return malformed(`${value} is less than the minimum ${k.min}`, `give at least ${k.min}`);
      }
      if (k.skipZero && n === 0) return { skip: true };
      if (ctx.opts.hostCpus !== undefined && spec.key === 'default_maxvcpus' && n > ctx.opts.hostCpus) {
        return malformed(`${value} vCPUs is more than the ${ctx.opts.hostCpus} CPUs of this host`, `give at most ${ctx.opts.hostCpus}`);
      }
      return { value: n };
    }
    case 'float': {
      if (!/^\+?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$/.test(value)) return malformed('not a non-negative decimal number', 'give a number such as "2" or "1.5"');
      const f = Number(value);
      if (!Number.isFinite(f) || f > 3.4028234663852886e38) return malformed('the number is too large', 'give a number of vCPUs, such as "2"');
      if (ctx.opts.hostCpus !== undefined && f > ctx.opts.hostCpus) {
        return malformed(`${value} vCPUs is more than the ${ctx.opts.hostCpus} CPUs of this host`, `give at most ${ctx.opts.hostCpus}`);
      }
      return { value: f };
    }
    case 'enum':
      return k.values.includes(value) ? { value } : malformed(`not one of ${k.values.map((v) => `"${v}"`).join(', ')}`, `give one of ${k.values.join(', ')}`);
    case 'path':
      return checkPath(value, k.list, ctx);
    case 'kernel-params':
      return value === '' ? { skip: true } : { value: mergeKernelParams(typeof current === 'string' ? current : '', value) };
    case 'json-strings-append': {
      let parsed: unknown;
      try {
        parsed = JSON.parse(value);
      } catch {
        parsed = undefined;
      }
      if (!Array.isArray(parsed) || !parsed.every((a) => typeof a === 'string')) {
        return malformed('not a JSON array of strings', 'give the arguments as JSON, e.g. ["--thread-pool-size=1"]');
      }
      return { value: [...stringList(current), ...parsed] };
    }
    case 'semicolon-list':
      return { value: value.split(';').map((m) => m.trim()).filter((m) => m.length > 0) };
    case 'experimental':
      // Kata splits on single spaces and refuses any feature it has not registered; it registers none.
      return malformed(`unknown experimental feature${value.includes(' ') ? 's' : ''} ${value.split(' ').map((f) => `"${f}"`).join(', ')} (none is available)`, 'remove the annotation');
  }
}

function checkPath(value: string, list: PathList, ctx: ConvertContext): Converted {
  const listKey = `${ctx.hvTable}.${list}`;
  const patterns = stringList(ctx.hvSection[list]);
  const refusal = (message: string): Converted => ({
    refusal: {
      reason: 'path-not-allowed',
      list: listKey,
      message,
      fix: patterns.length === 0 ? `add a glob matching this path to ${list} in [${ctx.hvTable}] (it is empty, so no path is allowed)` : `use a path matching ${list} in [${ctx.hvTable}], or add a glob for it there`,
    },
  });
  const unclean = pathProblem(value);
  if (unclean) return refusal(`path not allowed: ${unclean}; ${listKey} only accepts absolute, clean paths`);
  if (!patterns.some((p) => globMatch(p, value))) return refusal(`path not allowed: it matches no glob in ${listKey} ${formatValue(patterns)}`);
  if (ctx.opts.pathExists && !ctx.opts.pathExists(value)) return refusal(`path not allowed: it matches ${listKey} but does not exist on this host`);
  return { value };
}

/** Why a path is not absolute and clean, or undefined when it is. */
export function pathProblem(p: string): string | undefined {
  if (p.includes('\0')) return 'it contains a NUL byte';
  if (!p.startsWith('/')) return 'it is not absolute';
  if (p.length > 1 && p.endsWith('/')) return 'it ends with "/"';
  const segments = p.split('/').slice(1);
  if (segments.some((s) => s === '')) return 'it contains "//"';
  if (segments.some((s) => s === '.' || s === '..')) return 'it contains a "." or ".." segment';
  return undefined;
}

/**
 * glob(3) / Go filepath.Match: `*` any run of characters but `/`, `?` one character but `/`,
 * `[abc]`, `[a-z]`, `[!a]` or `[^a]`, `\` escapes. A malformed pattern matches nothing, as Go's
 * ErrBadPattern leaves it unused.
 */
export function globMatch(pattern: string, path: string): boolean {
  const re = globToRegExp(pattern);
  return re !== undefined && re.test(path);
}

function globToRegExp(pattern: string): RegExp | undefined {
  let out = '';
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i] as string;
    if (c === '*') out += '[^/]*';
    else if (c === '?') out += '[^/]';
    else if (c === '\\') {
      const next = pattern[i + 1];
      if (next === undefined) return undefined;
      out += escapeRe(next);
      i++;
    } else if (c === '[') {
      const end = pattern.indexOf(']', i + 2);
      if (end < 0) return undefined;
      let body = pattern.slice(i + 1, end);
      let negate = false;
      if (body.startsWith('!') || body.startsWith('^')) {
        negate = true;
        body = body.slice(1);
      }
      if (body === '' || body.includes('/')) return undefined;
      const cls = [...body].map((ch) => (/[\\\]\[^]/.test(ch) ? `\\${ch}` : ch)).join('');
      out += negate ? `(?!/)[^${cls}]` : `[${cls}]`;
      i = end;
    } else out += escapeRe(c);
  }
  try {
    return new RegExp(`^${out}$`, 'u');
  } catch {
    return undefined;
  }
}

function escapeRe(c: string): string {
  return /[\\^$.*+?()[\]{}|/]/.test(c) ? `\\${c}` : c;
}

/** A literal annotation name as a regular expression (for the fix text). */
function regexQuote(s: string): string {
  return s.replace(/[\\^$.*+?()[\]{}|]/g, '\\$&');
}

/** `enable_annotations` as matchers: each must match a WHOLE name; one JavaScript cannot compile matches nothing. */
export function compileEnable(patterns: readonly string[]): RegExp[] {
  const out: RegExp[] = [];
  for (const p of patterns) {
    try {
      out.push(new RegExp(`^(?:${p})$`));
    } catch {
      // Not a valid expression: it enables nothing (Kata's regexp.MatchString error is ignored too).
    }
  }
  return out;
}

/** Go's strconv.ParseBool. */
function parseGoBool(v: string): boolean | undefined {
  if (['1', 't', 'T', 'TRUE', 'true', 'True'].includes(v)) return true;
  if (['0', 'f', 'F', 'FALSE', 'false', 'False'].includes(v)) return false;
  return undefined;
}

const UINT64_MAX = 18446744073709551615n;

/** Go's strconv.ParseUint(v, 10, 64); values beyond 2^53 stay exact as BigInt, as the TOML parser keeps them. */
function parseUint(v: string): number | bigint | undefined {
  if (!/^\d+$/.test(v)) return undefined;
  const big = BigInt(v);
  if (big > UINT64_MAX) return undefined;
  return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
}

/**
 * Kata's kernel_params override: split both on whitespace; each annotation parameter replaces any
 * file parameter with the same name (the part before `=`), then is appended.
 */
export function mergeKernelParams(current: string, annotation: string): string {
  const name = (p: string) => p.split('=', 1)[0];
  let params = current.split(/\s+/).filter(Boolean);
  for (const p of annotation.split(/\s+/).filter(Boolean)) {
    params = params.filter((q) => name(q) !== name(p));
    params.push(p);
  }
  return params.join(' ');
}

function ensureTable(o: Record<string, unknown>, key: string): Record<string, unknown> {
  const v = o[key];
  if (v !== null && typeof v === 'object' && !Array.isArray(v)) return v as Record<string, unknown>;
  if (v === undefined) {
    const t: Record<string, unknown> = {};
    o[key] = t;
    return t;
  }
  // A malformed table (the shape check reports it): overrides land in a detached object and are dropped.
  return {};
}

function peekTable(o: Record<string, unknown>, key: string): Record<string, unknown> {
  const v = o[key];
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : {};
}

function stringList(v: unknown): string[] {
  return Array.isArray(v) ? v.filter((s): s is string => typeof s === 'string') : [];
}
