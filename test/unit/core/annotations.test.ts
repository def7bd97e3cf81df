/**
 * OCI annotation overrides: what Kata's security model lets a pod change, what it refuses (all at
 * once, each naming the annotation and the list that decided), and how the result is validated.
 */
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { AnnotationError, applyAnnotations, globMatch, mergeKernelParams, type AnnotationRefusal } from '../../../core/annotations.js';
import { ConfigInvalidError, KataError } from '../../../core/errors.js';
import { loadValidatedConfig } from '../../../core/runtime.js';
import type { RawConfig } from '../../../core/config/types.js';

const HV = 'io.katacontainers.config.hypervisor.';
const RT = 'io.katacontainers.config.runtime.';
const AG = 'io.katacontainers.config.agent.';

/** A configuration that validates with the qemu plugin and no side plugins. */
function base(hv: Record<string, unknown> = {}): RawConfig {
  return {
    hypervisor: {
      qemu: {
        kernel: '/usr/share/kata/vmlinuz',
        image: '/usr/share/kata/image',
        shared_fs: 'none',
        disable_block_device_use: true,
        block_device_driver: 'virtio-blk',
        kernel_params: 'console=hvc0 quiet',
        ...hv,
      },
    },
    agent: { kata: {} },
    runtime: {},
  };
}

function refusalsOf(fn: () => unknown): AnnotationRefusal[] {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof AnnotationError, `expected AnnotationError, got ${String(e)}`);
    assert.equal(e.code, 'KATA_ERR_ANNOTATION');
    assert.ok(e instanceof KataError);
    return [...e.refusals];
  }
  assert.fail('expected the annotations to be refused');
}

const hvOf = (cfg: RawConfig) => (cfg.hypervisor as Record<string, Record<string, unknown>>).qemu as Record<string, unknown>;

