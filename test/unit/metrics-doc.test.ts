/**
 * The README's metric list is generated from the registries and must match them.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { GUEST_METRICS } from '../../wire/agent/metric-families.js';
import { generateMetricTable, spliceMetricTable } from '../../scripts/gen-metrics-doc.js';

describe('documentation: metrics', () => {
  it('lists every metric of the shim, the guest and the monitor in the README (run `npm run gen` after changing one)', async () => {
    const text = await readFile(path.join(PACKAGE_ROOT, 'README.md'), 'utf8');
    const table = await generateMetricTable();
    assert.equal(text, spliceMetricTable(text, table));
    for (const name of ['kata_hypervisor_proc_status', 'kata_shim_process_cpu_seconds_total', 'kata_shim_hotplug_total', 'kata_monitor_running_shim_count', ...Object.keys(GUEST_METRICS)]) {
      assert.ok(text.includes(`| \`${name}\` |`), name);
    }
  });
});
