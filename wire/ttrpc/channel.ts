import type { Duplex } from 'node:stream';
import { FrameDecoder, encodeFrame, type Frame, type FrameHeader } from './frame.js';
import { closedError, type TtrpcError } from './errors.js';

export interface ChannelHandlers {
  frame(frame: Frame): void;
  /** A frame over the size limit; its body is skipped. */
  oversize(header: FrameHeader): void;
  /** Called once, when the stream has gone; `reason` says why (for the errors of pending calls). */
  close(reason: TtrpcError): void;
}

/**
 * Frames over any Node duplex stream: a unix socket, a vsock addon's socket, or a pair of file
 * streams on a virtio-serial port. The peer ending its side closes the channel: ttrpc has no
 * half-closed state for a connection.
 */
export class FrameChannel {
  private readonly decoder = new FrameDecoder();
  private done = false;
  private error: Error | undefined;

  constructor(
    private readonly stream: Duplex,
    private readonly handlers: ChannelHandlers,
  ) {
    stream.on('data', (chunk: Buffer) => {
      if (this.done) return;
      for (const item of this.decoder.push(chunk)) {
        if (this.done) return;
        if (item.kind === 'oversize') handlers.oversize(item);
        else handlers.frame(item);
      }
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

  get closed(): boolean {
    return this.done;
  }

  /** Writes one frame. Throws RESOURCE_EXHAUSTED for an oversized payload, UNAVAILABLE once closed. */
  send(streamId: number, type: number, flags: number, payload: Uint8Array): void {
    if (this.done) throw closedError();
    const bytes = encodeFrame(streamId, type, flags, payload);
    this.stream.write(bytes);
  }

  close(): void {
    this.finish();
  }

  private finish(): void {
    if (this.done) return;
    this.done = true;
    const parts: string[] = [];
    if (this.error) parts.push(this.error.message);
    const p = this.decoder.progress();
    if (p) parts.push(`connection ended inside a frame (${p.have} of ${p.need} bytes)`);
    const reason = closedError(parts.join('; ') || undefined, this.error);
    this.stream.destroy();
    this.handlers.close(reason);
  }
}
