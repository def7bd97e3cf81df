/**
 * The sandbox lifecycle: the API the shim and `kata-runtime run` use. A sandbox is one VM with its
 * guest agent; containers run inside it.
 *
 *   Sandbox.create: launchVm (daemons, createVm, start) → connect the agent → CreateSandbox
 *   createContainer: attachRootfs (hot-plug or share) → CreateContainer
 *   Container: start, wait, signal, stdio streams, exec, delete (RemoveContainer, detach rootfs)
 *   Sandbox.stop: delete containers → DestroySandbox → close the agent → stop the VM
 *
 * Every failure undoes what came before it. Rootfs delivery goes through the `attachRootfs` hook;
 * when no plugin answers, a directory rootfs is shared through the shared filesystem here.
 */
import { execFile } from 'node:child_process';
import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { Readable, Writable } from 'node:stream';
import { promisify } from 'node:util';
import { connectAgent, type AgentClient } from './agent/client.js';
import { KataError, toKataError } from './errors.js';
import { silentLogger, type Logger } from './logger.js';
import { GUEST_SHARED_DIR, SANDBOX_SHARED_DIR, fillSandboxDir } from './plan.js';
import type { ValidatedConfig } from './runtime.js';
import { launchVm, type LaunchOptions, type RunningVm } from './vm-lifecycle.js';
import type { ContainerContext, RootfsAttachment, RootfsSource, VmExit } from './vm.js';

const run = promisify(execFile);

// As kata-agent checks it: at least two characters.
const CONTAINER_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{1,127}$/;

export interface ProcessSpec {
  readonly args: readonly string[];
  readonly env?: readonly string[];
  readonly cwd?: string;
  readonly uid?: number;
  readonly gid?: number;
}

export interface ContainerSpec {
  readonly id: string;
  readonly rootfs: RootfsSource;
  readonly process: ProcessSpec;
  readonly hostname?: string;
}

export interface SandboxOptions extends LaunchOptions {
  /** How long the agent gets to answer after the VM starts; default: [agent.kata] dial_timeout. */
  readonly agentDialTimeoutMs?: number;
}

/** Exit status as runtimes report it: the exit code, or 128 + signal number. */
export type ExitStatus = number;

/** A process in the guest (a container's init or an exec), with its stdio as streams. */
export class GuestProcess {
  readonly stdout: Readable;
  readonly stderr: Readable;
  readonly stdin: Writable;

  constructor(
    private readonly agent: AgentClient,
    readonly containerId: string,
    readonly execId: string,
  ) {
    this.stdout = this.#pump('stdout');
    this.stderr = this.#pump('stderr');
    const ids = { containerId, execId };
    this.stdin = new Writable({
      write: (chunk: Buffer, _enc, cb) => {
        void (async () => {
          let off = 0;
          while (off < chunk.length) off += await agent.writeStdin({ ...ids, data: chunk.subarray(off) });
        })().then(() => cb(), cb);
      },
      final: (cb) => void agent.closeStdin(ids).then(() => cb(), cb),
    });
    // A stream error must not take the runtime down when nobody listens: the process's wait()
    // reports the failure (the agent or the VM gone) to whoever is waiting.
    for (const s of [this.stdout, this.stderr, this.stdin]) s.on('error', () => undefined);
  }

  /** Resolves with the exit status once the process ends. */
  wait(): Promise<ExitStatus> {
    return this.agent.waitProcess({ containerId: this.containerId, execId: this.execId });
  }

  signal(signal: number): Promise<void> {
    return this.agent.signalProcess({ containerId: this.containerId, execId: this.execId, signal });
  }

  /**
   * A stream of the process's output, read from the agent only as fast as it is consumed: when the
   * reader stops (a full FIFO), the next ReadStdout waits for it, and the guest's pipe fills up
   * instead of this process's memory.
   */
  #pump(which: 'stdout' | 'stderr'): Readable {
    let reading = false;
    const stream: Readable = new Readable({
      read: () => {
        if (reading) return;
        reading = true;
        void (async () => {
          const req = { containerId: this.containerId, execId: this.execId, len: 64 * 1024 };
          for (;;) {
            const data = which === 'stdout' ? await this.agent.readStdout(req) : await this.agent.readStderr(req);
            if (data.length === 0) {
              stream.push(null);
              return;
            }
            if (!stream.push(Buffer.from(data))) break;
          }
          reading = false;
        })().catch((e: unknown) => stream.destroy(toKataError(e)));
      },
    });
    return stream;
  }
}

