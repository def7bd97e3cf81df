/**
 * The rendered argv against the real qemu-system-x86_64 (Debian package qemu-system-x86): QEMU
 * is started paused (-S) under TCG with the argv as the driver will give it (tokens substituted),
 * and asked over the plan's own QMP socket what it built. Paused, no guest code runs, so a
 * synthetic kernel (a bzImage header only) and zero-filled firmware and image files suffice; each
 * start takes well under a second. Skipped when the binary is not installed.
 */
import assert from 'node:assert/strict';
import { fakeBzImage, qemuBinary } from '../../helpers/qemu.js';
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { loadValidatedConfig } from '../../../core/runtime.js';
import { isQemuSpec, type QemuLaunchSpec } from '../../../plugins/qemu/launch-spec.js';
import { renderQemuArgv, substituteTokens } from '../../../plugins/qemu/argv.js';
import { TempDir } from '../../helpers/tmp.js';

const BINARY = 'qemu-system-x86_64';
const IMAGE_BYTES = 8 * 1024 * 1024;

const binaryPath = qemuBinary;

interface QmpReply {
  return?: unknown;
  error?: { class: string; desc: string };
}

/** Starts QEMU paused, runs `commands` over its QMP socket one at a time, then quits it. */
async function runPaused(spec: QemuLaunchSpec, sandboxDir: string, commands: { execute: string; arguments?: object }[]): Promise<QmpReply[]> {
  const argv = renderQemuArgv(spec, { accelerator: 'tcg' });
  const child = spawn(argv[0] as string, [...argv.slice(1), '-S'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const failed = exited.then((code) => {
    throw new Error(`${BINARY} exited (${code}) before answering QMP: ${stderr.trim()}\nargv: ${argv.join(' ')}`);
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), 8000);
  try {
    const socket = await Promise.race([connect(path.join(sandboxDir, 'qmp.sock')), failed]);
    const replies = await Promise.race([session(socket, commands), failed]);
    socket.destroy();
    assert.equal(await exited, 0, stderr);
    return replies;
  } finally {
    clearTimeout(timer);
    child.kill('SIGKILL');
    failed.catch(() => undefined);
  }
}

async function connect(socketPath: string): Promise<net.Socket> {
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(socketPath, () => resolve(s));
        s.once('error', reject);
      });
    } catch {
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** qmp_capabilities, then each command, then quit; events are skipped. */
async function session(socket: net.Socket, commands: { execute: string; arguments?: object }[]): Promise<QmpReply[]> {
  const lines: string[] = [];
  const waiters: ((line: string) => void)[] = [];
  let buf = '';
  socket.on('data', (d: Buffer) => {
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (!line || 'event' in JSON.parse(line)) continue;
      const w = waiters.shift();
      if (w) w(line);
      else lines.push(line);
    }
  });
  const next = () => new Promise<QmpReply>((resolve) => {
    const line = lines.shift();
    if (line !== undefined) resolve(JSON.parse(line) as QmpReply);
    else waiters.push((l) => resolve(JSON.parse(l) as QmpReply));
  });
  await next(); // greeting
  const replies: QmpReply[] = [];
  for (const cmd of [{ execute: 'qmp_capabilities' }, ...commands, { execute: 'quit' }]) {
    socket.write(`${JSON.stringify(cmd)}\n`);
    replies.push(await next());
  }
  return replies.slice(1, -1);
}

interface PciDevice {
  qdev_id: string;
  slot: number;
  pci_bridge?: { devices?: PciDevice[] };
}

function pciIds(reply: QmpReply): string[] {
  const buses = reply.return as { devices: PciDevice[] }[];
  const walk = (ds: PciDevice[]): string[] => ds.flatMap((d) => [d.qdev_id, ...walk(d.pci_bridge?.devices ?? [])]);
  return buses.flatMap((b) => walk(b.devices)).filter(Boolean);
}

