/**
 * memory-policy: refuses a sandbox whose VM may grow past the memory `[memory-policy] max_mib`
 * allows. The limit is checked against the plan's resolved maximum (`plan.vm.memory.maxMiB`), which
 * the hypervisor plugin works out (QEMU: `default_maxmemory`, or the host's memory when it is 0): a
 * value no configuration key holds as such, so the check runs in `checkPlan`, the last word on the
 * resolved plan, before any VM starts.
 */
import { definePlugin, type KataConfig } from 'kata-ts/plugin';

export const PLUGIN_NAME = 'memory-policy';

/** The plugin's own section, `[memory-policy]`, as `schema.json` describes it (defaults filled in). */
export interface MemoryPolicySection {
  /** The most memory, in MiB, a VM may grow to. */
  readonly max_mib: number;
}

function section(cfg: KataConfig): MemoryPolicySection {
  return cfg.data[PLUGIN_NAME] as MemoryPolicySection;
}

export default definePlugin({
  manifest: {
    name: PLUGIN_NAME,
    version: '0.1.0',
    runtime: '^1.0.0',
    description: 'refuses sandboxes whose VM may grow past [memory-policy] max_mib',
    requires: ['hypervisor'],
    // Relative to this module (dist/index.js): the schema ships beside dist/.
    config: { table: PLUGIN_NAME, schema: '../schema.json' },
  },
  apply({ hooks, log }) {
    hooks.checkPlan.tap(PLUGIN_NAME, (plan, cfg, verdict) => {
      const { max_mib } = section(cfg);
      const max = plan.vm.memory.maxMiB;
      if (max > max_mib) {
        verdict.veto({
          key: `${cfg.hypervisorTable}.default_maxmemory`,
          value: max,
          reason: `the VM may grow to ${max} MiB, more than the ${max_mib} MiB [${PLUGIN_NAME}] max_mib allows`,
          fix: `set default_maxmemory to at most ${max_mib} in [${cfg.hypervisorTable}], or raise max_mib in [${PLUGIN_NAME}]`,
        });
      }
    });
    hooks.containerExited.tapPromise(PLUGIN_NAME, async (container, status) => {
      // 137 is SIGKILL, what the guest's OOM killer sends.
      if (status === 137) log.warn({ container: container.containerId, sandbox: container.sandbox.sandboxId }, 'container killed (SIGKILL): out of memory?');
    });
  },
});
