/**
 * Pod networking end to end: real network namespaces, a veth pair, taps and tc filters, QEMU in
 * the pod's namespace, the guest agent configuring the interface. Addresses are documentation
 * ranges (192.0.2.0/24, 2001:db8::/64) inside two namespaces this test creates: traffic flows
 * only between them, never to the host's own interfaces. Everything is removed in after().
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { text } from 'node:stream/consumers';
import type { KataError } from '../../core/errors.js';
import { loadValidatedConfig } from '../../core/runtime.js';
import { Sandbox } from '../../core/sandbox.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { qemuBinary, qemuLeftBehind } from '../helpers/qemu.js';
import { TempDir } from '../helpers/tmp.js';

const POD = `kts-pod-${process.pid}`;
const PEER = `kts-peer-${process.pid}`;
const POD_PATH = `/var/run/netns/${POD}`;
const ip = (...args: string[]) => execFileSync('ip', args, { encoding: 'utf8' });
const tc = (...args: string[]) => execFileSync('tc', args, { encoding: 'utf8' });

function config(image: GuestImage): string {
  return `[hypervisor.qemu]
path = "${qemuBinary() ?? '/usr/bin/qemu-system-x86_64'}"
kernel = "${image.kernel}"
initrd = "${image.initrd}"
default_memory = 512
default_vcpus = 1
shared_fs = "none"
disable_block_device_use = false
block_device_driver = "virtio-blk"

[agent.kata]
dial_timeout = 120
`;
}

/** A TCP server in the peer namespace (node, run with `ip netns exec`): greets, then echoes what it reads back prefixed. */
function peerServer(): Promise<ChildProcess> {
  const code = `const net=require('net');net.createServer((s)=>{s.write('hello from the peer\\n');s.on('data',(d)=>s.end('peer got '+d));}).listen(8080,'192.0.2.1',()=>console.log('listening'));`;
  const child = spawn('ip', ['netns', 'exec', PEER, process.execPath, '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (c) => reject(new Error(`the peer server exited (${c})`)));
    child.stdout.once('data', () => resolve(child));
  });
}

/** Connects from the peer namespace to `host:port` and answers what the server sent; bounded retries while the server starts. */
async function fromPeer(host: string, port: number): Promise<string> {
  const code = `const s=require('net').connect(${port},'${host}');let b='';s.on('data',(d)=>b+=d);s.on('end',()=>{process.stdout.write(b);process.exit(0)});s.on('error',(e)=>{console.error(e.message);process.exit(1)});setTimeout(()=>process.exit(2),5000);`;
  let last = '';
  for (let i = 0; i < 40; i++) {
    try {
      return execFileSync('ip', ['netns', 'exec', PEER, process.execPath, '-e', code], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      last = String((e as { stderr?: string }).stderr ?? e);
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  throw new Error(`no answer from ${host}:${port}: ${last}`);
}

describe('pod networking @integration', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let tmp: TempDir;
  let server: ChildProcess | undefined;
  let sandbox: Sandbox | undefined;
  const runRoot = () => path.join(tmp.path, 'run');

  before(async function () {
    if (!qemuBinary() || process.getuid?.() !== 0) this.skip();
    image = await ensureGuestImage();
    if (!image.busyboxRootfs) this.skip();
    tmp = new TempDir('kata-net-');
    ip('netns', 'add', POD);
    ip('netns', 'add', PEER);
    ip('-n', POD, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'peer0', 'netns', PEER);
    ip('-n', POD, 'addr', 'add', '192.0.2.2/24', 'dev', 'eth0');
    ip('-n', POD, 'addr', 'add', '2001:db8::2/64', 'dev', 'eth0', 'nodad');
    ip('-n', POD, 'link', 'set', 'eth0', 'up');
    ip('-n', POD, 'route', 'add', 'default', 'via', '192.0.2.1');
    ip('-n', PEER, 'addr', 'add', '192.0.2.1/24', 'dev', 'peer0');
    ip('-n', PEER, 'addr', 'add', '2001:db8::1/64', 'dev', 'peer0', 'nodad');
    ip('-n', PEER, 'link', 'set', 'peer0', 'up');
    ip('-n', PEER, 'link', 'set', 'lo', 'up');
    server = await peerServer();
  });

  after(async () => {
    await sandbox?.stop().catch(() => undefined);
    if (server?.pid !== undefined && server.exitCode === null) server.kill('SIGKILL');
    for (const ns of [POD, PEER]) {
      try {
        ip('netns', 'del', ns);
      } catch {
        // not created
      }
    }
    tmp?.cleanup();
  });

  function freshImage(name: string): string {
    const p = path.join(tmp.path, `${name}.ext4`);
    copyFileSync(image.busyboxRootfs as string, p);
    return p;
  }

  it('fails with KATA_ERR_NETWORK naming the namespace when it does not exist, leaving nothing', async () => {
    const validated = await loadValidatedConfig({ text: config(image) });
    const missing = '/var/run/netns/kts-no-such-netns';
    await assert.rejects(Sandbox.create(validated, { sandboxId: 'net-missing', runRoot: runRoot(), netns: missing }), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === missing);
    assert.equal(existsSync(path.join(runRoot(), 'net-missing')), false);
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
  });

  it("gives the container the pod interface's address and routes, and TCP works out to the peer and in from it", async () => {
    const validated = await loadValidatedConfig({ text: config(image) });
    sandbox = await Sandbox.create(validated, { sandboxId: 'net-pod', runRoot: runRoot(), netns: POD_PATH });
    assert.match(ip('-n', POD, 'link', 'show', 'tap0_kata'), /tap0_kata/);
    assert.match(tc('-n', POD, 'filter', 'show', 'dev', 'eth0', 'ingress'), /mirred/);

    const script = [
      'ip -o addr show dev eth0',
      'ip route show',
      // out: to the peer's server
      'echo guest | nc -w 5 192.0.2.1 8080',
      // in: a server in the container, which the peer connects to
      'echo hello from the guest | nc -l -p 8081',
    ].join('; ');
    const c = await sandbox.createContainer({ id: 'net-c', rootfs: { kind: 'block', path: freshImage('net-c'), fstype: 'ext4' }, process: { args: ['sh', '-c', script] } });
    const out = text(c.stdout);
    const err = text(c.stderr);
    await c.start();
    c.stdin.end();
    const inbound = await fromPeer('192.0.2.2', 8081);
    const status = await c.wait();
    const stdout = await out;
    assert.equal(status, 0, `${stdout}\n${await err}`);
    assert.match(stdout, /inet 192\.0\.2\.2\/24/);
    assert.match(stdout, /inet6 2001:db8::2\/64/);
    assert.match(stdout, /default via 192\.0\.2\.1 dev eth0/);
    assert.match(stdout, /hello from the peer\npeer got guest/);
    assert.equal(inbound, 'hello from the guest\n');
    await c.delete();

    await sandbox.stop();
    sandbox = undefined;
    assert.doesNotMatch(ip('-n', POD, 'link', 'show'), /tap0_kata/, 'the tap is removed');
    assert.doesNotMatch(tc('-n', POD, 'qdisc', 'show', 'dev', 'eth0'), /ingress/, 'the ingress qdisc is removed');
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
  });
});