describe('qemu-system-x86_64 with the rendered argv @integration', function () {
  this.timeout(30_000);
  let binary: string | undefined;
  let tmp: TempDir;
  let sandbox: string;

  before(function () {
    binary = binaryPath();
    if (!binary) this.skip();
  });

  beforeEach(() => {
    tmp = new TempDir('kata-ts-qemu-');
    sandbox = path.join(tmp.path, 'sandbox');
    mkdirSync(path.join(sandbox, 'shared'), { recursive: true });
    writeFileSync(path.join(tmp.path, 'vmlinuz'), fakeBzImage());
    writeFileSync(path.join(tmp.path, 'initrd'), Buffer.alloc(4096));
    writeFileSync(path.join(tmp.path, 'image'), Buffer.alloc(IMAGE_BYTES));
    writeFileSync(path.join(tmp.path, 'bios.fd'), Buffer.alloc(256 * 1024));
  });

  afterEach(() => tmp?.cleanup());

  async function specOf(lines: string): Promise<QemuLaunchSpec> {
    const text = `[hypervisor.qemu]\npath = "${binary}"\nkernel = "${tmp.path}/vmlinuz"\naccelerator = "tcg"\ndefault_memory = 256\ndefault_maxmemory = 1024\ndefault_maxvcpus = 2\n${lines}\n`;
    const { plan } = await loadValidatedConfig({ text });
    assert.ok(isQemuSpec(plan.vm.native));
    return structuredClone(plan.vm.native) as QemuLaunchSpec;
  }

  it('builds the hot-plug ports, the agent port, the 9p share and the RNG of an initrd guest', async () => {
    const spec = await specOf(`initrd = "${tmp.path}/initrd"\nshared_fs = "virtio-9p"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"`);
    const [pci, status] = await runPaused(substituteTokens(spec, { sandboxDir: sandbox }), sandbox, [{ execute: 'query-pci' }, { execute: 'query-status' }]);
    const ids = pciIds(pci as QmpReply);
    for (const id of [...spec.hotplugPorts, 'virtio-serial0', 'virtio-9p-kataShared', 'rng-device0']) assert.ok(ids.includes(id), id);
    assert.equal(spec.hotplugPorts.length, 8);
    // The ports take the first slots of pcie.0, so a hot-plugged disk's guest PCI path is predictable.
    const root = (pci?.return as { devices: PciDevice[] }[])[0]?.devices ?? [];
    assert.deepEqual(spec.hotplugPorts.map((id) => root.find((d) => d.qdev_id === id)?.slot), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.equal((status?.return as { status: string }).status, 'prelaunch');
  });

  it('builds an NVDIMM image in shared guest memory', async () => {
    const spec = await specOf(`image = "${tmp.path}/image"\nshared_fs = "none"\ndisable_block_device_use = true`);
    spec.memory.shared = true; // as the virtiofs plugin does (its daemon is not started here)
    const [mem, backend] = await runPaused(substituteTokens(spec, { sandboxDir: sandbox, imageSizeBytes: IMAGE_BYTES }), sandbox, [
      { execute: 'query-memory-devices' },
      { execute: 'qom-get', arguments: { path: '/objects/guest-ram', property: 'share' } },
    ]);
    const devices = mem?.return as { type: string; data: { id?: string; size: number } }[];
    assert.deepEqual(devices.map((d) => [d.type, d.data.id, d.data.size]), [['nvdimm', 'image-nvdimm', IMAGE_BYTES]]);
    assert.equal(backend?.return, true);
  });

  it('builds a read-only virtio-blk image and firmware with every virtio device on the IOMMU platform', async () => {
    const spec = await specOf(
      `image = "${tmp.path}/image"\ndisable_image_nvdimm = true\nenable_iommu_platform = true\nfirmware = "${tmp.path}/bios.fd"\nshared_fs = "virtio-9p"\ndisable_block_device_use = true`,
    );
    const [disk, ninep, block] = await runPaused(substituteTokens(spec, { sandboxDir: sandbox }), sandbox, [
      { execute: 'qom-get', arguments: { path: '/machine/peripheral/image-disk', property: 'iommu_platform' } },
      { execute: 'qom-get', arguments: { path: '/machine/peripheral/virtio-9p-kataShared', property: 'iommu_platform' } },
      { execute: 'query-block' },
    ]);
    assert.equal(disk?.return, true);
    assert.equal(ninep?.return, true);
    const image = (block?.return as { qdev?: string; inserted?: { ro: boolean } }[]).find((b) => b.qdev?.includes('image-disk'));
    assert.equal(image?.inserted?.ro, true);
  });

  it('builds the virtio-scsi controller for block_device_driver = "virtio-scsi", on the IOMMU platform when asked', async () => {
    const spec = await specOf(`initrd = "${tmp.path}/initrd"\ndisable_block_device_use = false\nblock_device_driver = "virtio-scsi"\nenable_iommu_platform = true\nshared_fs = "none"`);
    const [iommu, type] = await runPaused(substituteTokens(spec, { sandboxDir: sandbox }), sandbox, [
      { execute: 'qom-get', arguments: { path: '/machine/peripheral/scsi0', property: 'iommu_platform' } },
      { execute: 'qom-get', arguments: { path: '/machine/peripheral/scsi0', property: 'type' } },
    ]);
    assert.equal(iommu?.return, true);
    assert.equal(type?.return, 'virtio-scsi-pci');
  });
});
