/**
 * `kata-runtime run -t`: the local terminal in raw mode while the container's process runs on its
 * guest pty, window changes forwarded, and the terminal restored on every way out (normal end,
 * an error, a signal, the VM dying, even `process.exit`).
 */
import type { ReadStream, WriteStream } from 'node:tty';
import type { TerminalSize } from '../core/sandbox.js';

export class LocalTerminal {
  #raw = false;
  readonly #restoreOnExit = () => this.restore();

  constructor(
    private readonly input: ReadStream,
    private readonly output: WriteStream,
  ) {}

  /** The local window's size now (24x80 when the output is no terminal). */
  size(): TerminalSize {
    return { rows: this.output.rows || 24, cols: this.output.columns || 80 };
  }

  /** Raw mode: keys (Ctrl-C included) go to the process's terminal, which does echo and signals. */
  enterRaw(): void {
    if (this.#raw) return;
    this.input.setRawMode(true);
    this.#raw = true;
    process.once('exit', this.#restoreOnExit);
  }

  /** Calls `onResize` with the new size on every window change (SIGWINCH); returns the unsubscribe. */
  onResize(onResize: (size: TerminalSize) => void): () => void {
    const handler = () => onResize(this.size());
    this.output.on('resize', handler);
    return () => this.output.off('resize', handler);
  }

  restore(): void {
    if (!this.#raw) return;
    this.#raw = false;
    process.off('exit', this.#restoreOnExit);
    try {
      this.input.setRawMode(false);
    } catch {
      // the terminal is gone (hang-up): nothing to restore
    }
  }
}
