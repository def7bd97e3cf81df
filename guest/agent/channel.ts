/**
 * The agent's end of the runtime connection: the virtio-serial port named `agent.channel.0`
 * (QEMU: `-device virtserialport,chardev=…,name=agent.channel.0`), found through
 * /sys/class/virtio-ports/<vportNpM>/name and opened read-write as /dev/<vportNpM>.
 *
 * What the port does (virtio_console, checked in a guest): a read blocks until the host sends
 * bytes, and returns 0 while no host process is connected to the chardev (before the first
 * connection and after a disconnect); bytes sent before the guest opened the port are delivered
 * once it does; a write blocks while the host is disconnected and takes at most 32 KiB at a time.
 * Node cannot poll a character device, so reads and writes run on libuv's thread pool (one read
 * always pending) and a 0-byte read is polled again after a short pause.
 *
 * The port has no connection boundaries of its own. A ttrpc connection ends at a 0-byte read, or
 * when a request arrives whose stream id is not above the last one (a client that reconnected
 * before the agent saw the port go quiet starts again at stream 1): {@link ConnectionSplitter}
 * follows the frame headers to cut the byte stream there. Each piece is served as its own
 * {@link PortConnection}, as a socket connection would be.
 */
import { close, open, read, write } from 'node:fs';
import { readFile, readdir } from 'node:fs/promises';
import path from 'node:path';
import { Duplex } from 'node:stream';
import { HEADER_LENGTH, MessageType } from '../../wire/ttrpc/frame.js';
import type { TtrpcServer } from '../../wire/ttrpc/server.js';
import { log } from './log.js';
import { sleep } from './sys.js';

export const AGENT_PORT_NAME = 'agent.channel.0';

/** The device name (`vport0p1`) of the virtio-serial port called `name`, if there is one. */
export async function findVirtioPort(name: string, sysfsRoot = '/sys'): Promise<string | undefined> {
  const dir = path.join(sysfsRoot, 'class', 'virtio-ports');
  let ports: string[];
  try {
    ports = (await readdir(dir)).sort();
  } catch {
    return undefined;
  }
  for (const p of ports) {
    const n = await readFile(path.join(dir, p, 'name'), 'utf8').catch(() => '');
    if (n.trim() === name) return p;
  }
  return undefined;
}

/** Waits for the port to appear (virtio_console is loaded by /init, so normally at once). */
export async function waitForVirtioPort(name: string, timeoutMs: number, sysfsRoot = '/sys'): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const p = await findVirtioPort(name, sysfsRoot);
    if (p) return p;
    if (Date.now() > deadline) throw new Error(`no virtio-serial port named ${name} under ${sysfsRoot}/class/virtio-ports within ${timeoutMs} ms`);
    await sleep(50);
  }
}

const readAsync = (fd: number, buf: Buffer): Promise<number> =>
  new Promise((resolve, reject) => read(fd, buf, 0, buf.length, null, (err, n) => (err ? reject(err) : resolve(n))));
const writeAsync = (fd: number, buf: Uint8Array, off: number): Promise<number> =>
  new Promise((resolve, reject) => write(fd, buf, off, buf.length - off, null, (err, n) => (err ? reject(err) : resolve(n))));
const openAsync = (p: string): Promise<number> => new Promise((resolve, reject) => open(p, 'r+', (err, fd) => (err ? reject(err) : resolve(fd))));

/** Bytes for the current connection, or for a new one that starts with them. */
export interface Segment {
  readonly newConnection: boolean;
  readonly bytes: Buffer;
}

/**
 * Follows ttrpc frame headers through the bytes from the port and cuts them where a new client
 * begins: at a request whose stream id is not above the previous request's (clients number their
 * requests 1, 3, 5, … from each connection's start).
 */
export class ConnectionSplitter {
  private header = Buffer.alloc(HEADER_LENGTH);
  private headerHave = 0;
  private bodyLeft = 0;
  private lastRequest = 0;

  /** Forget the current connection (the host went away): the next request starts a new one. */
  reset(): void {
    this.headerHave = 0;
    this.bodyLeft = 0;
    this.lastRequest = 0;
  }

