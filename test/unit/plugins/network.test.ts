import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../../core/paths.js';
import { loadValidatedConfig } from '../../../core/runtime.js';
import { silentLogger } from '../../../core/logger.js';
import type { KataError } from '../../../core/errors.js';
import type { VmContext } from '../../../core/vm.js';
import { redirectCommand, redirectArgs, scanCommands, tapArgs, tapCommand, teardownCommands, type Command } from '../../../plugins/network/commands.js';
import { checkNetns, wireSandbox, type CommandRunner } from '../../../plugins/network/index.js';
import { parseInterfaces, parseRoutes } from '../../../plugins/network/scan.js';

const fixture = (name: string) => readFileSync(path.join(PACKAGE_ROOT, 'test', 'fixtures', 'network', name), 'utf8');
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

    it('drops routes through devices that are not mirrored, and malformed prefixes', () => {
      const routes = [
        { dst: '198.51.100.0/24', dev: 'tap0_kata', scope: 'link' },
        { dst: '198.51.100.0/33', dev: 'eth0' },
        { dst: '198.51.100.0/24', gateway: 'eth0; reboot', dev: 'eth0' },
      ];
      assert.deepEqual(parseRoutes(JSON.stringify(routes), 'v4', new Set(['eth0'])), []);
    });
  });

  describe('commands', () => {
    it('reads the namespace with ip -json through nsenter, argv only', () => {
      assert.deepEqual(scanCommands(NETNS).addresses, { binary: 'nsenter', args: [`--net=${NETNS}`, '--', 'ip', '-d', '-json', 'addr', 'show'] });
    });

    it('makes the tap and brings it up with the interface MTU, as one ip -batch in the namespace', () => {
      assert.deepEqual(tapArgs('tap0_kata', 1400), [
        ['tuntap', 'add', 'dev', 'tap0_kata', 'mode', 'tap'],
        ['link', 'set', 'dev', 'tap0_kata', 'mtu', '1400', 'up'],
      ]);
      const c = tapCommand(NETNS, 'tap0_kata', 1400);
      assert.deepEqual(c.args, [`--net=${NETNS}`, '--', 'ip', '-batch', '-']);
      assert.deepEqual(c.input?.split('\n'), ['tuntap add dev tap0_kata mode tap', 'link set dev tap0_kata mtu 1400 up', '']);
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

    it('runs the four tc commands as one tc -batch in the namespace, one line each', () => {
      const c = redirectCommand(NETNS, 'eth0', 'tap0_kata');
      assert.deepEqual(c.args, [`--net=${NETNS}`, '--', 'tc', '-batch', '-']);
      assert.deepEqual(c.input?.split('\n'), [...redirectArgs('eth0', 'tap0_kata').map((a) => a.join(' ')), '']);
    });

    it('undoes the pod side qdisc and deletes the tap', () => {
      assert.deepEqual(
        teardownCommands(NETNS, 'eth0', 'tap0_kata').map((c) => c.args.slice(2)),
        [
          ['tc', 'qdisc', 'del', 'dev', 'eth0', 'ingress'],
          ['ip', 'link', 'del', 'dev', 'tap0_kata'],
        ],
      );
    });

    it('refuses a name that is not an interface name', () => {
      assert.throws(() => tapCommand(NETNS, '--help', 1500), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === '--help');
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
    const ctx = (): VmContext => ({ sandboxId: 's', runDir: '/tmp/x', plan: {} as VmContext['plan'], config: {} as VmContext['config'], log: silentLogger(), network: { devices: [], interfaces: [], routes: [], timings: { host: 0, guest: 0 } } });
    /** A stand-in for ip and tc: scan answers from the fixtures, `fail` makes the matching command fail. */
    const runner = (fail?: (c: Command) => boolean, stderr = 'RTNETLINK answers: File exists') => {
      const ran: string[][] = [];
      const run: CommandRunner = async (c) => {
        ran.push(c.args.slice(2));
        if (fail?.(c)) throw Object.assign(new Error('command failed'), { stderr });
        const a = c.args.join(' ');
        if (a.includes('addr show')) return fixture('addr-veth.json');
        if (a.includes('-4 -json route')) return fixture('route4.json');
        if (a.includes('-6 -json route')) return fixture('route6.json');
        return '';
      };
      return { run, ran };
    };

    it('adds a net intent, the interface and its routes for the guest', async () => {
      const c = ctx();
      const { run } = runner();
      await wireSandbox(c, NETNS, run, async () => undefined);
      assert.deepEqual(c.network.devices, [{ kind: 'net', id: 'net0', tap: 'tap0_kata', mac: 'd2:b6:47:44:96:b5', mtu: 1500 }]);
      assert.deepEqual(c.network.interfaces.map((i) => i.name), ['eth0']);
      assert.deepEqual(c.network.routes.map((r) => r.dest), ['192.0.2.0/24', '', '2001:db8::/64']);
    });

    it('fails with a coded error naming the interface when its tap cannot be wired, and leaves nothing', async () => {
      const c = ctx();
      const { run, ran } = runner((cmd) => cmd.args.includes('tc') && cmd.args.includes('-batch'));
      await assert.rejects(wireSandbox(c, NETNS, run, async () => undefined), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === 'eth0' && e.plugin === 'network');
      assert.deepEqual(ran.slice(-2), [
        ['tc', 'qdisc', 'del', 'dev', 'eth0', 'ingress'],
        ['ip', 'link', 'del', 'dev', 'tap0_kata'],
      ]);
      assert.deepEqual(c.network.devices, []);
    });
  });

  describe('wireSandbox, a tap that fails in its ip -batch', () => {
    const ctx = (): VmContext => ({ sandboxId: 's', runDir: '/tmp/x', plan: {} as VmContext['plan'], config: {} as VmContext['config'], log: silentLogger(), network: { devices: [], interfaces: [], routes: [], timings: { host: 0, guest: 0 } } });
    const wireFailing = async (stderr: string) => {
      const ran: string[][] = [];
      const run: CommandRunner = async (c) => {
        ran.push(c.args.slice(2));
        if (c.args.includes('ip') && c.args.includes('-batch')) throw Object.assign(new Error('command failed'), { stderr });
        const a = c.args.join(' ');
        if (a.includes('addr show')) return fixture('addr-veth.json');
        if (a.includes('-4 -json route')) return fixture('route4.json');
        if (a.includes('-6 -json route')) return fixture('route6.json');
        return '';
      };
      await assert.rejects(wireSandbox(ctx(), NETNS, run, async () => undefined), (e: KataError) => e.code === 'KATA_ERR_NETWORK' && e.value === 'eth0' && e.plugin === 'network');
      return ran.filter((a) => a.includes('del'));
    };

    it('does not delete a tap it could not add (one of that name may be another sandbox\'s)', async () => {
      assert.deepEqual(await wireFailing('ioctl(TUNSETIFF): Device or resource busy\nCommand failed -:1'), []);
    });

    it('deletes the tap it added when bringing it up fails', async () => {
      assert.deepEqual(await wireFailing('Error: mtu greater than device maximum.\nCommand failed -:2'), [
        ['tc', 'qdisc', 'del', 'dev', 'eth0', 'ingress'],
        ['ip', 'link', 'del', 'dev', 'tap0_kata'],
      ]);
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
