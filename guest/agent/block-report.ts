/**
 * Keeps /init's console contract with the agent running: a `KATA-TS-BLOCK: <name:sectors …>` line
 * whenever the guest's block devices change (and once at start), as /init prints when there is no
 * agent (guest/README.md). Hot-plug tests and the console log rely on it. Driven by inotify on
 * /dev (devtmpfs creates and removes the nodes), with a slow poll as a safety net.
 */
import { watch, type FSWatcher } from 'node:fs';
import { readFile, readdir } from 'node:fs/promises';
import path from 'node:path';

/** `vda:6144 vdb:2048`: every /sys/block entry but loop, ram and zram, with its size in 512-byte sectors, by name. */
export async function blockList(sysfsRoot = '/sys'): Promise<string> {
  const dir = path.join(sysfsRoot, 'block');
  const names = (await readdir(dir).catch(() => [] as string[])).filter((n) => !/^(loop|ram|zram)/.test(n)).sort();
  const parts: string[] = [];
  for (const n of names) {
    const size = (await readFile(path.join(dir, n, 'size'), 'utf8').catch(() => '0')).trim();
    parts.push(`${n}:${size}`);
  }
  return parts.join(' ');
}

export class BlockReporter {
  private last: string | undefined;
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private pending: NodeJS.Timeout | undefined;
  private scanning = Promise.resolve();

  constructor(
    private readonly print: (line: string) => void,
    private readonly sysfsRoot = '/sys',
  ) {}

  start(devDir = '/dev', pollMs = 2000): void {
    this.scan();
    try {
      this.watcher = watch(devDir, () => this.soon());
      this.watcher.on('error', () => undefined);
    } catch {
      pollMs = Math.min(pollMs, 200);
    }
    this.timer = setInterval(() => this.scan(), pollMs);
    this.timer.unref();
  }

  stop(): void {
    this.watcher?.close();
    if (this.timer) clearInterval(this.timer);
    if (this.pending) clearTimeout(this.pending);
  }

  /** Several /dev events come for one disk (the disk, its partitions): scan once, shortly after. */
  private soon(): void {
    if (this.pending) return;
    this.pending = setTimeout(() => {
      this.pending = undefined;
      this.scan();
    }, 20);
  }

  private scan(): void {
    this.scanning = this.scanning.then(async () => {
      const list = await blockList(this.sysfsRoot);
      if (list === this.last) return;
      this.last = list;
      this.print(`KATA-TS-BLOCK: ${list}`);
    });
  }
}
