/**
 * The Prometheus text exposition format (0.0.4), read strictly and written back: the shim checks
 * the guest's GetMetrics answer with it before merging it in, and `kata-runtime monitor` reads each
 * shim's answer with it before labelling and merging them. Anything that is not well-formed is
 * refused whole (a {@link PromTextError} naming the line), so nothing a guest or a shim sends
 * reaches the output unparsed.
 */

import { GUEST_METRICS } from '../wire/agent/metric-families.js';

export type PromType = 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';

/**
 * The type of every family a guest agent reports (wire/agent/metric-families.ts, the table the
 * agent answers GetMetrics from): a merge keeps these whatever a sandbox declares, so no guest can
 * retype a family for the others. Only the guest's families need it: a shim passes on nothing from
 * its guest but `kata_agent_*` and `kata_guest_*` families, and its own come from the runtime.
 */
export const GUEST_FAMILY_TYPES: ReadonlyMap<string, PromType> = new Map(Object.entries(GUEST_METRICS).map(([name, d]) => [name, d.type]));

/** The HELP text of every family a guest agent reports, from the same table: a guest cannot reword it for the others. */
export const GUEST_FAMILY_HELP: ReadonlyMap<string, string> = new Map(Object.entries(GUEST_METRICS).map(([name, d]) => [name, d.help]));

export interface PromSample {
  readonly name: string;
  /** Label pairs in order; values unescaped. */
  readonly labels: readonly (readonly [string, string])[];
  /** The value as written (a Go float: `1`, `1e3`, `NaN`, `+Inf`). */
  readonly value: string;
  readonly timestamp?: string;
}

export interface PromFamily {
  readonly name: string;
  readonly help?: string;
  readonly type: PromType;
  readonly samples: readonly PromSample[];
}

export interface PromTextLimits {
  /** Refuse text longer than this many bytes. */
  readonly maxBytes?: number;
  /** Refuse more samples than this. */
  readonly maxSamples?: number;
  /** Refuse families whose names do not start with one of these. */
  readonly allowedPrefixes?: readonly string[];
}

export class PromTextError extends Error {
  constructor(
    message: string,
    /** 1-based; 0 for the text as a whole. */
    readonly line: number,
    /** Why, as a metric label value: `too_large`, `too_many_samples`, `unparsable`, `unexpected_name`. */
    readonly reason: 'too_large' | 'too_many_samples' | 'unparsable' | 'unexpected_name',
  ) {
    super(line ? `line ${line}: ${message}` : message);
    this.name = 'PromTextError';
  }
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
// Go's strconv.ParseFloat, which Prometheus uses: NaN and Inf in any case (prom-client writes `Nan`).
const FLOAT = /^(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|infinity)|nan)$/i;
const TIMESTAMP = /^-?\d{1,19}$/;
const TYPES: readonly PromType[] = ['counter', 'gauge', 'histogram', 'summary', 'untyped'];

/** Whether a sample named `sample` belongs to the family `family` of type `type`. */
function belongs(sample: string, family: string, type: PromType): boolean {
  if (sample === family) return true;
  if (type === 'histogram') return sample === `${family}_bucket` || sample === `${family}_sum` || sample === `${family}_count`;
  if (type === 'summary') return sample === `${family}_sum` || sample === `${family}_count`;
  return false;
}

