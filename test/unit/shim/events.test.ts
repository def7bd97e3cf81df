/**
 * The event publisher against a real ttrpc server serving containerd's Events service on a unix
 * socket: what containerd's exchange checks (namespace, topic, non-zero timestamp, bare type_url),
 * order, retries while the server is away, and a bounded close when it never comes.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { silentLogger } from '../../../core/logger.js';
import { EventPublisher, TOPICS } from '../../../shim/events.js';
import { Events, TaskExit, TaskStart, type Envelope } from '../../../wire/containerd/proto.gen.js';
import { TtrpcServer } from '../../../wire/ttrpc/index.js';
import { TempDir } from '../../helpers/tmp.js';

function eventsServer(received: Envelope[]): TtrpcServer {
  return new TtrpcServer().register(Events, {
    Forward: (req) => {
      received.push(req.envelope!);
      return {};
    },
  });
}

describe('shim: task events to containerd', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir()));
  afterEach(() => tmp.cleanup());

  it('forwards envelopes containerd accepts, in order', async () => {
    const sock = path.join(tmp.path, 'c.sock.ttrpc');
    const received: Envelope[] = [];
    const server = eventsServer(received);
    await server.listen(sock);
    const pub = new EventPublisher({ address: sock, namespace: 'k8s.io', log: silentLogger() });
    pub.publish(TOPICS.start, TaskStart, { containerId: 'c1', pid: 42 });
    pub.publish(TOPICS.exit, TaskExit, { containerId: 'c1', id: 'c1', pid: 42, exitStatus: 3, exitedAt: { seconds: 1n, nanos: 0 } });
    await pub.close(5_000);
    await server.close();
    assert.deepEqual(
      received.map((e) => [e.namespace, e.topic, e.event?.type_url]),
      [
        ['k8s.io', '/tasks/start', 'containerd.events.TaskStart'],
        ['k8s.io', '/tasks/exit', 'containerd.events.TaskExit'],
      ],
    );
    for (const e of received) assert.ok(e.timestamp && e.timestamp.seconds > 0n, 'the timestamp must not be zero');
    assert.equal(TaskExit.decode(received[1]!.event!.value).exitStatus, 3);
    assert.equal(pub.delivered, 2);
  });

  it('retries while containerd is not listening yet', async () => {
    const sock = path.join(tmp.path, 'late.sock');
    const received: Envelope[] = [];
    const pub = new EventPublisher({ address: sock, namespace: 'default', log: silentLogger() });
    pub.publish(TOPICS.start, TaskStart, { containerId: 'c1', pid: 1 });
    await new Promise((r) => setTimeout(r, 150));
    const server = eventsServer(received);
    await server.listen(sock);
    await pub.close(5_000);
    await server.close();
    assert.equal(received.length, 1);
    assert.equal(pub.dropped, 0);
  });

  it('drops an event it cannot deliver instead of blocking, and closes in bounded time', async () => {
    const pub = new EventPublisher({ address: path.join(tmp.path, 'nobody.sock'), namespace: 'default', log: silentLogger(), attempts: 2 });
    pub.publish(TOPICS.start, TaskStart, { containerId: 'c1', pid: 1 });
    const t0 = Date.now();
    await pub.close(2_000);
    assert.ok(Date.now() - t0 < 2_500);
    assert.equal(pub.delivered, 0);
    assert.equal(pub.dropped, 1);
  });
});
