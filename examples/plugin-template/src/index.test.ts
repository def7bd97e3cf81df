import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { judge, runLifecycle } from 'kata-ts/testing';

// By path, as `[runtime] plugins` names it: the manifest's schema path resolves against the module.
const PLUGIN = fileURLToPath(new URL('./index.js', import.meta.url));

const config = (maxMemory: number, policy = '') => `[hypervisor.qemu]
kernel = "/k"
image = "/i"
shared_fs = "none"
default_memory = 512
default_maxmemory = ${maxMemory}

${policy}
`;

describe('memory-policy', () => {
  it('accepts a VM within the default limit (4096 MiB)', async () => {
    const r = await judge(config(2048), { plugins: [PLUGIN] });
    assert.equal(r.valid, true, JSON.stringify(r.problems));
    assert.ok(r.plugins.some((p) => p.name === 'memory-policy' && !p.builtin));
  });

  it('vetoes a VM that may grow past max_mib, naming the key and the fix', async () => {
    const r = await judge(config(2048, '[memory-policy]\nmax_mib = 1024'), { plugins: [PLUGIN] });
    assert.equal(r.valid, false);
    assert.deepEqual(r.problems.map((p) => [p.code, p.plugin, p.hook, p.key]), [['KATA_ERR_CONFIG_VETO', 'memory-policy', 'checkPlan', 'hypervisor.qemu.default_maxmemory']]);
    assert.match(r.problems[0]!.fix, /at most 1024/);
  });

  it('refuses a max_mib its schema refuses, with an instruction', async () => {
    const r = await judge(config(2048, '[memory-policy]\nmax_mib = "lots"'), { plugins: [PLUGIN] });
    assert.deepEqual(r.problems.map((p) => [p.code, p.plugin, p.key, p.fix]), [['KATA_ERR_CONFIG_SCHEMA', 'memory-policy', 'memory-policy.max_mib', 'give an integer']]);
    assert.deepEqual(r.unknownKeys, []);
  });

  it('lets the sandbox start against the recording driver, which gets the resolved maximum', async () => {
    const r = await runLifecycle(config(2048), { plugins: [PLUGIN], containers: [{ id: 'c1', exitStatus: 137 }] });
    assert.equal(r.error, undefined, r.error?.message);
    assert.equal(r.plan?.vm.memory.maxMiB, 2048);
    assert.deepEqual(r.events.filter((e) => e.startsWith('vm:')), ['vm:create', 'vm:start', 'vm:stop']);
  });

  it('starts nothing when it vetoes', async () => {
    const r = await runLifecycle(config(8192), { plugins: [PLUGIN] });
    assert.equal(r.error?.code, 'KATA_ERR_CONFIG_INVALID');
    assert.deepEqual(r.events, []);
  });
});
