/**
 * ttrpc framing, as containerd/ttrpc defines it: every message is a 10-byte big-endian header
 * (uint32 data length, uint32 stream id, uint8 type, uint8 flags) followed by `length` bytes.
 * The header does not count towards the length.
 */
import { GrpcCode } from './codes.js';
import { TtrpcError, oversizeMessage } from './errors.js';

export const HEADER_LENGTH = 10;
/** 4 MiB: the largest data length either side sends or accepts. */
export const MAX_MESSAGE_LENGTH = 4 << 20;

export const MessageType = Object.freeze({
  REQUEST: 1,
  RESPONSE: 2,
  /** Streaming data (ttrpc >= 1.2); no Kata or shim API uses streaming, so both sides refuse it. */
  DATA: 3,
} as const);

export const Flags = Object.freeze({
  /** On a request: no further data from the client; on data: the last frame of the stream. */
  REMOTE_CLOSED: 0x1,
  /** On a request: the client will stream data frames. */
  REMOTE_OPEN: 0x2,
  /** On data: the frame carries no message (not even an empty one). */
  NO_DATA: 0x4,
} as const);

export interface FrameHeader {
  readonly length: number;
  readonly streamId: number;
  /** Any byte; values other than {@link MessageType} are for the receiver to judge. */
  readonly type: number;
  readonly flags: number;
}

export interface Frame extends FrameHeader {
  readonly payload: Buffer;
}

/**
 * What the decoder makes of the bytes: a whole frame, the header of one too long to accept, or the
 * header of one the shared {@link FrameBudget} has no room for (the decoder stops there: nothing
 * more comes out of it, and the connection should be closed).
 */
export type DecodedItem =
  | ({ readonly kind: 'frame' } & Frame)
  /** The body is being discarded, so the stream stays in step; answer RESOURCE_EXHAUSTED on it. */
  | ({ readonly kind: 'oversize' } & FrameHeader)
  | ({ readonly kind: 'overbudget' } & FrameHeader);

/**
 * Bytes of partial frames that several decoders may hold together (a server's connections). A
 * decoder reserves a frame's whole length when its header arrives and the body does not, and
 * releases it when the frame is complete or the decoder is disposed of.
 */
export class FrameBudget {
  #used = 0;
  #peak = 0;

  constructor(readonly limit: number) {}

  /** Bytes reserved now. */
  get used(): number {
    return this.#used;
  }

  /** The most ever reserved at once. */
  get peak(): number {
    return this.#peak;
  }

