/**
 * Bad input, property-based (fixed seed): generated and mutated configurations either validate or
 * fail with a coded error — never an uncaught exception, and never a stack trace from the CLI.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { judgeConfig } from '../../../core/runtime.js';
import { ERROR_CODES, KataError } from '../../../core/errors.js';
import { main } from '../../../cli/main.js';
import { stringify } from 'smol-toml';
import { TempDir } from '../../helpers/tmp.js';
import { inspect } from 'node:util';

const SEED = 20261126;

const HV_KEYS = [
  'path', 'kernel', 'image', 'initrd', 'firmware', 'kernel_params', 'default_vcpus', 'default_maxvcpus', 'default_memory', 'memory_slots',
  'default_maxmemory', 'confidential_guest', 'sev_snp_guest', 'shared_fs', 'virtio_fs_daemon', 'virtio_fs_cache', 'virtio_fs_queue_size',
  'virtio_fs_extra_args', 'virtio_fs_access_platform', 'block_device_driver', 'disable_block_device_use', 'disable_image_nvdimm', 'machine_type',
  'enable_iommu', 'entropy_source', 'msize_9p', 'accelerator', 'valid_hypervisor_paths', 'enable_annotations', 'rootfs_type', 'cpu_features',
];
const RUNTIME_KEYS = ['internetworking_model', 'disable_new_netns', 'enable_debug', 'experimental', 'plugins', 'vfio_mode', 'sandbox_cgroup_only'];
const ENUM_VALUES = ['virtio-fs', 'virtio-9p', 'none', 'virtio-fs-nydus', 'virtio-blk', 'virtio-scsi', 'virtio-mmio', 'nvdimm', 'q35', 'pc', 'microvm', 'auto', 'never', 'always', 'tcg', 'kvm', 'tcfilter', ''];

const anyValue: fc.Arbitrary<unknown> = fc.oneof(
  fc.constantFrom(...ENUM_VALUES),
  fc.string({ maxLength: 12 }),
  fc.integer({ min: -5, max: 70000 }),
  fc.constantFrom(0, 1, 256, 2048, 4294967296, 9223372036854775807n, -9223372036854775808n, 0.5, 1.5, Number.MAX_SAFE_INTEGER),
  fc.boolean(),
  fc.array(fc.oneof(fc.string({ maxLength: 6 }), fc.integer()), { maxLength: 3 }),
  fc.dictionary(fc.constantFrom('a', 'b', 'kernel'), fc.oneof(fc.integer(), fc.string({ maxLength: 4 })), { maxKeys: 2 }),
);

/** runtime.plugins values that can never import a real module by accident. */
const pluginList = fc.array(fc.constantFrom('/nonexistent/plugin.mjs', './relative.mjs', '', 'kata-ts-no-such-plugin-xyz', 42), { maxLength: 2 });

const base = (hv: string) => ({
  hypervisor: { [hv]: { kernel: '/k', image: '/i', firmware: '/fw', shared_fs: 'none', disable_block_device_use: true, block_device_driver: 'virtio-blk', virtio_fs_daemon: '/v' } },
  agent: { kata: {} },
  runtime: {},
});

