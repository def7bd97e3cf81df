import type { Duplex } from 'node:stream';
import { FrameDecoder, encodeFrame, type DecodedItem, type Frame, type FrameBudget, type FrameHeader } from './frame.js';
import { closedError, type TtrpcError } from './errors.js';

export interface ChannelHandlers {
  frame(frame: Frame): void;
  /** A frame over the size limit; its body is skipped. */
  oversize(header: FrameHeader): void;
  /** Called once, when the stream has gone; `reason` says why (for the errors of pending calls). */
  close(reason: TtrpcError): void;
  /**
   * Whether the receiver takes another frame now. While it says no, decoded frames wait in the
   * channel and the stream is paused (the peer's writes back up into the kernel, then into the
   * peer); call {@link FrameChannel.pump} when it may say yes again. Absent: always yes.
   */
  ready?(): boolean;
  /** The channel closes the connection on its own (a limit); said before `close`. */
  refused?(reason: string): void;
}

export interface ChannelOptions {
  /** Shared with other channels: the bytes of partial frames they may hold together. */
  budget?: FrameBudget;
  /** Once a frame has started, its last byte must come within this time, or the connection closes. 0: no limit. */
  frameTimeoutMs?: number;
}

/**
 * Frames over any Node duplex stream: a unix socket, a vsock addon's socket, or a pair of file
 * streams on a virtio-serial port. The peer ending its side closes the channel: ttrpc has no
 * half-closed state for a connection.
 */
export class FrameChannel {
  private readonly decoder: FrameDecoder;
  /** Decoded items not yet handed over: `queue[head..]` (an index, not shift(), which is O(n) per item). */
  private queue: DecodedItem[] = [];
  private head = 0;
  private done = false;
  /** Ending: the last writes flush, nothing more is read or sent. */
  private closing = false;
  private paused = false;
  private error: Error | undefined;
  private frameTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly stream: Duplex,
    private readonly handlers: ChannelHandlers,
    private readonly opts: ChannelOptions = {},
  ) {
    this.decoder = new FrameDecoder({ budget: opts.budget });
    stream.on('data', (chunk: Buffer) => {
      if (this.done || this.closing) return;
      const items = this.decoder.push(chunk);
      // A frame ended: the partial one now (if any) is a new frame, with its own time.
      if (items.length > 0) this.clearFrameTimer();
      if (this.head === this.queue.length) {
        this.queue = items;
        this.head = 0;
      } else for (const item of items) this.queue.push(item);
      this.pump();
    });
    stream.on('end', () => this.finish());
    stream.on('error', (err: Error) => {
      this.error ??= err;
      this.finish();
    });
    stream.on('close', () => this.finish());
    // A stream handed over paused (after the hybrid-vsock handshake, say) does not start by itself.
    stream.resume();
    if (stream.destroyed) queueMicrotask(() => this.finish());
  }

  /** True once closed or closing: nothing more can be sent. */
  get closed(): boolean {
    return this.done || this.closing;
  }

  /** Frames decoded but not yet handed to the receiver (it said it was not ready). */
  get queuedFrames(): number {
    return this.queue.length - this.head;
  }

  /** Bytes held for the partial frame being received. */
  get bufferedBytes(): number {
    return this.decoder.bufferedBytes;
  }

  /** Bytes written but not yet taken by the peer (the stream's write buffer). */
  get pendingWriteBytes(): number {
    return this.stream.writableLength ?? 0;
  }

  /** True while reading is stopped because the receiver is not ready. */
  get readPaused(): boolean {
    return this.paused;
  }

  /** Writes one frame. Throws RESOURCE_EXHAUSTED for an oversized payload, UNAVAILABLE once closed. */
  send(streamId: number, type: number, flags: number, payload: Uint8Array): void {
    if (this.done || this.closing) throw closedError();
    const bytes = encodeFrame(streamId, type, flags, payload);
    this.stream.write(bytes);
  }

  /**
   * Hands queued frames to the receiver while it is ready, then pauses or resumes reading. The
   * receiver calls it when it can take frames again (a call finished, its replies drained).
   */
  pump(): void {
    while (this.head < this.queue.length && !this.done && !this.closing && (this.handlers.ready?.() ?? true)) {
      const item = this.queue[this.head]!;
      this.queue[this.head++] = undefined as unknown as DecodedItem;
      if (item.kind === 'overbudget') {
        this.refuse(`no room for a frame of ${item.length} bytes on stream ${item.streamId}: partial frames of all connections already hold ${this.opts.budget?.used ?? 0} of ${this.opts.budget?.limit ?? 0} bytes`);
        return;
      }
      if (item.kind === 'oversize') this.handlers.oversize(item);
      else this.handlers.frame(item);
    }
    if (this.done || this.closing) return;
    if (this.head === this.queue.length) {
      this.queue = [];
      this.head = 0;
    }
    const hold = this.head < this.queue.length || !(this.handlers.ready?.() ?? true);
    if (hold && !this.paused) {
      this.paused = true;
      this.stream.pause();
    } else if (!hold && this.paused) {
      this.paused = false;
      this.stream.resume();
    }
    this.watchFrame();
  }

  /** Closes at once; what is not yet written is lost. */
  close(): void {
    this.finish();
  }

  /** Stops reading and sending, lets what is written reach the peer (at most `graceMs`), then closes. */
  closeAfterFlush(graceMs = 1000): void {
    if (this.done || this.closing) return;
    this.closing = true;
    this.queue = [];
    this.head = 0;
    this.decoder.dispose();
    this.clearFrameTimer();
    const t = setTimeout(() => this.finish(), graceMs);
    t.unref();
    this.stream.end(() => {
      clearTimeout(t);
      this.finish();
    });
  }

  /** A started frame must end in time, unless the wait is ours (reading paused). */
  private watchFrame(): void {
    const ms = this.opts.frameTimeoutMs ?? 0;
    if (ms <= 0) return;
    if (!this.decoder.midFrame || this.paused) {
      this.clearFrameTimer();
      return;
    }
    this.frameTimer ??= setTimeout(() => {
      this.frameTimer = undefined;
      const p = this.decoder.progress();
      if (p) this.refuse(`a frame started ${ms} ms ago is still incomplete (${p.have} of ${p.need} bytes)`);
    }, ms);
    this.frameTimer.unref();
  }

  private clearFrameTimer(): void {
    if (this.frameTimer) clearTimeout(this.frameTimer);
    this.frameTimer = undefined;
  }

  private refuse(reason: string): void {
    if (this.done || this.closing) return;
    this.handlers.refused?.(reason);
    this.error ??= new Error(reason);
    this.finish();
  }

  private finish(): void {
    if (this.done) return;
    this.done = true;
    this.clearFrameTimer();
    this.queue = [];
    this.head = 0;
    const parts: string[] = [];
    if (this.error) parts.push(this.error.message);
    const p = this.closing ? undefined : this.decoder.progress();
    if (p) parts.push(`connection ended inside a frame (${p.have} of ${p.need} bytes)`);
    this.decoder.dispose();
    const reason = closedError(parts.join('; ') || undefined, this.error);
    this.stream.destroy();
    this.handlers.close(reason);
  }
}
