/**
 * `kata-runtime monitor [--listen HOST:PORT]`: kata-monitor's job. An HTTP server whose `GET
 * /metrics` scrapes every sandbox's management socket (`<sbs root>/<id>/shim-monitor.sock`, served
 * by its shim: shim/monitor.ts) in parallel, each within {@link SCRAPE_TIMEOUT_MS} and
 * {@link SHIM_ANSWER_MAX_BYTES} and the whole round within {@link ROUND_DEADLINE_MS}, puts
 * `sandbox_id` (and the pod's `cri_name`, `cri_namespace`, `cri_uid` where the shim knows them) on
 * every sample in place of any `sandbox_id` or `cri_*` label the answer carried, merges the
 * families by the types the runtime defines for them, and adds its own `kata_monitor_*` figures.
 * A sandbox whose socket does not answer, answers late or answers anything but well-formed
 * Prometheus text is left out and counted (`kata_monitor_scrape_failed_count`); the scrape itself
 * never fails for it. A merged answer is served again for {@link CACHE_MS}.
 */
import { setMaxListeners } from 'node:events';
import type { Dirent } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { KataError } from '../core/errors.js';
import { identifierProblem } from '../core/identifiers.js';
import { GUEST_FAMILY_HELP, GUEST_FAMILY_TYPES, formatPromText, mergeFamilies, parsePromText, withLabels, type PromFamily } from '../core/prom-text.js';
import { sbsRoot } from '../core/shim-monitor.js';
import type { Logger } from '../core/logger.js';
import { describeError } from './io.js';
import { EXIT, usageError, type CommandContext } from './main.js';

/** Kata's kata-monitor default. */
export const DEFAULT_LISTEN = '127.0.0.1:8090';
/**
 * How long one sandbox's scrape may take: twice the 1.5 s the shim gives its guest
 * (shim/metrics.ts GUEST_METRICS_TIMEOUT_MS), so that a slow guest costs the sandbox its guest
 * figures only.
 */
export const SCRAPE_TIMEOUT_MS = 3_000;
/**
 * How long one round of scrapes may take; the answer has what was gathered by then. Below
 * Prometheus's default scrape_timeout (10 s), and hung shims cannot add {@link SCRAPE_TIMEOUT_MS}
 * per {@link SCRAPE_CONCURRENCY} of them.
 */
export const ROUND_DEADLINE_MS = 8_000;
/** How long a merged answer is served again: a client asking in a loop cannot make the monitor scrape every shim back to back. */
export const CACHE_MS = 2_000;
/** The most connections the HTTP server holds at once (a scraper needs one). */
export const MAX_CONNECTIONS = 64;
/** How long a request may take to arrive (headers included), and a connection may stay idle. */
export const HTTP_TIMEOUT_MS = 30_000;
/** The largest answer read from one shim. */
export const SHIM_ANSWER_MAX_BYTES = 4 * 1024 * 1024;
/** The most samples taken from one shim. */
export const SHIM_ANSWER_MAX_SAMPLES = 50_000;
/** Sandboxes scraped at once. */
export const SCRAPE_CONCURRENCY = 16;
/** The families a shim may report (its own, its hypervisor's and its guest's). */
export const SHIM_METRIC_PREFIXES = ['kata_shim_', 'kata_hypervisor_', 'kata_agent_', 'kata_guest_'] as const;

const POD_INFO = 'kata_shim_pod_info';

/** Labels only the monitor puts on a sample: a shim's answer (its guest's part above all) cannot bring its own. */
const MONITOR_LABEL = (label: string) => label === 'sandbox_id' || label.startsWith('cri_');

