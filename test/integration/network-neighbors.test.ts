/**
 * Pod networking beyond one interface, end to end with real namespaces, ip/tc, QEMU and the guest
 * agent: two interfaces in one pod's namespace, the namespace's permanent neighbours in the guest
 * (kata-agent's AddARPNeighbors), and the failures that must leave nothing behind (a tap name that
 * is taken, a namespace that vanishes while the sandbox starts). Documentation addresses only
 * (192.0.2.0/24, 198.51.100.0/24, 2001:db8::/64) inside namespaces this test creates and removes.
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { text } from 'node:stream/consumers';
import type { KataError } from '../../core/errors.js';
import { silentLogger } from '../../core/logger.js';
import { loadValidatedConfig } from '../../core/runtime.js';
import { Sandbox } from '../../core/sandbox.js';
import type { VmContext } from '../../core/vm.js';
import { runCommand, wireSandbox, type CommandRunner } from '../../plugins/network/index.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { createPodAndPeer, fromPeer, ip, peerServer, removeNetns, tc, type PodAndPeer } from '../helpers/netns.js';
import { qemuBinary, qemuLeftBehind, sandboxConfigText } from '../helpers/qemu.js';
import { TempDir } from '../helpers/tmp.js';

const BLOCK = 'shared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"';

/** A second veth in the pod namespace, `eth1` (198.51.100.2/24), whose other end is in a namespace of its own (198.51.100.1/24). */
function addSecondInterface(pod: string, peer2: string): void {
  ip('netns', 'add', peer2);
  ip('-n', pod, 'link', 'add', 'eth1', 'type', 'veth', 'peer', 'name', 'peer1', 'netns', peer2);
  ip('-n', pod, 'addr', 'add', '198.51.100.2/24', 'dev', 'eth1');
  ip('-n', pod, 'link', 'set', 'eth1', 'up');
  ip('-n', peer2, 'addr', 'add', '198.51.100.1/24', 'dev', 'peer1');
  ip('-n', peer2, 'link', 'set', 'peer1', 'up');
  ip('-n', peer2, 'link', 'set', 'lo', 'up');
}

const links = (ns: string) => ip('-n', ns, 'link', 'show');
const ingress = (ns: string, dev: string) => tc('-n', ns, 'qdisc', 'show', 'dev', dev);

