/**
 * The shim's Prometheus metrics, served as `GET /metrics` on the sandbox's management socket
 * (shim/monitor.ts), as Kata's shim serves them: the shim's own process (prom-client's default
 * metrics with Kata's `kata_shim_` prefix, and `kata_shim_proc_*`), the hypervisor's process
 * (`kata_hypervisor_*`, from /proc of the VM handle's pid), the sandbox's start phases, hot-plug
 * counts (core/counters.ts), and the guest's figures from the agent's GetMetrics.
 *
 * What the guest answers is bounded and checked before it is merged in: at most
 * {@link GUEST_METRICS_MAX_BYTES} and {@link GUEST_METRICS_MAX_SAMPLES}, well-formed text, only
 * `kata_agent_*` and `kata_guest_*` families (a guest cannot pass off figures as the host's). A
 * guest answer that fails any of this, or no answer in time, is left out and counted in
 * `kata_shim_agent_metrics_errors_total{reason}`; the scrape itself still succeeds.
 */
import type { Counter, Gauge, Registry } from 'prom-client';
import { hotplugCounts } from '../core/counters.js';
import { formatPromText, parsePromText, PromTextError } from '../core/prom-text.js';
import { GrpcCode } from '../wire/ttrpc/codes.js';
import { CRI_LABEL_ANNOTATIONS, type SandboxFigures } from './metrics-labels.js';
import { CLOCK_TICKS, readProcessFigures, type ProcessFigures } from './metrics-proc.js';

export { CRI_LABEL_ANNOTATIONS, podLabelsFrom, type SandboxFigures } from './metrics-labels.js';

/** The largest guest answer merged in. */
export const GUEST_METRICS_MAX_BYTES = 1024 * 1024;
/** The most guest samples merged in. */
export const GUEST_METRICS_MAX_SAMPLES = 20_000;
/**
 * How long a scrape waits for the agent's GetMetrics: well under the 3 s `kata-runtime monitor`
 * gives a shim (cli/monitor.ts SCRAPE_TIMEOUT_MS), so that a slow guest leaves out the guest's
 * figures only, and the monitor still gets the shim's and the hypervisor's in time.
 */
export const GUEST_METRICS_TIMEOUT_MS = 1_500;
/** The families a guest may report. */
export const GUEST_METRIC_PREFIXES = ['kata_agent_', 'kata_guest_'] as const;

/** Why a guest answer was left out, as the `reason` label. */
export type GuestMetricsError = 'unavailable' | 'timeout' | 'too_large' | 'too_many_samples' | 'unparsable' | 'unexpected_name';

const STAT_ITEMS = ['utime', 'stime', 'cutime', 'cstime'] as const;

type PromClient = typeof import('prom-client');

/** Registers the process gauges of one prefix (`kata_shim`, `kata_hypervisor`) and returns their setter. */
function processGauges({ Gauge }: PromClient, registry: Registry, prefix: string, who: string): (f: ProcessFigures | undefined) => void {
  const g = (name: string, help: string, labelNames: string[] = []) => new Gauge({ name: `${prefix}_${name}`, help, labelNames, registers: [registry] });
  const procStat = g('proc_stat', `${who} process statistics from /proc/<pid>/stat, in clock ticks (item: utime, stime, cutime, cstime).`, ['item']);
  const procStatus = g('proc_status', `${who} process status from /proc/<pid>/status (sizes in bytes), and pss from smaps_rollup.`, ['item']);
  const threads = g('threads', `${who} process threads.`);
  const fds = g('fds', `${who} process open file descriptors.`);
  const cpu = prefix === 'kata_shim' ? undefined : g('process_cpu_seconds_total', `${who} process user and system CPU time in seconds (utime + stime).`);
  const rss = prefix === 'kata_shim' ? undefined : g('process_resident_memory_bytes', `${who} process resident memory in bytes.`);
  return (f) => {
    for (const x of [procStat, procStatus, threads, fds, cpu, rss]) x?.reset();
    if (!f) return;
    if (f.stat) {
      for (const item of STAT_ITEMS) procStat.set({ item }, f.stat[item]);
      threads.set(f.stat.numThreads);
      cpu?.set((f.stat.utime + f.stat.stime) / CLOCK_TICKS);
    }
    for (const [item, v] of f.status) procStatus.set({ item }, v);
    if (f.pssBytes !== undefined) procStatus.set({ item: 'pss' }, f.pssBytes);
    const vmrss = f.status.get('vmrss');
    if (vmrss !== undefined) rss?.set(vmrss);
    if (f.fds !== undefined) fds.set(f.fds);
  };
}

export class ShimMetrics {
  readonly registry: Registry;
  readonly #setShim: (f: ProcessFigures | undefined) => void;
  readonly #setHypervisor: (f: ProcessFigures | undefined) => void;
  readonly #phases: Gauge;
  readonly #hotplug: Counter;
  readonly #pod: Gauge;
  readonly #up: Gauge;
  readonly #errors: Counter;
  readonly #scrapes: Counter;
  #inFlight: Promise<string> | undefined;

