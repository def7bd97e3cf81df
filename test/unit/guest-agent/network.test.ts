import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { GuestNetwork, MAX_NEIGHBORS, addressArg, neighborArgs, parseAddrLines, parseRouteLines, routeArgs } from '../../../guest/agent/network.js';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import type { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { ARPNeighbor, IPFamily, type Interface } from '../../../wire/agent/proto.gen.js';
import { TempDir } from '../../helpers/tmp.js';

const invalid = (e: TtrpcError) => e.code === GrpcCode.INVALID_ARGUMENT;

function iface(over: Partial<Interface> = {}): Interface {
  return {
    device: 'eth0',
    name: 'eth0',
    IPAddresses: [{ family: IPFamily.v4, address: '192.0.2.2', mask: '24' }],
    mtu: 1400n,
    hwAddr: '02:42:C0:00:02:02',
    devicePath: '',
    type: '',
    rawFlags: 0,
    ...over,
  };
}

describe('guest network', () => {
  describe('addressArg', () => {
    it('writes address/prefix for both families', () => {
      assert.equal(addressArg({ family: IPFamily.v4, address: '192.0.2.2', mask: '24' }), '192.0.2.2/24');
      assert.equal(addressArg({ family: IPFamily.v6, address: '2001:db8::2', mask: '64' }), '2001:db8::2/64');
    });

    it('refuses an address of the other family, a prefix out of range and an option', () => {
      assert.throws(() => addressArg({ family: IPFamily.v6, address: '192.0.2.2', mask: '24' }), invalid);
      assert.throws(() => addressArg({ family: IPFamily.v4, address: '192.0.2.2', mask: '33' }), invalid);
      assert.throws(() => addressArg({ family: IPFamily.v4, address: '-h', mask: '24' }), invalid);
    });
  });

  describe('routeArgs', () => {
    it('builds ip route replace for a default route, a link route and an IPv6 prefix', () => {
      assert.deepEqual(routeArgs({ family: IPFamily.v4, dest: '', gateway: '192.0.2.1', device: 'eth0' }), ['route', 'replace', 'default', 'via', '192.0.2.1', 'dev', 'eth0']);
      assert.deepEqual(routeArgs({ family: IPFamily.v4, dest: '192.0.2.0/24', device: 'eth0', source: '192.0.2.2', scope: 253 }), ['route', 'replace', '192.0.2.0/24', 'dev', 'eth0', 'src', '192.0.2.2', 'scope', 'link']);
      assert.deepEqual(routeArgs({ family: IPFamily.v6, dest: '2001:db8::/64', device: 'eth0' }), ['-6', 'route', 'replace', '2001:db8::/64', 'dev', 'eth0']);
    });

    it('refuses a device that could be read as an option, and a gateway that is not an address', () => {
      assert.throws(() => routeArgs({ family: IPFamily.v4, dest: '', gateway: '192.0.2.1', device: '-all' }), invalid);
      assert.throws(() => routeArgs({ family: IPFamily.v4, dest: '', gateway: 'eth0', device: 'eth0' }), invalid);
      assert.throws(() => routeArgs({ family: IPFamily.v4, dest: '192.0.2.0/24;x', device: 'eth0' }), invalid);
    });
  });

  describe('neighborArgs', () => {
    const neigh = (over: Partial<ARPNeighbor> = {}): ARPNeighbor => ({ toIPAddress: { family: IPFamily.v4, address: '192.0.2.9', mask: '' }, device: 'eth0', lladdr: '02:00:00:00:00:09', state: 0x80, flags: 0, ...over });

    it('builds ip neigh replace with nud permanent for both families, and router for NTF_ROUTER', () => {
      assert.deepEqual(neighborArgs(neigh()), ['neigh', 'replace', '192.0.2.9', 'lladdr', '02:00:00:00:00:09', 'dev', 'eth0', 'nud', 'permanent']);
      assert.deepEqual(neighborArgs(neigh({ toIPAddress: { family: IPFamily.v6, address: '2001:db8::1', mask: '' }, lladdr: '02:00:00:00:00:0A', flags: 0x80 })), [
        'neigh', 'replace', '2001:db8::1', 'lladdr', '02:00:00:00:00:0a', 'dev', 'eth0', 'nud', 'permanent', 'router',
      ]);
      assert.deepEqual(neighborArgs(neigh({ state: 0 })).slice(-2), ['nud', 'permanent']);
      assert.deepEqual(neighborArgs(neigh({ state: 0x40 })).slice(-2), ['nud', 'noarp']);
    });

    it('refuses hostile or malformed values: a second command, an option, a zone, the other family, an unknown state or flag', () => {
      const bad: Partial<ARPNeighbor>[] = [
        { toIPAddress: undefined },
        { toIPAddress: { family: IPFamily.v4, address: '192.0.2.9\nlink del eth0', mask: '' } },
        { toIPAddress: { family: IPFamily.v4, address: '-force', mask: '' } },
        { toIPAddress: { family: IPFamily.v6, address: '192.0.2.9', mask: '' } },
        { toIPAddress: { family: IPFamily.v6, address: 'fe80::1%eth0', mask: '' } },
        { toIPAddress: { family: IPFamily.v4, address: '0.0.0.0', mask: '' } },
        { toIPAddress: { family: IPFamily.v6, address: '::', mask: '' } },
        { toIPAddress: { family: 7, address: '192.0.2.9', mask: '' } },
        { device: 'eth0 nud noarp' },
        { device: '-all' },
        { device: '' },
        { lladdr: '' },
        { lladdr: '02:00:00:00:00:09 router' },
        { lladdr: '02:00:00:00:00' },
        { state: 0x20 },
        { state: -1 },
        { flags: 0x08 },
      ];
      for (const b of bad) assert.throws(() => neighborArgs(neigh(b)), invalid, JSON.stringify(b));
    });
  });

  describe('parsers of busybox ip output', () => {
    it('reads addresses from ip -o addr show', () => {
      const text = [
        '1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever',
        '2: eth0    inet 192.0.2.2/24 scope global eth0\\       valid_lft forever preferred_lft forever',
        '2: eth0    inet6 2001:db8::2/64 scope global flags 02 \\       valid_lft forever preferred_lft forever',
      ].join('\n');
      assert.deepEqual(parseAddrLines(text).get('eth0'), [
        { family: IPFamily.v4, address: '192.0.2.2', mask: '24' },
        { family: IPFamily.v6, address: '2001:db8::2', mask: '64' },
      ]);
    });

    it('reads routes from ip route show, without multicast', () => {
      const v4 = parseRouteLines('default via 192.0.2.1 dev eth0 \n192.0.2.0/24 dev eth0 scope link  src 192.0.2.2 \n', 'v4');
      assert.deepEqual(
        v4.map((r) => [r.dest, r.gateway, r.device, r.source, r.scope]),
        [
          ['', '192.0.2.1', 'eth0', '', 0],
          ['192.0.2.0/24', '', 'eth0', '192.0.2.2', 253],
        ],
      );
      assert.deepEqual(parseRouteLines('multicast ff00::/8 dev eth0  metric 256 \n', 'v6'), []);
    });
  });

  describe('GuestNetwork', () => {
    let tmp: TempDir;
    let sys: string;
    beforeEach(() => {
      tmp = new TempDir();
      sys = tmp.path;
      for (const [name, mac] of [['lo', '00:00:00:00:00:00'], ['eth1', '02:42:c0:00:02:02']]) {
        mkdirSync(path.join(sys, name as string));
        writeFileSync(path.join(sys, name as string, 'address'), `${mac}\n`);
      }
    });
    afterEach(() => tmp.cleanup());

    it('finds the link by MAC and gives it the name, MTU and addresses, then brings it up', async () => {
      const ran: string[][] = [];
      const net = new GuestNetwork(async (args) => (ran.push([...args]), ''), sys);
      await net.updateInterface(iface());
      assert.deepEqual(ran, [
        ['link', 'set', 'dev', 'eth1', 'down'],
        ['link', 'set', 'dev', 'eth1', 'name', 'eth0'],
        ['link', 'set', 'dev', 'eth0', 'mtu', '1400'],
        ['addr', 'flush', 'dev', 'eth0'],
        ['addr', 'add', '192.0.2.2/24', 'dev', 'eth0'],
        ['link', 'set', 'dev', 'eth0', 'up'],
      ]);
    });

    it('moves aside another device that holds the name, so that two pod interfaces can swap names', async () => {
      mkdirSync(path.join(sys, 'eth0'));
      writeFileSync(path.join(sys, 'eth0', 'address'), '02:42:c0:00:02:03\n');
      const ran: string[][] = [];
      const net = new GuestNetwork(async (args) => (ran.push([...args]), ''), sys);
      await net.updateInterface(iface());
      assert.deepEqual(ran.slice(0, 4), [
        ['link', 'set', 'dev', 'eth1', 'down'],
        ['link', 'set', 'dev', 'eth0', 'down'],
        ['link', 'set', 'dev', 'eth0', 'name', 'kata_tmp1'],
        ['link', 'set', 'dev', 'eth1', 'name', 'eth0'],
      ]);
    });

    it('refuses a bad request before running anything', async () => {
      const ran: string[][] = [];
      const net = new GuestNetwork(async (args) => (ran.push([...args]), ''), sys);
      await assert.rejects(net.updateInterface(iface({ name: '-x' })), invalid);
      await assert.rejects(net.updateInterface(iface({ hwAddr: 'zz' })), invalid);
      await assert.rejects(net.updateInterface(iface({ mtu: 10n })), invalid);
      assert.deepEqual(ran, []);
    });

    it('adds every neighbour with one iproute2 ip -batch, after checking all of them and their devices', async () => {
      mkdirSync(path.join(sys, 'eth0'));
      writeFileSync(path.join(sys, 'eth0', 'address'), '02:42:c0:00:02:03\n');
      const batches: string[] = [];
      const net = new GuestNetwork(async () => '', sys, async (input) => void batches.push(input));
      const n = (address: string, family: number = IPFamily.v4): ARPNeighbor => ({ toIPAddress: { family, address, mask: '' }, device: 'eth0', lladdr: '02:00:00:00:00:09', state: 0x80, flags: 0 });
      await net.addArpNeighbors([n('192.0.2.9'), n('2001:db8::9', IPFamily.v6)]);
      assert.deepEqual(batches, ['neigh replace 192.0.2.9 lladdr 02:00:00:00:00:09 dev eth0 nud permanent\nneigh replace 2001:db8::9 lladdr 02:00:00:00:00:09 dev eth0 nud permanent\n']);

      await net.addArpNeighbors([]);
      await assert.rejects(net.addArpNeighbors([n('192.0.2.9'), { ...n('192.0.2.10'), device: 'eth7' }]), (e: TtrpcError) => e.code === GrpcCode.NOT_FOUND && /eth7/.test(e.message));
      await assert.rejects(net.addArpNeighbors([n('192.0.2.9'), { ...n('192.0.2.10'), lladdr: 'x' }]), invalid);
      await assert.rejects(net.addArpNeighbors(Array.from({ length: MAX_NEIGHBORS + 1 }, () => n('192.0.2.9'))), invalid);
      assert.equal(batches.length, 1, 'nothing is run for a request with a bad neighbour');
    });

    it('answers INTERNAL with ip\'s message when the batch fails', async () => {
      mkdirSync(path.join(sys, 'eth0'));
      writeFileSync(path.join(sys, 'eth0', 'address'), '02:42:c0:00:02:03\n');
      const net = new GuestNetwork(async () => '', sys, async () => {
        throw new Error('RTNETLINK answers: Invalid argument Command failed -:1');
      });
      await assert.rejects(net.addArpNeighbors([{ toIPAddress: { family: IPFamily.v4, address: '192.0.2.9', mask: '' }, device: 'eth0', lladdr: '02:00:00:00:00:09', state: 0x80, flags: 0 }]), (e: TtrpcError) => e.code === GrpcCode.INTERNAL && /Invalid argument/.test(e.message));
    });

    it('adds link routes before gateway routes and flushes the IPv4 routes of their devices first', async () => {
      const ran: string[][] = [];
      const net = new GuestNetwork(async (args) => (ran.push([...args]), ''), sys);
      await net.updateRoutes([
        { family: IPFamily.v4, dest: '', gateway: '192.0.2.1', device: 'eth0', source: '', scope: 0, flags: 0 },
        { family: IPFamily.v4, dest: '192.0.2.0/24', gateway: '', device: 'eth0', source: '', scope: 253, flags: 0 },
      ]);
      assert.deepEqual(ran.slice(0, 3), [
        ['route', 'flush', 'dev', 'eth0'],
        ['route', 'replace', '192.0.2.0/24', 'dev', 'eth0', 'scope', 'link'],
        ['route', 'replace', 'default', 'via', '192.0.2.1', 'dev', 'eth0'],
      ]);
    });
  });
});
