/**
 * How the runtime reaches kata-agent's ttrpc server in the guest (vsock port 1024 by Kata's
 * convention):
 *
 * - `unix`: a unix socket whose other end is the agent. QEMU's virtio-serial port is served this
 *   way (`-chardev socket,server=on,wait=off` + `virtserialport name=agent.channel.0`): the socket
 *   exists as soon as QEMU runs, and bytes sent before the guest opens the port wait for it.
 * - `hvsock`: Cloud Hypervisor's and Firecracker's hybrid vsock: a unix socket served by the VMM;
 *   the client writes `CONNECT <port>\n` and gets `OK <host port>\n` once something in the guest
 *   listens on that port (before that the VMM closes the connection), then speaks ttrpc.
 * - `vsock`: AF_VSOCK to a guest CID, as Kata uses with QEMU + vhost-vsock. Node.js has no AF_VSOCK
 *   sockets and npm has no maintained addon, so the connection is socat's (`vsock.ts`): ttrpc runs
 *   over its stdin and stdout.
 *
 * Every kind is dialled again and again while the guest boots, until a deadline.
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { AgentError, RetryableDialError } from './errors.js';
import { connectVsock, findSocat } from './vsock.js';

/** kata-agent's ttrpc port on vsock (and hybrid vsock). */
export const AGENT_VSOCK_PORT = 1024;

export type AgentAddress =
  | { readonly kind: 'unix'; readonly path: string }
  | { readonly kind: 'hvsock'; readonly path: string; readonly port: number }
  | { readonly kind: 'vsock'; readonly cid: number; readonly port: number };

export interface DialOptions {
  /** Give up this many milliseconds after the first attempt. Default 30 000. */
  deadlineMs?: number;
  /** Pause after a failed attempt; doubles up to 16 times this, within the deadline. Default 20. */
  retryIntervalMs?: number;
  /** Longest wait for the hybrid-vsock `OK` line in one attempt (Kata: 10 s); capped by the deadline. */
  handshakeTimeoutMs?: number;
  signal?: AbortSignal;
  /**
   * @internal Tests only: the socat address a `vsock` dial connects to instead of
   * `VSOCK-CONNECT:<cid>:<port>` (e.g. `UNIX-CONNECT:/path`), to exercise the socat plumbing on a
   * host without vhost-vsock. Not a configuration key, not an environment variable.
   */
  testOnlySocatAddress?: string;
}

/** `unix:///p`, `hvsock:///p:1024` (Kata's hybrid-vsock address form), `vsock://3:1024`. */
export function parseAgentAddress(address: string): AgentAddress {
  const m = /^([a-z]+):\/\/(.*)$/.exec(address);
  const bad = (why: string): AgentError =>
    new AgentError('address', `agent address ${JSON.stringify(address)}: ${why}`, {
      address,
      fix: 'Use unix:///path, hvsock:///path:port or vsock://cid:port.',
    });
  if (!m) throw bad('no scheme');
  const [, scheme, rest] = m as unknown as [string, string, string];
  const portOf = (s: string): number => {
    const n = Number(s);
    if (!/^\d+$/.test(s) || n > 0xffffffff) throw bad(`port ${JSON.stringify(s)} is not a number`);
    return n;
  };
  switch (scheme) {
    case 'unix':
      if (!rest.startsWith('/')) throw bad('the path must be absolute');
      return { kind: 'unix', path: rest };
    case 'hvsock': {
      const i = rest.lastIndexOf(':');
      if (i <= 0 || !rest.startsWith('/')) throw bad('expected hvsock:///absolute/path:port');
      return { kind: 'hvsock', path: rest.slice(0, i), port: portOf(rest.slice(i + 1)) };
    }
    case 'vsock': {
      const [cid, port, ...more] = rest.split(':');
      if (cid === undefined || port === undefined || more.length) throw bad('expected vsock://cid:port');
      return { kind: 'vsock', cid: portOf(cid), port: portOf(port) };
    }
    default:
      throw bad(`unknown scheme ${scheme}`);
  }
}

export function formatAgentAddress(a: AgentAddress): string {
  switch (a.kind) {
    case 'unix':
      return `unix://${a.path}`;
    case 'hvsock':
      return `hvsock://${a.path}:${a.port}`;
    case 'vsock':
      return `vsock://${a.cid}:${a.port}`;
  }
}

