/**
 * AF_VSOCK agent connections through socat. Node.js has no AF_VSOCK sockets, and rather than a
 * native addon of our own the runtime runs Debian's socat (1.7.4+ has `VSOCK-CONNECT:<cid>:<port>`)
 * and speaks ttrpc over its stdin and stdout:
 *
 *     setpriv --pdeathsig KILL -- socat -d -d -t0 - VSOCK-CONNECT:<cid>:<port>
 *
 * - `-d -d` makes socat log notices on stderr: "starting data transfer loop" once connect()
 *   succeeded, which is when the stream is handed to ttrpc, and `E connect(…): <strerror>` when it
 *   failed (then it exits 1). Its stdout carries nothing before the connection is up.
 * - `-t0`: when either side reaches end of file socat exits at once instead of waiting 0.5 s for
 *   the other direction. ttrpc has no half-closed state, so nothing is lost; it means the agent
 *   closing its end exits socat (its stdout ends), and so does our stdin closing.
 * - socat copies whatever it reads (up to 8 KiB at a time) without line buffering or delay.
 * - Lifetime: the stream's destroy() SIGKILLs socat; an aborted or timed-out attempt does too.
 *   If the runtime dies, `setpriv --pdeathsig KILL` (util-linux, Essential in Debian; started
 *   through `core/child.ts` like the hypervisor) has the kernel kill socat at once, even while it
 *   waits in connect(), which takes up to 2 s for a guest that is not up. Without setpriv, socat
 *   still exits when its stdin (a pipe from the runtime) reaches end of file, but only once
 *   connect() has returned.
 */
import type { ChildProcess } from 'node:child_process';
import { Duplex } from 'node:stream';
import { findExecutable, spawnTied } from '../child.js';
import { AgentError, RetryableDialError } from './errors.js';

/** socat's notice once both addresses are open (`-d -d`), verified with socat 1.7.4.4. */
const CONNECTED = /\bN starting data transfer loop\b/;
/** A socat log line: `2026/11/26 20:37:30 socat[21060] E connect(…): Connection reset by peer`. */
const LOG_LINE = /^\S+ \S+ socat\[\d+\] ([DINWEF]) (.*)$/;
/** Keep this many of socat's last stderr lines for error messages. */
const TAIL_LINES = 8;

export const SOCAT_INSTALL_FIX = 'Install socat 1.7.4 or later: `apt-get install socat` (Debian 12 ships 1.7.4.4).';

export interface VsockDialTarget {
  readonly cid: number;
  readonly port: number;
  /** `vsock://cid:port`, for messages. */
  readonly where: string;
  /**
   * Tests only: the socat address to connect to instead of `VSOCK-CONNECT:<cid>:<port>` (e.g.
   * `UNIX-CONNECT:/path`), so the socat plumbing can be exercised on a host without vhost-vsock.
   */
  readonly socatAddress?: string | undefined;
}

/** Finds socat on PATH, or throws the `socat-missing` AgentError with the install fix. */
export function findSocat(where: string): string {
  const socat = findExecutable('socat');
  if (!socat) {
    throw new AgentError('socat-missing', `cannot dial ${where}: AF_VSOCK connections go through socat, and socat is not on PATH`, {
      address: where,
      fix: SOCAT_INSTALL_FIX,
    });
  }
  return socat;
}

/**
 * One attempt: starts socat and resolves with the connected stream once socat reports the data
 * transfer loop. Rejects with a {@link RetryableDialError} when connect() failed (nothing listens
 * on the port yet, the CID has no guest yet) or the attempt ran out of time, with an AgentError
 * when retrying cannot help, and with the signal's reason on abort. socat is dead whenever this
 * rejects.
 */
