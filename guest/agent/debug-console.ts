/**
 * The guest debug console (`agent.debug_console` on the kernel command line, set by the runtime
 * for `[agent.kata] debug_console_enabled = true`): a root shell in the guest, not in a container,
 * on a pty, relayed over its own virtio-serial port `debug.console.0`. The host end is a QEMU
 * chardev socket that the shim's management socket relays `kata-runtime exec <sandbox>` to.
 *
 * The port is opened non-blocking: unlike the agent's port (channel.ts), a write must never wait
 * on libuv's thread pool for a host that is not connected, or a chatty shell with nobody attached
 * would take the pool's threads from the agent. With O_NONBLOCK virtio_console answers EAGAIN to a
 * write while the host is away (the shell's output then waits in the pty, as on a serial line
 * without a reader), 0 to a read while the host is away, and EAGAIN to a read with no data.
 * When the shell exits (`exit`), a new one is started for the next attach.
 */
import { spawn } from 'node:child_process';
import { close, constants, open, read, write } from 'node:fs';
import { waitForVirtioPort } from './channel.js';
import { log } from './log.js';
import { PtyMaster } from './pty.js';
import { BUSYBOX, sleep } from './sys.js';

export const DEBUG_CONSOLE_PORT_NAME = 'debug.console.0';

/** The environment of the console's shell: nothing of the agent's own. */
const SHELL_ENV = Object.freeze({ PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', HOME: '/root', TERM: 'linux', PS1: 'guest# ' });

const openNonBlocking = (p: string): Promise<number> =>
  new Promise((resolve, reject) => open(p, constants.O_RDWR | constants.O_NONBLOCK | constants.O_NOCTTY, (err, fd) => (err ? reject(err) : resolve(fd))));

/** A read of the port: bytes, 0 (host away), or -1 (no data yet). */
const readPort = (fd: number, buf: Buffer): Promise<number> =>
  new Promise((resolve, reject) =>
    read(fd, buf, 0, buf.length, null, (err, n) => {
      if (err && err.code === 'EAGAIN') resolve(-1);
      else if (err) reject(err);
      else resolve(n);
    }),
  );

/** A write to the port: bytes written, or 0 when it would block (host away or queue full). */
const writePort = (fd: number, data: Uint8Array, off: number): Promise<number> =>
  new Promise((resolve, reject) =>
    write(fd, data, off, Math.min(data.length - off, 32 * 1024), null, (err, n) => {
      if (err && err.code === 'EAGAIN') resolve(0);
      else if (err) reject(err);
      else resolve(n);
    }),
  );

/** One shell on a fresh pty; resolves when the shell has exited and its terminal is drained. */
async function runShell(fd: number, stop: AbortSignal): Promise<void> {
  const pty = PtyMaster.open(24, 80);
  const slave = pty.slave as number;
  let child;
  try {
    // setsid -c: a new session whose controlling terminal is the slave (so ^C reaches the shell's job).
    child = spawn(BUSYBOX, ['setsid', '-c', BUSYBOX, 'sh', '-l'], { stdio: [slave, slave, slave], env: SHELL_ENV, cwd: '/' });
  } finally {
    pty.closeSlave();
  }
  child.on('error', (err) => log(`debug console: ${err.message}`));
  log(`debug console: shell started pid=${child.pid}`);
  let outputDone = false;
  // Terminal → port, paused while the host cannot take it.
  const toHost = (async () => {
    for await (const chunk of pty.output as AsyncIterable<Buffer>) {
      let off = 0;
      while (off < chunk.length && !stop.aborted) {
        const n = await writePort(fd, chunk, off);
        if (n === 0) await sleep(50);
        off += n;
      }
    }
  })()
    .catch(() => undefined)
    .finally(() => {
      outputDone = true;
    });
  // Port → terminal, polled (a character device cannot be watched by libuv).
  const buf = Buffer.allocUnsafe(4096);
  while (!outputDone && !stop.aborted) {
    const n = await readPort(fd, buf).catch(() => 0);
    if (n > 0) await new Promise<void>((resolve) => pty.write(Buffer.from(buf.subarray(0, n)), () => resolve()));
    else await sleep(n === 0 ? 100 : 20);
  }
  await toHost;
  pty.destroy();
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  log('debug console: shell ended');
}

/** Serves the debug console until `stop` aborts (never, in the agent). */
export async function serveDebugConsole(stop: AbortSignal = new AbortController().signal): Promise<void> {
  const port = await waitForVirtioPort(DEBUG_CONSOLE_PORT_NAME, 30_000);
  const fd = await openNonBlocking(`/dev/${port}`);
  log(`debug console on /dev/${port} (${DEBUG_CONSOLE_PORT_NAME})`);
  try {
    while (!stop.aborted) {
      await runShell(fd, stop).catch((err: unknown) => log(`debug console: ${(err as Error).message}`));
      await sleep(200);
    }
  } finally {
    close(fd, () => undefined);
  }
}
