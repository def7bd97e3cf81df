/**
 * The client's ends of stdio FIFOs, as containerd's client holds them: read ends opened before the
 * shim's Create and polled without blocking, a stdin write end that never blocks on open.
 */
import { closeSync, constants as fsc, openSync, readSync, writeSync } from 'node:fs';
import path from 'node:path';
import { until } from './wait.js';

/** A read end of an output FIFO, opened non-blocking. */
export class FifoReader {
  readonly fd: number;
  readonly chunks: Buffer[] = [];
  eof = false;
  #closed = false;

  constructor(readonly file: string) {
    this.fd = openSync(file, fsc.O_RDONLY | fsc.O_NONBLOCK);
  }

  /**
   * Reads what is there, up to `max` bytes. Call only once the writer has opened its end: with no
   * writer at all, read() says EOF.
   */
  poll(max = Infinity): this {
    const buf = Buffer.alloc(64 * 1024);
    let got = 0;
    while (!this.eof && !this.#closed && got < max) {
      let n: number;
      try {
        n = readSync(this.fd, buf, 0, Math.min(buf.length, max - got), null);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EAGAIN') break;
        throw e;
      }
      if (n === 0) this.eof = true;
      else {
        got += n;
        this.chunks.push(Buffer.from(buf.subarray(0, n)));
      }
    }
    return this;
  }

  get bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }

  get text(): string {
    return this.bytes.toString();
  }

  async waitForText(expected: string, timeoutMs = 3_000): Promise<void> {
    await until(`"${expected.slice(0, 40)}" on ${path.basename(this.file)} (got ${JSON.stringify(this.text.slice(0, 80))})`, () => this.poll().text.includes(expected), timeoutMs);
  }

  async waitForEof(timeoutMs = 3_000): Promise<void> {
    await until(`EOF on ${path.basename(this.file)}`, () => this.poll().eof, timeoutMs);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    closeSync(this.fd);
  }
}

/** The write end of a stdin FIFO; O_RDWR so opening never blocks (the shim opens its read end at Create). */
export class FifoWriter {
  readonly fd: number;
  #closed = false;

  constructor(readonly file: string) {
    this.fd = openSync(file, fsc.O_RDWR);
  }

  write(text: string): void {
    writeSync(this.fd, text);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    closeSync(this.fd);
  }
}