/** `host:port` or `[v6]:port`, the port decimal 0..65535; refusals are KATA_ERR_MONITOR naming --listen. */
export function parseListen(value: string): { host: string; port: number } {
  const refuse = (why: string) => new KataError('KATA_ERR_MONITOR', `--listen ${JSON.stringify(value)}: ${why}`, { key: '--listen', value, fix: 'give --listen HOST:PORT, e.g. --listen 127.0.0.1:8090 ([::1]:8090 for IPv6)' });
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]+)):([^:]*)$/.exec(value);
  if (!m) throw refuse('not HOST:PORT');
  const host = m[1] ?? m[2]!;
  const port = m[3]!;
  if (!/^\d{1,5}$/.test(port) || Number(port) > 65535) throw refuse(`the port ${JSON.stringify(port)} is not a number from 0 to 65535`);
  if (m[1] !== undefined && net.isIPv6(host) === false) throw refuse(`${host} is not an IPv6 address`);
  if (m[2] !== undefined && !net.isIPv4(host) && !/^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$/.test(host)) throw refuse(`${JSON.stringify(host)} is not an address or host name`);
  return { host, port: Number(port) };
}

/** Why a sandbox was left out of a scrape. */
export type ScrapeFailure = 'unreachable' | 'timeout' | 'deadline' | 'status' | 'too_large' | 'invalid';

/** GET /metrics on one management socket, bounded in time and size; `signal` ends it early (the round's deadline). */
export function scrapeSocket(socketPath: string, timeoutMs = SCRAPE_TIMEOUT_MS, maxBytes = SHIM_ANSWER_MAX_BYTES, signal?: AbortSignal): Promise<string> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(Object.assign(new Error('the round of scrapes ran out of time before this sandbox'), { reason: 'deadline' }));
      return;
    }
    // Settling drops the timer and the abort listener at once: the round's signal holds one listener per scrape under way.
    const settle = () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', abort);
    };
    const fail = (reason: ScrapeFailure, message: string) => {
      settle();
      reject(Object.assign(new Error(message), { reason }));
    };
    const req = http.get({ socketPath, path: '/metrics', headers: { Accept: 'text/plain' } }, (res) => {
      if (res.statusCode !== 200) {
        res.resume();
        fail('status', `HTTP ${res.statusCode}`);
        return;
      }
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (d: Buffer) => {
        size += d.length;
        if (size > maxBytes) {
          req.destroy();
          fail('too_large', `more than ${maxBytes} bytes`);
          return;
        }
        chunks.push(d);
      });
      res.once('end', () => {
        settle();
        resolve(Buffer.concat(chunks).toString('utf8'));
      });
      res.once('error', (err) => fail('unreachable', err.message));
    });
    const timer = setTimeout(() => {
      req.destroy();
      fail('timeout', `no answer within ${timeoutMs} ms`);
    }, timeoutMs);
    const abort = () => {
      req.destroy();
      fail('deadline', 'the round of scrapes ran out of time');
    };
    signal?.addEventListener('abort', abort, { once: true });
    req.once('error', (err) => fail('unreachable', err.message));
  });
}

/** The pod's CRI labels as the shim reported them (its kata_shim_pod_info sample), in a fixed order. */
function criLabels(families: readonly PromFamily[]): [string, string][] {
  const info = families.find((f) => f.name === POD_INFO)?.samples[0];
  if (!info) return [];
  return ['cri_uid', 'cri_name', 'cri_namespace'].flatMap((k) => {
    const v = info.labels.find(([name]) => name === k)?.[1];
    return v ? [[k, v] as [string, string]] : [];
  });
}

/** The sbs root cannot be read: as a non-root user, Kata's /run/vc/sbs (root's, 0700) is the usual reason. */
function sbsRootError(root: string, e: NodeJS.ErrnoException): KataError {
  if (e.code === 'EACCES' || e.code === 'EPERM') {
    return new KataError('KATA_ERR_MONITOR_SBS_ROOT', `cannot read the sandbox directory ${root}: ${e.code} (running as uid ${process.getuid?.() ?? '?'})`, { value: root, cause: e });
  }
  return new KataError('KATA_ERR_MONITOR_SBS_ROOT', `cannot read the sandbox directory ${root}: ${e.code ?? e.message}`, { value: root, cause: e, fix: 'check that the sbs root (KATA_TS_SBS_ROOT, default /run/vc/sbs) is a directory' });
}

