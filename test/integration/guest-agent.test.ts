/**
 * The guest agent (guest/agent/) in a real guest: the image from guest/image/build-image.ts (Debian
 * kernel, busybox, node and the agent bundle in /agent) booted by a plain qemu-system-x86_64
 * under TCG, driven over its virtio-serial port by the runtime's own client (core/agent). One
 * boot for the whole describe. The container rootfs is an ext4 image made with `mkfs.ext4 -d`
 * from a busybox tree and hot-plugged through QMP onto a pcie-root-port (PCI path 05/00), or a
 * directory on the 9p share.
 */
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { AgentError, connectAgent, type AgentClient } from '../../core/agent/index.js';
import { GrpcCode } from '../../wire/ttrpc/codes.js';
import { guestImagePaths, type GuestManifest } from '../../guest/image/build-image.js';
import { readInitramfs } from '../../guest/image/cpio.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { TempDir } from '../helpers/tmp.js';
import { processesMentioning } from '../helpers/procs.js';

const run = promisify(execFile);
const QEMU = 'qemu-system-x86_64';
const SHARED = '/run/kata-containers/shared/containers';
/** The pcie-root-port's address on pcie.0, hence the hot-plugged disk's PCI path. */
const ROOT_PORT_SLOT = 5;
const PCI_PATH = `${ROOT_PORT_SLOT.toString(16).padStart(2, '0')}/00`;

const sec = (ms: number) => `${(ms / 1000).toFixed(2)} s`;

/** A QMP connection: capabilities negotiated, one command at a time. */
class Qmp {
  private buf = '';
  private readonly pending: ((msg: Record<string, unknown>) => void)[] = [];
  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const msg = JSON.parse(this.buf.slice(0, nl)) as Record<string, unknown>;
        this.buf = this.buf.slice(nl + 1);
        if ('return' in msg || 'error' in msg) this.pending.shift()?.(msg);
      }
    });
  }
  static async connect(socket: string): Promise<Qmp> {
    const sock = net.connect(socket);
    await new Promise<void>((resolve, reject) => {
      sock.once('data', () => resolve()); // the greeting
      sock.once('error', reject);
    });
    const q = new Qmp(sock);
    await q.execute('qmp_capabilities');
    return q;
  }
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.pending.push((msg) => (msg.error ? reject(new Error(`${command}: ${JSON.stringify(msg.error)}`)) : resolve(msg.return)));
      this.sock.write(`${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) })}\n`);
    });
  }
  close(): void {
    this.sock.destroy();
  }
}

/** Reads a stream to its end: kata-agent (and ours) answers INTERNAL "read meet eof" there. */
async function readToEnd(client: AgentClient, which: 'stdout' | 'stderr', containerId: string, execId = ''): Promise<string> {
  let out = '';
  for (;;) {
    try {
      const req = { containerId, execId, len: 65536 };
      const data = which === 'stdout' ? await client.readStdout(req) : await client.readStderr(req);
      if (data.length === 0) return out; // an agent that signals EOF with empty data
      out += Buffer.from(data).toString('utf8');
    } catch (e) {
      if (e instanceof AgentError && e.grpcCode === GrpcCode.INTERNAL && /read meet eof/.test(e.message)) return out;
      throw e;
    }
  }
}

async function rejectsWith(p: Promise<unknown>, code: number): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof AgentError, String(e));
    assert.equal(e.grpcCodeName, Object.keys(GrpcCode).find((k) => GrpcCode[k as keyof typeof GrpcCode] === code));
    return true;
  });
}

