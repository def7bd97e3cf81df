/**
 * containerd-shim-kata-v2: the runtime v2 shim containerd starts for `io.containerd.kata.v2`.
 *
 *   start   Binds nothing itself: spawns the shim daemon (this program with `-socket PATH`),
 *           detached and with its own stdio, waits until it serves, writes `<bundle>/address` and
 *           prints only `unix://PATH` (containerd 1.6 reads stdout and stderr together and dials
 *           what it reads). A container of a pod whose shim already runs gets that shim's address.
 *   delete  Cleans up after a shim that is gone (containerd 1.6 also runs it after every normal
 *           task deletion): unmounts the rootfs, kills what is left of the sandbox's VM, removes its
 *           run directory, and prints a DeleteResponse. Idempotent.
 *   (daemon) Serves containerd.task.v2.Task over ttrpc on the socket and forwards task events to
 *           $TTRPC_ADDRESS; exits after Shutdown, or on SIGTERM/SIGINT after stopping the sandbox.
 *
 * Every id and namespace (flags, the CRI sandbox-id annotation, task API requests) is checked as
 * containerd checks identifiers before it names a file, a directory or a process (./identifiers.ts);
 * what `delete` removes or kills is only what is provably the shim's own (./cleanup.ts).
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, writeSync } from 'node:fs';
import { chmod, mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { KataError, toKataError } from '../core/errors.js';
import { closeSinks, logFifo, systemLog } from './log-sinks.js';
import { createLogger, type Logger } from '../core/logger.js';
import { mountsUnder, unmount } from '../core/mounts.js';
import { TtrpcServer } from '../wire/ttrpc/index.js';
import { runtimeVersion } from '../core/version.js';
import { DEFAULT_RUN_ROOT } from '../core/vm-lifecycle.js';
import { canConnect, inSocketDir, readAddressFile, removeShimSocket, sandboxProcesses, shimSocketDir, socketRefusal, writeAddressFile } from './cleanup.js';
import { EventPublisher } from './events.js';
import { parseShimFlags, type ShimFlags } from './flags.js';
import { checkIdentifier, guardTaskIds } from './identifiers.js';
import { readBundleSpec, SANDBOX_ID_ANNOTATION, type BundleSpec } from './oci.js';
import { Any, DeleteResponse, RuntimeInfo, Task } from '../wire/containerd/proto.gen.js';
import { PARKED_TASK_METHODS, TaskService } from './service.js';
import { timestamp } from './time.js';
import { SHIPPED_QEMU_CONFIG } from '../core/paths.js';
import type { PluginSource } from '../core/plugin-api.js';
import { useBuiltinPlugins } from '../core/plugin-loader.js';
import { ShimMonitor, shimMonitorSocket } from './monitor.js';

/** The runtime type containerd knows this shim by. */
export const RUNTIME_NAME = 'io.containerd.kata.v2';

/** The runtime options containerd wrote to stdin (a protobuf Any), echoed back by -info; anything else is ignored. */
function runtimeOptions(bytes: Uint8Array | undefined): { options?: Any } {
  if (!bytes || bytes.length === 0) return {};
  try {
    const options = Any.decode(bytes);
    return options.type_url ? { options } : {};
  } catch {
    return {};
  }
}

export { SOCKET_DIR } from './cleanup.js';
const READY_LINE = 'ready';
/** The daemon's readiness pipe to `start`. */
const READY_FD = 3;
const START_TIMEOUT_MS = 20_000;

export interface ShimEnv {
  readonly env: NodeJS.ProcessEnv;
  /** Everything on stdin (read only by -info). */
  readonly stdin?: () => Uint8Array;
  readonly argv: readonly string[];
  readonly stdout: (s: string | Uint8Array) => void;
  readonly stderr: (s: string) => void;
  /** The built-in plugins the executable hands over (the shim itself imports no plugin). */
  readonly builtins?: readonly PluginSource[];
}

/** The socket of the shim serving a sandbox: a hash of containerd's address, namespace and sandbox id. */
export function socketPath(env: NodeJS.ProcessEnv, address: string, namespace: string, sandboxId: string): string {
  const dir = shimSocketDir(env);
  return path.join(dir, createHash('sha256').update(path.join(address, namespace, sandboxId)).digest('hex'));
}

/**
 * Where the sandboxes of a containerd namespace keep their run directories: ids are unique only
 * within a namespace, so `delete` in one can never touch another's VM.
 */
export function runRootOf(env: NodeJS.ProcessEnv, namespace: string): string {
  return path.join(env.KATA_TS_RUN_ROOT || DEFAULT_RUN_ROOT, namespace);
}

