/** The agent's pseudo-terminals (guest/agent/pty.ts) with node-pty's addon on the host, and a real child on the slave. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { PtyMaster, checkDimension } from '../../../guest/agent/pty.js';

/** Everything the master yields until every slave fd is closed (EIO ends a pty master's stream). */
function collect(pty: PtyMaster): Promise<string> {
  return new Promise((resolve) => {
    let out = '';
    pty.output.on('data', (d: Buffer) => (out += d.toString('utf8')));
    pty.output.on('error', () => undefined);
    pty.output.once('close', () => resolve(out.replaceAll('\r', '')));
  });
}

/** Runs `sh -c script` on the slave of `pty`, in its own session with the slave as controlling terminal. */
function runOn(pty: PtyMaster, script: string): Promise<number | null> {
  const slave = pty.slave as number;
  const child = spawn('setsid', ['-c', 'sh', '-c', script], { stdio: [slave, slave, slave] });
  pty.closeSlave();
  return new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}

describe('guest agent: PtyMaster', () => {
  it('gives the child a terminal of the asked size as stdin, stdout, stderr and controlling terminal', async () => {
    const pty = PtyMaster.open(33, 91);
    try {
      assert.match(pty.path, /^\/dev\/pts\/\d+$/);
      const out = collect(pty);
      const code = await runOn(pty, 'tty; stty size; echo err >&2; stty size </dev/tty; exit 4');
      assert.equal(code, 4);
      assert.equal(await out, `${pty.path}\n33 91\nerr\n33 91\n`);
    } finally {
      pty.destroy();
    }
  });

  it('resizes the window and relays input written to the master, keeping the last output', async () => {
    const pty = PtyMaster.open(0, 0);
    try {
      const out = collect(pty);
      const code = runOn(pty, 'stty size; read -r line; stty size; echo "got $line"');
      // The shell reads only once the line is there; the resize lands before it.
      await new Promise((r) => setTimeout(r, 200));
      pty.resize(50, 132);
      await new Promise<void>((resolve, reject) => pty.write(Buffer.from('hello\n'), (e) => (e ? reject(e) : resolve())));
      assert.equal(await code, 0);
      assert.equal(await out, '24 80\nhello\n50 132\ngot hello\n');
    } finally {
      pty.destroy();
    }
  });

  it('clamps window dimensions to what TIOCSWINSZ takes, 0 or nonsense meaning the default', () => {
    assert.equal(checkDimension(0, 80), 80);
    assert.equal(checkDimension(-3, 24), 24);
    assert.equal(checkDimension(1.5, 24), 24);
    assert.equal(checkDimension(70000, 24), 65535);
    assert.equal(checkDimension(120, 80), 120);
  });
});