describe('applyAnnotations', () => {
  describe('refusals', () => {
    it('lists every refused annotation in one error, each with its reason and the list that decided', () => {
      const raw = base({ enable_annotations: ['path', 'default_memory', 'jailer_path'], valid_hypervisor_paths: ['/usr/bin/qemu-*'] });
      const refusals = refusalsOf(() =>
        applyAnnotations(
          raw,
          {
            [`${HV}kernel`]: '/tmp/evil-kernel',
            [`${HV}path`]: '/tmp/evil',
            [`${HV}default_memory`]: 'lots',
            [`${HV}jailer_path`]: '/usr/bin/jailer',
            [`${RT}disable_guest_seccomp`]: 'maybe',
            [`${HV}default_vcpus`]: '2',
          },
          'qemu',
        ),
      );
      const byName = new Map(refusals.map((r) => [r.annotation, r]));
      assert.equal(refusals.length, 6);
      assert.deepEqual(
        { reason: byName.get(`${HV}kernel`)?.reason, list: byName.get(`${HV}kernel`)?.list, key: byName.get(`${HV}kernel`)?.key },
        { reason: 'not-enabled', list: 'hypervisor.qemu.enable_annotations', key: 'hypervisor.qemu.kernel' },
      );
      assert.equal(byName.get(`${HV}default_vcpus`)?.reason, 'not-enabled');
      assert.deepEqual(
        { reason: byName.get(`${HV}path`)?.reason, list: byName.get(`${HV}path`)?.list },
        { reason: 'path-not-allowed', list: 'hypervisor.qemu.valid_hypervisor_paths' },
      );
      // valid_jailer_paths is absent: no jailer path is allowed.
      assert.deepEqual(
        { reason: byName.get(`${HV}jailer_path`)?.reason, list: byName.get(`${HV}jailer_path`)?.list },
        { reason: 'path-not-allowed', list: 'hypervisor.qemu.valid_jailer_paths' },
      );
      assert.match(byName.get(`${HV}jailer_path`)?.fix ?? '', /valid_jailer_paths.*empty/);
      assert.deepEqual(
        { reason: byName.get(`${HV}default_memory`)?.reason, key: byName.get(`${HV}default_memory`)?.key },
        { reason: 'malformed', key: 'hypervisor.qemu.default_memory' },
      );
      assert.equal(byName.get(`${RT}disable_guest_seccomp`)?.reason, 'malformed');
    });

    it('names the annotation, the config key or list and the fix in the message', () => {
      const raw = base({ enable_annotations: ['default_memory'] });
      try {
        applyAnnotations(raw, { [`${HV}kernel_params`]: 'init=/bin/sh', [`${HV}default_memory`]: '12x' }, 'qemu');
        assert.fail('expected a refusal');
      } catch (e) {
        assert.ok(e instanceof AnnotationError);
        assert.match(e.message, /^2 OCI annotations refused:/);
        assert.match(e.message, /io\.katacontainers\.config\.hypervisor\.kernel_params = "init=\/bin\/sh": not enabled: .*hypervisor\.qemu\.enable_annotations \["default_memory"\].*fix: add "kernel_params" to enable_annotations in \[hypervisor\.qemu\]/);
        assert.match(e.message, /default_memory = "12x": malformed value for hypervisor\.qemu\.default_memory/);
      }
    });

    it('refuses every hypervisor annotation when enable_annotations is empty or absent', () => {
      for (const hv of [{ enable_annotations: [] }, {}]) {
        const refusals = refusalsOf(() => applyAnnotations(base(hv), { [`${HV}enable_iommu`]: 'true', [`${HV}default_memory`]: '4096', [`${HV}no_such_key`]: 'x' }, 'qemu'));
        assert.deepEqual(refusals.map((r) => r.reason), ['not-enabled', 'not-enabled', 'not-enabled']);
      }
    });

    it('matches enable_annotations against the whole name (Kata matches unanchored; we are stricter)', () => {
      // Under Kata "kernel" would also enable kernel_params; here it enables exactly "kernel".
      const raw = base({ enable_annotations: ['kernel', 'enable_iommu'] });
      const refusals = refusalsOf(() =>
        applyAnnotations(raw, { [`${HV}kernel_params`]: 'init=/bin/sh', [`${HV}enable_iommu_platform`]: 'true', [`${HV}kernel`]: '/k2' }, 'qemu'),
      );
      assert.deepEqual(refusals.map((r) => [r.annotation, r.reason]), [
        [`${HV}enable_iommu_platform`, 'not-enabled'],
        [`${HV}kernel_params`, 'not-enabled'],
      ]);
      // A regular expression is still a regular expression: kernel.* enables both on purpose.
      const r = applyAnnotations(base({ enable_annotations: ['kernel.*'] }), { [`${HV}kernel_params`]: 'foo=1', [`${HV}kernel`]: '/k2' }, 'qemu');
      assert.deepEqual(r.applied.map((a) => a.key), ['hypervisor.qemu.kernel', 'hypervisor.qemu.kernel_params']);
    });

    it('treats an enable_annotations entry JavaScript cannot compile as enabling nothing', () => {
      const refusals = refusalsOf(() => applyAnnotations(base({ enable_annotations: ['(kernel'] }), { [`${HV}kernel`]: '/k2' }, 'qemu'));
      assert.equal(refusals[0]?.reason, 'not-enabled');
    });

    it('accepts a path matching a glob and refuses other paths, traversal and unclean forms', () => {
      const raw = base({ enable_annotations: ['path'], valid_hypervisor_paths: ['/usr/bin/qemu-*', '/opt/kata/bin/qemu-system-[xa]*'] });
      const ok = applyAnnotations(raw, { [`${HV}path`]: '/usr/bin/qemu-system-x86_64' }, 'qemu');
      assert.equal(hvOf(ok.config).path, '/usr/bin/qemu-system-x86_64');
      assert.equal(hvOf(applyAnnotations(raw, { [`${HV}path`]: '/opt/kata/bin/qemu-system-aarch64' }, 'qemu').config).path, '/opt/kata/bin/qemu-system-aarch64');
      for (const evil of [
        '/tmp/evil',
        '/usr/bin/qemu-x/../../../tmp/evil',
        '/usr/bin/qemu-x/evil',
        '/usr/bin//qemu-system-x86_64',
        '/usr/bin/./qemu-system-x86_64',
        'usr/bin/qemu-system-x86_64',
        '/usr/bin/qemu-system-x86_64/',
        '/opt/kata/bin/qemu-system-riscv64',
        '',
      ]) {
        const [r] = refusalsOf(() => applyAnnotations(raw, { [`${HV}path`]: evil }, 'qemu'));
        assert.equal(r?.reason, 'path-not-allowed', evil);
        assert.equal(r?.list, 'hypervisor.qemu.valid_hypervisor_paths');
      }
    });

    it('checks each path annotation against its own valid_* list', () => {
      const lists = {
        jailer_path: 'valid_jailer_paths',
        ctlpath: 'valid_ctlpaths',
        virtio_fs_daemon: 'valid_virtio_fs_daemon_paths',
        entropy_source: 'valid_entropy_sources',
        file_mem_backend: 'valid_file_mem_backends',
        vhost_user_store_path: 'valid_vhost_user_store_paths',
        path: 'valid_hypervisor_paths',
      };
      // Each list allows only /allowed/<name>; a path allowed by another list is refused.
      const hv: Record<string, unknown> = { enable_annotations: ['.*'] };
      for (const [name, list] of Object.entries(lists)) hv[list] = [`/allowed/${name}`];
      const good = Object.fromEntries(Object.keys(lists).map((n) => [`${HV}${n}`, `/allowed/${n}`]));
      const r = applyAnnotations(base(hv), good, 'qemu');
      for (const n of Object.keys(lists)) assert.equal(hvOf(r.config)[n], `/allowed/${n}`);
      const crossed = Object.fromEntries(Object.keys(lists).map((n) => [`${HV}${n}`, `/allowed/${n === 'path' ? 'ctlpath' : 'path'}`]));
      const refusals = refusalsOf(() => applyAnnotations(base(hv), crossed, 'qemu'));
      assert.deepEqual(
        Object.fromEntries(refusals.map((x) => [x.annotation.slice(HV.length), x.list])),
        Object.fromEntries(Object.entries(lists).map(([n, l]) => [n, `hypervisor.qemu.${l}`])),
      );
    });

    it('refuses a matching path that does not exist when told how to look (as Kata, whose globs expand on disk)', () => {
      const raw = base({ enable_annotations: ['entropy_source'], valid_entropy_sources: ['/dev/*random'] });
      const exists = (p: string) => p === '/dev/urandom';
      assert.equal(hvOf(applyAnnotations(raw, { [`${HV}entropy_source`]: '/dev/urandom' }, 'qemu', { pathExists: exists }).config).entropy_source, '/dev/urandom');
      const [r] = refusalsOf(() => applyAnnotations(raw, { [`${HV}entropy_source`]: '/dev/random' }, 'qemu', { pathExists: exists }));
      assert.match(r?.message ?? '', /does not exist/);
    });

    it('refuses malformed values for each value type', () => {
      const raw = base({ enable_annotations: ['.*'] });
      const cases: Record<string, string> = {
        [`${HV}default_memory`]: '-1',
        [`${HV}default_max_vcpus`]: '2.5',
        [`${HV}default_vcpus`]: 'two',
        [`${HV}enable_iommu`]: 'yes',
        [`${HV}shared_fs`]: 'nfs',
        [`${HV}block_device_driver`]: 'ide',
        [`${HV}virtio_fs_extra_args`]: '--foo',
        [`${HV}memory_slots`]: '18446744073709551616',
        [`${RT}internetworking_model`]: 'bridged',
        [`${RT}experimental`]: 'newstore',
        [`${AG}container_pipe_size`]: '1k',
      };
      const refusals = refusalsOf(() => applyAnnotations(raw, cases, 'qemu'));
      assert.deepEqual(refusals.map((r) => r.annotation).sort(), Object.keys(cases).sort());
      for (const r of refusals) assert.equal(r.reason, 'malformed', r.annotation);
    });

    it("refuses default_memory below Kata's 256 MiB minimum, and vCPUs beyond the host's when it is given", () => {
      const raw = base({ enable_annotations: ['default_memory', 'default_vcpus', 'default_max_vcpus'] });
      const refusals = refusalsOf(() =>
        applyAnnotations(raw, { [`${HV}default_memory`]: '128', [`${HV}default_vcpus`]: '3', [`${HV}default_max_vcpus`]: '8' }, 'qemu', { hostCpus: 2 }),
      );
      assert.deepEqual(refusals.map((r) => r.key), ['hypervisor.qemu.default_maxvcpus', 'hypervisor.qemu.default_memory', 'hypervisor.qemu.default_vcpus']);
    });

    it('refuses annotations Kata acts on but kata-ts does not implement, instead of dropping them', () => {
      const [r, s] = refusalsOf(() => applyAnnotations(base({ enable_annotations: ['.*'] }), { [`${HV}kernel_verity_params`]: 'root_hash=ab', [`${AG}policy`]: 'cGFja2FnZQ==' }, 'qemu'));
      assert.equal(r?.reason, 'unsupported');
      assert.equal(s?.reason, 'unsupported');
    });

    it('refuses security-posture keys even when enable_annotations allows everything', () => {
      const refusals = refusalsOf(() =>
        applyAnnotations(
          base({ enable_annotations: ['.*'], valid_hypervisor_paths: ['/usr/bin/qemu-system-x86_64'] }),
          { [`${HV}confidential_guest`]: 'true', [`${HV}enable_annotations`]: '[".*"]', [`${HV}valid_hypervisor_paths`]: '["/tmp/*"]' },
          'qemu',
        ),
      );
      assert.deepEqual(refusals.map((r) => r.reason), ['not-overridable', 'not-overridable', 'not-overridable']);
    });
  });

  describe('applied overrides', () => {
    it('converts values to the key types and records the file value they replace', () => {
      const raw = base({ enable_annotations: ['default_.*', 'enable_iommu', 'virtio_fs_extra_args', 'kernel_params', 'disable_block_device_use'], virtio_fs_extra_args: ['--a'] });
      const r = applyAnnotations(
        raw,
        {
          [`${HV}default_memory`]: '4096',
          [`${HV}default_vcpus`]: '1.5',
          [`${HV}default_max_vcpus`]: '4',
          [`${HV}enable_iommu`]: 'T',
          [`${HV}disable_block_device_use`]: '0',
          [`${HV}virtio_fs_extra_args`]: '["--b","--c=1"]',
          [`${HV}kernel_params`]: 'quiet=0 agent.log=debug',
          [`${RT}sandbox_cgroup_only`]: 'true',
          [`${RT}internetworking_model`]: 'none',
          [`${RT}enable_pprof`]: 'false',
          [`${AG}kernel_modules`]: 'e1000e InterruptThrottleRate=3000,3000 EEE=1; i915',
          [`${AG}enable_tracing`]: '1',
          [`${AG}container_pipe_size`]: '65536',
        },
        'qemu',
      );
      const h = hvOf(r.config);
      assert.deepEqual(
        [h.default_memory, h.default_vcpus, h.default_maxvcpus, h.enable_iommu, h.disable_block_device_use, h.virtio_fs_extra_args, h.kernel_params],
        [4096, 1.5, 4, true, false, ['--a', '--b', '--c=1'], 'console=hvc0 quiet=0 agent.log=debug'],
      );
      assert.deepEqual(r.config.runtime, { sandbox_cgroup_only: true, internetworking_model: 'none', enable_pprof: false });
      assert.deepEqual((r.config.agent as Record<string, unknown>).kata, { kernel_modules: ['e1000e InterruptThrottleRate=3000,3000 EEE=1', 'i915'], enable_tracing: true, container_pipe_size: 65536 });
      const dbd = r.applied.find((a) => a.key === 'hypervisor.qemu.disable_block_device_use');
      assert.deepEqual(dbd, { annotation: `${HV}disable_block_device_use`, key: 'hypervisor.qemu.disable_block_device_use', value: false, previous: true });
      assert.equal(r.applied.length, 13);
    });

    it('leaves the input untouched and ignores what Kata ignores', () => {
      const raw = base({ enable_annotations: ['.*'] });
      const before = structuredClone(raw);
      const r = applyAnnotations(
        raw,
        {
          'io.katacontainers.config_path': '/etc/other.toml',
          'io.kubernetes.cri.sandbox-id': 'abc',
          'io.katacontainers.container.resource.swappiness': '10',
          [`${HV}no_such_knob`]: '1',
          [`${RT}no_such_knob`]: '1',
          [`${HV}default_memory`]: '1024',
        },
        'qemu',
      );
      assert.deepEqual(raw, before);
      assert.deepEqual(r.ignored.map((i) => i.annotation), [`${HV}no_such_knob`, `${RT}no_such_knob`]);
      assert.deepEqual(r.applied.map((a) => a.key), ['hypervisor.qemu.default_memory']);
      assert.equal(hvOf(r.config).path, undefined);
    });
  });

  describe('through loadValidatedConfig', () => {
    it('validates overridden values like file values: the schema error names the key', async () => {
      const raw = base({ enable_annotations: ['default_memory'] });
      await assert.rejects(loadValidatedConfig({ raw, annotations: { [`${HV}default_memory`]: '5000000000' } }), (e: unknown) => {
        assert.ok(e instanceof ConfigInvalidError);
        assert.deepEqual(e.problems.map((p) => [p.code, p.key]), [['KATA_ERR_CONFIG_SCHEMA', 'hypervisor.qemu.default_memory']]);
        return true;
      });
    });

    it('runs the value rules and plugins on the result (shared_fs by annotation loads the virtiofs plugin)', async () => {
      const raw = base({ enable_annotations: ['shared_fs'] });
      await assert.rejects(loadValidatedConfig({ raw, annotations: { [`${HV}shared_fs`]: 'virtio-fs' } }), (e: unknown) => {
        assert.ok(e instanceof ConfigInvalidError);
        assert.ok(e.problems.some((p) => p.key === 'hypervisor.qemu.virtio_fs_daemon' && p.plugin === 'virtiofs'), JSON.stringify(e.problems));
        return true;
      });
    });

    it('returns the validated config with the overrides and the list of what was applied', async () => {
      const raw = base({ enable_annotations: ['default_memory', 'default_vcpus'] });
      const v = await loadValidatedConfig({ raw, annotations: { [`${HV}default_memory`]: '1024', [`${HV}default_vcpus`]: '2', 'io.katacontainers.config_path': '/x.toml' } });
      assert.equal(v.config.hypervisor.default_memory, 1024);
      assert.equal(v.config.hypervisor.default_vcpus, 2);
      assert.deepEqual(v.annotations.map((a) => a.annotation), [`${HV}default_memory`, `${HV}default_vcpus`]);
    });

    it('stops before any plugin work with KATA_ERR_ANNOTATION when an annotation is refused', async () => {
      await assert.rejects(loadValidatedConfig({ raw: base(), annotations: { [`${HV}path`]: '/tmp/evil' } }), { code: 'KATA_ERR_ANNOTATION' });
    });
  });

  describe('property: an annotation that is not enabled never changes the configuration', () => {
    const NAMES = ['path', 'kernel', 'kernel_params', 'default_memory', 'default_vcpus', 'enable_iommu', 'shared_fs', 'image', 'confidential_guest', 'virtio_fs_daemon', 'enable_annotations', 'madeup'];
    const VALUES = ['/usr/bin/qemu-system-x86_64', '/tmp/evil', '4096', 'true', 'virtio-9p', '1', '', 'init=/bin/sh', '["--x"]'];
    it('holds for random enable lists, names and values (fixed seed)', () => {
      fc.assert(
        fc.property(
          fc.subarray(NAMES),
          fc.dictionary(fc.constantFrom(...NAMES), fc.constantFrom(...VALUES), { minKeys: 1, maxKeys: 5 }),
          (enabled, picks) => {
            const raw = base({ enable_annotations: enabled, valid_hypervisor_paths: ['/usr/bin/*'], valid_virtio_fs_daemon_paths: ['/usr/libexec/*'] });
            const before = structuredClone(raw);
            const annotations = Object.fromEntries(Object.entries(picks).map(([n, v]) => [HV + n, v]));
            const notEnabled = Object.keys(picks).filter((n) => !enabled.includes(n));
            let result;
            try {
              result = applyAnnotations(raw, annotations, 'qemu');
            } catch (e) {
              assert.ok(e instanceof AnnotationError);
              // Every annotation that is not enabled is among those refused, as not enabled.
              for (const n of notEnabled) assert.equal(e.refusals.find((r) => r.annotation === HV + n)?.reason, 'not-enabled');
              assert.deepEqual(raw, before);
              return;
            }
            // Accepted only when all were enabled; then only enabled names changed keys.
            assert.deepEqual(notEnabled, []);
            const changed = Object.keys({ ...hvOf(result.config), ...hvOf(before) }).filter((k) => JSON.stringify(hvOf(result.config)[k]) !== JSON.stringify(hvOf(before)[k]));
            for (const k of changed) assert.ok(result.applied.some((a) => a.key === `hypervisor.qemu.${k}` && enabled.includes(a.annotation.slice(HV.length))), k);
          },
        ),
        { seed: 20261126, numRuns: 500 },
      );
    });
  });
});