describe('pod networking: two interfaces, permanent neighbours, failures @integration', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let tmp: TempDir;
  const servers: ChildProcess[] = [];
  let sandbox: Sandbox | undefined;
  let ns: PodAndPeer | undefined;
  let peer2 = '';
  const extraNetns: string[] = [];
  const runRoot = () => path.join(tmp.path, 'run');

  before(async function () {
    if (!qemuBinary() || process.getuid?.() !== 0) this.skip();
    image = await ensureGuestImage();
    if (!image.busyboxRootfs) this.skip();
    tmp = new TempDir('kata-net2-');
    ns = createPodAndPeer('ktn');
    peer2 = `ktn-peer2-${process.pid}`;
    addSecondInterface(ns.pod, peer2);
    ip('-n', ns.pod, 'neigh', 'add', '192.0.2.99', 'lladdr', '02:00:00:00:00:99', 'dev', 'eth0', 'nud', 'permanent');
    ip('-n', ns.pod, 'neigh', 'add', '2001:db8::99', 'lladdr', '02:00:00:00:00:98', 'dev', 'eth0', 'nud', 'permanent');
    ip('-n', ns.pod, 'neigh', 'add', '198.51.100.99', 'lladdr', '02:00:00:00:01:99', 'dev', 'eth1', 'nud', 'permanent');
    servers.push(await peerServer(ns.peer), await peerServer(peer2));
  });

  after(async () => {
    await sandbox?.stop().catch(() => undefined);
    for (const s of servers) if (s.pid !== undefined && s.exitCode === null) s.kill('SIGKILL');
    removeNetns([...(ns ? [ns.pod, ns.peer] : []), ...(peer2 ? [peer2] : []), ...extraNetns]);
    tmp?.cleanup();
  });

  function freshImage(name: string): string {
    const p = path.join(tmp.path, `${name}.ext4`);
    copyFileSync(image.busyboxRootfs as string, p);
    return p;
  }

  it("fails naming the second interface when its tap's name is taken, removing the first tap and every filter and leaving the other tap alone", async () => {
    const { pod, podPath } = ns!;
    ip('-n', pod, 'tuntap', 'add', 'dev', 'tap1_kata', 'mode', 'tap');
    try {
      const validated = await loadValidatedConfig({ text: sandboxConfigText(image, BLOCK) });
      await assert.rejects(
        Sandbox.create(validated, { sandboxId: 'net2-busy', runRoot: runRoot(), netns: podPath }),
        (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.plugin === 'network' && e.value === 'eth1' && /ip link del tap1_kata/.test(e.fix ?? ''),
      );
      assert.equal(existsSync(path.join(runRoot(), 'net2-busy')), false);
      assert.deepEqual(await qemuLeftBehind(runRoot()), []);
      assert.doesNotMatch(links(pod), /tap0_kata/, 'the tap it made is removed');
      assert.match(ip('-n', pod, 'link', 'show', 'tap1_kata'), /tap1_kata/, 'the tap it did not make is left alone');
      for (const dev of ['eth0', 'eth1', 'tap1_kata']) assert.doesNotMatch(ingress(pod, dev), /ingress/, `no ingress qdisc on ${dev}`);
    } finally {
      ip('-n', pod, 'link', 'del', 'tap1_kata');
    }
  });

  it("fails naming the second interface when it already has an ingress qdisc, leaving that qdisc and removing its own (real ip, tc, nsenter)", async () => {
    const { pod, podPath } = ns!;
    tc('-n', pod, 'qdisc', 'add', 'dev', 'eth1', 'handle', 'ffff:', 'ingress');
    try {
      const ctx: VmContext = { sandboxId: 'q', runDir: tmp.path, plan: {} as VmContext['plan'], config: {} as VmContext['config'], log: silentLogger(), network: { devices: [], interfaces: [], routes: [], neighbors: [], timings: { host: 0, guest: 0 } } };
      await assert.rejects(wireSandbox(ctx, podPath), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === 'eth1' && /tc qdisc del dev eth1 ingress/.test(e.fix ?? ''));
      assert.match(ingress(pod, 'eth1'), /ingress/, "the qdisc it did not add is left alone");
      assert.doesNotMatch(ingress(pod, 'eth0'), /ingress/, 'its own qdisc is removed');
      assert.doesNotMatch(links(pod), /tap\d_kata/, 'its taps are removed');
    } finally {
      tc('-n', pod, 'qdisc', 'del', 'dev', 'eth1', 'ingress');
    }
  });

  it("mirrors both interfaces, each reachable to and from its own peer, and gives the guest the namespace's permanent neighbours", async () => {
    const { pod, peer, podPath } = ns!;
    const validated = await loadValidatedConfig({ text: sandboxConfigText(image, BLOCK) });
    sandbox = await Sandbox.create(validated, { sandboxId: 'net2-pod', runRoot: runRoot(), netns: podPath });
    assert.deepEqual(
      sandbox.running.ctx.network.neighbors.map((n) => `${n.address} ${n.device} ${n.mac}`).sort(),
      ['192.0.2.99 eth0 02:00:00:00:00:99', '198.51.100.99 eth1 02:00:00:00:01:99', '2001:db8::99 eth0 02:00:00:00:00:98'],
    );
    for (const tap of ['tap0_kata', 'tap1_kata']) assert.match(links(pod), new RegExp(tap));
    for (const dev of ['eth0', 'eth1']) assert.match(tc('-n', pod, 'filter', 'show', 'dev', dev, 'ingress'), /mirred/);

    const script = [
      'cat /proc/net/arp',
      'ip neigh show',
      'ip -o addr show',
      'echo one | nc -w 5 192.0.2.1 8080',
      'echo two | nc -w 5 198.51.100.1 8080',
      'echo in one | nc -l -p 8081',
      'echo in two | nc -l -p 8082',
    ].join('; ');
    const c = await sandbox.createContainer({ id: 'net2-c', rootfs: { kind: 'block', path: freshImage('net2-c'), fstype: 'ext4' }, process: { args: ['sh', '-c', script] } });
    const out = text(c.stdout);
    const err = text(c.stderr);
    await c.start();
    c.stdin.end();
    const in1 = await fromPeer(peer, '192.0.2.2', 8081);
    const in2 = await fromPeer(peer2, '198.51.100.2', 8082);
    const status = await c.wait();
    const stdout = await out;
    assert.equal(status, 0, `${stdout}\n${await err}`);
    // /proc/net/arp: flags 0x6 is ATF_COM | ATF_PERM, a permanent entry.
    assert.match(stdout, /^192\.0\.2\.99\s+0x1\s+0x6\s+02:00:00:00:00:99\s+\S+\s+eth0$/m);
    assert.match(stdout, /^198\.51\.100\.99\s+0x1\s+0x6\s+02:00:00:00:01:99\s+\S+\s+eth1$/m);
    assert.match(stdout, /^2001:db8::99 dev eth0 lladdr 02:00:00:00:00:98 .*PERMANENT/m);
    assert.match(stdout, /eth0\s+inet 192\.0\.2\.2\/24/);
    assert.match(stdout, /eth1\s+inet 198\.51\.100\.2\/24/);
    assert.match(stdout, /peer got one/);
    assert.match(stdout, /peer got two/);
    assert.equal(in1, 'in one\n');
    assert.equal(in2, 'in two\n');
    await c.delete();

    await sandbox.stop();
    sandbox = undefined;
    assert.doesNotMatch(links(pod), /tap\d_kata/, 'the taps are removed');
    for (const dev of ['eth0', 'eth1']) assert.doesNotMatch(ingress(pod, dev), /ingress/, `the ingress qdisc of ${dev} is removed`);
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
  });

  it('fails with the fix when the namespace vanishes after its interfaces were wired, before the hypervisor starts in it, leaving no QEMU and no run directory', async () => {
    const v = createPodAndPeer('ktv');
    extraNetns.push(v.pod, v.peer);
    const validated = await loadValidatedConfig({ text: sandboxConfigText(image, BLOCK) });
    // After the network plugin's beforeVmStart (taps registered later run later).
    validated.hooks.beforeVmStart.tapPromise('test-vanish', async (ctx) => {
      assert.equal(ctx.network.devices.length, 1, 'the network was wired first');
      ip('netns', 'del', v.pod);
    });
    await assert.rejects(
      Sandbox.create(validated, { sandboxId: 'net2-vanish', runRoot: runRoot(), netns: v.podPath }),
      (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.plugin === 'network' && e.value === 'eth0' && /vanished/.test(e.message) && /start the pod again/.test(e.fix ?? ''),
    );
    assert.equal(existsSync(path.join(runRoot(), 'net2-vanish')), false);
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
    extraNetns.splice(extraNetns.indexOf(v.pod), 1);
  });

  it('fails naming the interface, with the fix, when the namespace vanishes between its scan and its taps (real ip, tc, nsenter)', async () => {
    const v = createPodAndPeer('ktw');
    extraNetns.push(v.pod, v.peer);
    const ctx: VmContext = { sandboxId: 'w', runDir: tmp.path, plan: {} as VmContext['plan'], config: {} as VmContext['config'], log: silentLogger(), network: { devices: [], interfaces: [], routes: [], neighbors: [], timings: { host: 0, guest: 0 } } };
    const ran: string[] = [];
    const run: CommandRunner = async (c) => {
      ran.push(c.input?.split(' ')[0] ?? '');
      const out = await runCommand(c);
      if (c.input?.startsWith('addr show')) ip('netns', 'del', v.pod);
      return out;
    };
    await assert.rejects(wireSandbox(ctx, v.podPath, run), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === 'eth0' && /vanished/.test(e.message) && /start the pod again/.test(e.fix ?? ''));
    assert.deepEqual(ran, ['addr', 'tuntap'], 'the tap batch failed in nsenter; no filter batch, and no teardown of taps it did not make');
    assert.deepEqual(ctx.network.devices, []);
    assert.doesNotMatch(ip('netns', 'list'), new RegExp(v.pod));
    extraNetns.splice(extraNetns.indexOf(v.pod), 1);
  });
});
