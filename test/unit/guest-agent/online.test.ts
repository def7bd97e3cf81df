/**
 * OnlineCPUMem (guest/agent/online.ts) on a sysfs-shaped directory tree: CPUs and memory blocks
 * that appear late, as the guest kernel adds ACPI-hot-plugged ones after device_add returns.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { onlineCpuMem } from '../../../guest/agent/online.js';
import { TempDir } from '../../helpers/tmp.js';

describe('OnlineCPUMem (guest agent)', () => {
  let tmp: TempDir;
  let cpuDir: string;
  let memoryDir: string;
  beforeEach(() => {
    tmp = new TempDir();
    cpuDir = path.join(tmp.path, 'cpu');
    memoryDir = path.join(tmp.path, 'memory');
    mkdirSync(path.join(cpuDir, 'cpu0'), { recursive: true }); // the boot CPU has no online file
    mkdirSync(memoryDir, { recursive: true });
    writeFileSync(path.join(cpuDir, 'online'), '0\n'); // not a cpuN directory
  });
  afterEach(() => tmp.cleanup());

  const add = (dir: string, name: string, state: string) => {
    mkdirSync(path.join(dir, name), { recursive: true });
    writeFileSync(path.join(dir, name, 'online'), `${state}\n`);
  };
  const state = (dir: string, name: string) => readFileSync(path.join(dir, name, 'online'), 'utf8').trim();

  it('onlines the offline CPUs it is asked for, and memory blocks unless cpu_only', async () => {
    add(cpuDir, 'cpu1', '0');
    add(cpuDir, 'cpu2', '0');
    add(memoryDir, 'memory4', '1');
    add(memoryDir, 'memory5', '0');
    const r = await onlineCpuMem({ nbCpus: 2, cpuOnly: false }, { cpuDir, memoryDir, pollMs: 5 });
    assert.deepEqual(r, { cpus: 2, memoryBlocks: 1 });
    assert.equal(state(cpuDir, 'cpu1'), '1');
    assert.equal(state(cpuDir, 'cpu2'), '1');
    assert.equal(state(memoryDir, 'memory5'), '1');
    assert.equal(readFileSync(path.join(cpuDir, 'online'), 'utf8'), '0\n');
  });

  it('leaves memory alone with cpu_only', async () => {
    add(cpuDir, 'cpu1', '0');
    add(memoryDir, 'memory5', '0');
    assert.deepEqual(await onlineCpuMem({ nbCpus: 1, cpuOnly: true }, { cpuDir, memoryDir, pollMs: 5 }), { cpus: 1, memoryBlocks: 0 });
    assert.equal(state(memoryDir, 'memory5'), '0');
  });

  it('waits for CPUs and memory blocks that appear after the call', async () => {
    setTimeout(() => add(cpuDir, 'cpu1', '0'), 30);
    setTimeout(() => add(memoryDir, 'memory8', '0'), 60);
    const r = await onlineCpuMem({ nbCpus: 1, cpuOnly: false }, { cpuDir, memoryDir, pollMs: 5, timeoutMs: 2_000 });
    assert.deepEqual(r, { cpus: 1, memoryBlocks: 1 });
  });

  it('fails when fewer CPUs than asked come online before the deadline', async () => {
    add(cpuDir, 'cpu1', '0');
    await assert.rejects(onlineCpuMem({ nbCpus: 2, cpuOnly: true }, { cpuDir, memoryDir, pollMs: 5, timeoutMs: 100 }), /onlined 1 of 2/);
  });
});