/** Reads `{a="x",b="y"}` from `line` at `i` (just after `{`); returns the labels and the index after `}`. */
function readLabels(line: string, start: number, n: number): { labels: [string, string][]; end: number } {
  const labels: [string, string][] = [];
  let i = start;
  const fail = (why: string): never => {
    throw new PromTextError(why, n, 'unparsable');
  };
  for (;;) {
    while (line[i] === ' ' || line[i] === '\t') i++;
    if (line[i] === '}') return { labels, end: i + 1 };
    const eq = line.indexOf('=', i);
    if (eq < 0) fail('a label without "="');
    const name = line.slice(i, eq).trim();
    if (!LABEL_NAME.test(name)) fail(`bad label name ${JSON.stringify(name.slice(0, 64))}`);
    if (labels.some(([k]) => k === name)) fail(`label ${name} given twice`);
    i = eq + 1;
    while (line[i] === ' ' || line[i] === '\t') i++;
    if (line[i] !== '"') fail(`the value of label ${name} is not quoted`);
    i++;
    let value = '';
    for (;;) {
      const c = line[i];
      if (c === undefined) fail(`the value of label ${name} is not closed`);
      if (c === '"') break;
      if (c === '\\') {
        const e = line[i + 1];
        if (e === '\\') value += '\\';
        else if (e === '"') value += '"';
        else if (e === 'n') value += '\n';
        else fail(`bad escape in the value of label ${name}`);
        i += 2;
        continue;
      }
      value += c;
      i++;
    }
    i++;
    labels.push([name, value]);
    while (line[i] === ' ' || line[i] === '\t') i++;
    if (line[i] === ',') {
      i++;
      continue;
    }
    if (line[i] === '}') return { labels, end: i + 1 };
    fail('labels are not separated by ","');
  }
}

/** Parses the whole text; throws {@link PromTextError} on the first problem or limit. */
export function parsePromText(text: string, limits: PromTextLimits = {}): PromFamily[] {
  if (limits.maxBytes !== undefined && Buffer.byteLength(text) > limits.maxBytes) {
    throw new PromTextError(`${Buffer.byteLength(text)} bytes, more than the ${limits.maxBytes} allowed`, 0, 'too_large');
  }
  interface Building {
    name: string;
    help?: string;
    type: PromType;
    typed: boolean;
    samples: PromSample[];
  }
  const families: Building[] = [];
  const seen = new Map<string, Building>();
  let current: Building | undefined;
  let count = 0;
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  const family = (name: string, n: number): Building => {
    if (limits.allowedPrefixes && !limits.allowedPrefixes.some((p) => name.startsWith(p))) {
      throw new PromTextError(`metric ${JSON.stringify(name.slice(0, 64))} does not start with ${limits.allowedPrefixes.join(' or ')}`, n, 'unexpected_name');
    }
    const known = seen.get(name);
    if (known) {
      if (known !== current) throw new PromTextError(`the lines of ${name} are not together`, n, 'unparsable');
      return known;
    }
    const f: Building = { name, type: 'untyped', typed: false, samples: [] };
    families.push(f);
    seen.set(name, f);
    current = f;
    return f;
  };
  lines.forEach((line, idx) => {
    const n = idx + 1;
    if (line.trim() === '') return;
    if (line.startsWith('#')) {
      const m = /^#\s+(HELP|TYPE)\s+(\S+)(?:\s(.*))?$/.exec(line);
      if (!m) return; // a comment
      const [, kind, name, rest = ''] = m;
      if (!METRIC_NAME.test(name!)) throw new PromTextError(`bad metric name ${JSON.stringify(name!.slice(0, 64))}`, n, 'unparsable');
      const f = family(name!, n);
      if (kind === 'HELP') {
        if (f.help !== undefined) throw new PromTextError(`a second HELP for ${name}`, n, 'unparsable');
        if (/\\[^\\n]/.test(rest.replace(/\\\\/g, ''))) throw new PromTextError(`bad escape in the HELP of ${name}`, n, 'unparsable');
        f.help = rest.replace(/\\(\\|n)/g, (_, e: string) => (e === 'n' ? '\n' : '\\'));
      } else {
        const type = rest.trim() as PromType;
        if (!TYPES.includes(type)) throw new PromTextError(`unknown type ${JSON.stringify(rest.slice(0, 32))} for ${name}`, n, 'unparsable');
        if (f.typed || f.samples.length > 0) throw new PromTextError(`TYPE of ${name} after its samples or twice`, n, 'unparsable');
        f.type = type;
        f.typed = true;
      }
      return;
    }
    const nameEnd = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
    if (!nameEnd) throw new PromTextError('a line that is no sample', n, 'unparsable');
    const name = nameEnd[0];
    let i = name.length;
    let labels: [string, string][] = [];
    if (line[i] === '{') ({ labels, end: i } = readLabels(line, i + 1, n));
    const rest = line.slice(i);
    if (rest !== '' && !/^[ \t]/.test(rest)) throw new PromTextError(`junk after the name of ${name}`, n, 'unparsable');
    const parts = rest.trim().split(/[ \t]+/);
    const [value, timestamp, ...extra] = parts;
    if (value === undefined || !FLOAT.test(value)) throw new PromTextError(`bad value ${JSON.stringify((value ?? '').slice(0, 32))} for ${name}`, n, 'unparsable');
    if (extra.length > 0 || (timestamp !== undefined && !TIMESTAMP.test(timestamp))) throw new PromTextError(`junk after the value of ${name}`, n, 'unparsable');
    const owner = current && belongs(name, current.name, current.type) ? current : family(name, n);
    if (limits.maxSamples !== undefined && ++count > limits.maxSamples) throw new PromTextError(`more than ${limits.maxSamples} samples`, n, 'too_many_samples');
    owner.samples.push({ name, labels, value, ...(timestamp !== undefined ? { timestamp } : {}) });
  });
  return families.map(({ name, help, type, samples }) => ({ name, type, samples, ...(help !== undefined ? { help } : {}) }));
}

