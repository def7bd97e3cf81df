/**
 * OOM kills, for GetOOMEvent. kata-agent learns of them from each container's memory cgroup
 * (`memory.events`); this guest puts containers in no cgroup, so the agent reads the kernel log
 * instead: the OOM killer logs every kill it makes to /dev/kmsg as
 * `Out of memory: Killed process <pid> (<comm>) total-vm:…` (`Memory cgroup out of memory: …` for
 * a memcg limit, `Out of memory (oom_kill_allocating_task): …` under that sysctl; mm/oom_kill.c
 * `__oom_kill_process`). The pid is the victim's in the guest's initial pid namespace, the one the
 * agent sees; sandbox.ts says which container it belonged to.
 *
 * /dev/kmsg is read without blocking: a read returns one record, or EAGAIN when there is none.
 * A thread-pool read would block a libuv thread for good; instead the log is polled, and drained
 * at once whenever a process of a container ends and before a container is removed, so the OOM
 * event is queued before WaitProcess reports that exit (the record is written before the victim
 * can die).
 */
import { closeSync, constants, openSync, readSync } from 'node:fs';
import { cancelled } from './errors.js';
import { log } from './log.js';

export const KMSG_PATH = '/dev/kmsg';

/** How often the kernel log is read when nothing else drains it. */
export const OOM_POLL_MS = 250;

/** OOM events kept for a host that is not asking (the oldest go first beyond that). */
export const MAX_QUEUED_OOM_EVENTS = 1024;

/** A kmsg record is at most this long (the kernel's CONSOLE_EXT_LOG_MAX); a shorter buffer gets EINVAL. */
const KMSG_RECORD_MAX = 8192;

export interface KmsgRecord {
  /** The record's sequence number (64-bit in the kernel; a JS number is exact up to 2^53). */
  readonly seq: number;
  /** The text, without the trailing newline and the `KEY=value` continuation lines. */
  readonly message: string;
}

/** `6,1234,5678901,-;text\n KEY=value\n`: one record as read(2) on /dev/kmsg returns it. */
export function parseKmsgRecord(record: string): KmsgRecord | undefined {
  const semi = record.indexOf(';');
  if (semi < 0) return undefined;
  const fields = record.slice(0, semi).split(',');
  if (fields.length < 4 || !/^\d+$/.test(fields[1] ?? '')) return undefined;
  const nl = record.indexOf('\n', semi);
  return { seq: Number(fields[1]), message: record.slice(semi + 1, nl < 0 ? undefined : nl) };
}

export interface OomKill {
  /** The victim's pid in the guest's initial pid namespace. */
  readonly pid: number;
  /** Its command name (at most 15 characters; may hold spaces and parentheses). */
  readonly comm: string;
}

const OOM_KILL = /^(?:Out of memory(?: \(oom_kill_allocating_task\))?|Memory cgroup out of memory): Killed process (\d+) \((.*)\) total-vm:/;

/** The victim of an OOM kill, when `message` is the OOM killer's kill line; undefined for any other line. */
export function parseOomKill(message: string): OomKill | undefined {
  const m = OOM_KILL.exec(message);
  return m ? { pid: Number(m[1]), comm: m[2] as string } : undefined;
}

/** Reads the kernel log for OOM kills, calling `onKill` for each one (those before start too: the log is read from its oldest record). */
export class OomWatcher {
  private fd: number | undefined;
  private timer: NodeJS.Timeout | undefined;
  private lastSeq = -1;
  private readonly buf = Buffer.alloc(KMSG_RECORD_MAX);

  constructor(
    private readonly onKill: (kill: OomKill) => void,
    private readonly kmsgPath = KMSG_PATH,
    /** Called after each timed read (the sandbox refreshes its pid → container map there). */
    private readonly onPoll: () => void = () => undefined,
  ) {}

  /** Opens the log and starts polling it; false (logged) when it cannot be read. */
  start(pollMs = OOM_POLL_MS): boolean {
    try {
      this.fd = openSync(this.kmsgPath, constants.O_RDONLY | constants.O_NONBLOCK);
    } catch (e) {
      log(`cannot read the kernel log ${this.kmsgPath} (${(e as Error).message}): no OOM events`);
      return false;
    }
    this.drain();
    this.timer = setInterval(() => {
      this.drain();
      this.onPoll();
    }, pollMs);
    this.timer.unref();
    return true;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }

  /** Reads every record logged since the last drain, synchronously (each read is one record, or EAGAIN). */
  drain(): void {
    if (this.fd === undefined) return;
    for (;;) {
      let n: number;
      try {
        n = readSync(this.fd, this.buf, 0, this.buf.length, null);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN') return;
        // The reader fell behind the ring buffer and records were overwritten; the next read goes on from the oldest left.
        if (code === 'EPIPE') continue;
        log(`reading the kernel log failed (${(e as Error).message}): no more OOM events`);
        this.stop();
        return;
      }
      if (n === 0) return;
      const rec = parseKmsgRecord(this.buf.toString('utf8', 0, n));
      if (!rec || rec.seq <= this.lastSeq) continue;
      this.lastSeq = rec.seq;
      const kill = parseOomKill(rec.message);
      if (kill) this.onKill(kill);
    }
  }
}

/**
 * The OOM events waiting for GetOOMEvent, and the calls waiting for an event: each event goes to
 * exactly one call, in order (kata-agent's single channel receiver does the same).
 */
export class OomEvents {
  private readonly queue: string[] = [];
  private readonly waiters: { resolve: (id: string) => void }[] = [];

  get queued(): number {
    return this.queue.length;
  }

  push(containerId: string): void {
    const w = this.waiters.shift();
    if (w) {
      w.resolve(containerId);
      return;
    }
    if (this.queue.length >= MAX_QUEUED_OOM_EVENTS) log(`OOM event of container ${this.queue.shift()} dropped: nobody asked for it`);
    this.queue.push(containerId);
  }

  /** The next event; waits for one when none is queued. Rejects CANCELLED when `signal` aborts first. */
  next(signal?: AbortSignal): Promise<string> {
    const ready = this.queue.shift();
    if (ready !== undefined) return Promise.resolve(ready);
    if (signal?.aborted) return Promise.reject(cancelled('GetOOMEvent was cancelled'));
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (id: string) => {
          signal?.removeEventListener('abort', onAbort);
          resolve(id);
        },
      };
      const onAbort = (): void => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(cancelled('GetOOMEvent was cancelled'));
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiters.push(waiter);
    });
  }
}
