/**
 * `kata-runtime exec <sandbox-id>`: attaches the local terminal to the sandbox's guest debug console
 * (a root shell in the guest, `[agent.kata] debug_console_enabled = true`) through the shim's
 * management socket (shim/monitor.ts). The local terminal is in raw mode while attached and is
 * restored on every way out (detach, the shim or VM going away, a signal, `process.exit`).
 *
 * The console is a serial line: the guest shell outlives an attach, and `exit` in it starts a new
 * one. Ctrl-] detaches (as `virsh console` and telnet). Without a terminal on stdin, input is sent
 * as it is and the command ends once stdin has ended and the console has been quiet for a second.
 */
import http from 'node:http';
import { statSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import type { ReadStream, WriteStream } from 'node:tty';
import { KataError } from '../core/errors.js';
import { DEBUG_CONSOLE_PROTOCOL, shimMonitorSocket } from '../core/shim-monitor.js';
import { EXIT, usageError, type CommandContext } from './main.js';
import { LocalTerminal } from './tty.js';

/** Ctrl-]: detaches from the console. */
export const DETACH_KEY = 0x1d;

/** How long the shim has to accept or refuse an attach. */
export const ATTACH_TIMEOUT_MS = 10_000;
/** The most of a refusal's body that is read (its JSON `message`). */
const MAX_REFUSAL_BYTES = 4096;

/** Connects to the debug console of `sandboxId`; refusals are KATA_ERR_DEBUG_CONSOLE (or KATA_ERR_INVALID_ID). */
export function attachDebugConsole(sandboxId: string, env: NodeJS.ProcessEnv = process.env, timeoutMs = ATTACH_TIMEOUT_MS): Promise<Duplex> {
  const socketPath = shimMonitorSocket(sandboxId, env);
  try {
    statSync(socketPath);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    // The management sockets are root's (/run/vc/sbs is 0700): not finding one as another user says nothing about the sandbox.
    if (code === 'EACCES') {
      return Promise.reject(new KataError('KATA_ERR_DEBUG_CONSOLE', `cannot look for sandbox "${sandboxId}": permission denied on ${socketPath}`, { key: 'sandbox-id', value: sandboxId, fix: 'run kata-runtime exec as root: the shims\' management sockets are root only' }));
    }
    return Promise.reject(new KataError('KATA_ERR_DEBUG_CONSOLE', `no running sandbox "${sandboxId}": ${socketPath} does not exist`, { key: 'sandbox-id', value: sandboxId }));
  }
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, path: '/debug-console', method: 'GET', headers: { Connection: 'Upgrade', Upgrade: DEBUG_CONSOLE_PROTOCOL } });
    // A shim that accepts the connection and never answers must not hold the terminal forever.
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.once('upgrade', (_res, socket, head) => {
      socket.setTimeout(0);
      if (head.length) socket.unshift(head);
      resolve(socket);
    });
    req.once('response', (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => {
        if (body.length < MAX_REFUSAL_BYTES) body += d.slice(0, MAX_REFUSAL_BYTES - body.length);
      });
      res.once('end', () => {
        let message = `the shim refused the debug console (HTTP ${res.statusCode})`;
        try {
          const parsed = JSON.parse(body) as { message?: unknown };
          if (typeof parsed.message === 'string') message = parsed.message;
        } catch {
          /* not JSON: keep the status */
        }
        reject(new KataError('KATA_ERR_DEBUG_CONSOLE', `sandbox "${sandboxId}": ${message}`, { key: 'sandbox-id', value: sandboxId }));
      });
    });
    req.once('error', (err) => reject(new KataError('KATA_ERR_DEBUG_CONSOLE', `cannot reach the shim of sandbox "${sandboxId}" at ${socketPath}: ${err.message}`, { key: 'sandbox-id', value: sandboxId })));
    req.end();
  });
}

export async function execCommand(ctx: CommandContext): Promise<number> {
  const [sandboxId, ...rest] = ctx.args;
  if (!sandboxId || rest.length > 0) throw usageError('exec takes one argument, the sandbox id: kata-runtime exec <sandbox-id>');
  const conn = await attachDebugConsole(sandboxId, ctx.io.env);
  const stdin = process.stdin;
  const local = stdin.isTTY && process.stdout.isTTY ? new LocalTerminal(stdin as ReadStream, process.stdout as WriteStream) : undefined;
  const signals = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
  let how = 'ended' as 'detached' | 'ended' | 'signal';
  const onSignal = () => {
    how = 'signal';
    finishing?.();
  };
  let finishing: (() => void) | undefined;
  try {
    local?.enterRaw();
    if (local) ctx.io.err('kata-runtime: attached to the guest debug console; Ctrl-] detaches\r\n');
    await new Promise<void>((resolve) => {
      let quiet: NodeJS.Timeout | undefined;
      let inputEnded = false;
      const finish = () => resolve();
      finishing = finish;
      const armQuiet = () => {
        if (!inputEnded) return;
        clearTimeout(quiet);
        quiet = setTimeout(() => {
          how = 'detached';
          finish();
        }, 1000);
      };
      for (const s of signals) process.once(s, onSignal);
      conn.on('data', (d: Buffer) => {
        process.stdout.write(d);
        armQuiet();
      });
      conn.once('close', finish);
      conn.on('error', finish);
      stdin.on('data', (d: Buffer) => {
        const at = local ? d.indexOf(DETACH_KEY) : -1;
        if (at >= 0) {
          if (at > 0) conn.write(d.subarray(0, at));
          how = 'detached';
          finish();
          return;
        }
        conn.write(d);
      });
      stdin.once('end', () => {
        inputEnded = true;
        armQuiet();
      });
      stdin.resume();
    });
  } finally {
    for (const s of signals) process.off(s, onSignal);
    stdin.pause();
    stdin.removeAllListeners('data');
    conn.destroy();
    local?.restore();
  }
  if (how === 'signal') return EXIT.FAILED;
  if (how === 'ended') {
    ctx.io.err('\r\nkata-runtime: the debug console connection ended (the sandbox stopped)\n');
    return EXIT.FAILED;
  }
  if (local) ctx.io.err('\r\nkata-runtime: detached\n');
  return EXIT.OK;
}
