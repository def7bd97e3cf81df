import assert from 'node:assert/strict';
import { spawn, spawnSync, execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { gunzipSync } from 'node:zlib';
import { parse as parseToml } from 'smol-toml';
import { DIST_ROOT, PACKAGE_ROOT } from '../../core/paths.js';
import { defaultCacheDir, guestImagePaths, type GuestManifest } from '../../guest/image/build-image.js';
import { CpioGzWriter } from '../../guest/image/cpio.js';
import { GUEST_MODULES } from '../../guest/image/kernel-modules.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { TempDir } from '../helpers/tmp.js';
import { processesMentioning } from '../helpers/procs.js';

const run = promisify(execFile);
const BUILDER = path.join(DIST_ROOT, 'guest', 'image', 'build-image.js');
const CLI = path.join(DIST_ROOT, 'bin', 'kata-runtime.js');
const QEMU = 'qemu-system-x86_64';

interface CpioMember {
  readonly name: string;
  readonly mode: number;
  readonly rdev: [number, number];
  readonly data: Buffer;
}

/** Reads a gzip-compressed cpio newc archive (what the kernel unpacks). */
function readInitramfs(file: string): Map<string, CpioMember> {
  const buf = gunzipSync(readFileSync(file));
  const out = new Map<string, CpioMember>();
  let off = 0;
  const field = (i: number) => Number.parseInt(buf.toString('ascii', off + 6 + i * 8, off + 14 + i * 8), 16);
  for (;;) {
    assert.equal(buf.toString('ascii', off, off + 6), '070701', `newc magic at offset ${off}`);
    const mode = field(1);
    const size = field(6);
    const rdev: [number, number] = [field(9), field(10)];
    const nameSize = field(11);
    const name = buf.toString('utf8', off + 110, off + 110 + nameSize - 1);
    const dataStart = off + 110 + nameSize + ((4 - ((110 + nameSize) % 4)) % 4);
    if (name === 'TRAILER!!!') return out;
    out.set(name, { name, mode, rdev, data: buf.subarray(dataStart, dataStart + size) });
    off = dataStart + size + ((4 - (size % 4)) % 4);
  }
}

const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');
const manifestOf = (image: GuestImage) => JSON.parse(readFileSync(guestImagePaths(image.cacheDir).manifest, 'utf8')) as GuestManifest;

describe('guest image builder @integration', function () {
  this.timeout(600_000);
  let image: GuestImage;

  before(async function () {
    const t0 = performance.now();
    image = await ensureGuestImage();
    console.log(`      guest image ready in ${((performance.now() - t0) / 1000).toFixed(1)} s (${image.cacheDir})`);
  });

  it('writes a kernel and an initramfs that match their manifest', () => {
    const m = manifestOf(image);
    assert.equal(m.kernel.release, image.kernelVersion);
    assert.equal(m.kernel.metaPackage, 'linux-image-amd64');
    assert.equal(m.kernel.package, `linux-image-${image.kernelVersion}`);
    assert.ok(m.packages['busybox-static'], 'records the busybox-static version');
    assert.deepEqual(m.modules.requested, [...GUEST_MODULES]);
    assert.equal(sha256(guestImagePaths(image.cacheDir).kernel), m.outputs.vmlinuz.sha256);
    assert.equal(sha256(image.initrd), m.outputs['initramfs.cpio.gz'].sha256);
    assert.equal(statSync(image.initrd).size, m.outputs['initramfs.cpio.gz'].bytes);
    // Work files stay out of the cache directory.
    // busybox-rootfs.ext4 is the container rootfs made from the initramfs (guest/image/busybox-rootfs.ts).
    // agent.img and initramfs-base.cpio.gz: the agent disk and the initramfs to boot it with.
    const expected = [...(m.agent ? ['agent.img'] : []), 'busybox-rootfs.ext4', ...(m.agent ? ['initramfs-base.cpio.gz'] : []), 'initramfs.cpio.gz', 'manifest.json', ...(m.outputs.vmlinux ? ['vmlinux'] : []), 'vmlinuz'];
    assert.deepEqual(readdirSync(path.dirname(image.kernel)).filter((f) => !f.startsWith('.build.lock')).sort(), expected);
    if (m.outputs.vmlinux) assert.equal(sha256(guestImagePaths(image.cacheDir).vmlinux), m.outputs.vmlinux.sha256);
    else assert.ok(m.vmlinuxSkipped, 'says why there is no vmlinux');
    console.log(
      `      vmlinuz ${m.outputs.vmlinuz.bytes} bytes, initramfs ${m.outputs['initramfs.cpio.gz'].bytes} bytes, ` +
        `vmlinux ${m.outputs.vmlinux?.bytes ?? `none (${m.vmlinuxSkipped})`}, kernel ${m.kernel.release}`,
    );
  });

  it('does nothing when run again with the same inputs', async () => {
    const before = readFileSync(guestImagePaths(image.cacheDir).manifest, 'utf8');
    const mtimes = [image.kernel, image.initrd].map((f) => statSync(f).mtimeMs);
    const t0 = performance.now();
    const { stdout, stderr } = await run(process.execPath, [BUILDER, '--cache-dir', image.cacheDir]);
    const ms = performance.now() - t0;
    console.log(`      second run: ${(ms / 1000).toFixed(2)} s`);
    assert.match(stderr, /guest image is up to date .*nothing to do/);
    assert.doesNotMatch(stderr, /building the guest image/);
    assert.match(stdout, new RegExp(`^kernel_version=${image.kernelVersion}$`, 'm'));
    assert.equal(readFileSync(guestImagePaths(image.cacheDir).manifest, 'utf8'), before);
    assert.deepEqual([image.kernel, image.initrd].map((f) => statSync(f).mtimeMs), mtimes);
    assert.ok(ms < 30_000, `a no-op run takes ${ms} ms`);
  });

  it('packs busybox, /init, the modules with their modules.dep and an empty agent slot', () => {
    const m = manifestOf(image);
    // The base archive: the head of initramfs.cpio.gz, and on its own initramfs-base.cpio.gz.
    const base = guestImagePaths(image.cacheDir).baseInitrd;
    assert.equal(createHash('sha256').update(readFileSync(image.initrd).subarray(0, m.initramfs.baseBytes)).digest('hex'), sha256(base));
    const files = readInitramfs(base);
    const modDir = `lib/modules/${image.kernelVersion}`;
    const busybox = files.get('bin/busybox');
    assert.ok(busybox && busybox.data.length > 500_000, 'bin/busybox (static)');
    assert.equal(files.get('bin/sh')?.data.toString(), '/bin/busybox', 'applet symlinks');
    assert.equal(files.get('sbin/modprobe')?.data.toString(), '/bin/busybox');
    const init = files.get('init');
    assert.ok(init, '/init');
    assert.equal(init.mode & 0o777, 0o755);
    assert.equal(init.data.toString(), readFileSync(path.join(PACKAGE_ROOT, 'guest', 'rootfs', 'init'), 'utf8'));
    assert.deepEqual(files.get('dev/console')?.rdev, [5, 1], '/dev/console exists before devtmpfs is mounted');
    assert.equal(files.get('agent')?.mode! & 0o170000, 0o040000, '/agent is a directory');
    assert.deepEqual([...files.keys()].filter((n) => n.startsWith('agent/')), [], '/agent is empty');
    assert.equal(files.get('etc/kata-ts/modules')?.data.toString(), m.modules.load.map((x) => `${x}\n`).join(''));
    const dep = files.get(`${modDir}/modules.dep`)?.data.toString() ?? '';
    for (const mod of m.modules.load) {
      const ko = [...files.keys()].find((n) => n.startsWith(`${modDir}/`) && path.basename(n).replaceAll('-', '_') === `${mod}.ko`);
      assert.ok(ko, `${mod}.ko is in the initramfs`);
      assert.ok(dep.includes(`${ko.slice(modDir.length + 1)}:`), `${mod} is in modules.dep`);
    }
    assert.deepEqual([...files.keys()].filter((n) => /\.ko\.(xz|zst|gz)$/.test(n)), [], 'modules are decompressed');
    assert.ok(![...files.keys()].some((n) => n.includes('node')), 'no node yet');
  });
});

describe('guest boot under TCG @integration', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let tmp: TempDir | undefined;

  before(async function () {
    if (spawnSync(QEMU, ['--version']).error) this.skip();
    image = await ensureGuestImage();
  });
  afterEach(() => tmp?.cleanup());

  interface Guest {
    readonly t0: number;
    readonly share: string;
    /** Resolves with the first console line matching `re` (multiline); fails if QEMU exits first. */
    waitFor(re: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>;
    console(): Promise<string>;
    /** Sends one QMP command (after the capabilities handshake) and resolves with its reply. */
    qmp(command: string): Promise<Record<string, unknown>>;
    /** Resolves with QEMU's exit code once it exits by itself. */
    readonly exited: Promise<number | null>;
    /** Kills QEMU and checks that no process is left. */
    kill(): Promise<void>;
  }

  /** Starts QEMU under TCG with a 9p share, a 3 MiB virtio-blk disk (or `disk`) and the console in a file. */
  function startGuest(opts: { kernel: string; initrd: string; append: string; disk?: string }): Guest {
    tmp = new TempDir('kata-ts-guest-boot-');
    const dir = tmp.path;
    const share = path.join(dir, 'shared');
    const log = path.join(dir, 'console.log');
    let disk = opts.disk;
    if (disk === undefined) {
      disk = path.join(dir, 'disk.img');
      writeFileSync(disk, Buffer.alloc(3 * 1024 * 1024)); // 6144 sectors
    }
    tmp.file('shared/.keep', '');
    // prettier-ignore
    const argv = [
      '-no-user-config', '-nodefaults', '-display', 'none', '-no-reboot',
      '-machine', 'q35', '-accel', 'tcg', '-cpu', 'max', '-m', '512',
      '-kernel', opts.kernel, '-initrd', opts.initrd, '-append', opts.append,
      '-serial', `file:${log}`,
      '-fsdev', `local,id=fs0,path=${share},security_model=none`,
      '-device', 'virtio-9p-pci,fsdev=fs0,mount_tag=kataShared',
      '-blockdev', `driver=raw,node-name=disk0,file.driver=file,file.filename=${disk}`,
      '-device', 'virtio-blk-pci,drive=disk0',
      '-qmp', `unix:${path.join(dir, 'qmp.sock')},server=on,wait=off`,
    ];
    const t0 = performance.now();
    const qemu = spawn(QEMU, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    qemu.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => qemu.on('exit', (code) => resolve(code)));
    let exitCode: number | null | undefined;
    void exited.then((c) => (exitCode = c));
    const consoleText = async () => (existsSync(log) ? (await readFile(log, 'latin1')).replaceAll('\r', '') : '');
    return {
      t0,
      share,
      exited,
      console: consoleText,
      qmp: (command) => qmpCommand(path.join(dir, 'qmp.sock'), command),
      async waitFor(re, timeoutMs = 120_000) {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
          const text = await consoleText();
          const m = text.match(re);
          if (m) return m;
          if (exitCode !== undefined) assert.fail(`QEMU exited (${exitCode}) before ${re}: ${stderr}\n${text.slice(-2000)}`);
          if (Date.now() > deadline) assert.fail(`no ${re} within ${timeoutMs} ms; console:\n${text.slice(-2000)}`);
          await new Promise((r) => setTimeout(r, 20));
        }
      },
      async kill() {
        qemu.kill('SIGKILL');
        await exited;
        assert.throws(() => process.kill(qemu.pid as number, 0), { code: 'ESRCH' });
        const left = processesMentioning(dir).map((p) => p.pid);
        assert.deepEqual(left, [], 'no process uses the test directory');
      },
    };
  }

  /** A bare QMP exchange: greeting, qmp_capabilities, one command, its reply. */
  function qmpCommand(socket: string, command: string): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const conn = net.connect(socket);
      let buf = '';
      let sent = 0;
      conn.on('error', reject);
      conn.on('data', (d) => {
        buf += d.toString();
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const msg = JSON.parse(buf.slice(0, nl)) as Record<string, unknown>;
          buf = buf.slice(nl + 1);
          if ('QMP' in msg) conn.write(`${JSON.stringify({ execute: 'qmp_capabilities' })}\n`);
          else if ('return' in msg || 'error' in msg) {
            if (sent++ === 0) conn.write(`${JSON.stringify({ execute: command })}\n`);
            else {
              conn.end();
              resolve(msg);
            }
          }
        }
      });
    });
  }

  /** Boots `kernel` with the image's initramfs and checks every line of the /init contract. */
  async function bootAndCheck(kernel: string, what: string): Promise<void> {
    const guest = startGuest({ kernel, initrd: image.initrd, append: 'console=ttyS0 panic=-1 kata_ts.mount9p=1' });
    try {
      const ready = await guest.waitFor(/^KATA-TS-GUEST: ready kernel=(\S+)$/m);
      const readyMs = performance.now() - guest.t0;
      console.log(`      spawn → "KATA-TS-GUEST: ready": ${(readyMs / 1000).toFixed(2)} s under TCG (${what})`);
      assert.equal(ready[1], image.kernelVersion);
      assert.equal((await guest.waitFor(/^KATA-TS-9P: (.*)$/m))[1], 'mounted');
      await guest.waitFor(/^KATA-TS-9P: rw ok$/m);
      const block = await guest.waitFor(/^KATA-TS-BLOCK: (.*)$/m);
      assert.equal(block[1], 'vda:6144');
      const text = await guest.console();
      assert.doesNotMatch(text, /modprobe \S+ failed/);
      assert.doesNotMatch(text, /KATA-TS-9P: (failed|rw failed)/);
      const probe = path.join(guest.share, 'kata-ts-9p-probe');
      assert.match(readFileSync(probe, 'utf8'), new RegExp(`written by the kata-ts guest, kernel ${image.kernelVersion}`));
    } finally {
      await guest.kill();
    }
  }

  it('reaches /init, reports block devices and mounts the 9p share read-write', async () => {
    await bootAndCheck(image.kernel, 'vmlinuz, bzImage');
  });

  it('boots the uncompressed vmlinux through PVH as well', async function () {
    const m = manifestOf(image);
    if (!m.outputs.vmlinux) this.skip();
    await bootAndCheck(guestImagePaths(image.cacheDir).vmlinux, 'vmlinux, PVH');
  });

  it('powers off on an ACPI power-button press (QMP system_powerdown)', async () => {
    const guest = startGuest({ kernel: image.kernel, initrd: image.initrd, append: 'console=ttyS0 panic=-1' });
    try {
      await guest.waitFor(/^KATA-TS-BLOCK: /m);
      const t0 = performance.now();
      assert.deepEqual((await guest.qmp('system_powerdown')).return, {});
      await guest.waitFor(/^KATA-TS-GUEST: power button, powering off$/m, 30_000);
      const code = await Promise.race([guest.exited, new Promise((r) => setTimeout(() => r('timeout'), 30_000))]);
      assert.equal(code, 0, 'QEMU exits by itself');
      console.log(`      system_powerdown → QEMU exit: ${((performance.now() - t0) / 1000).toFixed(2)} s`);
    } finally {
      await guest.kill();
    }
  });

  it('runs /agent/start from an appended initramfs segment as PID 1, which can mount an ext4 disk', async function () {
    if (spawnSync('mkfs.ext4', ['-V']).error) this.skip();
    const seg = new TempDir('kata-ts-agent-seg-');
    try {
      // The next issue's agent arrives the same way: a second gzip'd cpio archive after the image's.
      const start = [
        '#!/bin/sh',
        'echo "AGENT-TEST: pid $$"',
        'mkdir -p /mnt/root',
        'if out=$(mount -t ext4 /dev/vda /mnt/root 2>&1); then echo "AGENT-TEST: ext4 $(cat /mnt/root/hello)"; else echo "AGENT-TEST: ext4 failed $out"; fi',
        'exec sleep 3600',
        '',
      ].join('\n');
      const segment = path.join(seg.path, 'agent.cpio.gz');
      const w = new CpioGzWriter(segment);
      await w.add({ kind: 'dir', path: 'agent', mode: 0o755 });
      await w.add({ kind: 'file', path: 'agent/start', mode: 0o755, data: Buffer.from(start) });
      await w.finish();
      const initrd = path.join(seg.path, 'initrd-with-agent');
      writeFileSync(initrd, Buffer.concat([readFileSync(image.initrd), readFileSync(segment)]));
      seg.file('rootfs/hello', 'hello from ext4\n');
      const disk = path.join(seg.path, 'ext4.img');
      await run('mkfs.ext4', ['-q', '-F', '-d', path.join(seg.path, 'rootfs'), disk, '8M']);

      const guest = startGuest({ kernel: image.kernel, initrd, append: 'console=ttyS0 panic=-1', disk });
      try {
        await guest.waitFor(/^KATA-TS-GUEST: ready kernel=/m);
        await guest.waitFor(/^KATA-TS-GUEST: exec \/agent\/start$/m);
        assert.equal((await guest.waitFor(/^AGENT-TEST: pid (\d+)$/m))[1], '1');
        assert.equal((await guest.waitFor(/^AGENT-TEST: ext4 (.*)$/m))[1], 'hello from ext4');
        assert.doesNotMatch(await guest.console(), /KATA-TS-BLOCK:/, 'with an agent, /init does not poll block devices');
      } finally {
        await guest.kill();
      }
    } finally {
      seg.cleanup();
    }
  });
});

