import assert from 'node:assert/strict';
import { Counter, Gauge, Histogram, Registry, Summary, collectDefaultMetrics } from 'prom-client';
import { GUEST_FAMILY_HELP, formatPromText, mergeFamilies, parsePromText, PromTextError, withLabels } from '../../../core/prom-text.js';
import { GUEST_METRICS } from '../../../wire/agent/metric-families.js';

function refusal(text: string, limits = {}): PromTextError {
  try {
    parsePromText(text, limits);
  } catch (e) {
    assert.ok(e instanceof PromTextError, String(e));
    return e;
  }
  assert.fail(`accepted ${JSON.stringify(text)}`);
}

describe('Prometheus text (core/prom-text.ts)', () => {
  it('reads HELP, TYPE, labels with escapes, timestamps and the samples of a histogram as one family', () => {
    const text = [
      '# HELP a_total Things\\ncounted \\\\ here.',
      '# TYPE a_total counter',
      'a_total{x="1",y="q\\"uote\\\\back\\nline"} 3 1700000000000',
      '# a comment',
      '',
      '# TYPE h histogram',
      'h_bucket{le="0.5"} 1',
      'h_bucket{le="+Inf",} 2',
      'h_sum 1.5e0',
      'h_count 2',
      'u NaN',
      'v -Inf',
    ].join('\n');
    const f = parsePromText(text);
    assert.deepEqual(
      f.map((x) => [x.name, x.type, x.samples.length]),
      [
        ['a_total', 'counter', 1],
        ['h', 'histogram', 4],
        ['u', 'untyped', 1],
        ['v', 'untyped', 1],
      ],
    );
    assert.equal(f[0]!.help, 'Things\ncounted \\ here.');
    assert.deepEqual(f[0]!.samples[0], { name: 'a_total', labels: [['x', '1'], ['y', 'q"uote\\back\nline']], value: '3', timestamp: '1700000000000' });
    // Written back, it reads the same.
    assert.deepEqual(parsePromText(formatPromText(f)), f);
  });

  it('refuses malformed lines whole, naming the line', () => {
    const bad: [string, number][] = [
      ['ok 1\nbad-name 1', 2],
      ['m{a="1" 1', 1],
      ['m{a=1} 1', 1],
      ['m{a="1",a="2"} 1', 1],
      ['m{1a="x"} 1', 1],
      ['m{a="\\x"} 1', 1],
      ['m one', 1],
      ['m 1 2 3', 1],
      ['m 1 1.5', 1],
      ['m', 1],
      ['m{a="x"}1', 1],
      ['# TYPE m bogus', 1],
      ['m 1\n# TYPE m gauge', 2],
      ['# TYPE m gauge\n# TYPE m gauge', 2],
      ['# HELP m a\n# HELP m b', 2],
      ['a 1\nb 1\na 2', 3],
    ];
    for (const [text, line] of bad) {
      const e = refusal(text);
      assert.equal(e.reason, 'unparsable', text);
      assert.equal(e.line, line, text);
    }
  });

  it('refuses text over its byte or sample limit and names outside the allowed prefixes', () => {
    assert.equal(refusal('m 1\n'.repeat(100), { maxBytes: 399 }).reason, 'too_large');
    assert.equal(parsePromText('m 1\n'.repeat(100), { maxBytes: 400 }).length, 1);
    assert.equal(refusal('m{i="1"} 1\nm{i="2"} 1\nm{i="3"} 1', { maxSamples: 2 }).reason, 'too_many_samples');
    const e = refusal('kata_guest_load 1\nkata_hypervisor_fds 0', { allowedPrefixes: ['kata_guest_', 'kata_agent_'] });
    assert.equal(e.reason, 'unexpected_name');
    assert.equal(e.line, 2);
    assert.equal(refusal('# HELP kata_shim_x spoof', { allowedPrefixes: ['kata_guest_'] }).reason, 'unexpected_name');
  });

  it("reads prom-client's own output (counters, gauges, histograms, summaries, default metrics)", async () => {
    const registers = [new Registry()];
    const r = registers[0]!;
    collectDefaultMetrics({ register: r, prefix: 'p_' });
    new Counter({ name: 'c_total', help: 'c', labelNames: ['l'], registers }).inc({ l: 'a"b\\c\nd' }, 2);
    new Gauge({ name: 'g', help: 'g\nmultiline', registers }).set(-1.5);
    new Histogram({ name: 'h_ms', help: 'h', buckets: [1, 10], registers }).observe(3);
    new Summary({ name: 's', help: 's', registers }).observe(1);
    const text = await r.metrics();
    const f = parsePromText(text);
    const byName = new Map(f.map((x) => [x.name, x]));
    assert.equal(byName.get('c_total')?.samples[0]?.labels[0]?.[1], 'a"b\\c\nd');
    assert.equal(byName.get('h_ms')?.type, 'histogram');
    assert.equal(byName.get('h_ms')?.samples.length, 5);
    assert.equal(byName.get('s')?.type, 'summary');
    assert.ok(byName.get('p_process_cpu_seconds_total'));
    assert.ok(f.every((x) => x.help !== undefined), 'every family has its HELP');
  });

  it('puts the given labels first on every sample, replacing a spoofed one of the same name', () => {
    const f = withLabels(parsePromText('m{sandbox_id="other",x="1"} 1\nn 2'), [['sandbox_id', 'sb1']]);
    assert.deepEqual(
      f.map((x) => x.samples[0]!.labels),
      [
        [['sandbox_id', 'sb1'], ['x', '1']],
        [['sandbox_id', 'sb1']],
      ],
    );
  });

  it('strips every label the caller reserves, whether or not it sets it', () => {
    const f = withLabels(parsePromText('m{cri_namespace="kube-system",cri_name="coredns",sandbox_id="other",item="x"} 1'), [['sandbox_id', 'sb1']], (k) => k === 'sandbox_id' || k.startsWith('cri_'));
    assert.deepEqual(f[0]!.samples[0]!.labels, [['sandbox_id', 'sb1'], ['item', 'x']]);
  });

  it('merges the families of several sources, each once with all its samples, leaving out a family of another type', () => {
    const conflicts: string[] = [];
    const a = withLabels(parsePromText('# HELP m M\n# TYPE m gauge\nm 1\n# TYPE c counter\nc 1'), [['s', 'a']]);
    const b = withLabels(parsePromText('# TYPE m gauge\nm 2\n# TYPE c gauge\nc 5\nz 0'), [['s', 'b']]);
    const merged = mergeFamilies([a, b], { onConflict: (n) => conflicts.push(n) });
    assert.deepEqual(merged.map((f) => [f.name, f.samples.map((s) => s.value)]), [
      ['m', ['1', '2']],
      ['c', ['1']],
      ['z', ['0']],
    ]);
    assert.deepEqual(conflicts, ['c']);
    // The merged text is itself valid Prometheus text.
    assert.equal(parsePromText(formatPromText(merged)).length, 3);
  });

  it('keeps the type the table gives a family: a source that declares another is left out for it, first or not', () => {
    const conflicts: [string, number][] = [];
    const liar = withLabels(parsePromText('# TYPE kata_guest_meminfo counter\nkata_guest_meminfo{item="mem_total"} 1\n# TYPE kata_guest_x counter\nkata_guest_x 1'), [['s', 'a']]);
    const honest = withLabels(parsePromText('# TYPE kata_guest_meminfo gauge\nkata_guest_meminfo{item="mem_total"} 2\n# TYPE kata_guest_x gauge\nkata_guest_x 2'), [['s', 'b']]);
    const merged = mergeFamilies([liar, honest, honest], { types: new Map([['kata_guest_meminfo', 'gauge']]), onConflict: (n, i) => conflicts.push([n, i]) });
    assert.deepEqual(merged.map((f) => [f.name, f.type, f.samples.map((s) => s.value)]), [
      // A family the table does not know takes the first source's type.
      ['kata_guest_x', 'counter', ['1']],
      ['kata_guest_meminfo', 'gauge', ['2', '2']],
    ]);
    assert.deepEqual(conflicts, [
      ['kata_guest_meminfo', 0],
      ['kata_guest_x', 1],
      ['kata_guest_x', 2],
    ]);
  });

  it("takes a family's HELP from the table when it has one, whatever the first source says", () => {
    const first = parsePromText('# HELP kata_guest_meminfo Ignore the other sandboxes.\n# TYPE kata_guest_meminfo gauge\nkata_guest_meminfo 1\n# HELP kata_guest_y Its own words.\n# TYPE kata_guest_y gauge\nkata_guest_y 1');
    const merged = mergeFamilies([first], { help: new Map([['kata_guest_meminfo', 'Guest memory.']]) });
    assert.deepEqual(merged.map((f) => [f.name, f.help]), [
      ['kata_guest_meminfo', 'Guest memory.'],
      ['kata_guest_y', 'Its own words.'],
    ]);
    assert.equal(GUEST_FAMILY_HELP.get('kata_guest_meminfo'), GUEST_METRICS.kata_guest_meminfo.help, 'the table is the agent\'s');
  });
});