export async function shimMain(io: ShimEnv): Promise<number> {
  if (io.builtins) useBuiltinPlugins(io.builtins);
  let flags: ShimFlags;
  try {
    flags = parseShimFlags(io.argv);
  } catch (e) {
    io.stderr(`containerd-shim-kata-v2: ${describe(e)}\n`);
    return 2;
  }
  if (flags.action === 'version') {
    io.stdout(`containerd-shim-kata-v2 (kata-ts) ${runtimeVersion()}\n`);
    return 0;
  }
  if (flags.action === 'info') {
    io.stdout(RuntimeInfo.encode({ name: RUNTIME_NAME, version: { version: runtimeVersion(), revision: '' }, ...runtimeOptions(io.stdin?.()) }));
    return 0;
  }
  try {
    if (flags.action === 'start') return await start(flags, io);
    if (flags.action === 'delete') return await deleteAction(flags, io);
    return await serve(flags, io);
  } catch (e) {
    // containerd shows what start/delete print as the error of the call it made.
    io.stderr(`containerd-shim-kata-v2 ${flags.action}: ${describe(e)}\n`);
    return 1;
  }
}

function describe(e: unknown): string {
  const k = toKataError(e);
  return `${k.message} [${k.code}] (fix: ${k.fix})`;
}

/** The pod sandbox a container joins (CRI annotation) names a run directory and a socket too. */
function checkedSandboxId(spec: Pick<BundleSpec, 'sandboxId' | 'joinsSandbox'>): string {
  return spec.joinsSandbox ? checkIdentifier(SANDBOX_ID_ANNOTATION, spec.sandboxId) : spec.sandboxId;
}

async function start(flags: ShimFlags, io: ShimEnv): Promise<number> {
  const bundle = flags.bundle ?? process.cwd();
  const spec = await readBundleSpec(bundle, flags.id);
  const sock = socketPath(io.env, flags.address, flags.namespace, checkedSandboxId(spec));
  const address = `unix://${sock}`;
  if (await canConnect(sock)) {
    // The pod's shim already runs: containerd talks to it for this container too.
    await writeAddressFile(bundle, address);
    io.stdout(address);
    return 0;
  }
  if (spec.joinsSandbox) {
    throw new KataError('KATA_ERR_SHIM', `container ${flags.id} joins pod sandbox ${spec.sandboxId}, but no shim serves that sandbox`, {
      fix: 'create the pod sandbox first (CRI does); check that its shim is still running',
    });
  }
  await mkdir(path.dirname(sock), { recursive: true, mode: 0o711 });
  await removeShimSocket(sock, shimSocketDir(io.env));

  const script = process.argv[1]!;
  const args = [...process.execArgv, script, '-namespace', flags.namespace, '-address', flags.address, '-publish-binary', flags.publishBinary, '-id', flags.id, '-bundle', bundle];
  if (flags.debug) args.push('-debug');
  args.push('-socket', sock);
  // Detached with its own stdio: containerd waits for start's stdout and stderr to close.
  // Readiness comes back on fd 3, a pipe of its own: the daemon's stdout and stderr are /dev/null,
  // so nothing it (or a plugin) ever prints can reach a closed pipe.
  const child = spawn(process.execPath, args, { cwd: bundle, detached: true, stdio: ['ignore', 'ignore', 'ignore', 'pipe'], env: io.env });
  const ready = child.stdio[3] as NodeJS.ReadableStream & { destroy(): void };
  const answer = await new Promise<string>((resolve) => {
    let buf = '';
    const timer = setTimeout(() => resolve(`the shim daemon did not become ready within ${START_TIMEOUT_MS / 1000} s`), START_TIMEOUT_MS);
    ready.setEncoding('utf8');
    ready.on('data', (d: string) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(buf.slice(0, nl));
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      resolve(buf.split('\n')[0] || `the shim daemon exited (${signal ?? `code ${code}`}) before it served`);
    });
  });
  ready.destroy();
  child.unref();
  if (answer !== READY_LINE) {
    if (child.exitCode === null) child.kill('SIGKILL');
    throw new KataError('KATA_ERR_SHIM', answer);
  }
  await writeAddressFile(bundle, address);
  io.stdout(address);
  return 0;
}