interface MonitorOptions {
  readonly root: string;
  readonly log?: Logger;
  readonly timeoutMs?: number;
  readonly deadlineMs?: number;
  readonly cacheMs?: number;
}

/** kata-monitor: scrapes the sandboxes under `root` and answers their merged metrics. */
export class KataMonitor {
  #registry: Promise<import('prom-client').Registry> | undefined;
  #metrics: Promise<{ shims: import('prom-client').Gauge; scrapes: import('prom-client').Counter; failed: import('prom-client').Counter; durations: import('prom-client').Histogram }> | undefined;
  #inFlight: Promise<string> | undefined;
  #cached: { text: string; at: number } | undefined;

  constructor(readonly opts: MonitorOptions) {}

  async #own() {
    this.#metrics ??= import('prom-client').then(({ Registry, collectDefaultMetrics, Gauge, Counter, Histogram }) => {
      const registry = new Registry();
      collectDefaultMetrics({ register: registry, prefix: 'kata_monitor_' });
      this.#registry = Promise.resolve(registry);
      const registers = [registry];
      return {
        shims: new Gauge({ name: 'kata_monitor_running_shim_count', help: 'Running shim count (sandboxes with a management socket).', registers }),
        scrapes: new Counter({ name: 'kata_monitor_scrape_count', help: 'Scrape count.', registers }),
        failed: new Counter({ name: 'kata_monitor_scrape_failed_count', help: 'Sandboxes left out of a scrape (socket dead, slow, or its answer not Prometheus text).', registers }),
        durations: new Histogram({ name: 'kata_monitor_scrape_durations_histogram_milliseconds', help: 'Time used to scrape from shims, in milliseconds.', buckets: [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000], registers }),
      };
    });
    return this.#metrics;
  }

  /** The sandbox ids with a directory under the root (identifiers only); none while there is no root. */
  async sandboxes(): Promise<string[]> {
    let entries: Dirent[];
    try {
      entries = await readdir(this.opts.root, { withFileTypes: true });
    } catch (e) {
      // No sandbox has run on this host yet.
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw sbsRootError(this.opts.root, e as NodeJS.ErrnoException);
    }
    return entries.filter((e) => e.isDirectory() && identifierProblem(e.name) === undefined).map((e) => e.name).sort();
  }

  /** One sandbox's families with its labels, or why it is left out. */
  async scrapeSandbox(id: string, signal?: AbortSignal): Promise<PromFamily[] | { reason: ScrapeFailure; message: string }> {
    try {
      const text = await scrapeSocket(path.join(this.opts.root, id, 'shim-monitor.sock'), this.opts.timeoutMs ?? SCRAPE_TIMEOUT_MS, SHIM_ANSWER_MAX_BYTES, signal);
      const families = parsePromText(text, { maxBytes: SHIM_ANSWER_MAX_BYTES, maxSamples: SHIM_ANSWER_MAX_SAMPLES, allowedPrefixes: SHIM_METRIC_PREFIXES });
      return withLabels(families, [['sandbox_id', id], ...criLabels(families)], MONITOR_LABEL);
    } catch (e) {
      const reason = (e as { reason?: ScrapeFailure }).reason ?? 'invalid';
      return { reason, message: e instanceof Error ? e.message : String(e) };
    }
  }

  /** The merged answer; concurrent requests share one round of scrapes, and later ones its answer for {@link CACHE_MS}. */
  render(): Promise<string> {
    const cached = this.#cached;
    if (cached && performance.now() - cached.at < (this.opts.cacheMs ?? CACHE_MS)) return Promise.resolve(cached.text);
    this.#inFlight ??= this.#render()
      .then((text) => {
        this.#cached = { text, at: performance.now() };
        return text;
      })
      .finally(() => (this.#inFlight = undefined));
    return this.#inFlight;
  }

  async #render(): Promise<string> {
    const own = await this.#own();
    const t0 = performance.now();
    own.scrapes.inc();
    const ids = await this.sandboxes();
    const results: ({ id: string; families: PromFamily[] } | undefined)[] = new Array(ids.length);
    const round = new AbortController();
    setMaxListeners(SCRAPE_CONCURRENCY, round.signal);
    const deadline = setTimeout(() => round.abort(), this.opts.deadlineMs ?? ROUND_DEADLINE_MS);
    let next = 0;
    const worker = async () => {
      while (next < ids.length) {
        const i = next++;
        const id = ids[i]!;
        const r = await this.scrapeSandbox(id, round.signal);
        if (Array.isArray(r)) {
          results[i] = { id, families: r };
        } else {
          own.failed.inc();
          this.opts.log?.info({ sandbox: id, reason: r.reason, err: r.message }, 'sandbox left out of the scrape');
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(SCRAPE_CONCURRENCY, ids.length) }, worker));
    clearTimeout(deadline);
    const scraped = results.filter((r) => r !== undefined);
    own.shims.set(scraped.length);
    own.durations.observe(performance.now() - t0);
    const merged = mergeFamilies(
      scraped.map((r) => r.families),
      { types: GUEST_FAMILY_TYPES, help: GUEST_FAMILY_HELP, onConflict: (name, i) => this.opts.log?.warn({ sandbox: scraped[i]!.id, metric: name }, 'a sandbox reported a metric with another type than the runtime gives it; left out') },
    );
    return (await (await this.#registry!).metrics()) + formatPromText(merged);
  }

  /** An HTTP server answering GET /metrics (not yet listening). */
  server(): http.Server {
    const server = http.createServer({ requestTimeout: HTTP_TIMEOUT_MS, headersTimeout: HTTP_TIMEOUT_MS }, (req, res) => {
      if (req.method !== 'GET' || !(req.url === '/metrics' || req.url?.startsWith('/metrics?'))) {
        res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found: GET /metrics\n');
        return;
      }
      this.render().then(
        (text) => res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4; charset=utf-8' }).end(text),
        (err: unknown) => {
          this.opts.log?.error({ err }, 'cannot gather the metrics');
          res.writeHead(500, { 'Content-Type': 'text/plain' }).end(err instanceof KataError ? describeError(err) : `cannot gather the metrics: ${err instanceof Error ? err.message : String(err)}\n`);
        },
      );
    });
    // What one client can hold: Node's defaults are no connection limit and no idle timeout.
    server.maxConnections = MAX_CONNECTIONS;
    server.setTimeout(HTTP_TIMEOUT_MS);
    return server;
  }
}

export async function monitorCommand(ctx: CommandContext): Promise<number> {
  if (ctx.args.length > 0) throw usageError('monitor takes no arguments: kata-runtime monitor [--listen HOST:PORT]');
  const { host, port } = parseListen(ctx.flags.listen ?? DEFAULT_LISTEN);
  const root = sbsRoot(ctx.io.env);
  const monitor = new KataMonitor({ root, log: ctx.log });
  // Refused now rather than served as a host without sandboxes: the sbs root is root's (0700).
  await monitor.sandboxes();
  const server = monitor.server();
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(new KataError('KATA_ERR_MONITOR', `cannot listen on ${host}:${port}: ${err.message}`, { key: '--listen', value: `${host}:${port}`, fix: 'choose a free port and an address of this host with --listen HOST:PORT', cause: err })),
    );
    server.listen(port, host, () => resolve());
  });
  const addr = server.address() as net.AddressInfo;
  const shown = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  ctx.io.out(`kata-runtime monitor: serving http://${shown}:${addr.port}/metrics for the sandboxes under ${root}\n`);
  await new Promise<void>((resolve) => {
    const stop = () => {
      for (const s of ['SIGINT', 'SIGTERM'] as const) process.off(s, stop);
      server.close(() => resolve());
      server.closeAllConnections();
    };
    for (const s of ['SIGINT', 'SIGTERM'] as const) process.once(s, stop);
  });
  return EXIT.OK;
}
