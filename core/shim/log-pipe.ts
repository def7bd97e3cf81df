/**
 * containerd's log pipe: the FIFO `log` in the bundle, which containerd opens for reading and
 * copies into its own log. Opened non-blocking; a line that does not fit (containerd stopped
 * reading) is dropped and counted instead of blocking the shim.
 */
import { constants, open } from 'node:fs';
import net from 'node:net';
import { promisify } from 'node:util';

const MAX_BUFFERED = 1 << 20;

export interface LogPipe {
  write(line: string): void;
  end(): void;
  readonly dropped: number;
}

export async function openLogPipe(file: string): Promise<LogPipe> {
  let sock: net.Socket | undefined;
  try {
    const fd = await promisify(open)(file, constants.O_WRONLY | constants.O_NONBLOCK);
    sock = new net.Socket({ fd, readable: false, writable: true });
    sock.on('error', () => {
      sock = undefined;
    });
  } catch {
    // No pipe (a shim run by hand, or containerd gone): log nowhere rather than fail.
    sock = undefined;
  }
  let dropped = 0;
  return {
    write(line: string) {
      if (!sock || sock.destroyed || sock.writableLength > MAX_BUFFERED) {
        dropped++;
        return;
      }
      sock.write(line);
    },
    end() {
      sock?.end();
    },
    get dropped() {
      return dropped;
    },
  };
}