const mutatedConfig = fc
  .record({
    hv: fc.oneof({ weight: 10, arbitrary: fc.constantFrom('clh', 'qemu') }, { weight: 1, arbitrary: fc.constantFrom('firecracker', 'nope') }),
    hvEdits: fc.array(fc.tuple(fc.constantFrom(...HV_KEYS), fc.option(anyValue, { nil: undefined })), { maxLength: 4 }),
    rtEdits: fc.array(fc.tuple(fc.constantFrom(...RUNTIME_KEYS), anyValue), { maxLength: 2 }),
    plugins: fc.oneof({ weight: 10, arbitrary: fc.constant(undefined) }, { weight: 1, arbitrary: pluginList }),
    structural: fc.oneof(
      { weight: 15, arbitrary: fc.constant('none') },
      { weight: 1, arbitrary: fc.constantFrom('hv-not-table', 'two-hv', 'no-hv', 'agent-scalar', 'runtime-array') },
    ),
  })
  .map(({ hv, hvEdits, rtEdits, plugins, structural }) => {
    const cfg = base(hv) as Record<string, unknown> & { hypervisor: Record<string, Record<string, unknown>>; runtime: Record<string, unknown> };
    const section = cfg.hypervisor[hv] as Record<string, unknown>;
    for (const [k, v] of hvEdits) {
      if (v === undefined) delete section[k];
      else section[k] = v;
    }
    for (const [k, v] of rtEdits) cfg.runtime[k] = v;
    if (plugins) cfg.runtime.plugins = plugins;
    if (structural === 'hv-not-table') cfg.hypervisor = 'qemu' as never;
    if (structural === 'two-hv') cfg.hypervisor.other = { kernel: '/k' };
    if (structural === 'no-hv') delete (cfg as Record<string, unknown>).hypervisor;
    if (structural === 'agent-scalar') cfg.agent = 7;
    if (structural === 'runtime-array') cfg.runtime = [1, 2] as never;
    return cfg;
  });

function assertCoded(e: unknown): void {
  assert.ok(e instanceof KataError, `not a coded error: ${e instanceof Error ? e.stack : String(e)}`);
  assert.ok(e.code in ERROR_CODES, `unknown code ${e.code}`);
}

describe('bad configuration input (property-based)', function () {
  this.timeout(120_000);

  it('judges 1000 mutated configurations with a verdict or a coded error', async () => {
    let valid = 0;
    let invalid = 0;
    let thrown = 0;
    await fc.assert(
      fc.asyncProperty(mutatedConfig, async (raw) => {
        try {
          const j = await judgeConfig({ raw });
          if (j.valid) valid++;
          else invalid++;
          for (const p of j.problems) {
            if (!(p.code in ERROR_CODES && p.key.length > 0 && p.reason.length > 0 && p.fix.length > 0)) assert.fail(`incomplete problem: ${inspect(p)}`);
          }
          if (j.valid) assert.ok(j.plan?.vm.launch !== undefined);
        } catch (e) {
          thrown++;
          assertCoded(e);
        }
      }),
      { seed: SEED, numRuns: 1000 },
    );
    // The generator must exercise all three outcomes, or the property proves little.
    assert.ok(valid > 20 && invalid > 100 && thrown > 20, `valid ${valid}, invalid ${invalid}, thrown ${thrown}`);
  });

  it('answers 300 mutated TOML files through the CLI without a stack trace', async () => {
    const tmp = new TempDir();
    const file = `${tmp.path}/c.toml`;
    const { writeFileSync } = await import('node:fs');
    const good = stringify(base('qemu'));
    try {
      await fc.assert(
        fc.asyncProperty(
          fc.oneof(
            mutatedConfig.map((c) => {
              try {
                return stringify(c);
              } catch {
                return good;
              }
            }),
            fc.tuple(fc.nat(good.length), fc.string({ maxLength: 5 }), fc.nat(4)).map(([at, ins, del]) => good.slice(0, at) + ins + good.slice(at + del)),
          ),
          async (text) => {
            writeFileSync(file, text);
            let out = '';
            let err = '';
            const code = await main(['--config', file, 'validate', '--json'], { out: (t) => (out += t), err: (t) => (err += t), env: {} });
            assert.ok(code === 0 || code === 1, `exit ${code}: ${err}`);
            assert.doesNotMatch(err, /^\s+at .+:\d+:\d+\)?$/m, 'no stack trace on stderr');
            if (code === 0) assert.equal((JSON.parse(out) as { valid: boolean }).valid, true);
            else assert.match(err, /KATA_ERR_[A-Z_]+/);
          },
        ),
        { seed: SEED, numRuns: 300 },
      );
    } finally {
      tmp.cleanup();
    }
  });
});
