import assert from 'node:assert/strict';
import { definePlugin } from '../../../core/plugin-api.js';
import { judge } from '../../../core/testing.js';

const QEMU = '[hypervisor.qemu]\nkernel = "/k"\nimage = "/i"\nshared_fs = "none"\n';

function sectionReader(seen: unknown[]) {
  return definePlugin({
    manifest: {
      name: 'quota',
      version: '1.0.0',
      runtime: '^1.0.0',
      config: { table: 'quota', schema: { type: 'object', additionalProperties: false, properties: { limit: { type: 'integer', default: 7 } } } },
    },
    apply({ hooks }) {
      hooks.validate.tap('quota', (cfg) => void seen.push(cfg.data.quota));
    },
  });
}

describe("a plugin's own configuration section", () => {
  it("gets its schema's defaults when the file has no such section", async () => {
    const seen: unknown[] = [];
    const r = await judge(QEMU, { plugins: [sectionReader(seen)] });
    assert.equal(r.valid, true, JSON.stringify(r.problems));
    assert.deepEqual(seen, [{ limit: 7 }]);
  });

  it('creates a table named __proto__.x as an own table, never on the object prototype', async () => {
    const plugin = definePlugin({
      manifest: { name: 'proto', version: '1.0.0', runtime: '^1.0.0', config: { table: '__proto__.x', schema: { type: 'object', properties: { y: { type: 'integer', default: 1 } } } } },
      apply() {},
    });
    await judge(QEMU, { plugins: [plugin] });
    assert.equal(({} as Record<string, unknown>).x, undefined);
    assert.equal(Object.prototype.hasOwnProperty.call(Object.prototype, 'x'), false);
  });

  it('keeps the values the file gives', async () => {
    const seen: unknown[] = [];
    await judge(`${QEMU}\n[quota]\nlimit = 3\n`, { plugins: [sectionReader(seen)] });
    assert.deepEqual(seen, [{ limit: 3 }]);
  });

  it('reports a refused key once, as the plugin schema problem with an instruction, not also as unknown', async () => {
    const r = await judge(`${QEMU}\n[quota]\nlimit = "x"\nlimt = 3\n`, { plugins: [sectionReader([])] });
    assert.deepEqual(r.problems.map((p) => [p.code, p.plugin, p.key]).sort(), [['KATA_ERR_CONFIG_SCHEMA', 'quota', 'quota.limit'], ['KATA_ERR_CONFIG_SCHEMA', 'quota', 'quota.limt']]);
    assert.equal(r.problems.find((p) => p.key === 'quota.limit')?.fix, 'give an integer');
    assert.deepEqual(r.unknownKeys, []);
  });
});
