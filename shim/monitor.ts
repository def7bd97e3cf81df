/**
 * The shim's per-sandbox management socket, Kata's `shim-monitor.sock` at Kata's path
 * `/run/vc/sbs/<sandbox-id>/shim-monitor.sock` (directory 0700, socket 0600: root only). Like
 * Kata's, it speaks HTTP, so that other endpoints (metrics) can be added to it.
 *
 * `GET /debug-console` with `Upgrade: kata-debug-console` attaches to the guest debug console:
 * the answer is `101 Switching Protocols`, after which the connection carries the console's
 * terminal bytes both ways (the shim relays them to the QEMU chardev socket of the console's
 * virtio-serial port). One attach at a time: the port has one host end. Refusals are JSON
 * `{ code, message }` bodies with a 4xx status (KATA_ERR_DEBUG_CONSOLE).
 *
 * `GET /metrics` answers the sandbox's Prometheus metrics (shim/metrics.ts), as Kata's shim does
 * on the same socket; `kata-runtime monitor` scrapes it.
 */
import { lstat, mkdir, open, rm } from 'node:fs/promises';
import { chmodSync, constants as fsc } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { canConnect } from './cleanup.js';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { KataError } from '../core/errors.js';
import { DEBUG_CONSOLE_PROTOCOL, shimMonitorSocket } from '../core/shim-monitor.js';
import type { SandboxFigures, ShimMetrics } from './metrics.js';

export { DEBUG_CONSOLE_PROTOCOL, DEFAULT_SBS_ROOT, sbsRoot, shimMonitorSocket } from '../core/shim-monitor.js';

/** What the monitor asks of the shim. */
export interface MonitorSource {
  /** The host end of the guest debug console now, or undefined (no sandbox yet, or the console is off). */
  debugConsoleSocket(): string | undefined;
  /** What `GET /metrics` reports of the sandbox (shim/metrics.ts); absent: no /metrics. */
  readonly figures?: SandboxFigures;
}

/** The content type of Prometheus text 0.0.4 (what prom-client's registry says it writes). */
export const PROMETHEUS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

function refuse(socket: Duplex, status: number, reason: string, message: string): void {
  const body = JSON.stringify({ code: 'KATA_ERR_DEBUG_CONSOLE', message });
  socket.end(`HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
}

/**
 * Makes the socket's directory, root-only, or takes the one an earlier shim left once sure it is
 * this user's own: mkdir takes whatever is already there, a symlink included, and setting the mode
 * by path would follow one. The directory is opened without following a link and its mode set
 * through that descriptor, so a link put there in between is refused too. (A directory left by an
 * earlier shim keeps its mode through mkdir: it is set here.)
 */
async function claimDirectory(dir: string, sandboxId: string): Promise<void> {
  const uid = process.getuid?.();
  const refuse = (why: string, cause?: unknown) => new KataError('KATA_ERR_MANAGEMENT_SOCKET', `no management socket in ${dir}: ${why}`, { key: 'sandbox-id', value: sandboxId, cause });
  // Its failure (a file there, a dangling link, no permission) is told by what follows.
  const made = await mkdir(dir, { recursive: true, mode: 0o700 }).then(
    () => undefined,
    (e: unknown) => e,
  );
  let fh;
  try {
    fh = await open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY | fsc.O_NOFOLLOW);
  } catch (e) {
    const st = await lstat(dir).catch(() => undefined);
    const err = (made ?? e) as NodeJS.ErrnoException;
    throw refuse(st?.isSymbolicLink() ? 'it is a symlink' : st ? 'it is not a directory' : `it cannot be made (${err.code})`, err);
  }
  try {
    const st = await fh.stat();
    if (uid !== undefined && st.uid !== uid) throw refuse(`it is owned by uid ${st.uid}, not by this shim's (uid ${uid})`);
    await fh.chmod(0o700);
  } finally {
    await fh.close();
  }
}

export class ShimMonitor {
  readonly #server: http.Server;
  readonly #open = new Set<Duplex>();
  #attached = false;
  #registry: Promise<ShimMetrics> | undefined;

