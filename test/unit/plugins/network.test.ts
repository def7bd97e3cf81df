import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../../core/paths.js';
import { loadValidatedConfig } from '../../../core/runtime.js';
import { silentLogger } from '../../../core/logger.js';
import type { KataError } from '../../../core/errors.js';
import type { VmContext } from '../../../core/vm.js';
import { failedLine, redirectsCommand, redirectArgs, scanCommand, tapArgs, tapsCommand, teardownCommands, type Command } from '../../../plugins/network/commands.js';
import { checkNetns, wireSandbox, type CommandRunner } from '../../../plugins/network/index.js';
import { SCAN_LINES, parseInterfaces, parseNeighbors, parseRoutes, parseScan } from '../../../plugins/network/scan.js';

const fixture = (name: string) => readFileSync(path.join(PACKAGE_ROOT, 'test', 'fixtures', 'network', name), 'utf8');
/** What `ip -d -json -batch -` answers to SCAN_LINES: one JSON array per line. */
const scanOutput = (addr = fixture('addr-veth.json')) => [addr, fixture('route4.json'), fixture('route6.json'), fixture('neigh.json')].map((t) => t.trim()).join('\n') + '\n';
const NETNS = '/var/run/netns/pod';

const qemu = (runtime = '') => `[hypervisor.qemu]
kernel = "/k"
initrd = "/i"
shared_fs = "none"
disable_block_device_use = true
[runtime]
${runtime}
`;

