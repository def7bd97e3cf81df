/**
 * CPU and memory hot-plug through the real containerd (Debian's 1.6, private instance) and `ctr`,
 * with the shipped configs/configuration-qemu.toml: its default_maxvcpus and default_maxmemory let
 * a VM booted with 1 vCPU and 512 MiB grow for a container's `--cpus` and `--memory-limit`, which
 * the shim reads from the OCI spec's linux.resources.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { NO_LEFTOVERS, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { ensureGuestImage } from '../helpers/guest.js';
import { TempDir } from '../helpers/tmp.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';

const RUNTIME = 'io.containerd.kata.v2';
const PROBE = ['sh', '-c', 'echo "nproc=$(nproc)"; echo "online=$(cat /sys/devices/system/cpu/online)"; echo "possible=$(cat /sys/devices/system/cpu/possible)"; grep MemTotal /proc/meminfo'];

describe('CPU and memory hot-plug through containerd (ctr run --cpus, --memory-limit) @integration', function () {
  this.timeout(300_000);
  let tmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let config: string;

  before(async function () {
    this.timeout(600_000);
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-resize-e2e-');
    config = shimConfig(tmp, image);
    ctrd = await startContainerd(this, { pathPrefix: [shimBinDir(tmp)], env: { KATA_CONF_FILE: config, KATA_TS_RUN_ROOT: path.join(tmp.path, 'run'), KATA_TS_SBS_ROOT: path.join(tmp.path, 'sbs') } });
  });
  after(async () => {
    await ctrd?.stop();
    tmp?.cleanup();
  });

  const why = (r: { stdout: string; stderr: string }) => `stdout: ${r.stdout}\nstderr: ${r.stderr}\n--- containerd log ---\n${ctrd!.logTail(40)}`;
  async function probe(id: string, flags: string[]): Promise<{ nproc: number; online: string; possible: string; memTotalKiB: number }> {
    const r = await ctrd!.run(id, PROBE, { runtime: RUNTIME, timeoutMs: 180_000, flags });
    assert.equal(r.code, 0, why(r));
    const nproc = Number(/nproc=(\d+)/.exec(r.stdout)?.[1]);
    const online = /online=(\S+)/.exec(r.stdout)?.[1] ?? '';
    const possible = /possible=(\S+)/.exec(r.stdout)?.[1] ?? '';
    const memTotalKiB = Number(/MemTotal:\s+(\d+)/.exec(r.stdout)?.[1]);
    assert.ok(nproc > 0 && memTotalKiB > 0, why(r));
    return { nproc, online, possible, memTotalKiB };
  }

  let plain: { nproc: number; online: string; possible: string; memTotalKiB: number };

  it('boots the shipped configuration with 1 vCPU online for a container without limits', async () => {
    plain = await probe('plain', []);
    assert.equal(plain.nproc, 1);
    assert.equal(plain.online, '0');
    assert.equal(plain.possible, '0-3', 'default_maxvcpus = 4: room for 3 hot-plugged vCPUs');
  });

  it('ctr run --cpus 2 shows the hot-plugged vCPUs online in the guest (1 + 2, Kata\'s rule)', async () => {
    const r = await probe('cpus2', ['--cpus', '2']);
    assert.ok(r.nproc >= 2, `nproc ${r.nproc}`);
    assert.equal(r.nproc, 3);
    assert.equal(r.online, '0-2');
  });

  it('ctr run --memory-limit beyond the boot memory grows MemTotal by the hot-plugged DIMM', async () => {
    const r = await probe('mem', ['--memory-limit', String(768 * 1024 * 1024)]);
    assert.ok(r.memTotalKiB - plain.memTotalKiB >= 768 * 1024, `MemTotal ${plain.memTotalKiB} kB → ${r.memTotalKiB} kB`);
  });

  it('with static_sandbox_resource_mgmt, boots the VM for ctr run --cpus 2 --memory-limit with 3 vCPUs and the memory, and no hot-plug room', async () => {
    const staticConfig = path.join(tmp.path, 'configuration-static.toml');
    const text = readFileSync(config, 'utf8').replace(/^\[runtime\]$/m, '[runtime]\nstatic_sandbox_resource_mgmt = true');
    writeFileSync(staticConfig, text);
    const r = await probe('static', ['--runtime-config-path', staticConfig, '--cpus', '2', '--memory-limit', String(768 * 1024 * 1024)]);
    assert.equal(r.nproc, 3);
    assert.equal(r.possible, '0-2', 'maxcpus equals the boot vCPUs: nothing may be hot-plugged');
    assert.ok(r.memTotalKiB - plain.memTotalKiB >= 700 * 1024, `MemTotal ${plain.memTotalKiB} kB → ${r.memTotalKiB} kB`);
  });

  it('leaves nothing behind', async () => {
    assert.deepEqual(await ctrd!.stop(), NO_LEFTOVERS, ctrd!.logTail(40));
  });
});