describe('globMatch', () => {
  it('follows glob(3): * and ? stop at "/", classes and escapes work, malformed patterns match nothing', () => {
    assert.equal(globMatch('/usr/bin/qemu-*', '/usr/bin/qemu-system-x86_64'), true);
    assert.equal(globMatch('/usr/bin/qemu-*', '/usr/bin/qemu-x/y'), false);
    assert.equal(globMatch('/dev/?random', '/dev/urandom'), true);
    assert.equal(globMatch('/dev/?random', '/dev//random'), false);
    assert.equal(globMatch('/dev/[!u]random', '/dev/urandom'), false);
    assert.equal(globMatch('/dev/[a-z]random', '/dev/hrandom'), true);
    assert.equal(globMatch('/a/\\*', '/a/*'), true);
    assert.equal(globMatch('/a/\\*', '/a/b'), false);
    assert.equal(globMatch('/a/[b', '/a/[b'), false);
    assert.equal(globMatch('/usr/bin/qemu.system', '/usr/bin/qemuXsystem'), false);
  });
});

describe('mergeKernelParams', () => {
  it('replaces a parameter with the same name and appends the rest, as Kata does', () => {
    assert.equal(mergeKernelParams('console=hvc0 quiet agent.log=info', 'agent.log=debug  init=/sbin/init'), 'console=hvc0 quiet agent.log=debug init=/sbin/init');
    assert.equal(mergeKernelParams('', 'a=1'), 'a=1');
  });
});
