/**
 * The README's metric list, between `<!-- metrics:start -->` and `<!-- metrics:end -->`, generated
 * from the registries themselves: the shim's (shim/metrics.ts, prom-client), the guest agent's
 * table (wire/agent/metric-families.ts GUEST_METRICS) and kata-runtime monitor's (cli/monitor.ts).
 * prom-client's Node.js runtime figures (`*_nodejs_*`) are one row per registry.
 * `npm run gen` rewrites it; test/unit/metrics-doc.test.ts fails when the README differs.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { KataMonitor } from '../cli/monitor.js';
import { parsePromText } from '../core/prom-text.js';
import { GUEST_METRICS } from '../wire/agent/metric-families.js';
import { ShimMetrics } from '../shim/metrics.js';

interface Row {
  readonly name: string;
  readonly type: string;
  readonly labels: readonly string[];
  readonly help: string;
}

function cell(s: string): string {
  return s.replace(/\|/g, '\\|').replace(/\n/g, ' ');
}

/** Collapses prom-client's `<prefix>nodejs_*` families into one row. */
function collapseNodejs(rows: Row[], prefix: string): Row[] {
  const nodejs = rows.filter((r) => r.name.startsWith(`${prefix}nodejs_`));
  if (nodejs.length === 0) return rows;
  return [
    ...rows.filter((r) => !r.name.startsWith(`${prefix}nodejs_`)),
    { name: `${prefix}nodejs_*`, type: 'various', labels: [], help: "Node.js runtime figures (prom-client's default metrics: heap, event loop lag, GC, handles ...)." },
  ];
}

export async function generateMetricTable(): Promise<string> {
  const shim = await ShimMetrics.create({ hypervisorPid: () => undefined, startPhases: () => ({}), guestMetrics: async () => '', podLabels: () => ({}) });
  const shimRows: Row[] = (shim.registry.getMetricsAsArray() as unknown as { name: string; help: string; type: string; labelNames?: string[] }[]).map((m) => ({
    name: m.name,
    type: m.type,
    labels: m.labelNames ?? [],
    help: m.help,
  }));
  const guestRows: Row[] = Object.entries(GUEST_METRICS).map(([name, d]) => ({ name, type: d.type, labels: d.labels, help: d.help }));
  const empty = mkdtempSync(path.join(os.tmpdir(), 'kata-gen-metrics-'));
  let monitorRows: Row[];
  try {
    monitorRows = parsePromText(await new KataMonitor({ root: empty }).render()).map((f) => ({ name: f.name, type: f.type, labels: [], help: f.help ?? '' }));
  } finally {
    rmSync(empty, { recursive: true, force: true });
  }
  const rows = [
    ...collapseNodejs(shimRows, 'kata_shim_').map((r) => ({ ...r, where: 'shim' })),
    ...guestRows.map((r) => ({ ...r, where: 'guest (GetMetrics)' })),
    ...collapseNodejs(monitorRows, 'kata_monitor_').map((r) => ({ ...r, where: 'monitor' })),
  ];
  return [
    '| metric | type | labels | from | meaning |',
    '| --- | --- | --- | --- | --- |',
    ...rows.map((r) => `| \`${r.name}\` | ${r.type} | ${r.labels.map((l) => `\`${l}\``).join(', ')} | ${r.where} | ${cell(r.help)} |`),
  ].join('\n');
}

export function spliceMetricTable(readme: string, table: string): string {
  const start = '<!-- metrics:start -->';
  const end = '<!-- metrics:end -->';
  const a = readme.indexOf(start);
  const b = readme.indexOf(end);
  if (a < 0 || b < a) throw new Error('README.md has no <!-- metrics:start --> … <!-- metrics:end --> block');
  return `${readme.slice(0, a + start.length)}\n${table}\n${readme.slice(b)}`;
}
