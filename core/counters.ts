/**
 * Counters that code anywhere in the runtime increments and the shim's metrics report (its
 * registry reads them at each scrape; shim/metrics.ts). Plain numbers in this process: no metrics
 * library is loaded by whoever counts.
 */

const hotplugs = new Map<string, number>();

/**
 * Counts one hot-plug of `kind` (`cpu`, `memory`, `block`, …; unplugs as `cpu_unplug` …), reported
 * as `kata_shim_hotplug_total{kind}`.
 */
export function countHotplug(kind: string): void {
  hotplugs.set(kind, (hotplugs.get(kind) ?? 0) + 1);
}

/** The hot-plug counts so far, by kind. */
export function hotplugCounts(): ReadonlyMap<string, number> {
  return hotplugs;
}
