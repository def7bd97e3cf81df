/** The last `size` lines of a stream, split on newlines across chunks. */
export class LineRing {
  readonly #size: number;
  readonly #lines: string[] = [];
  #partial = '';

  constructor(size: number) {
    this.#size = Math.max(1, size);
  }

  /** Adds a chunk; returns the lines it completed. */
  push(chunk: string): string[] {
    const parts = (this.#partial + chunk).split('\n');
    this.#partial = parts.pop() ?? '';
    const done = parts.map((l) => l.replace(/\r$/, '')).filter((l) => l.trim() !== '');
    for (const l of done) this.#add(l);
    return done;
  }

  /** Ends the stream: a last line without a newline counts. */
  flush(): string[] {
    const rest = this.#partial.trim() === '' ? [] : [this.#partial];
    this.#partial = '';
    for (const l of rest) this.#add(l);
    return rest;
  }

  tail(n: number): string[] {
    return [...this.#lines.slice(-n), ...(this.#partial.trim() ? [this.#partial] : [])].slice(-n);
  }

  #add(line: string): void {
    this.#lines.push(line);
    if (this.#lines.length > this.#size) this.#lines.shift();
  }
}
