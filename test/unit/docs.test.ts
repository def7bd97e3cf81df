/**
 * The documentation that is generated from code must match it, and what it names must exist.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { ERROR_CODES } from '../../core/errors.js';
import { createHooks } from '../../core/hooks.js';
import { generateConfigurationDoc, generateErrorTable, spliceReadme, CONFIG_DOC } from '../../scripts/gen-docs.js';
import { PLUGIN_API_DOC, generatePluginApiDoc } from '../../scripts/gen-plugin-api-doc.js';

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
  it('names only files and directories of the repository that exist', async () => {
    const top = (await readdir(PACKAGE_ROOT, { withFileTypes: true })).filter((d) => d.isDirectory() && !d.name.startsWith('.') && d.name !== 'node_modules' && d.name !== 'dist');
    const cited = new RegExp(`\`((?:${top.map((d) => d.name).join('|')})/[^\`\\s<]*)\``, 'g');
    const missing: string[] = [];
    for (const [, rel] of (await readme()).matchAll(cited)) if (!existsSync(path.join(PACKAGE_ROOT, rel!))) missing.push(rel!);
    assert.deepEqual([...new Set(missing)], []);
  });
  // The README's example plugin is packed, installed and loaded as an author would in test/unit/plugin-package.test.ts.
});
