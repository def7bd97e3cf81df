/**
 * A sandbox's OOM events: one GetOOMEvent long poll at a time, for the sandbox's lifetime, as
 * Kata's shim does (`watchOOMEvents`). Each answer names the container whose process the guest's
 * OOM killer killed; the loop hands it on and asks again at once.
 *
 * It ends, without an error, when the connection closes (the sandbox stops, the agent or the VM
 * dies) or on {@link OomEventLoop.stop}. An agent without the RPC (UNIMPLEMENTED: an older agent)
 * ends it with one debug line; any other failure is logged and the call retried after a pause.
 * Nothing here keeps the process alive: a pending call holds no timer, the pause is unref'd.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { GrpcCode } from '../../wire/ttrpc/codes.js';
import type { Logger } from '../logger.js';
import type { AgentClient } from './client.js';
import { AgentError } from './errors.js';

/** Pause after a failed GetOOMEvent before the next (Kata's `defaultCheckInterval`). */
export const OOM_RETRY_MS = 1_000;

export interface OomEventLoopOptions {
  readonly log: Logger;
  /** Called with the container's id for each OOM kill; a throw is logged, the loop goes on. */
  readonly onOom: (containerId: string) => void;
  readonly retryMs?: number;
}

export class OomEventLoop {
  /** Settles (never rejects) once the loop has ended. */
  readonly done: Promise<void>;
  readonly #abort = new AbortController();

  constructor(
    private readonly agent: Pick<AgentClient, 'getOOMEvent' | 'isClosed'>,
    private readonly opts: OomEventLoopOptions,
  ) {
    this.done = this.#run();
  }

  /**
   * Ends the loop now. The agent cannot be told: its pending call takes the next event and answers
   * nobody, so stop only when the connection goes too (Sandbox.stop closes it).
   */
  stop(): void {
    this.#abort.abort();
  }

  async #run(): Promise<void> {
    const { signal } = this.#abort;
    const { log } = this.opts;
    while (!signal.aborted) {
      let containerId: string;
      try {
        containerId = await this.agent.getOOMEvent({ signal });
      } catch (e) {
        if (signal.aborted || this.agent.isClosed || (e instanceof AgentError && e.kind === 'closed')) return;
        if (e instanceof AgentError && e.grpcCode === GrpcCode.UNIMPLEMENTED) {
          log.debug({ err: e.message }, 'the agent has no GetOOMEvent: no OOM events for this sandbox');
          return;
        }
        log.warn({ err: e }, 'GetOOMEvent failed; asking again shortly');
        await sleep(this.opts.retryMs ?? OOM_RETRY_MS, undefined, { signal, ref: false }).catch(() => undefined);
        continue;
      }
      log.info({ container: containerId }, 'the guest OOM killer killed a process of the container');
      try {
        this.opts.onOom(containerId);
      } catch (err) {
        log.error({ err, container: containerId }, 'an OOM event listener failed');
      }
    }
  }
}
