/**
 * Errors a plugin author meets: each names the plugin (its path when no name is known yet), keeps
 * its code and hook, says what to do, and shows the plugin's own stack with --debug.
 */
import assert from 'node:assert/strict';
import { pathToFileURL } from 'node:url';
import path from 'node:path';
import { main } from '../../../cli/main.js';
import type { ValidateReport } from '../../../cli/validate.js';
import { judgeConfig } from '../../../core/runtime.js';
import { DIST_ROOT } from '../../../core/paths.js';
import type { KataError } from '../../../core/errors.js';
import { TempDir, fakeConfig, fakeHypervisorSource } from '../../helpers/tmp.js';
import { capture } from '../../helpers/cli.js';

const ERRORS_URL = pathToFileURL(path.join(DIST_ROOT, 'core', 'errors.js')).href;

describe('plugin errors', () => {
  let tmp: TempDir;
  let hv: string;
  beforeEach(() => {
    tmp = new TempDir('kata-plugin-errors-');
    hv = tmp.file('fakevmm.mjs', fakeHypervisorSource('fakevmm'));
  });
  afterEach(() => tmp.cleanup());

  const configWith = (plugin: string, extraSection = '', tail = '') =>
    fakeConfig('fakevmm', hv, extraSection, tail).replace(`plugins = ["${hv}"]`, `plugins = ${JSON.stringify([hv, plugin])}`);

  /** A plugin module with a validate handler whose body is `body`. */
  const validatePlugin = (name: string, body: string, manifest = '') =>
    tmp.file(`${name}.mjs`, `import { KataError } from ${JSON.stringify(ERRORS_URL)};
export default { manifest: { name: ${JSON.stringify(name)}, version: '1.0.0', runtime: '^1.0.0'${manifest} },
  apply({ hooks }) { hooks.validate.tap(${JSON.stringify(name)}, (cfg, verdict) => { ${body} }); } };
void KataError;
`);

  /** A plugin module with a manifest (`extra` fields added; a later field wins) and an apply() whose body is `apply`. */
  const manifestOnly = (name: string, extra = '', apply = '') =>
    `export default { manifest: { name: ${JSON.stringify(name)}, version: '1.0.0', runtime: '^1.0.0'${extra ? `, ${extra}` : ''} }, apply({ hooks }) { ${apply} } };\n`;

  async function cli(argv: string[]) {
    const c = capture({});
    const code = await main(argv, c.io);
    return { code, stdout: c.stdout(), stderr: c.stderr() };
  }

  describe('while loading', () => {
    const cases: { what: string; module: () => string; code: string; plugin: (file: string) => string }[] = [
      { what: 'a missing module', module: () => path.join(tmp.path, 'nope.mjs'), code: 'KATA_ERR_PLUGIN_NOT_FOUND', plugin: (f) => f },
      { what: 'a module that throws on import', module: () => tmp.file('throws.mjs', 'throw new Error("kaput");'), code: 'KATA_ERR_PLUGIN_IMPORT', plugin: (f) => f },
      { what: 'a module without a default export', module: () => tmp.file('nodefault.mjs', 'export const x = 1;'), code: 'KATA_ERR_PLUGIN_NO_DEFAULT_EXPORT', plugin: (f) => f },
      {
        what: 'a bad manifest with a usable name',
        module: () => tmp.file('badm.mjs', 'export default { manifest: { name: "badm", version: "x" }, apply() {} };'),
        code: 'KATA_ERR_PLUGIN_BAD_MANIFEST',
        plugin: () => 'badm',
      },
      {
        what: 'a bad manifest with a bad name',
        module: () => tmp.file('badname.mjs', 'export default { manifest: { name: "Bad Name", version: "1.0.0", runtime: "^1.0.0" }, apply() {} };'),
        code: 'KATA_ERR_PLUGIN_BAD_MANIFEST',
        plugin: (f) => f,
      },
      { what: 'an API range this runtime does not implement', module: () => tmp.file('old.mjs', manifestOnly('old', "runtime: '^0.9.0'")), code: 'KATA_ERR_PLUGIN_API_VERSION', plugin: () => 'old' },
      { what: 'a name another plugin has', module: () => tmp.file('twin.mjs', manifestOnly('fakevmm')), code: 'KATA_ERR_PLUGIN_DUPLICATE', plugin: () => 'fakevmm' },
      { what: 'a role no plugin provides', module: () => tmp.file('needy.mjs', manifestOnly('needy', "requires: ['gpu']")), code: 'KATA_ERR_PLUGIN_MISSING_DEPENDENCY', plugin: () => 'needy' },
      { what: 'a schema that cannot be loaded', module: () => tmp.file('schemaless.mjs', manifestOnly('schemaless', "config: { table: 'schemaless', schema: './missing.json' }")), code: 'KATA_ERR_PLUGIN_SCHEMA', plugin: () => 'schemaless' },
      { what: 'an apply() that throws', module: () => tmp.file('applies.mjs', manifestOnly('applies', '', "throw new Error('no taps today');")), code: 'KATA_ERR_PLUGIN_APPLY', plugin: () => 'applies' },
      { what: 'a tap under another name', module: () => tmp.file('tapper.mjs', manifestOnly('tapper', '', "hooks.validate.tap('someone-else', () => {});")), code: 'KATA_ERR_PLUGIN_TAP', plugin: () => 'tapper' },
    ];
    for (const c of cases) {
      it(`names the plugin for ${c.what}`, async () => {
        const file = c.module();
        await assert.rejects(judgeConfig({ text: configWith(file) }), (e: KataError) => {
          assert.equal(e.code, c.code);
          assert.equal(e.plugin, c.plugin(file));
          assert.ok(e.message.startsWith(`[plugin ${c.plugin(file)}] `), e.message);
          return true;
        });
      });

      it(`validate --json prints one object with the plugin in problems[] for ${c.what}`, async () => {
        const file = c.module();
        const r = await cli(['--config', tmp.file('c.toml', configWith(file)), 'validate', '--json']);
        assert.equal(r.code, 1);
        const doc = JSON.parse(r.stdout) as ValidateReport;
        assert.equal(doc.valid, false);
        assert.deepEqual(doc.problems.map((p) => [p.code, p.plugin]), [[c.code, c.plugin(file)]]);
      });

      it(`env --json prints one object with the plugin in problems[] for ${c.what}`, async () => {
        const file = c.module();
        const r = await cli(['--config', tmp.file('c.toml', configWith(file)), 'env', '--json']);
        const doc = JSON.parse(r.stdout) as { problems: { code: string; plugin?: string }[] };
        assert.deepEqual(doc.problems.map((p) => [p.code, p.plugin]), [[c.code, c.plugin(file)]]);
      });
    }
  });

  describe('vetoes', () => {
    it('refuses a veto without a fix as the plugin’s error, naming plugin and hook', async () => {
      const p = validatePlugin('nofix', `verdict.veto({ key: 'agent.kata.debug_console_enabled', value: true, reason: 'no' });`);
      await assert.rejects(judgeConfig({ text: configWith(p) }), (e: KataError) => {
        assert.deepEqual([e.code, e.plugin, e.hook], ['KATA_ERR_PLUGIN_BAD_VETO', 'nofix', 'validate']);
        return true;
      });
    });

    it('never prints "fix: undefined"', async () => {
      const p = validatePlugin('noreason', `verdict.veto({ key: 'agent.kata.debug_console_enabled' });`);
      const r = await cli(['--config', tmp.file('c.toml', configWith(p)), 'validate']);
      assert.equal(r.code, 1);
      assert.doesNotMatch(r.stdout + r.stderr, /undefined/);
      assert.match(r.stderr, /\[plugin noreason\] .*without a reason or a fix/);
    });
  });

  describe('hook errors', () => {
    it('keeps the code of a coded error thrown inside a hook and adds the hook', async () => {
      const p = validatePlugin('coded', `throw new KataError('CODED_ERR_TOO_BIG', 'too big', { fix: 'make it smaller' });`);
      await assert.rejects(judgeConfig({ text: configWith(p) }), (e: KataError) => {
        assert.deepEqual([e.code, e.plugin, e.hook, e.fix], ['CODED_ERR_TOO_BIG', 'coded', 'validate', 'make it smaller']);
        return true;
      });
    });

    it("--debug shows the cause of a throwing apply() with the plugin's own file and line, and the fix says so", async () => {
      const p = tmp.file('applies.mjs', manifestOnly('applies', '', "throw new RangeError('no taps today');"));
      const file = tmp.file('c.toml', configWith(p));
      const plain = await cli(['--config', file, 'validate']);
      assert.match(plain.stderr, /^kata-runtime: \[plugin applies\] apply\(\) threw: no taps today\n {2}fix: .*--debug/m);
      const debug = await cli(['--debug', '--config', file, 'validate']);
      assert.match(debug.stderr, /cause: RangeError: no taps today\n\s+at .*applies\.mjs:\d+:\d+/);
    });

    it("--debug shows the cause with the plugin's own file and line, not the runtime's frames", async () => {
      const p = validatePlugin('thrower', `helper();`);
      tmp.file('thrower.mjs', `${(await import('node:fs')).readFileSync(p, 'utf8')}\nfunction helper() { throw new TypeError('boom inside plugin'); }\n`);
      const file = tmp.file('c.toml', configWith(p));
      const plain = await cli(['--config', file, 'validate']);
      assert.doesNotMatch(plain.stderr, /cause:/);
      assert.doesNotMatch(plain.stderr, /thrower\.mjs:/);
      const debug = await cli(['--debug', '--config', file, 'validate']);
      assert.match(debug.stderr, /cause: TypeError: boom inside plugin/);
      assert.match(debug.stderr, /at helper \(file:\/\/.*thrower\.mjs:\d+:\d+\)/);
      assert.doesNotMatch(debug.stderr.slice(debug.stderr.indexOf('cause:')), /dist\/core|node:internal/);
    });
  });

  describe('a plugin’s own section', () => {
    const section = `, config: { table: 'mine', schema: { type: 'object', properties: { size: { type: 'integer', minimum: 1 } }, additionalProperties: false } }`;

    it('reports a key its schema refuses once, as a problem, not also as an ignored key', async () => {
      const p = validatePlugin('mine', '', section);
      const j = await judgeConfig({ text: configWith(p, '', '\n[mine]\nsize = 2\nextra = 1\n') });
      assert.deepEqual(j.problems.map((x) => [x.code, x.plugin, x.key]), [['KATA_ERR_CONFIG_SCHEMA', 'mine', 'mine.extra']]);
      assert.deepEqual(j.unknownKeys, []);
    });

    it('words schema fixes as instructions', async () => {
      const p = validatePlugin('mine', '', section);
      const wrongType = await judgeConfig({ text: configWith(p, '', '\n[mine]\nsize = "a"\n') });
      assert.deepEqual(wrongType.problems.map((x) => [x.key, x.reason, x.fix]), [['mine.size', 'must be an integer', 'give an integer']]);
      const tooSmall = await judgeConfig({ text: configWith(p, '', '\n[mine]\nsize = 0\n') });
      assert.deepEqual(tooSmall.problems.map((x) => [x.key, x.reason, x.fix]), [['mine.size', 'must be at least 1', 'give a value of at least 1']]);
    });
  });
});