  private constructor(
    readonly socketPath: string,
    private readonly source: MonitorSource,
  ) {
    this.#server = http.createServer((req, res) => {
      if (req.method === 'GET' && (req.url === '/metrics' || req.url?.startsWith('/metrics?')) && this.source.figures) {
        this.#metrics(res, this.source.figures);
        return;
      }
      res.writeHead(404, { 'Content-Type': 'application/json' }).end(JSON.stringify({ code: 'KATA_ERR_DEBUG_CONSOLE', message: `no endpoint ${req.method} ${req.url}` }));
    });
    this.#server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => this.#attach(req, socket, head));
    this.#server.on('connection', (s: net.Socket) => {
      this.#open.add(s);
      s.once('close', () => this.#open.delete(s));
    });
  }

  /** Creates the directory and listens; a stale socket of a dead shim of the same id is replaced. */
  static async start(sandboxId: string, source: MonitorSource, env: NodeJS.ProcessEnv = process.env): Promise<ShimMonitor> {
    const socketPath = shimMonitorSocket(sandboxId, env);
    await claimDirectory(path.dirname(socketPath), sandboxId);
    // Kata's path has no namespace: the same sandbox id in another containerd namespace must not take a live shim's socket.
    if (await canConnect(socketPath)) {
      throw new KataError('KATA_ERR_MANAGEMENT_SOCKET', `another shim already serves ${socketPath} (the same sandbox id in another containerd namespace?)`, {
        key: 'sandbox-id',
        value: sandboxId,
        fix: 'give each sandbox an id unique on this host; this pod runs on without a management socket (no metrics, no kata-runtime exec)',
      });
    }
    await rm(socketPath, { force: true });
    const m = new ShimMonitor(socketPath, source);
    await new Promise<void>((resolve, reject) => {
      m.#server.once('error', reject);
      m.#server.listen(socketPath, () => resolve());
    });
    chmodSync(socketPath, 0o600);
    return m;
  }

  #metrics(res: http.ServerResponse, figures: SandboxFigures): void {
    // prom-client is loaded on the first scrape, not at every shim start.
    this.#registry ??= import('./metrics.js').then(({ ShimMetrics }) => ShimMetrics.create(figures));
    this.#registry
      .then((m) => m.render())
      .then(
        (text) => res.writeHead(200, { 'Content-Type': PROMETHEUS_CONTENT_TYPE }).end(text),
        (err: unknown) => res.writeHead(500, { 'Content-Type': 'application/json' }).end(JSON.stringify({ code: 'KATA_ERR_INTERNAL', message: `cannot gather the metrics: ${err instanceof Error ? err.message : String(err)}` })),
      );
  }

  #attach(req: http.IncomingMessage, client: Duplex, head: Buffer): void {
    client.on('error', () => undefined);
    if (req.method !== 'GET' || req.url !== '/debug-console' || req.headers.upgrade !== DEBUG_CONSOLE_PROTOCOL) {
      refuse(client, 404, 'Not Found', `no endpoint ${req.method} ${req.url}`);
      return;
    }
    const target = this.source.debugConsoleSocket();
    if (!target) {
      refuse(client, 409, 'Conflict', 'the debug console is off in this sandbox: set debug_console_enabled = true in [agent.kata] and start the sandbox again');
      return;
    }
    if (this.#attached) {
      refuse(client, 409, 'Conflict', 'another kata-runtime exec is attached to this debug console');
      return;
    }
    this.#attached = true;
    const guest = net.connect(target);
    const done = () => {
      this.#attached = false;
      guest.destroy();
      client.destroy();
    };
    guest.once('error', (err) => {
      if (!client.destroyed) refuse(client, 502, 'Bad Gateway', `cannot reach the guest debug console: ${err.message}`);
      this.#attached = false;
    });
    guest.once('connect', () => {
      guest.removeAllListeners('error');
      guest.on('error', done);
      client.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: ${DEBUG_CONSOLE_PROTOCOL}\r\nConnection: Upgrade\r\n\r\n`);
      if (head.length) guest.write(head);
      client.pipe(guest);
      guest.pipe(client);
      client.once('close', done);
      guest.once('close', done);
    });
  }

  /** Stops listening, ends every attach and removes the socket and its directory. */
  async close(): Promise<void> {
    for (const s of this.#open) s.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    await rm(path.dirname(this.socketPath), { recursive: true, force: true });
  }
}
