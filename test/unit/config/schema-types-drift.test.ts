import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../../core/paths.js';
import { generateSchemaTypes, SCHEMA_TYPES_FILE } from '../../../scripts/gen-schema-types.js';

describe('schema types', () => {
  it('match a fresh generation from schemas/ (run `npm run gen` after changing a schema)', async function () {
    this.timeout(60_000);
    const committed = await readFile(path.join(PACKAGE_ROOT, SCHEMA_TYPES_FILE), 'utf8');
    assert.equal(committed, await generateSchemaTypes());
  });
});