describe('the agent disk (agent.img + initramfs-base.cpio.gz) under TCG @integration', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let guest: { kill(): Promise<void>; dir: TempDir } | undefined;

  before(async function () {
    if (spawnSync(QEMU, ['--version']).error) this.skip();
    image = await ensureGuestImage();
  });
  afterEach(async () => {
    await guest?.kill();
    guest?.dir.cleanup();
    guest = undefined;
  });

  /** Boots the agent-less initramfs with the agent disk as an NVDIMM or a virtio-blk disk; returns the console once the agent started. */
  async function bootWithDisk(how: 'nvdimm' | 'virtio-blk'): Promise<string> {
    const disk = image.agentDisk;
    assert.ok(disk, 'the builder made an agent disk');
    const dir = new TempDir('kata-ts-agent-disk-');
    const log = path.join(dir.path, 'console.log');
    const root = how === 'nvdimm' ? 'root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro' : 'root=/dev/vda1 rootflags=data=ordered,errors=remount-ro';
    // prettier-ignore
    const argv = [
      '-no-user-config', '-nodefaults', '-display', 'none', '-no-reboot', '-accel', 'tcg', '-cpu', 'max',
      '-kernel', image.kernel, '-initrd', disk.initrd, '-append', `console=ttyS0 panic=-1 ${root} ro rootfstype=ext4`,
      '-serial', `file:${log}`,
      ...(how === 'nvdimm'
        ? ['-machine', 'q35,nvdimm=on', '-m', '512,slots=1,maxmem=2G',
          '-object', `memory-backend-file,id=agentdisk,mem-path=${disk.image},size=${statSync(disk.image).size},readonly=on,share=off`,
          '-device', 'nvdimm,id=nv0,memdev=agentdisk,unarmed=on']
        : ['-machine', 'q35', '-m', '512',
          '-blockdev', `driver=raw,node-name=agentdisk,read-only=on,file.driver=file,file.filename=${disk.image},file.read-only=on`,
          '-device', 'virtio-blk-pci,drive=agentdisk']),
    ];
    const qemu = spawn(QEMU, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    qemu.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    let exit: number | null | undefined;
    const exited = new Promise<void>((resolve) => qemu.on('exit', (c) => ((exit = c), resolve())));
    guest = {
      dir,
      kill: async () => {
        if (exit === undefined) qemu.kill('SIGKILL');
        await exited;
      },
    };
    const deadline = Date.now() + 180_000;
    for (;;) {
      const text = existsSync(log) ? readFileSync(log, 'latin1').replaceAll('\r', '') : '';
      // The agent starts, then gives up on its virtio-serial port (none here): started is enough.
      if (/^KATA-TS-AGENT: started pid=\d+ node=v/m.test(text)) return text;
      if (exit !== undefined) assert.fail(`QEMU exited (${exit}): ${stderr}\n${text.slice(-2000)}`);
      if (Date.now() > deadline) assert.fail(`the agent did not start within 180 s; console:\n${text.slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  it('is written by the builder with its manifest entries, a DAX header and an MBR at 0 and at 2 MiB', () => {
    const disk = image.agentDisk;
    assert.ok(disk);
    const m = JSON.parse(readFileSync(guestImagePaths(image.cacheDir).manifest, 'utf8')) as GuestManifest;
    for (const [name, file] of [['agent.img', disk.image], ['initramfs-base.cpio.gz', disk.initrd]] as const) {
      const info = m.outputs[name];
      assert.ok(info, `${name} in the manifest`);
      assert.equal(createHash('sha256').update(readFileSync(file)).digest('hex'), info.sha256);
    }
    const bytes = statSync(disk.image).size;
    assert.equal(bytes % (2 * 1024 * 1024), 0);
    const head = readFileSync(disk.image).subarray(0, 2 * 1024 * 1024 + 512);
    assert.equal(head.toString('latin1', 4096, 4096 + 15), 'NVDIMM_PFN_INFO');
    assert.equal(head.readUInt16LE(510), 0xaa55);
    assert.equal(head.readUInt16LE(2 * 1024 * 1024 + 510), 0xaa55);
    assert.equal(head.readUInt32LE(446 + 8) - head.readUInt32LE(2 * 1024 * 1024 + 446 + 8), 4096, 'the two partitions are the same bytes, 2 MiB apart');
    // The base archive has no agent: the agent disk brings it.
    assert.ok(statSync(disk.initrd).size < 16 * 1024 * 1024);
  });

  it('on an NVDIMM: /init loads nfit and nd_pmem, mounts /dev/pmem0p1 read-only with DAX and runs the agent from it', async () => {
    const text = await bootWithDisk('nvdimm');
    const mounted = /^KATA-TS-GUEST: agent disk \/dev\/pmem0p1 mounted \((.*)\)$/m.exec(text);
    assert.ok(mounted, text.slice(-2000));
    const opts = (mounted[1] as string).split(',');
    assert.ok(opts.includes('ro'), mounted[1]);
    assert.ok(opts.includes('dax=always'), mounted[1]);
    assert.match(text, /^KATA-TS-GUEST: exec \/agent\/start$/m);
    assert.doesNotMatch(text, /modprobe \S+ failed|cannot mount the agent disk|DAX unsupported/);
  });

  it('as a read-only virtio-blk disk: /init mounts /dev/vda1 (the MBR at byte 0) and runs the agent from it', async () => {
    const text = await bootWithDisk('virtio-blk');
    const mounted = /^KATA-TS-GUEST: agent disk \/dev\/vda1 mounted \((.*)\)$/m.exec(text);
    assert.ok(mounted, text.slice(-2000));
    assert.ok((mounted[1] as string).split(',').includes('ro'));
    assert.match(text, /^KATA-TS-GUEST: exec \/agent\/start$/m);
  });
});

describe('configs/configuration-qemu.toml', function () {
  this.timeout(60_000);
  const CONFIG = path.join(PACKAGE_ROOT, 'configs', 'configuration-qemu.toml');

  it('passes `kata-runtime validate`', async () => {
    const { stdout } = await run(process.execPath, [CLI, '--config', CONFIG, 'validate', '--json']);
    const verdict = JSON.parse(stdout) as { valid: boolean; hypervisor: string };
    assert.equal(verdict.valid, true, stdout.slice(0, 2000));
    assert.equal(verdict.hypervisor, 'qemu');
  });

  it('points kernel (the uncompressed one, which boots twice as fast), initrd and image (the agent disk, on an NVDIMM) at what the builder writes for root', async () => {
    const qemu = (parseToml(await readFile(CONFIG, 'utf8')) as { hypervisor: { qemu: Record<string, unknown> } }).hypervisor.qemu;
    const out = guestImagePaths(defaultCacheDir({}, 0));
    assert.equal(qemu.kernel, out.vmlinux);
    assert.equal(qemu.initrd, out.baseInitrd);
    assert.equal(qemu.image, out.agentDisk);
    assert.equal(qemu.disable_image_nvdimm, false);
    assert.equal(qemu.machine_type, 'q35');
    assert.equal(qemu.shared_fs, 'virtio-9p');
    assert.equal(qemu.block_device_driver, 'virtio-blk');
    assert.equal(qemu.disable_block_device_use, false);
  });
});

describe('guest image cache directory', () => {
  it('is --cache-dir, else KATA_TS_CACHE_DIR, else /var/cache/kata-ts for root, else ~/.cache/kata-ts', () => {
    assert.equal(defaultCacheDir({ KATA_TS_CACHE_DIR: '/x/y' }, 0, '/home/u'), '/x/y');
    assert.equal(defaultCacheDir({}, 0, '/root'), '/var/cache/kata-ts');
    assert.equal(defaultCacheDir({}, 1000, '/home/u'), '/home/u/.cache/kata-ts');
  });
});