/** Errors that mean "not there yet": the VMM or the guest agent may still be starting. */
const RETRYABLE = new Set(['ENOENT', 'ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'EAGAIN']);

/**
 * Opens a byte stream to the agent, retrying while the VM boots. Rejects with an AgentError:
 * `unreachable` at the deadline (with the last failure), `handshake` at once on a reply to CONNECT
 * that is not `OK`; for vsock, `socat-missing` without a usable socat and `transport-unsupported`
 * when the host kernel has no AF_VSOCK.
 */
export async function dialAgent(address: AgentAddress, opts: DialOptions = {}): Promise<Duplex> {
  const where = formatAgentAddress(address);
  const socat = address.kind === 'vsock' ? findSocat(where) : undefined;
  const deadlineMs = opts.deadlineMs ?? 30_000;
  const start = Date.now();
  const interval = opts.retryIntervalMs ?? 20;
  let pause = interval;
  let attempts = 0;
  let last: unknown;
  for (;;) {
    opts.signal?.throwIfAborted();
    const left = deadlineMs - (Date.now() - start);
    attempts++;
    try {
      if (address.kind === 'vsock') {
        return await connectVsock(socat!, { cid: address.cid, port: address.port, where, socatAddress: opts.testOnlySocatAddress }, left, opts.signal);
      }
      const sock = await connectUnix(address.path, left, opts.signal);
      if (address.kind === 'unix') return sock;
      const remaining = deadlineMs - (Date.now() - start);
      await hybridHandshake(sock, address.port, Math.max(1, Math.min(remaining, opts.handshakeTimeoutMs ?? 10_000)), where);
      return sock;
    } catch (e) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      if (e instanceof AgentError) throw e;
      if (!(e instanceof RetryableDialError) && !RETRYABLE.has((e as NodeJS.ErrnoException).code ?? '')) {
        throw new AgentError('unreachable', `cannot connect to the agent at ${where}: ${(e as Error).message}`, { address: where, cause: e });
      }
      // The last attempt is often cut short by the deadline; an earlier, real cause says more.
      if (!(e instanceof RetryableDialError && e.timedOut) || last === undefined) last = e;
    }
    const remaining = deadlineMs - (Date.now() - start);
    if (remaining <= 0) break;
    await sleep(Math.min(pause, remaining), opts.signal);
    pause = Math.min(pause * 2, interval * 16);
  }
  throw new AgentError('unreachable', `the agent at ${where} did not answer within ${deadlineMs} ms (${attempts} attempts; last: ${(last as Error).message})`, {
    address: where,
    cause: last,
    fix:
      address.kind === 'vsock'
        ? `Check that the VM booted with a vhost-vsock device whose guest CID is ${address.cid} and that its agent listens on vsock port ${address.port} (the guest console log shows both); on a slow host (TCG) allow a longer dial timeout.`
        : 'Check that the VM booted and its agent started (the guest console log shows both); on a slow host (TCG) allow a longer dial timeout.',
  });
}

function connectUnix(path: string, timeoutMs: number, signal: AbortSignal | undefined): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(path);
    const timer = setTimeout(() => fail(new RetryableDialError(`connect to ${path} timed out`, true)), Math.max(1, timeoutMs));
    const onAbort = (): void => fail(signal!.reason as Error);
    const cleanup = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      sock.off('error', fail);
    };
    function fail(err: Error): void {
      cleanup();
      sock.destroy();
      reject(err);
    }
    signal?.addEventListener('abort', onAbort, { once: true });
    sock.once('error', fail);
    sock.once('connect', () => {
      cleanup();
      resolve(sock);
    });
  });
}

/** Longest handshake reply we read; `OK 4294967295\n` is 14 bytes. */
const MAX_REPLY = 64;

/**
 * Sends `CONNECT <port>\n` and waits for one line. `OK` or `OK <n>` completes the handshake, and
 * any bytes after the line are handed back to the stream for ttrpc. The VMM closing the socket
 * without a line means nothing listens on the port yet: retryable. Any other line is a handshake
 * error: the socket is not a hybrid-vsock endpoint, or not for this port.
 */
function hybridHandshake(sock: net.Socket, port: number, timeoutMs: number, where: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => done(new RetryableDialError(`no reply to CONNECT ${port} within ${timeoutMs} ms`, true)), timeoutMs);
    const cleanup = (): void => {
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('end', onEnd);
      sock.off('close', onEnd);
      sock.off('error', onError);
    };
    const done = (err?: Error, rest?: Buffer): void => {
      cleanup();
      if (err) {
        sock.destroy();
        reject(err);
        return;
      }
      sock.pause();
      if (rest && rest.length) sock.unshift(rest);
      resolve();
    };
    const onData = (chunk: Buffer): void => {
      buf = Buffer.concat([buf, chunk]);
      const nl = buf.indexOf(0x0a);
      if (nl < 0) {
        if (buf.length > MAX_REPLY) done(badReply(buf));
        return;
      }
      const line = buf.subarray(0, nl).toString('latin1').replace(/\r$/, '');
      if (/^OK( \d+)?$/.test(line)) done(undefined, buf.subarray(nl + 1));
      else done(badReply(buf.subarray(0, nl)));
    };
    const badReply = (reply: Buffer): AgentError =>
      new AgentError('handshake', `hybrid vsock at ${where}: expected "OK <port>" in reply to "CONNECT ${port}", got ${JSON.stringify(reply.subarray(0, MAX_REPLY).toString('latin1'))}`, {
        address: where,
        fix: 'Check that the path is the VM\'s vsock socket (Cloud Hypervisor: the vsock device\'s socket; Firecracker: its uds_path) and that the agent listens on this port.',
      });
    const onEnd = (): void => done(new RetryableDialError(`the hybrid-vsock socket closed without answering CONNECT ${port} (nothing listens on the port yet)`));
    const onError = (err: Error): void => done(err);
    sock.on('data', onData);
    sock.once('end', onEnd);
    sock.once('close', onEnd);
    sock.once('error', onError);
    sock.write(`CONNECT ${port}\n`);
  });
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(t);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