  /** Reserves `n` bytes; false (and nothing reserved) when that would go over the limit. */
  reserve(n: number): boolean {
    if (this.#used + n > this.limit) return false;
    this.#used += n;
    if (this.#used > this.#peak) this.#peak = this.#used;
    return true;
  }

  release(n: number): void {
    this.#used = Math.max(0, this.#used - n);
  }
}

/** One frame as bytes. Refuses a payload over {@link MAX_MESSAGE_LENGTH} with RESOURCE_EXHAUSTED. */
export function encodeFrame(streamId: number, type: number, flags: number, payload: Uint8Array): Buffer {
  if (payload.length > MAX_MESSAGE_LENGTH) {
    throw new TtrpcError(GrpcCode.RESOURCE_EXHAUSTED, oversizeMessage(payload.length, MAX_MESSAGE_LENGTH));
  }
  if (!Number.isInteger(streamId) || streamId < 0 || streamId > 0xffffffff) throw new RangeError(`stream id ${streamId} is not a uint32`);
  const out = Buffer.allocUnsafe(HEADER_LENGTH + payload.length);
  out.writeUInt32BE(payload.length, 0);
  out.writeUInt32BE(streamId, 4);
  out.writeUInt8(type & 0xff, 8);
  out.writeUInt8(flags & 0xff, 9);
  out.set(payload, HEADER_LENGTH);
  return out;
}

/**
 * Turns a byte stream cut at arbitrary points into frames. Any 10 bytes form a header, so the
 * decoder itself never fails: a frame longer than the limit is reported as `oversize` and its body
 * skipped, and what a header means (type, stream id) is for the client or server to judge.
 * Memory stays bounded by the limit, whatever the peer claims.
 */
export class FrameDecoder {
  private readonly header = Buffer.alloc(HEADER_LENGTH);
  private headerFill = 0;
  private current: FrameHeader | undefined;
  private body: Buffer | undefined;
  private bodyFill = 0;
  private discardLeft = 0;
  private readonly max: number;
  private readonly budget: FrameBudget | undefined;
  /** Bytes this decoder holds reserved in the budget (the body being filled). */
  private reserved = 0;
  /** Set after an `overbudget` item or {@link dispose}: the decoder takes no more bytes. */
  private stopped = false;

  constructor(opts: { maxMessageLength?: number; budget?: FrameBudget } = {}) {
    this.max = opts.maxMessageLength ?? MAX_MESSAGE_LENGTH;
    this.budget = opts.budget;
  }

  /** Bytes held for the partial frame being received (its whole length, allocated at its header). */
  get bufferedBytes(): number {
    return this.body ? this.body.length : 0;
  }

  /** Drops the partial frame and gives its reservation back; the decoder takes no more bytes. */
  dispose(): void {
    this.stopped = true;
    this.body = undefined;
    this.current = undefined;
    this.releaseBody();
  }

  private releaseBody(): void {
    if (this.reserved > 0) this.budget?.release(this.reserved);
    this.reserved = 0;
  }

  /** True while a frame has started but not ended: the peer going away now cuts a frame short. */
  get midFrame(): boolean {
    return this.headerFill > 0 || this.current !== undefined || this.discardLeft > 0;
  }

  /** Bytes of the current partial frame received so far, and how many it needs; for error messages. */
  progress(): { have: number; need: number } | undefined {
    if (!this.midFrame) return undefined;
    if (this.current) {
      const have = HEADER_LENGTH + (this.body ? this.bodyFill : this.current.length - this.discardLeft);
      return { have, need: HEADER_LENGTH + this.current.length };
    }
    return { have: this.headerFill, need: HEADER_LENGTH };
  }

  push(chunk: Uint8Array): DecodedItem[] {
    const out: DecodedItem[] = [];
    if (this.stopped) return out;
    let buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
    while (buf.length > 0) {
      if (this.discardLeft > 0) {
        const n = Math.min(this.discardLeft, buf.length);
        this.discardLeft -= n;
        buf = buf.subarray(n);
        if (this.discardLeft === 0) this.current = undefined;
        continue;
      }
      if (!this.current) {
        // Fast path: a whole header at the start of the chunk needs no copy.
        let h: Buffer;
        if (this.headerFill === 0 && buf.length >= HEADER_LENGTH) {
          h = buf;
          buf = buf.subarray(HEADER_LENGTH);
        } else {
          const n = Math.min(HEADER_LENGTH - this.headerFill, buf.length);
          buf.copy(this.header, this.headerFill, 0, n);
          this.headerFill += n;
          buf = buf.subarray(n);
          if (this.headerFill < HEADER_LENGTH) break;
          this.headerFill = 0;
          h = this.header;
        }
        const header: FrameHeader = { length: h.readUInt32BE(0), streamId: h.readUInt32BE(4), type: h[8]!, flags: h[9]! };
        if (header.length > this.max) {
          out.push({ kind: 'oversize', ...header });
          this.current = header;
          this.discardLeft = header.length;
          continue;
        }
        if (header.length === 0) {
          out.push({ kind: 'frame', ...header, payload: Buffer.alloc(0) });
          continue;
        }
        if (buf.length >= header.length) {
          // The whole body is in this chunk: hand out a view of it (socket chunks are never reused).
          out.push({ kind: 'frame', ...header, payload: buf.subarray(0, header.length) });
          buf = buf.subarray(header.length);
          continue;
        }
        // Only now, with the header in hand, is the body allocated: once, at its final size.
        if (this.budget && !this.budget.reserve(header.length)) {
          out.push({ kind: 'overbudget', ...header });
          this.stopped = true;
          return out;
        }
        this.reserved = this.budget ? header.length : 0;
        this.current = header;
        this.body = Buffer.allocUnsafe(header.length);
        this.bodyFill = 0;
        continue;
      }
      const body = this.body!;
      const n = Math.min(body.length - this.bodyFill, buf.length);
      buf.copy(body, this.bodyFill, 0, n);
      this.bodyFill += n;
      buf = buf.subarray(n);
      if (this.bodyFill === body.length) {
        out.push({ kind: 'frame', ...this.current, payload: body });
        this.current = undefined;
        this.body = undefined;
        this.releaseBody();
      }
    }
    return out;
  }
}
