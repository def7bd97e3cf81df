/**
 * The guest debug console in a real guest: real QEMU, the project's guest image and agent, the
 * core's Sandbox API. With `debug_console_enabled` the VM gets a second virtio-serial port and the
 * agent serves a root shell on it, in the guest (not in a container); without it there is none.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { loadValidatedConfig } from '../../core/runtime.js';
import { Sandbox } from '../../core/sandbox.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { TempDir } from '../helpers/tmp.js';
import { qemuBinary, qemuLeftBehind, sandboxConfigText } from '../helpers/qemu.js';

const NO_DISKS = 'shared_fs = "none"\ndisable_block_device_use = true';

/** Sends `input` on a console connection and collects output until `until` matches it. */
export async function converse(sock: net.Socket, input: string, until: RegExp, timeoutMs = 60_000): Promise<string> {
  let out = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      sock.off('data', onData);
      reject(new Error(`no ${until} in ${JSON.stringify(out)}`));
    }, timeoutMs);
    const onData = (d: Buffer) => {
      out += d.toString('utf8');
      if (until.test(out)) {
        clearTimeout(timer);
        sock.off('data', onData);
        resolve(out);
      }
    };
    sock.on('data', onData);
    sock.write(input);
  });
}

describe('guest debug console @integration', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let tmp: TempDir;

  before(async function () {
    if (!qemuBinary()) this.skip();
    image = await ensureGuestImage();
    tmp = new TempDir('kata-debug-console-');
  });
  after(() => tmp?.cleanup());

  it('serves a root shell in the guest on its own port when debug_console_enabled is set', async () => {
    const runRoot = path.join(tmp.path, 'run-on');
    const sandbox = await Sandbox.create(await loadValidatedConfig({ text: sandboxConfigText(image, NO_DISKS, 'debug_console_enabled = true') }), { sandboxId: 'sb-console', runRoot });
    try {
      const socket = sandbox.debugConsoleSocket as string;
      assert.equal(socket, path.join(runRoot, 'sb-console', 'debug-console.sock'));
      const sock = net.connect(socket);
      await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
      try {
        // The guest's own command line (not a container's view), a pty, root.
        const out = await converse(sock, 'echo "uid=$(id -u) tty=$(tty) pid1=$(cat /proc/1/comm)"; grep -o agent.debug_console /proc/cmdline; echo end-$((6*7))\n', /end-42/);
        assert.match(out, /uid=0 tty=\/dev\/pts\/\d+ pid1=\S+/);
        assert.match(out, /^agent\.debug_console\r?$/m);
      } finally {
        sock.destroy();
      }
      // A second attach finds the same console alive.
      const again = net.connect(socket);
      await new Promise<void>((resolve, reject) => again.once('connect', resolve).once('error', reject));
      try {
        assert.match(await converse(again, 'echo back-$((2+3))\n', /back-5/), /back-5/);
      } finally {
        again.destroy();
      }
    } finally {
      await sandbox.stop();
    }
    assert.deepEqual(await qemuLeftBehind(runRoot), [], 'no QEMU left');
    assert.equal(existsSync(path.join(runRoot, 'sb-console')), false, 'run dir removed');
  });

  it('has no console port when debug_console_enabled is off (the default)', async () => {
    const runRoot = path.join(tmp.path, 'run-off');
    const sandbox = await Sandbox.create(await loadValidatedConfig({ text: sandboxConfigText(image, NO_DISKS, 'debug_console_enabled = false') }), { sandboxId: 'sb-noconsole', runRoot });
    try {
      assert.equal(sandbox.debugConsoleSocket, undefined);
      assert.equal(existsSync(path.join(runRoot, 'sb-noconsole', 'debug-console.sock')), false);
    } finally {
      await sandbox.stop();
    }
    assert.deepEqual(await qemuLeftBehind(runRoot), [], 'no QEMU left');
  });
});
