/**
 * The kata-ts guest agent: serves the subset of kata-agent's `grpc.AgentService` and `grpc.Health`
 * that the runtime uses, over ttrpc on the virtio-serial port `agent.channel.0`. Bundled by the
 * guest image builder into /agent/agent.mjs and started by /agent/start (guest/agent/start), which
 * stays PID 1 to reap orphans. guest/README.md describes what it does and does not do.
 *
 * Kernel command line: `agent.log=debug` logs every RPC; `agent.hotplug_timeout=<s>` (kata's
 * name) bounds the wait for a hot-plugged block device (default 60 s: TCG is slow);
 * `agent.debug_console` (kata's name) serves a root shell on the virtio-serial port
 * `debug.console.0` (debug-console.ts).
 */
import { readFileSync } from 'node:fs';
import { TtrpcServer } from '../../wire/ttrpc/server.js';
import { BlockReporter } from './block-report.js';
import { AGENT_PORT_NAME, servePort, waitForVirtioPort } from './channel.js';
import { serveDebugConsole } from './debug-console.js';
import { log, setDebug } from './log.js';
import { DEFAULT_SANDBOX_OPTIONS, Sandbox } from './sandbox.js';
import { registerServices } from './service.js';
import { uptime } from './sys.js';
import { AGENT_VERSION } from './version.js';

function cmdlineParam(cmdline: string, name: string): string | undefined {
  for (const p of cmdline.split(/\s+/)) if (p.startsWith(`${name}=`)) return p.slice(name.length + 1);
  return undefined;
}

async function main(): Promise<void> {
  const cmdline = (() => {
    try {
      return readFileSync('/proc/cmdline', 'utf8');
    } catch {
      return '';
    }
  })();
  setDebug(cmdlineParam(cmdline, 'agent.log') === 'debug');
  log(`started pid=${process.pid} node=${process.version} version=${AGENT_VERSION} uptime=${uptime().toFixed(2)}`);
  if (process.pid === 1) log('running as PID 1: orphaned processes will not be reaped (start it through /agent/start)');

  // The agent must outlive any bug in a handler: log and carry on.
  process.on('uncaughtException', (err) => log(`uncaught exception: ${err.stack ?? err.message}`));
  process.on('unhandledRejection', (err) => log(`unhandled rejection: ${(err as Error)?.stack ?? String(err)}`));
  // PID 1 (our parent) ignores these; we must not die of them either.
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => log(`ignoring ${sig}`));

  const hotplugS = Number(cmdlineParam(cmdline, 'agent.hotplug_timeout'));
  const sandbox = new Sandbox({
    ...DEFAULT_SANDBOX_OPTIONS,
    hotplugTimeoutMs: Number.isFinite(hotplugS) && hotplugS > 0 ? hotplugS * 1000 : DEFAULT_SANDBOX_OPTIONS.hotplugTimeoutMs,
  });
  const server = new TtrpcServer({
    onHandlerError: (err, ctx) => log(`${ctx.method}: ${(err as Error)?.stack ?? String(err)}`),
    onProtocolError: (err) => log(`protocol error: ${err.message}`),
  });
  registerServices(server, sandbox);
  await sandbox.enableCgroups();
  sandbox.watchOomKills();

  new BlockReporter((line) => process.stderr.write(`${line}\n`)).start();

  // Off unless the runtime asked for it (debug_console_enabled); a failure here leaves the agent serving.
  if (cmdline.split(/\s+/).includes('agent.debug_console')) void serveDebugConsole().catch((err: unknown) => log(`debug console: ${(err as Error).message}`));

  const port = await waitForVirtioPort(AGENT_PORT_NAME, 30_000);
  log(`listening on /dev/${port} (${AGENT_PORT_NAME}) uptime=${uptime().toFixed(2)}`);
  await servePort(server, `/dev/${port}`);
}

main().catch((err: unknown) => {
  log(`fatal: ${(err as Error)?.stack ?? String(err)}`);
  // /agent/start powers the guest off: without its agent it is of no use, and the runtime sees the VM end.
  process.exit(1);
});