/** A busybox rootfs: the static busybox from the guest image, its applets, users root and 1000, a marker file. */
function makeRootfs(dir: string, busybox: Buffer, marker: string): void {
  for (const d of ['bin', 'etc', 'proc', 'sys', 'dev', 'tmp', 'root', 'home/user']) mkdirSync(path.join(dir, d), { recursive: true });
  chmodSync(path.join(dir, 'tmp'), 0o1777);
  writeFileSync(path.join(dir, 'bin', 'busybox'), busybox, { mode: 0o755 });
  const applets = spawnSync(path.join(dir, 'bin', 'busybox'), ['--list'], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
  assert.ok(applets.includes('sh') && applets.includes('sleep'), 'the static busybox runs on the host and lists its applets');
  for (const a of applets) if (a !== 'busybox') symlinkSync('busybox', path.join(dir, 'bin', a));
  writeFileSync(path.join(dir, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n');
  writeFileSync(path.join(dir, 'etc', 'group'), 'root:x:0:\nuser:x:1000:\n');
  writeFileSync(path.join(dir, 'kata-ts-rootfs'), `${marker}\n`);
  // Named like a busybox applet, but the container's own program: the container's must run.
  mkdirSync(path.join(dir, 'usr', 'bin'), { recursive: true });
  writeFileSync(path.join(dir, 'usr', 'bin', 'uptime'), '#!/bin/sh\necho "the container\'s uptime: $0"\n', { mode: 0o755 });
}

/** An OCI spec for a container rooted at `root`. */
function spec(root: string, args: string[], opts: { hostname?: string; uid?: number; gid?: number; cwd?: string } = {}) {
  return {
    Version: '1.0.2',
    Process: { Args: args, Env: ['PATH=/bin', 'GREETING=hello from the host'], Cwd: opts.cwd ?? '/', User: { UID: opts.uid ?? 0, GID: opts.gid ?? 0 } },
    Root: { Path: root },
    Hostname: opts.hostname ?? '',
  };
}

describe('guest agent in a TCG guest @integration', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let tmp: TempDir | undefined;
  let qemu: ChildProcess | undefined;
  let qemuExit: Promise<unknown> | undefined;
  let qmp: Qmp | undefined;
  let client: AgentClient | undefined;
  let consoleLog = '';
  let share = '';
  const blkStorage = { driver: 'blk', source: PCI_PATH, fstype: 'ext4', options: [], mountPoint: `${SHARED}/blk-rootfs` };
  const blkRoot = `${SHARED}/blk-rootfs`;
  const consoleText = () => (existsSync(consoleLog) ? readFileSync(consoleLog, 'latin1').replaceAll('\r', '') : '');

  before(async function () {
    if (spawnSync(QEMU, ['--version']).error || spawnSync('mkfs.ext4', ['-V']).error) this.skip();
    image = await ensureGuestImage();
    const manifest = JSON.parse(readFileSync(guestImagePaths(image.cacheDir).manifest, 'utf8')) as GuestManifest;
    assert.ok(manifest.agent, 'the image has the agent (not built with --no-agent)');
    tmp = new TempDir('kata-ts-agent-it-');
    const dir = tmp.path;
    share = path.join(dir, 'share');
    consoleLog = path.join(dir, 'console.log');

    // The container rootfs, twice: an ext4 image (block device) and a directory on the 9p share.
    const busybox = readInitramfs(readFileSync(image.initrd)).get('bin/busybox')?.data;
    assert.ok(busybox, 'bin/busybox is in the initramfs');
    makeRootfs(path.join(dir, 'rootfs'), busybox, 'blk rootfs');
    await run('mkfs.ext4', ['-q', '-F', '-d', path.join(dir, 'rootfs'), path.join(dir, 'rootfs.ext4'), '32M']);
    mkdirSync(share);
    cpSync(path.join(dir, 'rootfs'), path.join(share, 'c9p', 'rootfs'), { recursive: true, verbatimSymlinks: true });
    writeFileSync(path.join(share, 'c9p', 'rootfs', 'kata-ts-rootfs'), '9p rootfs\n');

    const manifestVmlinux = manifest.outputs.vmlinux ? guestImagePaths(image.cacheDir).vmlinux : image.kernel;
    // prettier-ignore
    const argv = [
      '-no-user-config', '-nodefaults', '-display', 'none', '-no-reboot',
      '-machine', 'q35', '-accel', 'tcg', '-cpu', 'max', '-m', '1024',
      '-kernel', manifestVmlinux, '-initrd', image.initrd, '-append', 'console=ttyS0 panic=-1 quiet',
      '-serial', `file:${consoleLog}`,
      '-device', `pcie-root-port,id=rp0,chassis=1,slot=1,bus=pcie.0,addr=0x${ROOT_PORT_SLOT.toString(16)}`,
      '-device', 'virtio-serial-pci,id=vser0',
      '-chardev', `socket,id=agent,path=${path.join(dir, 'agent.sock')},server=on,wait=off`,
      '-device', 'virtserialport,chardev=agent,name=agent.channel.0,bus=vser0.0',
      '-fsdev', `local,id=fs0,path=${share},security_model=none`,
      '-device', 'virtio-9p-pci,fsdev=fs0,mount_tag=kataShared',
      '-qmp', `unix:${path.join(dir, 'qmp.sock')},server=on,wait=off`,
    ];
    const t0 = performance.now();
    qemu = spawn(QEMU, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    qemu.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    qemuExit = new Promise((resolve) => qemu!.once('exit', resolve));
    void qemuExit.then((code) => {
      if (client) process.stderr.write(`      QEMU exited (${String(code)}): ${stderr}\n`);
    });

    // Host-side times of the console lines, polled while the agent connection is being made.
    const seen = new Map<string, number>();
    const marks: [string, RegExp][] = [
      ['init', /^KATA-TS-GUEST: init uptime=/m],
      ['ready', /^KATA-TS-GUEST: ready kernel=/m],
      ['started', /^KATA-TS-AGENT: started /m],
      ['listening', /^KATA-TS-AGENT: listening /m],
    ];
    const poll = setInterval(() => {
      const text = consoleText();
      for (const [k, re] of marks) if (!seen.has(k) && re.test(text)) seen.set(k, performance.now() - t0);
    }, 10);
    try {
      client = await connectAgent(`unix://${path.join(dir, 'agent.sock')}`, { deadlineMs: 300_000 });
    } catch (e) {
      throw new Error(`${(e as Error).message}\nQEMU: ${stderr}\nconsole:\n${consoleText().slice(-3000)}`);
    } finally {
      clearInterval(poll);
    }
    const servingMs = performance.now() - t0;
    const text = consoleText();
    const up = (re: RegExp) => Number(re.exec(text)?.[1]);
    const guest = {
      init: up(/^KATA-TS-GUEST: init uptime=([\d.]+)/m),
      start: up(/^KATA-TS-AGENT: \/agent\/start uptime=([\d.]+)/m),
      started: up(/^KATA-TS-AGENT: started .*uptime=([\d.]+)/m),
      listening: up(/^KATA-TS-AGENT: listening .*uptime=([\d.]+)/m),
    };
    const at = (k: string) => (seen.has(k) ? sec(seen.get(k) as number) : '?');
    console.log(
      `      boot to Health SERVING: ${sec(servingMs)} from spawning QEMU (${path.basename(manifestVmlinux)}, initrd ${(readFileSync(image.initrd).length / 1e6).toFixed(1)} MB)\n` +
        `        host clock: /init ${at('init')}, modules loaded ${at('ready')}, agent started ${at('started')}, listening ${at('listening')}, SERVING ${sec(servingMs)}\n` +
        `        guest uptime: kernel boot to /init ${guest.init.toFixed(2)} s, /init to /agent/start ${(guest.start - guest.init).toFixed(2)} s (modules), ` +
        `node start to agent code ${(guest.started - guest.start).toFixed(2)} s, agent code to listening ${(guest.listening - guest.started).toFixed(2)} s`,
    );
    qmp = await Qmp.connect(path.join(dir, 'qmp.sock'));
  });

  after(async function () {
    client?.close();
    client = undefined;
    qmp?.close();
    if (qemu && qemu.exitCode === null) {
      qemu.kill('SIGKILL');
      await qemuExit;
    }
    if (qemu?.pid) assert.throws(() => process.kill(qemu!.pid as number, 0), { code: 'ESRCH' }, 'QEMU is gone');
    if (tmp) {
      const left = processesMentioning(tmp!.path).map((p) => p.pid);
      assert.deepEqual(left, [], 'no process uses the test directory');
      tmp.cleanup();
    }
  });

  it('answers Health, Version and GetGuestDetails', async () => {
    const c = client as AgentClient;
    assert.equal((await c.check()).status, 1);
    const v = await c.version();
    assert.match(v.agentVersion, /kata-ts/);
    assert.equal(v.grpcVersion, '0.0.1');
    const d = await c.getGuestDetails({ memBlockSize: true, memHotplugProbe: true });
    assert.ok(d.memBlockSizeBytes > 0n, `memory block size ${d.memBlockSizeBytes}`);
    assert.deepEqual(d.agentDetails?.storageHandlers, ['blk', 'scsi', 'mmioblk', '9p', 'virtio-fs', 'ephemeral', 'local']);
    assert.equal(d.agentDetails?.initDaemon, false, 'PID 1 is /agent/start, the agent its child');
  });

  it('creates the sandbox with the 9p share as a storage, once', async () => {
    const c = client as AgentClient;
    const shared = { driver: '9p', source: 'kataShared', fstype: '9p', options: ['trans=virtio', 'version=9p2000.L', 'cache=mmap', 'nodev'], mountPoint: SHARED };
    await c.createSandbox({ hostname: 'kata-ts-sandbox', sandboxId: 'sb1', storages: [shared] });
    await rejectsWith(c.createSandbox({ hostname: 'again', storages: [] }), GrpcCode.ALREADY_EXISTS);
  });

  it('runs a container from a hot-plugged ext4 disk: stdout and stderr apart, exit code 3', async () => {
    const c = client as AgentClient;
    const t0 = performance.now();
    await (qmp as Qmp).execute('blockdev-add', { driver: 'raw', 'node-name': 'rootfs0', file: { driver: 'file', filename: path.join((tmp as TempDir).path, 'rootfs.ext4') } });
    await (qmp as Qmp).execute('device_add', { driver: 'virtio-blk-pci', id: 'rootfs0dev', drive: 'rootfs0', bus: 'rp0' });
    // CreateContainer right away: the agent waits for the device to show up behind 05/00.
    await c.createContainer({ containerId: 'c1', execId: 'c1', storages: [blkStorage], OCI: spec(blkRoot, ['sh', '-c', 'echo out; echo err >&2; exit 3']) });
    const created = performance.now() - t0;
    await c.startContainer({ containerId: 'c1' });
    const [out, err, status] = await Promise.all([readToEnd(c, 'stdout', 'c1'), readToEnd(c, 'stderr', 'c1'), c.waitProcess({ containerId: 'c1', execId: 'c1' })]);
    console.log(`      device_add → CreateContainer done ${sec(created)}, → exit ${sec(performance.now() - t0)}`);
    assert.equal(out, 'out\n');
    assert.equal(err, 'err\n');
    assert.equal(status, 3);
    assert.match(consoleText(), new RegExp(`^KATA-TS-AGENT: mounted /dev/vda \\(ext4\\) on ${blkRoot}$`, 'm'));
    assert.match(consoleText(), /^KATA-TS-BLOCK: vda:65536$/m, 'the agent keeps reporting block devices');
  });

  it('pipes stdin through to the container (cat)', async () => {
    const c = client as AgentClient;
    await c.createContainer({ containerId: 'c2', execId: 'c2', storages: [blkStorage], OCI: spec(blkRoot, ['cat']) });
    await c.startContainer({ containerId: 'c2' });
    const out = readToEnd(c, 'stdout', 'c2');
    assert.equal(await c.writeStdin({ containerId: 'c2', execId: 'c2', data: Buffer.from('hello\n') }), 6);
    assert.equal(await c.writeStdin({ containerId: 'c2', execId: 'c2', data: Buffer.from('world\n') }), 6);
    await c.closeStdin({ containerId: 'c2', execId: 'c2' });
    assert.equal(await out, 'hello\nworld\n');
    assert.equal(await c.waitProcess({ containerId: 'c2', execId: 'c2' }), 0);
    await rejectsWith(c.writeStdin({ containerId: 'c2', execId: 'c2', data: Buffer.from('late') }), GrpcCode.FAILED_PRECONDITION);
  });

  it('runs processes in the container namespaces and root, as the OCI user; exec into a running container; SIGKILL → 137', async () => {
    const c = client as AgentClient;
    await c.createContainer({ containerId: 'c3', execId: 'c3', storages: [blkStorage], OCI: spec(blkRoot, ['sleep', '100'], { hostname: 'c3-host' }) });
    await c.startContainer({ containerId: 'c3' });
    const script = [
      'echo pid=$$',
      'hostname',
      'id -u; id -g',
      "tr '\\0' ' ' </proc/1/cmdline; echo",
      'cat /kata-ts-rootfs',
      'pwd',
      'echo "$GREETING"',
      'echo via-dev-stderr >/dev/stderr',
      'ls /dev | tr "\\n" " "',
    ].join('; ');
    const proc = { Args: ['sh', '-c', script], Env: ['PATH=/bin', 'GREETING=hello from exec'], Cwd: '/tmp', User: { UID: 1000, GID: 1000 } };
    await c.execProcess({ containerId: 'c3', execId: "e1", process: proc });
    const [out, err, status] = await Promise.all([readToEnd(c, 'stdout', 'c3', 'e1'), readToEnd(c, 'stderr', 'c3', 'e1'), c.waitProcess({ containerId: 'c3', execId: 'e1' })]);
    assert.equal(status, 0, err);
    const lines = out.split('\n');
    assert.match(lines[0] as string, /^pid=\d+$/);
    assert.notEqual(lines[0], 'pid=1', 'an exec is not the container init');
    assert.ok(Number((lines[0] as string).slice(4)) < 100, `a pid in the container's own pid namespace: ${lines[0]}`);
    assert.deepEqual(lines.slice(1, 8), ['c3-host', '1000', '1000', '/bin/sleep 100 ', 'blk rootfs', '/tmp', 'hello from exec']);
    for (const dev of ['null', 'zero', 'urandom', 'tty', 'pts', 'shm', 'ptmx', 'fd']) assert.match(lines[8] as string, new RegExp(`(^| )${dev}( |$)`), `/dev/${dev}`);
    assert.equal(err, 'via-dev-stderr\n', 'stderr is a real pipe: /dev/stderr opens');
    await c.execProcess({ containerId: 'c3', execId: 'e-uptime', process: { Args: ['uptime'], Env: ['PATH=/usr/bin:/bin'], Cwd: '/' } });
    const [uptime] = await Promise.all([readToEnd(c, 'stdout', 'c3', 'e-uptime'), c.waitProcess({ containerId: 'c3', execId: 'e-uptime' })]);
    assert.equal(uptime, "the container's uptime: /usr/bin/uptime\n", 'the container program, not the guest busybox applet of that name');
    // PID 1 of the container has no SIGTERM handler: the signal is not delivered.
    const waited = c.waitProcess({ containerId: 'c3', execId: 'c3' });
    await c.signalProcess({ containerId: 'c3', execId: 'c3', signal: 15 });
    assert.equal(await Promise.race([waited, new Promise((r) => setTimeout(() => r('still running'), 1500))]), 'still running');
    await c.signalProcess({ containerId: 'c3', execId: 'c3', signal: 9 });
    assert.equal(await waited, 137);
    await rejectsWith(c.execProcess({ containerId: 'c3', execId: "e2", process: proc }), GrpcCode.FAILED_PRECONDITION);
  });

  it('delivers SIGTERM to a container init only through its handler: exit 143', async () => {
    const c = client as AgentClient;
    await c.createContainer({ containerId: 'c4', execId: 'c4', storages: [blkStorage], OCI: spec(blkRoot, ['sh', '-c', 'trap "exit 143" TERM; sleep 100 & wait']) });
    await c.startContainer({ containerId: 'c4' });
    const waited = c.waitProcess({ containerId: 'c4', execId: 'c4' });
    let done = false;
    void waited.then(() => (done = true));
    // Before the trap is set, SIGTERM is ignored (PID 1 without a handler): send it until it lands.
    let sent = 0;
    while (!done && sent < 30) {
      await c.signalProcess({ containerId: 'c4', execId: 'c4', signal: 15 });
      sent++;
      await Promise.race([waited, new Promise((r) => setTimeout(r, 1000))]);
    }
    assert.equal(await waited, 143);
    console.log(`      SIGTERM sent ${sent} time(s)`);
  });

  it('gives terminal processes a pty: the slave on 0-2 and as controlling tty, the asked size, TtyWinResize, echo, one output stream, the exit code', async () => {
    const c = client as AgentClient;
    // tty_nr (field 7 of /proc/self/stat) is the controlling terminal's device number, 0 without one.
    const probe = 'readlink /proc/self/fd/0; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo fds=tty; echo ctty=$(cut -d" " -f7 /proc/self/stat); stty size';
    const oci = spec(blkRoot, ['sh', '-c', `${probe}; read -r line; stty size; echo "term=$TERM line=$line"; exit 5`]);
    await c.createContainer({ containerId: 'ct', execId: 'ct', storages: [blkStorage], OCI: { ...oci, Process: { ...oci.Process, Terminal: true, ConsoleSize: { Height: 33, Width: 91 } } } });
    await c.startContainer({ containerId: 'ct' });
    let out = '';
    const reading = (async () => {
      for (;;) {
        const data = await c.readStdout({ containerId: 'ct', execId: 'ct', len: 65536 });
        if (data.length === 0) return;
        out += Buffer.from(data).toString('utf8');
      }
    })();
    const until = async (re: RegExp) => {
      for (let i = 0; i < 600 && !re.test(out); i++) await new Promise((r) => setTimeout(r, 50));
      assert.match(out, re);
    };
    await until(/33 91\r\n/);
    // An exec with its own terminal while the init waits for its line.
    const exec = { Args: ['sh', '-c', `${probe}; echo "term=$TERM"; exit 7`], Env: ['PATH=/bin', 'TERM=vt100'], Cwd: '/', User: { UID: 0, GID: 0 }, Terminal: true, ConsoleSize: { Height: 20, Width: 60 } };
    await c.execProcess({ containerId: 'ct', execId: 'et', process: exec });
    const [eout, eerr, estatus] = await Promise.all([readToEnd(c, 'stdout', 'ct', 'et'), readToEnd(c, 'stderr', 'ct', 'et'), c.waitProcess({ containerId: 'ct', execId: 'et' })]);
    assert.equal(estatus, 7, eout);
    assert.match(eout, /^\/dev\/pts\/\d+\r\nfds=tty\r\nctty=[1-9]\d*\r\n20 60\r\nterm=vt100\r\n$/);
    assert.equal(eerr, '', 'a terminal has no separate stderr');
    await c.ttyWinResize({ containerId: 'ct', execId: 'ct', row: 50, column: 132 });
    assert.equal(await c.writeStdin({ containerId: 'ct', execId: 'ct', data: Buffer.from('hello\n') }), 6);
    assert.equal(await c.waitProcess({ containerId: 'ct', execId: 'ct' }), 5);
    await reading;
    assert.match(out, /^\/dev\/pts\/\d+\r\nfds=tty\r\nctty=[1-9]\d*\r\n33 91\r\nhello\r\n50 132\r\nterm=xterm line=hello\r\n$/);
    assert.equal(await readToEnd(c, 'stderr', 'ct'), '');
    await c.removeContainer({ containerId: 'ct' });
  });

  it('runs a container whose rootfs is a directory on the 9p share', async () => {
    const c = client as AgentClient;
    await c.createContainer({ containerId: 'c9p', execId: 'c9p', storages: [], OCI: spec(`${SHARED}/c9p/rootfs`, ['sh', '-c', 'cat /kata-ts-rootfs; hostname']) });
    await c.startContainer({ containerId: 'c9p' });
    const [out, status] = await Promise.all([readToEnd(c, 'stdout', 'c9p'), c.waitProcess({ containerId: 'c9p', execId: '' })]);
    assert.equal(status, 0);
    assert.equal(out, '9p rootfs\nkata-ts-sandbox\n', 'the sandbox hostname when the spec has none');
  });

  it('answers NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT and FAILED_PRECONDITION where they apply', async () => {
    const c = client as AgentClient;
    await rejectsWith(c.waitProcess({ containerId: 'nope', execId: '' }), GrpcCode.NOT_FOUND);
    await rejectsWith(c.readStdout({ containerId: 'c1', execId: 'nope', len: 10 }), GrpcCode.NOT_FOUND);
    await rejectsWith(c.createContainer({ containerId: 'c1', execId: 'c1', OCI: spec(blkRoot, ['true']) }), GrpcCode.ALREADY_EXISTS);
    const badPci = { ...blkStorage, source: 'zz/00', mountPoint: `${SHARED}/bad` };
    await rejectsWith(c.createContainer({ containerId: 'c5', execId: 'c5', storages: [badPci], OCI: spec(blkRoot, ['true']) }), GrpcCode.INVALID_ARGUMENT);
    await rejectsWith(c.createContainer({ containerId: 'c5', execId: 'c5', storages: [blkStorage], OCI: spec(blkRoot, ['no-such-program']) }), GrpcCode.INVALID_ARGUMENT);
    await rejectsWith(c.startContainer({ containerId: 'c1' }), GrpcCode.FAILED_PRECONDITION);
    // Created, never started: removal ends the prepared init and releases the storage reference.
    await c.createContainer({ containerId: 'c6', execId: 'c6', storages: [blkStorage], OCI: spec(blkRoot, ['true']) });
    await rejectsWith(c.execProcess({ containerId: 'c6', execId: 'e1', process: { Args: ['true'], Cwd: '/' } }), GrpcCode.FAILED_PRECONDITION);
    await c.removeContainer({ containerId: 'c6', timeout: 0 });
  });

  it('fails an exec that cannot start at once with INVALID_ARGUMENT and keeps no record of it', async () => {
    const c = client as AgentClient;
    const sleeper = spec(`${SHARED}/c9p/rootfs`, ['sleep', '100']);
    await c.createContainer({ containerId: 'ex', execId: 'ex', storages: [], OCI: { ...sleeper, Process: { ...sleeper.Process, OOMScoreAdj: 123n } } });
    await c.startContainer({ containerId: 'ex' });
    const refused = async (process: { Args: string[]; Cwd: string }, message: RegExp) => {
      const t0 = performance.now();
      await assert.rejects(c.execProcess({ containerId: 'ex', execId: 'bad', process }), (e: unknown) => {
        assert.ok(e instanceof AgentError, String(e));
        assert.equal(e.grpcCodeName, 'INVALID_ARGUMENT', e.message);
        assert.match(e.message, message);
        return true;
      });
      const took = performance.now() - t0;
      assert.ok(took < 5000, `ExecProcess answered after ${sec(took)}`);
    };
    await refused({ Args: ['/nonexistent-binary'], Cwd: '/' }, /exec: "\/nonexistent-binary": executable file not found/);
    await refused({ Args: ['true'], Cwd: '/../..' }, /process cwd "\/\.\.\/\.\." must not contain "\.\."/);
    await refused({ Args: ['true'], Cwd: '/no-such-dir' }, /chdir to cwd "\/no-such-dir": no such directory/);
    // The id is free: nothing was recorded for the failed ones. (And the init's oom_score_adj, written without a shell, is set.)
    await c.execProcess({ containerId: 'ex', execId: 'bad', process: { Args: ['cat', '/proc/1/oom_score_adj'], Cwd: '/' } });
    const [out, status] = await Promise.all([readToEnd(c, 'stdout', 'ex', 'bad'), c.waitProcess({ containerId: 'ex', execId: 'bad' })]);
    assert.equal(status, 0);
    assert.equal(out, '123\n');
    await c.removeContainer({ containerId: 'ex', timeout: 0 });
  });

  it('refuses a bind mount whose options carry a shell payload, naming the option, and runs none of it', async () => {
    const c = client as AgentClient;
    // Before the fix this ran in the guest as root: the agent pasted options into a shell script.
    const option = `nosuid;/bin/busybox touch /run/kata-ts-pwned ${SHARED}/pwned;true`;
    const mounts = [{ destination: '/data', type: 'bind', source: `${SHARED}/c9p`, options: ['rbind', option] }];
    await assert.rejects(c.createContainer({ containerId: 'inj', execId: 'inj', storages: [], OCI: { ...spec(`${SHARED}/c9p/rootfs`, ['true']), Mounts: mounts } }), (e: unknown) => {
      assert.ok(e instanceof AgentError, String(e));
      assert.equal(e.grpcCodeName, 'INVALID_ARGUMENT', e.message);
      assert.ok(e.message.includes(`option ${JSON.stringify(option)} is not supported`), e.message);
      return true;
    });
    assert.equal(existsSync(path.join(share, 'pwned')), false, 'nothing was written to the share');
    // A container that sees the guest's /run (a legitimate bind mount) finds no marker there either.
    const probe = [{ destination: '/guest-run', type: 'bind', source: '/run', options: ['rbind', 'ro', 'nosuid', 'nodev'] }];
    await c.createContainer({ containerId: 'probe', execId: 'probe', storages: [], OCI: { ...spec(`${SHARED}/c9p/rootfs`, ['sh', '-c', 'ls /guest-run; test ! -e /guest-run/kata-ts-pwned']), Mounts: probe } });
    await c.startContainer({ containerId: 'probe' });
    const [out, status] = await Promise.all([readToEnd(c, 'stdout', 'probe'), c.waitProcess({ containerId: 'probe', execId: '' })]);
    assert.match(out, /kata-containers/, 'the probe sees the guest /run');
    assert.equal(status, 0, `the marker is in the guest's /run: ${out}`);
    await c.removeContainer({ containerId: 'probe', timeout: 0 });
  });

  it('mounts on a destination behind an absolute symlink in the image inside the root, not on the guest path it names', async () => {
    const c = client as AgentClient;
    const rootfs = path.join(share, 'c9p', 'rootfs');
    // In the image, /escape → /etc: the container's /etc, which a plain join would make the guest's.
    symlinkSync('/etc', path.join(rootfs, 'escape'));
    const mounts = [
      { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid', 'noexec', 'nodev'] },
      { destination: '/escape/kata-ts-mnt', type: 'tmpfs', source: 'tmpfs', options: ['size=1m'] },
      { destination: '/guest-etc', type: 'bind', source: '/etc', options: ['rbind', 'ro'] },
    ];
    await c.createContainer({ containerId: 'sym', execId: 'sym', storages: [], OCI: { ...spec(`${SHARED}/c9p/rootfs`, ['sh', '-c', 'grep " /etc/kata-ts-mnt " /proc/mounts; test ! -e /guest-etc/kata-ts-mnt && echo guest-etc-clean']), Mounts: mounts } });
    await c.startContainer({ containerId: 'sym' });
    const [out, status] = await Promise.all([readToEnd(c, 'stdout', 'sym'), c.waitProcess({ containerId: 'sym', execId: '' })]);
    await c.removeContainer({ containerId: 'sym', timeout: 0 });
    assert.equal(status, 0, out);
    assert.match(out, /^tmpfs \/etc\/kata-ts-mnt tmpfs /m, 'the tmpfs is on the container\'s /etc/kata-ts-mnt');
    assert.match(out, /^guest-etc-clean$/m, 'nothing was made in the guest\'s /etc');
    assert.ok(existsSync(path.join(rootfs, 'etc', 'kata-ts-mnt')), 'the mount point was made in the image\'s /etc');
  });

  it("keeps the working directory inside the container's root when the image links it to / (the init's and an exec's)", async () => {
    const c = client as AgentClient;
    const rootfs = path.join(share, 'c9p', 'rootfs');
    // In the image, /wd → /: inside the root that is the container's /, never the guest's.
    symlinkSync('/', path.join(rootfs, 'wd'));
    const probe = 'pwd; cat ./kata-ts-rootfs';
    await c.createContainer({ containerId: 'cwd', execId: 'cwd', storages: [], OCI: spec(`${SHARED}/c9p/rootfs`, ['sh', '-c', `${probe}; sleep 100`], { cwd: '/wd' }) });
    await c.startContainer({ containerId: 'cwd' });
    await c.execProcess({ containerId: 'cwd', execId: 'e-cwd', process: { Args: ['sh', '-c', probe], Env: ['PATH=/bin'], Cwd: '/wd', User: { UID: 1000, GID: 1000 } } });
    const [execOut, execStatus] = await Promise.all([readToEnd(c, 'stdout', 'cwd', 'e-cwd'), c.waitProcess({ containerId: 'cwd', execId: 'e-cwd' })]);
    await c.signalProcess({ containerId: 'cwd', execId: 'cwd', signal: 9 });
    const [initOut] = await Promise.all([readToEnd(c, 'stdout', 'cwd'), c.waitProcess({ containerId: 'cwd', execId: '' })]);
    await c.removeContainer({ containerId: 'cwd', timeout: 0 });
    assert.equal(initOut, '/\n9p rootfs\n', "the init's working directory is the container's /");
    assert.equal(execStatus, 0, execOut);
    assert.equal(execOut, '/\n9p rootfs\n', "the exec's working directory is the container's /");
  });

  it('removes containers, unmounting a storage with its last user', async () => {
    const c = client as AgentClient;
    for (const id of ['c1', 'c2', 'c3', 'c4']) {
      assert.doesNotMatch(consoleText(), new RegExp(`unmounted ${blkRoot}`), `still mounted before ${id} goes`);
      await c.removeContainer({ containerId: id, timeout: 0 });
    }
    await c.removeContainer({ containerId: 'c9p', timeout: 0 });
    assert.match(consoleText(), new RegExp(`^KATA-TS-AGENT: unmounted ${blkRoot}$`, 'm'));
    assert.ok(!existsSync(path.join(share, 'blk-rootfs')), 'the mount point the agent made on the share is gone');
    await rejectsWith(c.waitProcess({ containerId: 'c1', execId: '' }), GrpcCode.NOT_FOUND);
  });

  it('destroys the sandbox with a container still running, keeps serving, and serves a host that reconnects', async () => {
    const c = client as AgentClient;
    await c.createContainer({ containerId: 'c7', execId: 'c7', storages: [blkStorage], OCI: spec(blkRoot, ['sleep', '100']) });
    await c.startContainer({ containerId: 'c7' });
    const waited = c.waitProcess({ containerId: 'c7', execId: 'c7' });
    await c.destroySandbox();
    assert.equal(await waited, 137, 'DestroySandbox kills what still runs');
    const text = consoleText();
    const count = (re: RegExp) => text.match(re)?.length ?? 0;
    assert.equal(count(new RegExp(`^KATA-TS-AGENT: unmounted ${blkRoot}$`, 'gm')), count(/^KATA-TS-AGENT: mounted \/dev\/vda /gm), 'every rootfs mount was undone');
    assert.match(consoleText(), new RegExp(`^KATA-TS-AGENT: unmounted ${SHARED}$`, 'm'));
    c.close();
    const again = await connectAgent(`unix://${path.join((tmp as TempDir).path, 'agent.sock')}`, { deadlineMs: 60_000 });
    client = again;
    assert.equal((await again.check()).status, 1);
    assert.match(consoleText(), /^KATA-TS-AGENT: host connected \(connection 2\)$/m);
    console.log(`      the agent saw the first connection end by: ${/host disconnected \((.*)\)/.exec(consoleText())?.[1]}`);
    await again.createSandbox({ hostname: 'second' });
    await again.destroySandbox();
    assert.doesNotMatch(consoleText(), /KATA-TS-AGENT: (uncaught|unhandled|fatal)/);
  });
});
