/**
 * A ttrpc peer written by hand, frame by frame, for tests that must send what a correct client or
 * server never would (even stream ids, oversized frames, garbage) or see exactly what was sent.
 */
import net from 'node:net';
import { FrameDecoder, HEADER_LENGTH, type DecodedItem } from '../../../wire/ttrpc/frame.js';

export class RawPeer {
  private readonly decoder = new FrameDecoder();
  private readonly items: DecodedItem[] = [];
  private waiters: (() => void)[] = [];
  ended = false;

  constructor(readonly sock: net.Socket) {
    sock.on('data', (chunk: Buffer) => {
      this.items.push(...this.decoder.push(chunk));
      this.wake();
    });
    sock.on('close', () => {
      this.ended = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }

  static connect(path: string): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(new RawPeer(s)));
      s.once('error', reject);
    });
  }

  /** A frame with any header; `length` defaults to the payload's (a lie is allowed). */
  send(streamId: number, type: number, flags: number, payload: Uint8Array, length = payload.length): void {
    const h = Buffer.alloc(HEADER_LENGTH);
    h.writeUInt32BE(length, 0);
    h.writeUInt32BE(streamId, 4);
    h[8] = type;
    h[9] = flags;
    this.sock.write(Buffer.concat([h, payload]));
  }

  write(bytes: Uint8Array): void {
    this.sock.write(bytes);
  }

  /** The next frame (or oversize report) from the other side; rejects after `ms` or at close. */
  async next(ms = 2000): Promise<DecodedItem> {
    const deadline = Date.now() + ms;
    while (this.items.length === 0) {
      if (this.ended) throw new Error('connection closed');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no frame within ${ms} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return this.items.shift()!;
  }

  /** True when nothing arrives within `ms`. */
  async silent(ms: number): Promise<boolean> {
    await new Promise((r) => setTimeout(r, ms));
    return this.items.length === 0;
  }

  close(): void {
    this.sock.destroy();
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
}

/** A unix-socket server handing each connection to `onPeer` as a RawPeer. */
export async function rawServer(path: string, onPeer: (p: RawPeer) => void): Promise<net.Server> {
  const server = net.createServer((sock) => onPeer(new RawPeer(sock)));
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return server;
}

export function closeServer(server: net.Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}
