/** The agent port (guest/agent/channel.ts): finding it in sysfs, and cutting the byte stream into connections. */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { MessageType, encodeFrame } from '../../../wire/ttrpc/frame.js';
import { ConnectionSplitter, findVirtioPort } from '../../../guest/agent/channel.js';
import { TempDir } from '../../helpers/tmp.js';

const req = (id: number, size = 5) => encodeFrame(id, MessageType.REQUEST, 0, Buffer.alloc(size, id));

describe('guest agent: the agent port', () => {
  it('is the virtio-serial port whose name is agent.channel.0', async () => {
    const tmp = new TempDir('kata-ts-vport-');
    try {
      const sys = tmp.path;
      for (const [port, name] of [
        ['vport0p0', 'org.qemu.guest_agent.0'],
        ['vport1p1', 'agent.channel.0'],
      ]) {
        mkdirSync(path.join(sys, 'class', 'virtio-ports', port as string), { recursive: true });
        writeFileSync(path.join(sys, 'class', 'virtio-ports', port as string, 'name'), `${name}\n`);
      }
      assert.equal(await findVirtioPort('agent.channel.0', sys), 'vport1p1');
      assert.equal(await findVirtioPort('other', sys), undefined);
      assert.equal(await findVirtioPort('agent.channel.0', path.join(sys, 'nothing')), undefined);
    } finally {
      tmp.cleanup();
    }
  });

  describe('connection splitter', () => {
    it('passes one client\'s frames through as one connection, however they are chunked', () => {
      const bytes = Buffer.concat([req(1), req(3, 70_000), req(5)]);
      for (const size of [1, 7, 10, 11, 4096, bytes.length]) {
        const s = new ConnectionSplitter();
        const segs = [];
        for (let i = 0; i < bytes.length; i += size) segs.push(...s.feed(bytes.subarray(i, i + size)));
        assert.ok(segs.every((x) => !x.newConnection), `chunk size ${size}`);
        assert.deepEqual(Buffer.concat(segs.map((x) => x.bytes)), bytes);
      }
    });

    it('starts a new connection at a request that restarts the stream ids', () => {
      const s = new ConnectionSplitter();
      const a = Buffer.concat([req(1), req(3)]);
      const b = Buffer.concat([req(1), req(3)]);
      const segs = s.feed(Buffer.concat([a, b]));
      assert.deepEqual(segs.map((x) => [x.newConnection, x.bytes.length]), [
        [false, a.length],
        [true, b.length],
      ]);
      assert.deepEqual(s.feed(req(5)), [{ newConnection: false, bytes: req(5) }]);
    });

    it('forgets the stream ids once told the host went away', () => {
      const s = new ConnectionSplitter();
      s.feed(req(7));
      s.reset();
      assert.deepEqual(s.feed(req(1)), [{ newConnection: false, bytes: req(1) }]);
    });

    it('ignores frames that are not requests', () => {
      const s = new ConnectionSplitter();
      s.feed(req(5));
      const data = encodeFrame(1, MessageType.DATA, 0, Buffer.alloc(3));
      assert.deepEqual(s.feed(data), [{ newConnection: false, bytes: data }]);
    });
  });
});