function escapeLabel(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

/** Writes families back as text (HELP and TYPE first, then the samples). */
export function formatPromText(families: readonly PromFamily[]): string {
  const out: string[] = [];
  for (const f of families) {
    if (f.help !== undefined) out.push(`# HELP ${f.name} ${f.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`);
    out.push(`# TYPE ${f.name} ${f.type}`);
    for (const s of f.samples) {
      const l = s.labels.length ? `{${s.labels.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(',')}}` : '';
      out.push(`${s.name}${l} ${s.value}${s.timestamp !== undefined ? ` ${s.timestamp}` : ''}`);
    }
  }
  return out.length ? `${out.join('\n')}\n` : '';
}

/**
 * Puts `labels` first on every sample, replacing a label of the same name the sample had and any
 * label `reserved` says is the caller's to set (a shim or guest cannot pass itself off as another
 * sandbox, nor lend a sandbox labels it does not have).
 */
export function withLabels(families: readonly PromFamily[], labels: readonly (readonly [string, string])[], reserved: (label: string) => boolean = () => false): PromFamily[] {
  const names = new Set(labels.map(([k]) => k));
  return families.map((f) => ({ ...f, samples: f.samples.map((s) => ({ ...s, labels: [...labels, ...s.labels.filter(([k]) => !names.has(k) && !reserved(k))] })) }));
}

/**
 * Merges the families of several sources into one list, each family once with all its samples
 * together (the format requires it). A family named in `types` has that type whatever the sources
 * say: a source that gives it another is left out for that family, so that no source can hide the
 * others' samples by declaring the type first. A family `types` does not name takes the first
 * source's type, and a later source that disagrees is left out for it. `onConflict` hears of each
 * family left out, with the index of its source.
 */
export function mergeFamilies(
  sources: readonly (readonly PromFamily[])[],
  opts: { readonly types?: ReadonlyMap<string, PromType>; readonly help?: ReadonlyMap<string, string>; readonly onConflict?: (name: string, source: number) => void } = {},
): PromFamily[] {
  const merged = new Map<string, { name: string; help?: string; type: PromType; samples: PromSample[] }>();
  sources.forEach((families, source) => {
    for (const f of families) {
      const m = merged.get(f.name);
      if ((m?.type ?? opts.types?.get(f.name) ?? f.type) !== f.type) {
        opts.onConflict?.(f.name, source);
      } else if (!m) {
        const help = opts.help?.get(f.name) ?? f.help;
        merged.set(f.name, { name: f.name, type: f.type, samples: [...f.samples], ...(help !== undefined ? { help } : {}) });
      } else {
        m.samples.push(...f.samples);
        if (m.help === undefined && f.help !== undefined) m.help = f.help;
      }
    }
  });
  return [...merged.values()];
}
