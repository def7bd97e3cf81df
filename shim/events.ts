/**
 * Task events, forwarded to containerd's ttrpc events service at $TTRPC_ADDRESS
 * (`containerd.services.events.ttrpc.v1.Events/Forward`). CRI depends on them (TaskExit above all);
 * `ctr run` does not.
 *
 * Publishing never blocks or fails a task call: events queue in order and one sender works through
 * them, reconnecting and retrying each event a few times with back-off (as containerd's own shims
 * do). An event that still cannot be delivered is logged and dropped. `close()` flushes for a
 * bounded time before the shim exits.
 */
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../core/logger.js';
import { TtrpcClient, type MessageCodec, type MessageInit, type ServiceClient } from '../wire/ttrpc/index.js';
import { Events } from '../wire/containerd/proto.gen.js';
import { timestamp } from './time.js';

export const TOPICS = Object.freeze({
  create: '/tasks/create',
  start: '/tasks/start',
  exit: '/tasks/exit',
  delete: '/tasks/delete',
  execAdded: '/tasks/exec-added',
  execStarted: '/tasks/exec-started',
  paused: '/tasks/paused',
  resumed: '/tasks/resumed',
  oom: '/tasks/oom',
});

export type Topic = (typeof TOPICS)[keyof typeof TOPICS];

export interface PublisherOptions {
  /** containerd's ttrpc socket ($TTRPC_ADDRESS); absent: events are only logged. */
  readonly address: string | undefined;
  readonly namespace: string;
  readonly log: Logger;
  /** Attempts per event, with back-off in between. */
  readonly attempts?: number;
  readonly callTimeoutMs?: number;
}

interface Queued {
  readonly topic: Topic;
  readonly typeUrl: string;
  readonly value: Uint8Array;
  readonly at: Date;
}

export class EventPublisher {
  readonly #opts: Required<Omit<PublisherOptions, 'address'>> & { address: string | undefined };
  readonly #queue: Queued[] = [];
  #client: TtrpcClient | undefined;
  #stub: ServiceClient<typeof Events> | undefined;
  #draining: Promise<void> | undefined;
  #closed = false;
  /** Events given up on (logged each time). */
  dropped = 0;
  /** Events containerd accepted. */
  delivered = 0;

  constructor(opts: PublisherOptions) {
    this.#opts = { attempts: 5, callTimeoutMs: 5_000, ...opts };
  }

  /** Queues an event; the message's type name becomes the Any's type_url, as containerd expects. */
  publish<T>(topic: Topic, codec: MessageCodec<T>, message: MessageInit<T>): void {
    if (this.#closed) return;
    this.#opts.log.debug({ topic, event: codec.typeName }, 'publishing event');
    if (!this.#opts.address) return;
    this.#queue.push({ topic, typeUrl: codec.typeName, value: codec.encode(message), at: new Date() });
    this.#draining ??= this.#drain().finally(() => (this.#draining = undefined));
  }

  /** Waits up to `timeoutMs` for queued events to go out, then disconnects. */
  async close(timeoutMs = 5_000): Promise<void> {
    this.#closed = true;
    if (this.#draining) await Promise.race([this.#draining, sleep(timeoutMs, undefined, { ref: false })]);
    if (this.#queue.length > 0) {
      this.dropped += this.#queue.length;
      this.#opts.log.warn({ events: this.#queue.map((q) => q.topic) }, 'events not delivered before the shim exited');
      this.#queue.length = 0;
    }
    this.#client?.close();
  }

  async #drain(): Promise<void> {
    while (this.#queue.length > 0) {
      const ev = this.#queue[0]!;
      let lastErr: unknown;
      for (let attempt = 0; attempt < this.#opts.attempts; attempt++) {
        if (attempt > 0) await sleep(100 * 2 ** (attempt - 1), undefined, { ref: false });
        try {
          const stub = await this.#connect();
          await stub.Forward(
            { envelope: { timestamp: timestamp(ev.at), namespace: this.#opts.namespace, topic: ev.topic, event: { type_url: ev.typeUrl, value: ev.value } } },
            { timeoutMs: this.#opts.callTimeoutMs },
          );
          lastErr = undefined;
          this.delivered++;
          break;
        } catch (e) {
          lastErr = e;
          this.#client?.close();
          this.#client = undefined;
        }
      }
      if (lastErr !== undefined) {
        this.dropped++;
        this.#opts.log.error({ err: lastErr, topic: ev.topic, address: this.#opts.address }, 'cannot forward an event to containerd; dropped');
      }
      this.#queue.shift();
    }
  }

  async #connect(): Promise<ServiceClient<typeof Events>> {
    if (this.#client && !this.#client.isClosed && this.#stub) return this.#stub;
    const sock = net.connect(this.#opts.address!);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    this.#client = new TtrpcClient(sock);
    this.#stub = this.#client.service(Events);
    return this.#stub;
  }
}