export function connectVsock(socat: string, target: VsockDialTarget, timeoutMs: number, signal: AbortSignal | undefined): Promise<Duplex> {
  const address = target.socatAddress ?? `VSOCK-CONNECT:${target.cid}:${target.port}`;
  return new Promise((resolve, reject) => {
    // LC_ALL=C: socat's error text is strerror(), which we match and show.
    const child = spawnTied(socat, ['-d', '-d', '-t0', '-', address], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
    const log = new SocatLog(child);
    let settled = false;
    const timer = setTimeout(() => fail(new RetryableDialError(`socat did not connect to ${describe(target, address)} within ${timeoutMs} ms`, true)), Math.max(1, timeoutMs));
    const onAbort = (): void => fail(signal!.reason as Error);
    const cleanup = (): void => {
      settled = true;
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      child.off('error', onSpawnError);
      child.off('close', onClose);
      log.onConnected = undefined;
    };
    function fail(err: Error): void {
      if (settled) return;
      cleanup();
      kill(child);
      reject(err);
    }
    const onSpawnError = (err: NodeJS.ErrnoException): void =>
      fail(
        err.code === 'ENOENT'
          ? new AgentError('socat-missing', `cannot dial ${target.where}: ${socat} is gone (${err.message})`, { address: target.where, fix: SOCAT_INSTALL_FIX, cause: err })
          : new AgentError('unreachable', `cannot dial ${target.where}: starting socat failed: ${err.message}`, { address: target.where, cause: err }),
      );
    // 'close' (not 'exit'): stderr is read to its end, so socat's last words are in the log.
    const onClose = (code: number | null, sig: NodeJS.Signals | null): void => fail(attemptFailure(target, address, log, code, sig));
    if (signal?.aborted) {
      queueMicrotask(onAbort);
    } else {
      signal?.addEventListener('abort', onAbort, { once: true });
    }
    child.once('error', onSpawnError);
    child.once('close', onClose);
    log.onConnected = () => {
      if (settled) return;
      cleanup();
      resolve(new SocatStream(child, log, target.where));
    };
  });
}

/** Why socat ended before connecting: retryable for connect() failures, an AgentError otherwise. */
function attemptFailure(target: VsockDialTarget, address: string, log: SocatLog, code: number | null, sig: NodeJS.Signals | null): Error {
  const error = log.lastError;
  const said = error ? strerrorOf(error) : log.tail.at(-1) ?? (sig ? `killed by ${sig}` : `exit status ${code}`);
  const what = `socat could not connect ${describe(target, address)}: ${said}`;
  if (!error) return new RetryableDialError(`${what} (socat ended before connecting)`);
  if (/^unknown device\/address/.test(error)) {
    return new AgentError('socat-missing', `cannot dial ${target.where}: this socat does not know ${address.split(':')[0]} (${error}); VSOCK-CONNECT needs socat 1.7.4 or later`, {
      address: target.where,
      fix: SOCAT_INSTALL_FIX,
    });
  }
  if (/^socket\(.*Address family not supported/.test(error)) {
    return new AgentError('transport-unsupported', `cannot dial ${target.where}: this host's kernel has no AF_VSOCK support (${what})`, {
      address: target.where,
      fix: 'Load the host vsock modules (`modprobe vhost_vsock`), or use an agent channel without vhost-vsock: QEMU with virtio-serial, or Cloud Hypervisor (hybrid vsock).',
    });
  }
  // connect() failing is the guest not being there yet: ECONNRESET (nothing listens on the port),
  // ENODEV (no guest has this CID yet), ETIMEDOUT (the guest does not answer yet), ECONNREFUSED.
  if (/^connect\(/.test(error)) return new RetryableDialError(what);
  return new AgentError('unreachable', `cannot dial ${target.where}: ${what}`, {
    address: target.where,
    fix: "Read socat's message; `socat -d -d - VSOCK-CONNECT:<cid>:<port>` run by hand shows the same.",
  });
}

function describe(target: VsockDialTarget, address: string): string {
  return target.socatAddress ? `to ${address} (standing in for CID ${target.cid} port ${target.port})` : `to CID ${target.cid} port ${target.port}`;
}

/** `connect(5, AF=40 cid:2 port:9999, 16): Connection reset by peer` → `Connection reset by peer`. */
function strerrorOf(error: string): string {
  const i = error.lastIndexOf('): ');
  return i >= 0 ? error.slice(i + 3) : error;
}

function kill(child: ChildProcess): void {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
}

/** Reads socat's stderr line by line: spots the connected notice and keeps the last lines. */
class SocatLog {
  readonly tail: string[] = [];
  /** The text of socat's last `E` line, e.g. `connect(…): Connection reset by peer`. */
  lastError: string | undefined;
  /** socat's last warning or error since the connection was up. */
  problem: string | undefined;
  connected = false;
  onConnected: (() => void) | undefined;
  private partial = '';

  constructor(child: ChildProcess) {
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (chunk: string) => {
      const lines = (this.partial + chunk).split('\n');
      this.partial = lines.pop()!;
      for (const line of lines) this.line(line);
    });
    child.stderr!.on('end', () => {
      if (this.partial) this.line(this.partial);
      this.partial = '';
    });
  }

  private line(line: string): void {
    if (!line) return;
    this.tail.push(line);
    if (this.tail.length > TAIL_LINES) this.tail.shift();
    const m = LOG_LINE.exec(line);
    if (m?.[1] === 'E' || m?.[1] === 'F') this.lastError = m[2];
    // Once connected, socat reports a broken connection as a warning and exits 0:
    // `W read(5, …, 8192): Connection reset by peer`.
    if (this.connected && m && 'WEF'.includes(m[1]!)) this.problem = m[2];
    if (CONNECTED.test(line)) {
      this.connected = true;
      this.onConnected?.();
    }
  }
}

/**
 * The connected socat as the byte stream ttrpc reads and writes. End of file comes when socat
 * has exited (with `-t0` that is right after the agent's side closed), so that what socat
 * reported on the way out (`W read(…): Connection reset by peer`) becomes the stream's error
 * instead. destroy() kills socat.
 */
class SocatStream extends Duplex {
  constructor(
    private readonly child: ChildProcess,
    private readonly log: SocatLog,
    private readonly where: string,
  ) {
    super({ allowHalfOpen: false });
    const { stdin, stdout } = child;
    stdout!.on('data', (chunk: Buffer) => {
      if (!this.push(chunk)) stdout!.pause();
    });
    // EPIPE and the like once socat is gone: its exit says why, below.
    stdin!.on('error', () => undefined);
    stdout!.on('error', () => undefined);
    child.once('close', (code, sig) => {
      if (this.destroyed) return;
      const problem = this.log.problem;
      if (problem) this.destroy(new Error(`socat for ${this.where}: ${strerrorOf(problem)}`));
      else if (code !== 0) this.destroy(new Error(`socat for ${this.where} ended (${sig ?? `exit status ${code}`})`));
      else this.push(null);
    });
  }

  /** socat's pid, for tests and logs. */
  get pid(): number | undefined {
    return this.child.pid;
  }

  override _read(): void {
    this.child.stdout!.resume();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.child.stdin!.write(chunk, cb);
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.child.stdin!.end(cb);
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    kill(this.child);
    this.child.stdin!.destroy();
    this.child.stdout!.destroy();
    cb(err);
  }
}
