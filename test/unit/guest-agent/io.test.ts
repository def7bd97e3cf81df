/** The output buffer behind ReadStdout/ReadStderr (guest/agent/io.ts). */
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { isEndOfFile } from '../../../guest/agent/errors.js';
import { OutputBuffer } from '../../../guest/agent/io.js';

const tick = () => new Promise((r) => setImmediate(r));

describe('guest agent: output buffer', () => {
  it('returns what is there, up to the length asked, across chunks', async () => {
    const b = new OutputBuffer();
    b.push(Buffer.from('hello '));
    b.push(Buffer.from('world'));
    assert.equal((await b.read(8)).toString(), 'hello wo');
    assert.equal((await b.read(100)).toString(), 'rld');
  });

  it('waits for bytes when there are none', async () => {
    const b = new OutputBuffer();
    let got: string | undefined;
    void b.read(10).then((d) => (got = d.toString()));
    await tick();
    assert.equal(got, undefined);
    b.push(Buffer.from('late'));
    await tick();
    assert.equal(got, 'late');
  });

  it('gives the bytes left before end of file, then the end-of-file status, and says when that was delivered', async () => {
    const b = new OutputBuffer();
    b.push(Buffer.from('tail'));
    b.end();
    assert.equal(b.drained, false);
    assert.equal((await b.read(10)).toString(), 'tail');
    await assert.rejects(b.read(10), (e: unknown) => isEndOfFile(e));
    assert.equal(b.drained, true);
  });

  it('fails a waiting read with end of file when the writer closes', async () => {
    const b = new OutputBuffer();
    const r = b.read(10);
    b.end();
    await assert.rejects(r, (e: unknown) => isEndOfFile(e));
  });

  it('lets a caller that went away stop waiting (CANCELLED) without losing bytes', async () => {
    const b = new OutputBuffer();
    const ac = new AbortController();
    const r = b.read(10, ac.signal);
    ac.abort();
    await assert.rejects(r, (e: unknown) => e instanceof TtrpcError && e.code === GrpcCode.CANCELLED);
    b.push(Buffer.from('kept'));
    assert.equal((await b.read(10)).toString(), 'kept');
  });

  it('pauses its source past the high-water mark and resumes it once read', async () => {
    const src = new PassThrough();
    const b = new OutputBuffer(8).attach(src);
    src.write(Buffer.alloc(10, 1));
    await tick();
    assert.ok(src.isPaused(), 'paused above 8 bytes');
    await b.read(8);
    assert.ok(!src.isPaused(), 'resumed at or below half');
    src.end();
    await tick();
    assert.equal((await b.read(10)).length, 2);
    await assert.rejects(b.read(1), (e: unknown) => isEndOfFile(e));
  });
});