describe('network plugin', () => {
  describe('parseInterfaces', () => {
    it('reads a veth with its MAC, MTU, IPv4 and global IPv6 addresses, and skips lo and link-local addresses', () => {
      assert.deepEqual(parseInterfaces(fixture('addr-veth.json')), [
        {
          name: 'eth0',
          mac: 'd2:b6:47:44:96:b5',
          mtu: 1500,
          kind: 'veth',
          addresses: [
            { family: 'v4', address: '192.0.2.2', prefixLength: 24 },
            { family: 'v6', address: '2001:db8::2', prefixLength: 64 },
          ],
        },
      ]);
    });

    it('skips taps, so that a namespace scanned twice does not mirror its own taps', () => {
      const links = JSON.parse(fixture('addr-veth.json')) as object[];
      links.push({ ifname: 'tap0_kata', link_type: 'ether', address: '02:00:00:00:00:01', mtu: 1500, linkinfo: { info_kind: 'tun' }, addr_info: [] });
      assert.deepEqual(parseInterfaces(JSON.stringify(links)).map((i) => i.name), ['eth0']);
    });

    it('refuses an interface name that could be read as an option', () => {
      const links = [{ ifname: '-evil', link_type: 'ether', address: '02:00:00:00:00:01', mtu: 1500, addr_info: [] }];
      assert.throws(() => parseInterfaces(JSON.stringify(links)), /not a Linux interface name/);
    });

    it('answers no interface for a namespace with only lo', () => {
      const links = (JSON.parse(fixture('addr-veth.json')) as { ifname: string }[]).filter((l) => l.ifname === 'lo');
      assert.deepEqual(parseInterfaces(JSON.stringify(links)), []);
    });
  });

  describe('parseRoutes', () => {
    it('keeps the default route and the link routes of mirrored devices, link routes first', () => {
      assert.deepEqual(parseRoutes(fixture('route4.json'), 'v4', new Set(['eth0'])), [
        { family: 'v4', dest: '192.0.2.0/24', gateway: '', device: 'eth0', source: '192.0.2.2', scope: 253 },
        { family: 'v4', dest: '', gateway: '192.0.2.1', device: 'eth0', source: '', scope: 0 },
      ]);
    });

    it('leaves IPv6 link-local routes to the guest kernel', () => {
      assert.deepEqual(parseRoutes(fixture('route6.json'), 'v6', new Set(['eth0'])), [{ family: 'v6', dest: '2001:db8::/64', gateway: '', device: 'eth0', source: '', scope: 0 }]);
    });

    it("keeps only the main table's routes when every table is listed", () => {
      const routes = [
        { type: 'unicast', dst: 'default', gateway: '192.0.2.1', dev: 'eth0', table: 'main' },
        { type: 'local', dst: '192.0.2.2', dev: 'eth0', table: 'local' },
        { type: 'unicast', dst: '198.51.100.0/24', dev: 'eth0', table: '100' },
      ];
      assert.deepEqual(parseRoutes(JSON.stringify(routes), 'v4', new Set(['eth0'])).map((r) => r.gateway), ['192.0.2.1']);
    });

    it('drops routes through devices that are not mirrored, and malformed prefixes', () => {
      const routes = [
        { dst: '198.51.100.0/24', dev: 'tap0_kata', scope: 'link' },
        { dst: '198.51.100.0/33', dev: 'eth0' },
        { dst: '198.51.100.0/24', gateway: 'eth0; reboot', dev: 'eth0' },
      ];
      assert.deepEqual(parseRoutes(JSON.stringify(routes), 'v4', new Set(['eth0'])), []);
    });
  });

  describe('parseNeighbors', () => {
    it('reads the permanent neighbours of mirrored interfaces, both families, with the router flag', () => {
      assert.deepEqual(parseNeighbors(fixture('neigh.json'), new Set(['eth0'])), [
        { family: 'v4', address: '192.0.2.9', device: 'eth0', mac: '02:00:00:00:00:09', router: false },
        { family: 'v6', address: '2001:db8::1', device: 'eth0', mac: '02:00:00:00:00:01', router: true },
      ]);
    });

    it('leaves out entries that are not permanent, lack a MAC or carry a malformed address', () => {
      const neigh = [
        { dst: '192.0.2.3', dev: 'eth0', lladdr: '02:00:00:00:00:03', state: ['REACHABLE'] },
        { dst: '192.0.2.4', dev: 'eth0', state: ['PERMANENT'] },
        { dst: '192.0.2.5 lladdr', dev: 'eth0', lladdr: '02:00:00:00:00:05', state: ['PERMANENT'] },
        { dst: 'fe80::1%eth0', dev: 'eth0', lladdr: '02:00:00:00:00:06', state: ['PERMANENT'] },
        { dst: '192.0.2.7', dev: 'eth0', lladdr: '02:00:00:00:00:07;x', state: ['PERMANENT'] },
      ];
      assert.deepEqual(parseNeighbors(JSON.stringify(neigh), new Set(['eth0'])), []);
    });
  });

  describe('parseScan', () => {
    it('splits the one batch answer into interfaces, routes of both families and neighbours', () => {
      const pod = parseScan(scanOutput());
      assert.deepEqual(pod.interfaces.map((i) => i.name), ['eth0']);
      assert.deepEqual(pod.routes.map((r) => `${r.family} ${r.dest}`), ['v4 192.0.2.0/24', 'v4 ', 'v6 2001:db8::/64']);
      assert.deepEqual(pod.neighbors.map((n) => n.address), ['192.0.2.9', '2001:db8::1']);
    });

    it('refuses an answer with a missing part', () => {
      assert.throws(() => parseScan(scanOutput().split('\n').slice(1).join('\n')), /expected 4 JSON answers/);
    });
  });

  describe('commands', () => {
    it('reads the namespace with one ip -d -json -batch through nsenter, argv only', () => {
      const c = scanCommand(NETNS);
      assert.deepEqual(c.args, [`--net=${NETNS}`, '--', 'ip', '-d', '-json', '-batch', '-']);
      assert.deepEqual(c.input?.split('\n'), [...SCAN_LINES, '']);
      assert.ok(c.input?.includes('neigh show nud permanent'));
    });

    it('makes every tap and brings it up with its interface MTU, as one ip -batch in the namespace', () => {
      assert.deepEqual(tapArgs('tap0_kata', 1400), [
        ['tuntap', 'add', 'dev', 'tap0_kata', 'mode', 'tap'],
        ['link', 'set', 'dev', 'tap0_kata', 'mtu', '1400', 'up'],
      ]);
      const c = tapsCommand(NETNS, [
        { tap: 'tap0_kata', mtu: 1400 },
        { tap: 'tap1_kata', mtu: 9000 },
      ]);
      assert.deepEqual(c.args, [`--net=${NETNS}`, '--', 'ip', '-batch', '-']);
      assert.deepEqual(c.input?.split('\n'), ['tuntap add dev tap0_kata mode tap', 'link set dev tap0_kata mtu 1400 up', 'tuntap add dev tap1_kata mode tap', 'link set dev tap1_kata mtu 9000 up', '']);
    });

    it('reads the failing line of a batch from its stderr', () => {
      assert.equal(failedLine('ioctl(TUNSETIFF): Device or resource busy\nCommand failed -:3'), 3);
      assert.equal(failedLine('nsenter: cannot open /var/run/netns/x: No such file or directory'), undefined);
    });

    it('redirects both ways with an ingress qdisc and a mirred filter on each side', () => {
      const filter = (from: string, to: string) => ['filter', 'add', 'dev', from, 'parent', 'ffff:', 'protocol', 'all', 'u32', 'match', 'u32', '0', '0', 'action', 'mirred', 'egress', 'redirect', 'dev', to];
      assert.deepEqual(redirectArgs('eth0', 'tap0_kata'), [
        ['qdisc', 'add', 'dev', 'eth0', 'handle', 'ffff:', 'ingress'],
        filter('eth0', 'tap0_kata'),
        ['qdisc', 'add', 'dev', 'tap0_kata', 'handle', 'ffff:', 'ingress'],
        filter('tap0_kata', 'eth0'),
      ]);
    });

    it('runs the tc commands of every interface as one tc -batch in the namespace, one line each', () => {
      const c = redirectsCommand(NETNS, [
        { iface: 'eth0', tap: 'tap0_kata' },
        { iface: 'eth1', tap: 'tap1_kata' },
      ]);
      assert.deepEqual(c.args, [`--net=${NETNS}`, '--', 'tc', '-batch', '-']);
      assert.deepEqual(c.input?.split('\n'), [...redirectArgs('eth0', 'tap0_kata'), ...redirectArgs('eth1', 'tap1_kata')].map((a) => a.join(' ')).concat(''));
    });

    it('deletes only the ingress qdiscs that are ours', () => {
      const cmds = teardownCommands(NETNS, [
        { iface: 'eth0', tap: 'tap0_kata', ingress: true },
        { iface: 'eth1', tap: 'tap1_kata', ingress: false },
      ]);
      assert.deepEqual(cmds.map((c) => c.input), ['qdisc del dev eth0 ingress\n', 'link del dev tap0_kata\nlink del dev tap1_kata\n']);
      assert.deepEqual(teardownCommands(NETNS, [{ iface: 'eth0', tap: 'tap0_kata', ingress: false }]).map((c) => c.args[2]), ['ip']);
    });

    it('undoes the pod side qdiscs and deletes the taps, one forced batch each', () => {
      const cmds = teardownCommands(NETNS, [
        { iface: 'eth0', tap: 'tap0_kata' },
        { iface: 'eth1', tap: 'tap1_kata' },
      ]);
      assert.deepEqual(
        cmds.map((c) => c.args.slice(2)),
        [
          ['tc', '-force', '-batch', '-'],
          ['ip', '-force', '-batch', '-'],
        ],
      );
      assert.deepEqual(
        cmds.map((c) => c.input),
        ['qdisc del dev eth0 ingress\nqdisc del dev eth1 ingress\n', 'link del dev tap0_kata\nlink del dev tap1_kata\n'],
      );
      assert.deepEqual(teardownCommands(NETNS, []), []);
    });

    it('refuses a name that is not an interface name', () => {
      assert.throws(() => tapsCommand(NETNS, [{ tap: '--help', mtu: 1500 }]), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === '--help');
      assert.throws(() => teardownCommands(NETNS, [{ iface: 'eth0\nlink del dev eth1', tap: 'tap0_kata' }]), (e: KataError) => e.code === 'KATA_ERR_NETWORK');
    });
  });

  describe('checkNetns', () => {
    it('refuses a relative path', async () => {
      await assert.rejects(checkNetns('run/netns/x'), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.plugin === 'network');
    });

    it('refuses a path that does not exist', async () => {
      await assert.rejects(checkNetns('/nonexistent/netns'), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === '/nonexistent/netns');
    });

    it('refuses a file that is not a network namespace', async () => {
      await assert.rejects(checkNetns('/etc/hostname'), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && /not a network namespace/.test(e.message));
    });

    it("refuses the host's own network namespace: its traffic would be redirected into the VM", async () => {
      for (const host of ['/proc/self/ns/net']) {
        await assert.rejects(checkNetns(host), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === host && /host's network namespace/.test(e.message));
      }
    });
  });

  describe('wireSandbox', () => {
    const ctx = (): VmContext => ({ sandboxId: 's', runDir: '/tmp/x', plan: {} as VmContext['plan'], config: {} as VmContext['config'], log: silentLogger(), network: { devices: [], interfaces: [], routes: [], neighbors: [], timings: { host: 0, guest: 0 } } });
    /** A stand-in for ip and tc: scan answers from the fixtures, `fail` makes the matching command fail. */
    const runner = (fail?: (c: Command) => boolean, stderr = 'RTNETLINK answers: File exists') => {
      const ran: string[][] = [];
      const run: CommandRunner = async (c) => {
        ran.push([...c.args.slice(2), ...(c.input ? [c.input] : [])]);
        if (fail?.(c)) throw Object.assign(new Error('command failed'), { stderr });
        if (c.input?.startsWith('addr show')) return scanOutput(addr);
        return '';
      };
      return { run, ran };
    };
    let addr = fixture('addr-veth.json');
    /** The fixture's eth0 and a second veth, eth1. */
    const twoInterfaces = () => {
      const links = JSON.parse(fixture('addr-veth.json')) as { ifname: string; address: string }[];
      const eth0 = links.find((l) => l.ifname === 'eth0')!;
      return JSON.stringify([...links, { ...eth0, ifname: 'eth1', address: '02:00:00:00:01:01', addr_info: [] }]);
    };
    afterEach(() => (addr = fixture('addr-veth.json')));

    it('adds a net intent, the interface, its routes and its permanent neighbours for the guest, in three process starts', async () => {
      const c = ctx();
      const { run, ran } = runner();
      await wireSandbox(c, NETNS, run, async () => undefined);
      assert.deepEqual(c.network.devices, [{ kind: 'net', id: 'net0', tap: 'tap0_kata', mac: 'd2:b6:47:44:96:b5', mtu: 1500 }]);
      assert.deepEqual(c.network.interfaces.map((i) => i.name), ['eth0']);
      assert.deepEqual(c.network.routes.map((r) => r.dest), ['192.0.2.0/24', '', '2001:db8::/64']);
      assert.deepEqual(c.network.neighbors.map((n) => `${n.address} ${n.mac} ${n.router}`), ['192.0.2.9 02:00:00:00:00:09 false', '2001:db8::1 02:00:00:00:00:01 true']);
      assert.equal(ran.length, 3);
    });

    it('wires two interfaces with the same three process starts', async () => {
      addr = twoInterfaces();
      const c = ctx();
      const { run, ran } = runner();
      await wireSandbox(c, NETNS, run, async () => undefined);
      assert.deepEqual(c.network.devices.map((d) => `${d.id} ${d.tap} ${d.mac}`), ['net0 tap0_kata d2:b6:47:44:96:b5', 'net1 tap1_kata 02:00:00:00:01:01']);
      assert.equal(ran.length, 3);
      assert.match(ran[2]!.at(-1)!, /redirect dev tap1_kata/);
    });

    it('fails with a coded error naming the interface when its tap cannot be wired, and leaves nothing', async () => {
      const c = ctx();
      const { run, ran } = runner((cmd) => cmd.args.includes('tc') && cmd.args.includes('-batch') && !cmd.args.includes('-force'), 'Error: Specified action not found.\nCommand failed -:2');
      await assert.rejects(wireSandbox(c, NETNS, run, async () => undefined), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === 'eth0' && e.plugin === 'network' && e.fix !== undefined);
      assert.deepEqual(ran.slice(-2), [
        ['tc', '-force', '-batch', '-', 'qdisc del dev eth0 ingress\n'],
        ['ip', '-force', '-batch', '-', 'link del dev tap0_kata\n'],
      ]);
      assert.deepEqual(c.network.devices, []);
      assert.deepEqual(c.network.neighbors, []);
    });

    it("names the second interface when its filter line fails, removes both taps and the first interface's ingress qdisc, and keeps the second's (not ours)", async () => {
      addr = twoInterfaces();
      const { run, ran } = runner((cmd) => cmd.args.includes('tc') && !cmd.args.includes('-force'), 'Error: Exclusivity flag on, cannot modify.\nCommand failed -:5');
      await assert.rejects(
        wireSandbox(ctx(), NETNS, run, async () => undefined),
        (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === 'eth1' && /tc qdisc del dev eth1 ingress/.test(e.fix ?? ''),
      );
      assert.deepEqual(ran.slice(-2), [
        ['tc', '-force', '-batch', '-', 'qdisc del dev eth0 ingress\n'],
        ['ip', '-force', '-batch', '-', 'link del dev tap0_kata\nlink del dev tap1_kata\n'],
      ]);
    });

    it('leaves an ingress qdisc it could not add (someone else\'s) on the pod interface', async () => {
      const { run, ran } = runner((cmd) => cmd.args.includes('tc') && !cmd.args.includes('-force'), 'Error: Exclusivity flag on, cannot modify.\nCommand failed -:1');
      await assert.rejects(wireSandbox(ctx(), NETNS, run, async () => undefined), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === 'eth0');
      assert.deepEqual(ran.slice(-1), [['ip', '-force', '-batch', '-', 'link del dev tap0_kata\n']]);
      assert.ok(!ran.some((a) => a.at(-1)?.includes('qdisc del')));
    });

    it('says the namespace vanished, with the fix, when it is gone after a failed step', async () => {
      let checks = 0;
      const gone = async () => {
        if (++checks > 1) throw new Error('ENOENT');
      };
      const { run } = runner((cmd) => cmd.args.includes('ip') && cmd.input?.startsWith('tuntap') === true, 'nsenter: cannot open /var/run/netns/pod: No such file or directory');
      await assert.rejects(wireSandbox(ctx(), NETNS, run, gone), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === 'eth0' && /vanished/.test(e.message) && /start the pod again/.test(e.fix ?? ''));
    });
  });

  describe('wireSandbox, a tap that fails in its ip -batch', () => {
    const ctx = (): VmContext => ({ sandboxId: 's', runDir: '/tmp/x', plan: {} as VmContext['plan'], config: {} as VmContext['config'], log: silentLogger(), network: { devices: [], interfaces: [], routes: [], neighbors: [], timings: { host: 0, guest: 0 } } });
    const wireFailing = async (stderr: string) => {
      const ran: string[][] = [];
      const run: CommandRunner = async (c) => {
        ran.push([...c.args.slice(2), ...(c.input ? [c.input] : [])]);
        if (c.input?.startsWith('tuntap')) throw Object.assign(new Error('command failed'), { stderr });
        if (c.input?.startsWith('addr show')) return scanOutput();
        return '';
      };
      let error: KataError | undefined;
      await assert.rejects(wireSandbox(ctx(), NETNS, run, async () => undefined), (e: KataError) => ((error = e), e.code === 'KATA_ERR_NETWORK' && e.value === 'eth0' && e.plugin === 'network'));
      return { deleted: ran.filter((a) => a.includes('-force')), error: error! };
    };

    it("does not delete a tap it could not add (one of that name may be another sandbox's), and says how to free the name", async () => {
      const { deleted, error } = await wireFailing('ioctl(TUNSETIFF): Device or resource busy\nCommand failed -:1');
      assert.deepEqual(deleted, []);
      assert.match(error.fix ?? '', /ip link del tap0_kata/);
    });

    it('deletes the tap it added when bringing it up fails, and no qdisc (none was added)', async () => {
      assert.deepEqual((await wireFailing('Error: mtu greater than device maximum.\nCommand failed -:2')).deleted, [['ip', '-force', '-batch', '-', 'link del dev tap0_kata\n']]);
    });
  });

  describe('configuration', () => {
    it('applies by default and requires the hypervisor to render net devices', async () => {
      const v = await loadValidatedConfig({ text: qemu() });
      assert.ok(v.plugins.some((p) => p.manifest.name === 'network'));
    });

    for (const runtime of ['internetworking_model = "none"', 'internetworking_model = "none"\ndisable_new_netns = true']) {
      it(`does not apply with ${runtime.replace('\n', ', ')}`, async () => {
        const v = await loadValidatedConfig({ text: qemu(runtime) });
        assert.ok(!v.plugins.some((p) => p.manifest.name === 'network'));
      });
    }

    it('refuses the macvtap model in the validated config phase with a fix', async () => {
      await assert.rejects(loadValidatedConfig({ text: qemu('internetworking_model = "macvtap"') }), (e: { problems: { plugin?: string; key: string; code: string; fix: string }[] }) =>
        e.problems.some((p) => p.plugin === 'network' && p.key === 'runtime.internetworking_model' && p.code === 'KATA_ERR_NETWORK_MODEL' && p.fix.length > 0),
      );
    });
  });
});