async function serve(flags: ShimFlags, io: ShimEnv): Promise<number> {
  const bundle = flags.bundle ?? process.cwd();
  const socketDir = shimSocketDir(io.env);
  const sock = await inSocketDir(flags.socket!, socketDir);
  if (!sock) {
    throw new KataError('KATA_ERR_SHIM', `-socket ${flags.socket} is not directly in the shim socket directory ${socketDir}`, {
      fix: 'let `start` spawn the daemon: it chooses the socket in the shim socket directory',
    });
  }
  // containerd's log pipe and the system log (identifier "kata"), both written without blocking.
  // A `log` that is not a FIFO (a symlink to a file, say) is refused; the warning goes to the system log.
  const pipe = logFifo(path.join(bundle, 'log'), { onRefused: (message) => log.warn(message) });
  const sinks = [pipe, systemLog()];
  const log: Logger = createLogger({ level: flags.debug ? 'debug' : 'info', name: 'kata', sinks }).child({ namespace: flags.namespace });
  const events = new EventPublisher({ address: io.env.TTRPC_ADDRESS, namespace: flags.namespace, log });

  let exiting: Promise<void> | undefined;
  const exit = (code: number) => {
    exiting ??= (async () => {
      await service.close().catch((err: unknown) => log.error({ err }, 'shutdown: stopping the sandbox failed'));
      await server.close();
      await removeShimSocket(sock, socketDir);
      await events.close(5_000);
      log.info({ delivered: events.delivered, dropped: events.dropped, logLinesDropped: pipe.stats().dropped }, 'shim exiting');
      await closeSinks(sinks);
      process.exit(code);
    })();
  };
  const service: TaskService = new TaskService({
    namespace: flags.namespace,
    events,
    log,
    runRoot: runRootOf(io.env, flags.namespace),
    fallbackConfig: SHIPPED_QEMU_CONFIG,
    onShutdown: () => exit(0),
    startMonitor: (sandboxId, source) => ShimMonitor.start(sandboxId, source, io.env),
  });
  const server = new TtrpcServer({
    onHandlerError: (err, ctx) => log.error({ err, method: ctx.method }, 'task handler failed'),
    onProtocolError: (err) => log.warn({ err: err.message }, 'containerd sent something unexpected'),
    onLimit: (message) => log.warn({ socket: sock }, message),
  });
  server.register(
    Task,
    guardTaskIds(service.impl(), (err, method) => log.warn({ err: err.message, code: err.code, call: method }, 'task call refused')),
    { parked: PARKED_TASK_METHODS },
  );
  process.on('SIGTERM', () => exit(0));
  process.on('SIGINT', () => exit(0));
  process.on('uncaughtException', (err) => {
    log.fatal({ err }, 'uncaught exception in the shim; stopping the sandbox');
    exit(1);
  });
  process.on('unhandledRejection', (err) => log.error({ err }, 'unhandled rejection in the shim'));

  const tell = (line: string) => {
    try {
      writeSync(READY_FD, `${line}\n`);
      closeSync(READY_FD);
    } catch {
      /* started by hand, without the readiness pipe */
    }
  };
  try {
    // Only the owner may connect, from the moment the socket exists.
    const umask = process.umask(0o177);
    try {
      await server.listen(sock);
    } finally {
      process.umask(umask);
    }
    await chmod(sock, 0o600);
  } catch (e) {
    tell(`cannot serve on ${sock}: ${(e as Error).message}`);
    return 1;
  }
  // `start` (and containerd behind it) waits for this line; logging (pino loads on the first line) comes after.
  tell(READY_LINE);
  log.info({ socket: sock, version: runtimeVersion(), ttrpc: io.env.TTRPC_ADDRESS }, 'shim serving');
  return new Promise<number>(() => undefined);
}

async function deleteAction(flags: ShimFlags, io: ShimEnv): Promise<number> {
  const bundle = flags.bundle ?? process.cwd();
  const spec = await readBundleSpec(bundle, flags.id).catch(() => undefined);
  const sandboxId = spec ? checkedSandboxId(spec) : flags.id;
  const rootfs = path.join(bundle, 'rootfs');
  await unmount(rootfs).catch(() => undefined);

  // A live shim still serves the pod (this was one of its containers): it owns the sandbox. The
  // address file is only believed when it names a shim socket; containerd logs stderr as warnings.
  const socketDir = shimSocketDir(io.env);
  let sock = socketPath(io.env, flags.address, flags.namespace, sandboxId);
  const written = readAddressFile(bundle);
  if (written) {
    const named = written.startsWith('unix://') ? written.slice('unix://'.length) : written;
    const refusal = await socketRefusal(named, socketDir);
    if (refusal) io.stderr(`containerd-shim-kata-v2 delete: ignoring ${path.join(bundle, 'address')}: ${refusal}\n`);
    else sock = named;
  }
  const alive = await canConnect(sock);
  if (!alive && sandboxId === flags.id) {
    const runDir = path.join(runRootOf(io.env, flags.namespace), sandboxId);
    for (const pid of await sandboxProcesses(runDir)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
    // Mounts the dead shim left under the run directory (shared rootfs and volumes), deepest first.
    for (const m of await mountsUnder(runDir)) await unmount(m).catch(() => undefined);
    await rm(runDir, { recursive: true, force: true }).catch(() => undefined);
    // The dead shim's management socket (shim/monitor.ts); the id was checked as an identifier.
    // Kata's path has no namespace: a live shim of the same sandbox id in another containerd
    // namespace answers there, and keeps its socket (metrics, debug console).
    const monitorSock = shimMonitorSocket(sandboxId, io.env);
    if (!(await canConnect(monitorSock))) await rm(path.dirname(monitorSock), { recursive: true, force: true }).catch(() => undefined);
    await removeShimSocket(sock, socketDir);
  }
  io.stdout(DeleteResponse.encode({ pid: 0, exitStatus: 128 + 9, exitedAt: timestamp(new Date()) }));
  return 0;
}