  /** Loads prom-client (imported here, not with the shim: only a scraped shim pays for it). */
  static async create(figures: SandboxFigures, opts: { procRoot?: string; selfPid?: number } = {}): Promise<ShimMetrics> {
    return new ShimMetrics(await import('prom-client'), figures, opts);
  }

  private constructor(
    prom: PromClient,
    private readonly figures: SandboxFigures,
    private readonly opts: { procRoot?: string; selfPid?: number } = {},
  ) {
    const { Registry, Gauge, Counter, collectDefaultMetrics } = prom;
    const r = (this.registry = new Registry());
    collectDefaultMetrics({ register: r, prefix: 'kata_shim_' });
    this.#setShim = processGauges(prom, r, 'kata_shim', 'The shim');
    this.#setHypervisor = processGauges(prom, r, 'kata_hypervisor', 'The hypervisor');
    this.#phases = new Gauge({ name: 'kata_shim_sandbox_start_phase_seconds', help: 'How long each phase of the sandbox start took, in seconds (vm_start includes host_network).', labelNames: ['phase'], registers: [r] });
    // Set from the counts in core/counters.ts at each scrape.
    this.#hotplug = new Counter({ name: 'kata_shim_hotplug_total', help: 'Hot-plugs by kind since the shim started (cpu, memory, block; unplugs as <kind>_unplug).', labelNames: ['kind'], registers: [r] });
    this.#pod = new Gauge({ name: 'kata_shim_pod_info', help: 'The CRI labels of the pod this sandbox runs (always 1).', labelNames: Object.keys(CRI_LABEL_ANNOTATIONS), registers: [r] });
    this.#up = new Gauge({ name: 'kata_shim_agent_metrics_up', help: "1 when the agent's metrics are part of this scrape, 0 when they were left out.", registers: [r] });
    this.#errors = new Counter({ name: 'kata_shim_agent_metrics_errors_total', help: 'Agent metrics answers left out, by reason (unavailable, timeout, too_large, too_many_samples, unparsable, unexpected_name).', labelNames: ['reason'], registers: [r] });
    this.#scrapes = new Counter({ name: 'kata_shim_scrape_count', help: 'Metrics scrape count.', registers: [r] });
  }

  /**
   * The whole answer: the shim's registry, then the guest's checked families. Concurrent scrapes
   * share one gathering (and one GetMetrics call).
   */
  render(): Promise<string> {
    this.#inFlight ??= this.#render().finally(() => (this.#inFlight = undefined));
    return this.#inFlight;
  }

  async #render(): Promise<string> {
    this.#scrapes.inc();
    const procRoot = this.opts.procRoot ?? '/proc';
    const vmPid = this.figures.hypervisorPid();
    const [self, vm, guest] = await Promise.all([
      readProcessFigures(this.opts.selfPid ?? process.pid, procRoot),
      vmPid === undefined ? undefined : readProcessFigures(vmPid, procRoot),
      this.#guest(),
    ]);
    this.#setShim(self);
    this.#setHypervisor(vm);
    this.#phases.reset();
    for (const [phase, s] of Object.entries(this.figures.startPhases())) this.#phases.set({ phase }, s);
    this.#hotplug.reset();
    for (const [kind, n] of hotplugCounts()) this.#hotplug.inc({ kind }, n);
    this.#pod.reset();
    const pod = this.figures.podLabels();
    if (Object.keys(pod).length > 0) this.#pod.set(pod, 1);
    if (typeof guest === 'string') {
      this.#up.set(1);
    } else {
      this.#up.set(0);
      this.#errors.inc({ reason: guest.reason });
    }
    const own = await this.registry.metrics();
    return typeof guest === 'string' ? own + guest : own;
  }

  /** The guest's families as checked text, or why they are left out. */
  async #guest(): Promise<string | { reason: GuestMetricsError }> {
    let text: string;
    try {
      text = await this.figures.guestMetrics({ timeoutMs: GUEST_METRICS_TIMEOUT_MS });
    } catch (e) {
      // The agent client refuses a reply over the ttrpc frame limit (RESOURCE_EXHAUSTED) without holding it.
      const code = (e as { grpcCode?: number }).grpcCode;
      return { reason: code === GrpcCode.RESOURCE_EXHAUSTED ? 'too_large' : code === GrpcCode.DEADLINE_EXCEEDED ? 'timeout' : 'unavailable' };
    }
    try {
      const families = parsePromText(text, { maxBytes: GUEST_METRICS_MAX_BYTES, maxSamples: GUEST_METRICS_MAX_SAMPLES, allowedPrefixes: GUEST_METRIC_PREFIXES });
      return formatPromText(families);
    } catch (e) {
      if (e instanceof PromTextError) return { reason: e.reason };
      throw e;
    }
  }
}
