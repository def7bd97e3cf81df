/**
 * Pod networking end to end: real network namespaces, a veth pair, taps and tc filters, QEMU in
 * the pod's namespace, the guest agent configuring the interface. Addresses are documentation
 * ranges (192.0.2.0/24, 2001:db8::/64) inside two namespaces this test creates: traffic flows
 * only between them, never to the host's own interfaces. Everything is removed in after().
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { text } from 'node:stream/consumers';
import type { KataError } from '../../core/errors.js';
import { loadValidatedConfig } from '../../core/runtime.js';
import { Sandbox } from '../../core/sandbox.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { qemuBinary, qemuLeftBehind, sandboxConfigText } from '../helpers/qemu.js';
import { TempDir } from '../helpers/tmp.js';
import { createPodAndPeer, fromPeer, ip, peerServer, removeNetns, tc, type PodAndPeer } from '../helpers/netns.js';


const BLOCK = 'shared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"';

describe('pod networking @integration', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let tmp: TempDir;
  let server: ChildProcess | undefined;
  let sandbox: Sandbox | undefined;
  let ns: PodAndPeer | undefined;
  const runRoot = () => path.join(tmp.path, 'run');

  before(async function () {
    if (!qemuBinary() || process.getuid?.() !== 0) this.skip();
    image = await ensureGuestImage();
    if (!image.busyboxRootfs) this.skip();
    tmp = new TempDir('kata-net-');
    ns = createPodAndPeer('kts');
    server = await peerServer(ns.peer);
  });

  after(async () => {
    await sandbox?.stop().catch(() => undefined);
    if (server?.pid !== undefined && server.exitCode === null) server.kill('SIGKILL');
    if (ns) removeNetns([ns.pod, ns.peer]);
    tmp?.cleanup();
  });

  function freshImage(name: string): string {
    const p = path.join(tmp.path, `${name}.ext4`);
    copyFileSync(image.busyboxRootfs as string, p);
    return p;
  }

  it('fails with KATA_ERR_NETWORK naming the namespace when it does not exist, leaving nothing', async () => {
    const validated = await loadValidatedConfig({ text: sandboxConfigText(image, BLOCK) });
    const missing = '/var/run/netns/kts-no-such-netns';
    await assert.rejects(Sandbox.create(validated, { sandboxId: 'net-missing', runRoot: runRoot(), netns: missing }), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === missing);
    assert.equal(existsSync(path.join(runRoot(), 'net-missing')), false);
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
  });

  it('fails with KATA_ERR_NETWORK naming the interface when its tap cannot be made, leaving its filters out and the other tap alone', async () => {
    const { pod, podPath } = ns!;
    // Someone else's tap holds the name this sandbox would use.
    ip('-n', pod, 'tuntap', 'add', 'dev', 'tap0_kata', 'mode', 'tap');
    try {
      const validated = await loadValidatedConfig({ text: sandboxConfigText(image, BLOCK) });
      await assert.rejects(Sandbox.create(validated, { sandboxId: 'net-busy', runRoot: runRoot(), netns: podPath }), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === 'eth0' && e.plugin === 'network');
      assert.equal(existsSync(path.join(runRoot(), 'net-busy')), false);
      assert.deepEqual(await qemuLeftBehind(runRoot()), []);
      assert.doesNotMatch(tc('-n', pod, 'qdisc', 'show', 'dev', 'eth0'), /ingress/);
      assert.match(ip('-n', pod, 'link', 'show', 'tap0_kata'), /tap0_kata/, 'the tap it did not make is left alone');
    } finally {
      ip('-n', pod, 'link', 'del', 'tap0_kata');
    }
  });

  it("gives the container the pod interface's IPv4 and IPv6 addresses and routes, and TCP works out to the peer (both families) and in from it", async () => {
    const validated = await loadValidatedConfig({ text: sandboxConfigText(image, BLOCK) });
    const { pod, peer, podPath } = ns!;
    sandbox = await Sandbox.create(validated, { sandboxId: 'net-pod', runRoot: runRoot(), netns: podPath });
    assert.match(ip('-n', pod, 'link', 'show', 'tap0_kata'), /tap0_kata/);
    assert.match(tc('-n', pod, 'filter', 'show', 'dev', 'eth0', 'ingress'), /mirred/);

    const script = [
      'ip -o addr show dev eth0',
      'ip route show',
      // out: to the peer's server
      'echo guest | nc -w 5 192.0.2.1 8080',
      // out over IPv6, once the guest's address has passed duplicate address detection (bounded)
      'for i in 1 2 3 4 5 6 7 8 9 10; do echo v6 | nc -w 3 2001:db8::1 8080 && break; sleep 1; done',
      // in: a server in the container, which the peer connects to
      'echo hello from the guest | nc -l -p 8081',
    ].join('; ');
    const c = await sandbox.createContainer({ id: 'net-c', rootfs: { kind: 'block', path: freshImage('net-c'), fstype: 'ext4' }, process: { args: ['sh', '-c', script] } });
    const out = text(c.stdout);
    const err = text(c.stderr);
    await c.start();
    c.stdin.end();
    const inbound = await fromPeer(peer, '192.0.2.2', 8081);
    const status = await c.wait();
    const stdout = await out;
    assert.equal(status, 0, `${stdout}\n${await err}`);
    assert.match(stdout, /inet 192\.0\.2\.2\/24/);
    assert.match(stdout, /inet6 2001:db8::2\/64/);
    assert.match(stdout, /default via 192\.0\.2\.1 dev eth0/);
    assert.match(stdout, /hello from the peer\npeer got guest/);
    assert.match(stdout, /hello from the peer\npeer got v6/);
    assert.equal(inbound, 'hello from the guest\n');
    await c.delete();

    // The agent reports what it configured (ListInterfaces, ListRoutes).
    const podMac = (JSON.parse(ip('-n', pod, '-json', 'link', 'show', 'eth0')) as { address: string }[])[0]?.address;
    const eth0 = (await sandbox.agent.listInterfaces()).find((i) => i.name === 'eth0');
    assert.equal(eth0?.hwAddr, podMac);
    assert.equal(eth0?.mtu, 1500n);
    assert.ok(eth0?.IPAddresses.some((a) => a.address === '192.0.2.2' && a.mask === '24'), JSON.stringify(eth0, (_k, v: unknown) => (typeof v === 'bigint' ? String(v) : v)));
    assert.ok((await sandbox.agent.listRoutes()).some((r) => r.dest === '' && r.gateway === '192.0.2.1' && r.device === 'eth0'));

    await sandbox.stop();
    sandbox = undefined;
    assert.doesNotMatch(ip('-n', pod, 'link', 'show'), /tap0_kata/, 'the tap is removed');
    assert.doesNotMatch(tc('-n', pod, 'qdisc', 'show', 'dev', 'eth0'), /ingress/, 'the ingress qdisc is removed');
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
  });
});