export class Container extends GuestProcess {
  #execs = 0;
  #deleted = false;

  constructor(
    private readonly sandbox: Sandbox,
    agent: AgentClient,
    readonly id: string,
    private readonly attachment: RootfsAttachment,
  ) {
    super(agent, id, id);
  }

  start(): Promise<void> {
    return this.sandbox.agent.startContainer({ containerId: this.id });
  }

  /** Runs another process in the container's namespaces. */
  async exec(process: ProcessSpec, execId = `exec-${++this.#execs}`): Promise<GuestProcess> {
    await this.sandbox.agent.execProcess({ containerId: this.id, execId, process: ociProcess(process) });
    return new GuestProcess(this.sandbox.agent, this.id, execId);
  }

  /** Removes the container from the guest and takes its rootfs back. Idempotent. */
  async delete(): Promise<void> {
    if (this.#deleted) return;
    this.#deleted = true;
    this.sandbox.forget(this.id);
    const errors: unknown[] = [];
    await this.sandbox.agent.removeContainer({ containerId: this.id, timeout: 10 }).catch((e: unknown) => errors.push(e));
    await this.attachment.detach().catch((e: unknown) => errors.push(e));
    if (errors.length > 0) throw toKataError(errors[0]);
  }
}

export class Sandbox {
  readonly #containers = new Map<string, Container>();
  #failure: KataError | undefined;
  #stopping: Promise<VmExit> | undefined;

  private constructor(
    readonly running: RunningVm,
    readonly agent: AgentClient,
    private readonly validated: ValidatedConfig,
    private readonly log: Logger,
  ) {
    void running.exited.then((exit) => {
      if (!exit.expected) {
        this.#failure = exit.error ?? new KataError('KATA_ERR_VM_EXITED', 'the VM ended unexpectedly');
        agent.close();
      }
    });
  }

  get id(): string {
    return this.running.ctx.sandboxId;
  }

  /** Set when the VM ended without being asked to: the sandbox is then unusable. */
  get failure(): KataError | undefined {
    return this.#failure;
  }

