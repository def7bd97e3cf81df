/**
 * A task's stdio (shim/stdio.ts) against real FIFOs made with mkfifo and real files, with the
 * test holding the client's ends as containerd's client does: output read ends opened
 * O_RDONLY|O_NONBLOCK before the shim opens its side, the stdin writer O_RDWR.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmodSync, closeSync, constants as fsc, existsSync, openSync, readFileSync, writeSync } from 'node:fs';
import path from 'node:path';
import { PassThrough, type Readable, type Writable } from 'node:stream';
import { KataError } from '../../../core/errors.js';
import { TaskIo, openInput, openOutput } from '../../../shim/stdio.js';
import { TempDir } from '../../helpers/tmp.js';
import { until, within } from '../../helpers/wait.js';
import { FifoReader } from '../../helpers/fifo.js';

/** Ends a writable and waits until it has flushed and released its file. */
async function finish(w: Writable): Promise<void> {
  await within(
    new Promise<void>((resolve) => {
      w.once('close', () => resolve());
      w.end();
    }),
    'closing the output',
  );
}

describe('shim: task stdio (FIFOs, files, log URIs)', () => {
  let tmp: TempDir;
  const cleanups: (() => void)[] = [];
  const fifo = (name: string) => {
    const p = path.join(tmp.path, name);
    execFileSync('mkfifo', [p]);
    return p;
  };
  const reader = (p: string) => {
    const r = new FifoReader(p);
    cleanups.push(() => r.close());
    return r;
  };
  const track = <T extends Readable | Writable | TaskIo>(s: T): T => {
    cleanups.push(() => (s instanceof TaskIo ? s.close() : s.destroy()));
    return s;
  };

  beforeEach(() => (tmp = new TempDir('kata-ts-stdio-')));
  afterEach(() => {
    for (const c of cleanups.splice(0).reverse()) c();
    tmp.cleanup();
  });

  it('null io: empty paths open nothing, and output copied to nowhere is still drained to its end', async () => {
    assert.equal(await openOutput('', 'stdout'), undefined);
    assert.equal(await openInput(''), undefined);
    const io = await TaskIo.open({ stdin: '', stdout: '', stderr: '' });
    assert.deepEqual([io.stdin, io.stdout, io.stderr], [undefined, undefined, undefined]);
    const from = new PassThrough();
    const copied = TaskIo.copy(from, undefined);
    // More than a stream buffers: if nothing consumed it, the writes would stall and 'end' never come.
    for (let i = 0; i < 64; i++) from.write(Buffer.alloc(64 * 1024));
    from.end();
    await within(copied, 'copying to no output');
    io.close();
  });

  it('stdout and stderr on the same path share one stream: both reach the FIFO in order, then one EOF', async () => {
    const p = fifo('out');
    const r = reader(p);
    const io = track(await TaskIo.open({ stdin: '', stdout: p, stderr: p }));
    assert.ok(io.stdout, 'stdout opened');
    assert.equal(io.stderr, io.stdout, 'one stream for both');
    io.stdout.write('to stdout\n');
    io.stderr!.write('to stderr\n');
    io.close();
    await until('EOF', () => r.poll().eof);
    assert.equal(r.text, 'to stdout\nto stderr\n');
  });

  it('separate stdout and stderr FIFOs get their own output; close() gives each reader EOF', async () => {
    const [po, pe] = [fifo('o'), fifo('e')];
    const [ro, re] = [reader(po), reader(pe)];
    const io = track(await TaskIo.open({ stdin: '', stdout: po, stderr: pe }));
    assert.notEqual(io.stdout, io.stderr);
    const out = new PassThrough();
    const err = new PassThrough();
    const copies = [TaskIo.copy(out, io.stdout), TaskIo.copy(err, io.stderr)];
    out.end('O');
    err.end('E');
    await within(Promise.all(copies), 'the copies');
    io.close();
    await until('EOF on both', () => ro.poll().eof && re.poll().eof);
    assert.deepEqual([ro.text, re.text], ['O', 'E']);
  });

  it('a regular file path: output is appended, what was there stays', async () => {
    const file = tmp.file('log.txt', 'earlier\n');
    const w = track((await openOutput(file, 'stdout'))!);
    w.write('later\n');
    await finish(w);
    assert.equal(readFileSync(file, 'utf8'), 'earlier\nlater\n');
  });

  it('a file:// URI (ctr --log-uri): output is appended to that file', async () => {
    const file = tmp.file('dir with space/ctr.log', 'first\n');
    const uri = new URL(`file://${file}`).href; // percent-encoded, as containerd's client builds it
    assert.match(uri, /%20/);
    const io = track(await TaskIo.open({ stdin: '', stdout: uri, stderr: uri }));
    assert.ok(io.stdout, 'stdout opened');
    assert.equal(io.stderr, io.stdout);
    io.stdout.write('out\n');
    io.stderr!.write('err\n');
    await finish(io.stdout);
    assert.equal(readFileSync(file, 'utf8'), 'first\nout\nerr\n');
  });

  it('a binary:// URI: refused with KATA_ERR_NOT_IMPLEMENTED, or the logging binary gets the output', async () => {
    // containerd's logging-binary protocol: stdout on fd 3, stderr on fd 4, ready once fd 5 closes.
    const dest = path.join(tmp.path, 'binary.out');
    const bin = tmp.file('logger.sh', '#!/bin/sh\nfor a in "$@"; do dest="$a"; done\nexec 5>&-\ncat <&3 >>"$dest"\n');
    chmodSync(bin, 0o755);
    const uri = `binary://${bin}?dest=${dest}`;
    let io: TaskIo;
    try {
      io = track(await within(TaskIo.open({ stdin: '', stdout: uri, stderr: uri }), 'opening a binary:// output'));
    } catch (e) {
      assert.ok(e instanceof KataError, `a coded error, got ${String(e)}`);
      assert.equal(e.code, 'KATA_ERR_NOT_IMPLEMENTED', e.message);
      assert.match(e.message, /binary/);
      return;
    }
    io.stdout!.write('via the binary\n');
    io.close();
    await until('the logging binary writing its file', () => existsSync(dest) && readFileSync(dest, 'utf8') === 'via the binary\n');
  });

  it('an unknown URI scheme or a missing path: a coded error naming the stream', async () => {
    await assert.rejects(openOutput(path.join(tmp.path, 'absent', 'out'), 'stdout'), (e: unknown) => e instanceof KataError && /stdout/.test(e.message));
    await assert.rejects(openOutput('ftp://host/x', 'stdout'), (e: unknown) => e instanceof KataError);
    const p = fifo('o');
    reader(p);
    // stdout opens, stderr cannot: the whole open fails (and stdout is not leaked open).
    await assert.rejects(TaskIo.open({ stdin: '', stdout: p, stderr: path.join(tmp.path, 'absent', 'err') }), (e: unknown) => e instanceof KataError && /stderr/.test(e.message));
  });

  it('writes to a reader that does not read never block the event loop; everything arrives once it reads', async () => {
    const p = fifo('slow');
    const r = reader(p); // opened, not read while the writes happen
    const w = track((await openOutput(p, 'stdout'))!);
    // A write that blocked would stop the loop until the reader came back (never, in this test):
    // the bound only has to sit above scheduling noise on a loaded machine.
    const stallMs = 2_000;
    let maxLag = 0;
    let last = Date.now();
    const ticker = setInterval(() => {
      const now = Date.now();
      maxLag = Math.max(maxLag, now - last);
      last = now;
    }, 5);
    try {
      const chunk = Buffer.alloc(64 * 1024, 'x');
      const total = 64; // 4 MiB: 64 times what the pipe holds
      const t0 = Date.now();
      for (let i = 0; i < total; i++) w.write(chunk);
      const writeMs = Date.now() - t0;
      assert.ok(writeMs < 1_000, `the writes took ${writeMs} ms`);
      await new Promise((res) => setTimeout(res, 100));
      assert.ok(maxLag < stallMs, `the event loop stalled for ${maxLag} ms while the reader was away`);
      // The reader comes back: it gets everything, in order.
      await until('all bytes', () => r.poll().bytes.length >= total * chunk.length, 10_000);
      assert.equal(r.bytes.length, total * chunk.length);
      assert.ok(r.bytes.every((b) => b === 0x78));
      assert.ok(maxLag < stallMs, `the event loop stalled for ${maxLag} ms while the reader drained`);
    } finally {
      clearInterval(ticker);
    }
  });

  it('after the reader closes and a new one opens the FIFO (containerd restarting), later output reaches the new reader', async () => {
    const p = fifo('restart');
    const first = reader(p);
    const w = track((await openOutput(p, 'stdout'))!);
    w.write('before\n');
    await until('the first reader getting its line', () => first.poll().text === 'before\n');
    first.close();
    // Output while nobody reads (containerd is down): it may be lost, it must not break the stream.
    w.write('while away\n');
    await new Promise((res) => setTimeout(res, 50));
    assert.equal(w.destroyed, false, 'the output stream survives the reader going away');
    const second = reader(p);
    w.write('after\n');
    await until(`the new reader getting later output (got ${JSON.stringify(second.poll().text)})`, () => second.poll().text.includes('after\n'));
    assert.ok(second.text.endsWith('after\n'));
  });

  it('stdin FIFO: what the client writes comes through, and its closing the writer is EOF', async () => {
    const p = fifo('in');
    const wfd = openSync(p, fsc.O_RDWR);
    cleanups.push(() => {
      try {
        closeSync(wfd);
      } catch {
        /* closed by the test */
      }
    });
    writeSync(wfd, 'typed before the shim read\n');
    const input = track((await openInput(p))!);
    const got: Buffer[] = [];
    let ended = false;
    input.on('data', (d: Buffer) => got.push(d));
    input.once('end', () => (ended = true));
    await until('the first bytes', () => Buffer.concat(got).toString() === 'typed before the shim read\n');
    writeSync(wfd, 'more\n');
    await until('the later bytes', () => Buffer.concat(got).toString().endsWith('more\n'));
    assert.equal(ended, false, 'no EOF while the client holds the writer');
    closeSync(wfd);
    await until('EOF on stdin', () => ended);
    assert.equal(Buffer.concat(got).toString(), 'typed before the shim read\nmore\n');
  });

  it('TaskIo holds a write end of a stdin FIFO: the client closing its writer is no EOF, releaseStdin then is', async () => {
    const p = fifo('in');
    const wfd = openSync(p, fsc.O_RDWR);
    const io = track(await TaskIo.open({ stdin: p, stdout: '', stderr: '' }));
    assert.equal(io.holdsStdin, true);
    const got: Buffer[] = [];
    let ended = false;
    io.stdin!.on('data', (d: Buffer) => got.push(d));
    io.stdin!.once('end', () => (ended = true));
    writeSync(wfd, 'first client\n');
    closeSync(wfd);
    const second = openSync(p, fsc.O_WRONLY | fsc.O_NONBLOCK); // a later client: the shim still reads
    writeSync(second, 'second client\n');
    closeSync(second);
    await until('both clients\' bytes', () => Buffer.concat(got).toString() === 'first client\nsecond client\n');
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(ended, false, 'no EOF while the shim holds its writer');
    io.releaseStdin();
    assert.equal(io.holdsStdin, false);
    await until('EOF on stdin', () => ended);
    io.releaseStdin(); // twice is harmless
  });

  it('a regular file as stdin gets no write end of the shim', async () => {
    const io = track(await TaskIo.open({ stdin: tmp.file('input.txt', 'x'), stdout: '', stderr: '' }));
    assert.equal(io.holdsStdin, false);
  });

  it('a regular file as stdin is read to its end', async () => {
    const file = tmp.file('input.txt', 'from a file\n');
    const input = track((await openInput(file))!);
    const got: Buffer[] = [];
    await within(
      new Promise<void>((resolve) => {
        input.on('data', (d: Buffer) => got.push(d));
        input.once('end', () => resolve());
      }),
      'reading the file',
    );
    assert.equal(Buffer.concat(got).toString(), 'from a file\n');
  });
});
