/**
 * Kata's own configuration files (../shared/reference/kata-configs, present in CI, absent from a
 * user's clone): every Cloud Hypervisor and QEMU file loads, is judged as documented in the README,
 * and uses no key our schemas do not know.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../../core/paths.js';
import { judgeConfig } from '../../../core/runtime.js';
import type { KataError } from '../../../core/errors.js';

const DIR = path.resolve(PACKAGE_ROOT, '..', 'shared', 'reference', 'kata-configs');

type Outcome = { valid: true } | { valid: false; codes: string[]; key?: string; plugin?: string } | { throws: string };

const EXPECTED: Record<string, Outcome> = {
  'configuration-clh.toml': { valid: true },
  'configuration-qemu.toml': { valid: true },
  'configuration-qemu-tdx.toml': { valid: true },
  'configuration-qemu-coco-dev.toml': { valid: true },
  'configuration-clh-tdx.toml': { valid: false, codes: ['KATA_ERR_CONFIG_VETO'], key: 'hypervisor.clh.shared_fs', plugin: 'tdx' },
  'configuration-qemu-snp.toml': { valid: false, codes: ['KATA_ERR_TEE_UNSUPPORTED'], key: 'hypervisor.qemu.sev_snp_guest' },
  '2.4.0/configuration-clh.toml': { valid: true },
  '2.4.0/configuration-clh-confidential.toml': { valid: false, codes: ['KATA_ERR_CONFIG_VETO'], key: 'hypervisor.clh.shared_fs', plugin: 'tdx' },
  // Block devices on, with virtio-scsi: disks are hot-plugged as scsi-hd (see README).
  '2.4.0/configuration-qemu.toml': { valid: true },
  'configuration-fc.toml': { throws: 'KATA_ERR_HYPERVISOR_UNSUPPORTED' },
  '2.4.0/configuration-fc.toml': { throws: 'KATA_ERR_HYPERVISOR_UNSUPPORTED' },
  'configuration-dragonball.toml': { throws: 'KATA_ERR_HYPERVISOR_UNSUPPORTED' },
  'configuration-remote.toml': { throws: 'KATA_ERR_HYPERVISOR_UNSUPPORTED' },
};

describe('Kata reference configurations', function () {
  before(function () {
    if (!existsSync(DIR)) this.skip();
  });

  for (const [file, outcome] of Object.entries(EXPECTED)) {
    it(`judges ${file}`, async () => {
      const p = path.join(DIR, file);
      if ('throws' in outcome) {
        await assert.rejects(judgeConfig({ file: p }), (e: KataError) => e.code === outcome.throws);
        return;
      }
      const j = await judgeConfig({ file: p });
      assert.equal(j.valid, outcome.valid, JSON.stringify(j.problems, null, 1));
      assert.deepEqual(j.unknownKeys, [], 'every key of a Kata file is known');
      if (!outcome.valid) {
        assert.deepEqual([...new Set(j.problems.map((x) => x.code))], outcome.codes);
        assert.ok(j.problems.some((x) => x.key === outcome.key && (outcome.plugin === undefined || x.plugin === outcome.plugin)), JSON.stringify(j.problems, null, 1));
      } else {
        assert.ok(j.plan?.vm.launch, 'a valid file yields a launch description');
      }
    });
  }

  it('covers every Cloud Hypervisor and QEMU file there is', async () => {
    const { readdirSync } = await import('node:fs');
    const all = [...readdirSync(DIR).filter((f) => f.endsWith('.toml')), ...readdirSync(path.join(DIR, '2.4.0')).map((f) => `2.4.0/${f}`)];
    assert.deepEqual(all.filter((f) => !(f in EXPECTED)), []);
  });
});
