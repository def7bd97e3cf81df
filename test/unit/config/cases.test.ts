/**
 * Configuration combinations as data: each folder of test/fixtures/config-cases holds a config.toml
 * and an expect.json, and this one loop judges them all.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../../core/paths.js';
import { judgeConfig } from '../../../core/runtime.js';
import type { Problem } from '../../../core/errors.js';

interface Expect {
  valid?: boolean;
  throws?: Record<string, unknown>;
  plugins?: string[];
  problems?: Pick<Problem, 'code' | 'key' | 'plugin'>[];
  sortProblems?: boolean;
  capabilities?: { has?: string[]; hasNot?: string[] };
  plan?: Record<string, unknown>;
  planNoteMatches?: string;
  launch?: Record<string, unknown>;
  argvIncludes?: string[];
  argvMatches?: string[];
  unknownKeys?: string[];
}

const CASES = path.join(PACKAGE_ROOT, 'test', 'fixtures', 'config-cases');

const pick = (p: Problem) => ({ code: p.code, key: p.key, ...(p.plugin ? { plugin: p.plugin } : {}) });
const order = (a: { code: string; key: string; plugin?: string }, b: typeof a) => `${a.code} ${a.key} ${a.plugin ?? ''}`.localeCompare(`${b.code} ${b.key} ${b.plugin ?? ''}`);
const at = (o: unknown, dotted: string): unknown => dotted.split('.').reduce<unknown>((v, k) => (v !== null && typeof v === 'object' ? (v as Record<string, unknown>)[k] : undefined), o);

describe('configuration cases', () => {
  for (const name of readdirSync(CASES).sort()) {
    const dir = path.join(CASES, name);
    const expect = JSON.parse(readFileSync(path.join(dir, 'expect.json'), 'utf8')) as Expect;
    it(`judges ${name}`, async () => {
      const file = path.join(dir, 'config.toml');
      if (expect.throws) {
        await assert.rejects(judgeConfig({ file }), (e: Record<string, unknown>) => {
          for (const [k, v] of Object.entries(expect.throws ?? {})) assert.deepEqual(e[k], v, `${k} of ${String(e.message)}`);
          return true;
        });
        return;
      }
      const j = await judgeConfig({ file });
      if (expect.valid !== undefined) assert.equal(j.valid, expect.valid, JSON.stringify(j.problems, null, 1));
      if (expect.plugins) assert.deepEqual(j.plugins.map((p) => p.name), expect.plugins);
      if (expect.problems) {
        const got = j.problems.map(pick);
        assert.deepEqual(expect.sortProblems ? got.sort(order) : got, expect.sortProblems ? [...expect.problems].sort(order) : expect.problems);
        for (const p of j.problems) assert.ok(p.reason.length > 0 && p.fix.length > 0, `reason and fix for ${p.key}`);
      }
      for (const c of expect.capabilities?.has ?? []) assert.ok(j.capabilities.some((r) => r.name === c), `has ${c}`);
      for (const c of expect.capabilities?.hasNot ?? []) assert.ok(!j.capabilities.some((r) => r.name === c), `has not ${c}`);
      for (const [k, v] of Object.entries(expect.plan ?? {})) assert.deepEqual(at(j.plan, k), v, `plan.${k}`);
      if (expect.planNoteMatches) assert.ok(j.plan?.notes.some((n) => n.message.includes(expect.planNoteMatches ?? '')), 'plan note');
      for (const [k, v] of Object.entries(expect.launch ?? {})) assert.deepEqual(at(j.plan?.vm.launch, k) ?? null, v, `launch.${k}`);
      const argv = (j.plan?.vm.launch ?? []) as string[];
      for (const a of expect.argvIncludes ?? []) assert.ok(argv.join('\u0000').includes(a), `argv includes ${a}`);
      for (const m of expect.argvMatches ?? []) assert.ok(argv.some((a) => a.includes(m)), `argv has ${m}`);
      if (expect.unknownKeys) assert.deepEqual(j.unknownKeys, expect.unknownKeys);
      if (j.valid) {
        assert.ok(Object.isFrozen(j.config) && Object.isFrozen(j.config?.hypervisor), 'the validated config is frozen');
        assert.ok(Object.isFrozen(j.plan) && Object.isFrozen(j.plan?.vm), 'the plan is frozen');
      }
    });
  }
});