  feed(chunk: Buffer): Segment[] {
    const out: Segment[] = [];
    let start = 0;
    let i = 0;
    let startsNew = false;
    while (i < chunk.length) {
      if (this.bodyLeft > 0) {
        const n = Math.min(this.bodyLeft, chunk.length - i);
        this.bodyLeft -= n;
        i += n;
        continue;
      }
      const headerStart = i - this.headerHave;
      const n = Math.min(HEADER_LENGTH - this.headerHave, chunk.length - i);
      chunk.copy(this.header, this.headerHave, i, i + n);
      this.headerHave += n;
      i += n;
      if (this.headerHave < HEADER_LENGTH) break;
      this.headerHave = 0;
      this.bodyLeft = this.header.readUInt32BE(0);
      const streamId = this.header.readUInt32BE(4);
      if (this.header[8] !== MessageType.REQUEST) continue;
      if (this.lastRequest > 0 && streamId <= this.lastRequest && headerStart >= 0) {
        // A header split across chunks (headerStart < 0) cannot be cut here; such a reconnection is
        // taken for a protocol error by the old connection, as before this check existed.
        if (headerStart > start) out.push({ newConnection: startsNew, bytes: chunk.subarray(start, headerStart) });
        start = headerStart;
        startsNew = true;
      }
      this.lastRequest = streamId;
    }
    if (start < chunk.length || out.length === 0) out.push({ newConnection: startsNew, bytes: chunk.subarray(start) });
    return out;
  }
}

/** One ttrpc connection over the port: writes go to the fd, reads are pushed by {@link servePort}'s loop. */
export class PortConnection extends Duplex {
  constructor(private readonly fd: number) {
    super({ allowHalfOpen: false });
  }

  override _read(): void {
    // Bytes are pushed as the port delivers them.
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    void (async () => {
      let off = 0;
      while (off < chunk.length) off += await writeAsync(this.fd, chunk, off);
    })().then(() => cb(), (err: Error) => cb(err));
  }
}

export interface ServePortOptions {
  /** Pause between 0-byte reads while no host is connected. */
  readonly idlePollMs?: number;
  /** Stops the loop (tests). */
  readonly signal?: AbortSignal;
}

/** Serves ttrpc on the port at `devPath` for ever, one connection per host connection. */
export async function servePort(server: TtrpcServer, devPath: string, opts: ServePortOptions = {}): Promise<void> {
  const buf = Buffer.allocUnsafe(64 * 1024);
  let fd = await openAsync(devPath);
  let conn: PortConnection | undefined;
  const splitter = new ConnectionSplitter();
  let connections = 0;
  let idleSince = Date.now();
  const endConnection = (why: string, hostLeft = true): void => {
    // The splitter already follows a client that started over; only a host that left resets it.
    if (hostLeft) splitter.reset();
    if (!conn) return;
    conn.push(null);
    conn.destroy();
    conn = undefined;
    idleSince = Date.now();
    log(`host disconnected (${why})`);
  };
  while (!opts.signal?.aborted) {
    let n: number;
    try {
      n = await readAsync(fd, buf);
    } catch (e) {
      // ENODEV: the port was unplugged; anything else: reopen after a pause.
      endConnection(`read: ${(e as Error).message}`);
      close(fd, () => undefined);
      await sleep(500);
      fd = await openAsync(devPath).catch(() => -1);
      while (fd < 0 && !opts.signal?.aborted) {
        await sleep(1000);
        fd = await openAsync(devPath).catch(() => -1);
      }
      continue;
    }
    if (n === 0) {
      endConnection('end of data');
      // Poll briskly for a while after a disconnection (the runtime reconnecting), then slower.
      const base = opts.idlePollMs ?? 20;
      await sleep(Date.now() - idleSince < 10_000 ? base : base * 5);
      continue;
    }
    for (const seg of splitter.feed(Buffer.from(buf.subarray(0, n)))) {
      if (seg.newConnection) endConnection('a new client started over', false);
      if (!conn || conn.destroyed) {
        conn = new PortConnection(fd);
        connections++;
        const c = conn;
        const nth = connections;
        c.on('error', (err) => log(`connection ${nth}: ${err.message}`));
        server.serve(c);
        log(`host connected (connection ${nth})`);
      }
      if (seg.bytes.length) conn.push(seg.bytes);
    }
  }
  endConnection('stopped');
  close(fd, () => undefined);
}
