/**
 * The documentation that is generated from code must match it, and the README's example plugin
 * must work as written, loaded from outside the project tree like a user's plugin.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { ERROR_CODES } from '../../core/errors.js';
import { judgeConfig } from '../../core/runtime.js';
import { createHooks } from '../../core/hooks.js';
import { generateConfigurationDoc, generateErrorTable, spliceReadme, CONFIG_DOC } from '../../scripts/gen-docs.js';
import { PLUGIN_API_DOC, generatePluginApiDoc } from '../../scripts/gen-plugin-api-doc.js';
import { TempDir } from '../helpers/tmp.js';

const readme = () => readFile(path.join(PACKAGE_ROOT, 'README.md'), 'utf8');

describe('documentation', () => {
  it('lists every error code in the README table (run `npm run gen` after changing core/errors.ts)', async () => {
    const text = await readme();
    assert.equal(text, spliceReadme(text, generateErrorTable()));
    for (const code of Object.keys(ERROR_CODES)) assert.ok(text.includes(`| \`${code}\` |`), code);
  });

  it('lists every configuration key in docs/configuration.md (run `npm run gen` after changing a schema)', async () => {
    assert.equal(await readFile(path.join(PACKAGE_ROOT, CONFIG_DOC), 'utf8'), await generateConfigurationDoc());
  });

  it('matches the plugin API page to the source (run `npm run gen` after changing the plugin API)', async () => {
    assert.equal(await readFile(path.join(PACKAGE_ROOT, PLUGIN_API_DOC), 'utf8'), await generatePluginApiDoc());
  });

  it('documents every hook, with its tapable kind, on the plugin API page', async () => {
    const page = await generatePluginApiDoc();
    for (const [name, hook] of Object.entries(createHooks())) assert.ok(page.includes(`| \`${name}\` | \`${hook.constructor.name}\` |`), name);
  });

  it('documents every hook in the README hook table', async () => {
    const text = await readme();
    for (const hook of Object.keys(createHooks())) assert.ok(text.includes(`| \`${hook}\` |`), hook);
  });

  it('starts the README with exactly two command lines', async () => {
    const lines = (await readme()).split('\n');
    assert.deepEqual(lines.slice(0, 4), ['```', 'npm ci && npm run demo', 'npm ci && npm test', '```']);
  });

  describe('the README example plugin', () => {
    let tmp: TempDir;
    let plugin: string;
    before(async () => {
      const text = await readme();
      const m = /```js\n\/\/ example-plugin: (\S+)\n([\s\S]*?)```/.exec(text);
      assert.ok(m, 'the README has an example plugin block');
      tmp = new TempDir('kata-ts-example-plugin-');
      tmp.linkPackage();
      plugin = tmp.file(m[1] as string, m[2] as string);
    });
    after(() => tmp.cleanup());

    const config = (debug: boolean) => `[hypervisor.qemu]
kernel = "/k"
image = "/i"
shared_fs = "none"
disable_block_device_use = true

[agent.kata]
debug_console_enabled = ${debug}

[runtime]
plugins = ["${plugin}"]
`;

    it('loads and stays quiet when the debug console is off', async () => {
      const j = await judgeConfig({ text: config(false) });
      assert.equal(j.valid, true, JSON.stringify(j.problems));
      assert.ok(j.plugins.some((p) => p.name === 'no-debug-console' && !p.builtin));
    });

    it('vetoes the debug console under its own name', async () => {
      const j = await judgeConfig({ text: config(true) });
      assert.deepEqual(
        j.problems.map((p) => [p.code, p.plugin, p.key]),
        [['KATA_ERR_CONFIG_VETO', 'no-debug-console', 'agent.kata.debug_console_enabled']],
      );
    });
  });
});