  /** Creates and starts the VM, connects to its agent and sets the sandbox up in the guest. */
  static async create(validated: ValidatedConfig, opts: SandboxOptions): Promise<Sandbox> {
    const log = (opts.log ?? silentLogger()).child({ sandbox: opts.sandboxId });
    const { plan, config } = validated;
    if (!plan.agent) throw new KataError('KATA_ERR_INTERNAL', `the "${plan.hypervisor}" plugin planned no agent address`);
    const running = await launchVm(validated, opts);
    try {
      const address = fillSandboxDir(plan.agent.address, running.ctx.runDir);
      const deadlineMs = opts.agentDialTimeoutMs ?? config.agent.dial_timeout * 1000;
      // A VM that dies while we wait makes the dial fail at once instead of at the deadline.
      const abort = new AbortController();
      void running.exited.then(() => abort.abort());
      const agent = await connectAgent(address, { deadlineMs, signal: abort.signal }).catch((e: unknown) => {
        throw new KataError('KATA_ERR_AGENT_UNREACHABLE', `the guest agent of sandbox ${opts.sandboxId} did not answer: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
      });
      const storages = plan.sharedFsMount ? [{ ...plan.sharedFsMount, mountPoint: GUEST_SHARED_DIR }] : [];
      await agent.createSandbox({ sandboxId: opts.sandboxId, hostname: opts.sandboxId.slice(0, 63), storages });
      log.info({ agent: address }, 'sandbox ready');
      return new Sandbox(running, agent, validated, log);
    } catch (e) {
      await running.stop().catch(() => undefined);
      throw toKataError(e);
    }
  }

  container(id: string): Container | undefined {
    return this.#containers.get(id);
  }

  /** @internal Containers drop themselves on delete. */
  forget(id: string): void {
    this.#containers.delete(id);
  }

  /** Delivers the rootfs and creates the container in the guest (not started). */
  async createContainer(spec: ContainerSpec): Promise<Container> {
    if (this.#failure) throw this.#failure;
    if (!CONTAINER_ID.test(spec.id)) throw new KataError('KATA_ERR_SANDBOX', `invalid container id "${spec.id}"`);
    if (this.#containers.has(spec.id)) throw new KataError('KATA_ERR_SANDBOX', `container "${spec.id}" already exists in sandbox ${this.id}`);
    const ctx: ContainerContext = Object.freeze({ sandbox: this.running.ctx, vm: this.running.vm, containerId: spec.id, rootfs: spec.rootfs });
    const attachment = (await this.validated.hooks.attachRootfs.promise(ctx)) ?? (await this.#shareRootfs(ctx));
    try {
      await this.agent.createContainer({
        containerId: spec.id,
        execId: spec.id,
        storages: attachment.storages.map((s) => ({ ...s, options: [...s.options] })),
        OCI: {
          Version: '1.0.2',
          Hostname: spec.hostname ?? '',
          Root: { Path: attachment.guestPath, Readonly: false },
          Process: ociProcess(spec.process),
          Linux: { Namespaces: [{ Type: 'mount' }, { Type: 'pid' }, { Type: 'uts' }] },
        },
      });
    } catch (e) {
      await attachment.detach().catch((err: unknown) => this.log.error({ err }, 'could not take back the rootfs of a container that failed'));
      throw toKataError(e);
    }
    const c = new Container(this, this.agent, spec.id, attachment);
    this.#containers.set(spec.id, c);
    return c;
  }

  /** Deletes every container, destroys the sandbox in the guest and stops the VM. Idempotent. */
  stop(): Promise<VmExit> {
    this.#stopping ??= (async () => {
      if (!this.#failure) {
        for (const c of [...this.#containers.values()]) await c.delete().catch((err: unknown) => this.log.warn({ err, container: c.id }, 'container cleanup failed'));
        await this.agent.destroySandbox({ timeoutMs: 5_000 }).catch((err: unknown) => this.log.warn({ err }, 'DestroySandbox failed'));
      }
      this.agent.close();
      return this.running.stop();
    })();
    return this.#stopping;
  }

  /**
   * The core's own rootfs delivery: bind-mount a directory rootfs into the shared directory the
   * guest mounts. A confidential sandbox has no shared filesystem by design.
   */
  async #shareRootfs(ctx: ContainerContext): Promise<RootfsAttachment> {
    const { plan } = this.validated;
    const fix = plan.confidential
      ? 'a confidential sandbox has no shared filesystem: use the devmapper snapshotter (a block-device rootfs)'
      : 'enable a shared filesystem (shared_fs), or give the container a block-device rootfs';
    if (ctx.rootfs.kind !== 'dir') {
      throw new KataError('KATA_ERR_ROOTFS', `no plugin could deliver the block-device rootfs ${ctx.rootfs.path} (block devices are disabled: disable_block_device_use = true)`, {
        fix: 'set disable_block_device_use = false and block_device_driver = "virtio-blk", or use a directory rootfs',
      });
    }
    if (!plan.sharedFsMount) {
      throw new KataError('KATA_ERR_ROOTFS', `the directory rootfs ${ctx.rootfs.path} cannot reach the guest: shared_fs is "${plan.sharedFs}"`, { fix });
    }
    const hostDir = path.join(fillSandboxDir(SANDBOX_SHARED_DIR, ctx.sandbox.runDir), ctx.containerId, 'rootfs');
    await mkdir(hostDir, { recursive: true });
    try {
      await run('mount', ['--bind', ctx.rootfs.path, hostDir]);
    } catch (e) {
      await rm(path.dirname(hostDir), { recursive: true, force: true });
      throw new KataError('KATA_ERR_ROOTFS', `cannot share ${ctx.rootfs.path} with the guest: bind mount failed: ${(e as { stderr?: string }).stderr?.trim() || String(e)}`, {
        fix: 'run as root (bind mounts need CAP_SYS_ADMIN), and check the rootfs directory exists',
        cause: e,
      });
    }
    return {
      storages: [],
      guestPath: `${GUEST_SHARED_DIR}/${ctx.containerId}/rootfs`,
      detach: async () => {
        await run('umount', [hostDir]).catch(() => run('umount', ['-l', hostDir]));
        await rm(path.dirname(hostDir), { recursive: true, force: true });
      },
    };
  }
}

function ociProcess(p: ProcessSpec) {
  return {
    Terminal: false,
    Args: [...p.args],
    Env: [...(p.env ?? ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'])],
    Cwd: p.cwd ?? '/',
    User: { UID: p.uid ?? 0, GID: p.gid ?? 0, AdditionalGids: [], Username: '' },
  };
}
