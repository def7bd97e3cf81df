/**
 * The shim's log sinks against real receivers: a FIFO made with mkfifo, a unix stream server
 * speaking journald's side of the stream protocol, and a syslog datagram socket (socat), plus the
 * host with no system log at all.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, readSync, symlinkSync, writeFileSync, constants as fsc } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { closeSinks, journalStreamHeader, logFifo, systemLog, type LogSink } from '../../../shim/log-sinks.js';
import { createLogger } from '../../../core/logger.js';
import { TempDir } from '../../helpers/tmp.js';

/** Reads what is in a FIFO now, without waiting. */
function drain(fd: number): string {
  const chunks: Buffer[] = [];
  const buf = Buffer.alloc(1 << 16);
  for (;;) {
    let n: number;
    try {
      n = readSync(fd, buf, 0, buf.length, null);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EAGAIN') break;
      throw e;
    }
    if (n === 0) break;
    chunks.push(Buffer.from(buf.subarray(0, n)));
  }
  return Buffer.concat(chunks).toString('utf8');
}

const lines = (text: string) => text.split('\n').filter(Boolean);

function hasCommand(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

describe('log sinks', () => {
  let tmp: TempDir;
  let fifo: string;
  const fds: number[] = [];
  const sinks: LogSink[] = [];
  /** A system log that finds neither journald nor syslog. */
  const noSystemLog = () => systemLog({ journalSocket: path.join(tmp.path, 'no-journal'), syslogSocket: path.join(tmp.path, 'no-dev-log') });
  const track = <T extends LogSink>(s: T): T => (sinks.push(s), s);
  const reader = () => {
    const fd = openSync(fifo, fsc.O_RDONLY | fsc.O_NONBLOCK);
    fds.push(fd);
    return fd;
  };

  beforeEach(() => {
    tmp = new TempDir();
    fifo = path.join(tmp.path, 'log');
    execFileSync('mkfifo', [fifo]);
  });
  afterEach(async () => {
    await closeSinks(sinks.splice(0));
    for (const fd of fds.splice(0)) closeSync(fd);
    tmp.cleanup();
  });

  describe('logFifo', () => {
    it('delivers each line verbatim as JSON with the sandbox and container ids', () => {
      const r = reader();
      const log = createLogger({ level: 'info', name: 'kata', sinks: [track(logFifo(fifo)), track(noSystemLog())] });
      log.child({ sandbox: 'sb-1', container: 'ctr-1' }).info({ pid: 42 }, 'container started');
      log.child({ sandbox: 'sb-1' }).debug('below the level');
      const got = lines(drain(r)).map((l) => JSON.parse(l) as Record<string, unknown>);
      const started = got.find((l) => l.msg === 'container started');
      assert.ok(started, JSON.stringify(got));
      assert.deepEqual({ name: started.name, sandbox: started.sandbox, container: started.container, level: started.level }, { name: 'kata', sandbox: 'sb-1', container: 'ctr-1', level: 30 });
      assert.equal(got.some((l) => l.msg === 'below the level'), false);
    });

    it('neither throws nor blocks without a reader, counts the dropped lines, and delivers once a reader comes', () => {
      const sink = track(logFifo(fifo, { reopenIntervalMs: 0 }));
      assert.match(sink.open() ?? '', /ENXIO/);
      for (let i = 0; i < 5; i++) sink.write(`{"n":${i}}\n`, 30);
      assert.deepEqual([sink.stats().written, sink.stats().dropped], [0, 5]);
      const r = reader();
      sink.write('{"n":5}\n', 30);
      assert.equal(drain(r), '{"n":5}\n');
      assert.equal(sink.stats().written, 1);
    });

    it('drops whole lines when the pipe is full, without blocking, and never splits one', () => {
      const r = reader(); // opened, never read while writing
      const sink = track(logFifo(fifo));
      assert.equal(sink.open(), undefined);
      const line = (i: number) => `${JSON.stringify({ i, pad: 'x'.repeat(180) })}\n`;
      const started = process.hrtime.bigint();
      for (let i = 0; i < 5000; i++) sink.write(line(i), 30);
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      const { written, dropped } = sink.stats();
      assert.ok(dropped > 0 && written > 0 && written + dropped === 5000, `written ${written}, dropped ${dropped}`);
      assert.ok(ms < 2000, `5000 writes took ${ms} ms`);
      const got = lines(drain(r));
      assert.equal(got.length, written);
      for (const l of got) assert.equal(typeof (JSON.parse(l) as { i: number }).i, 'number');
    });

    it('finishes a line longer than the pipe before any later line', async () => {
      const r = reader();
      const sink = track(logFifo(fifo));
      sink.open();
      const big = `${JSON.stringify({ big: 'y'.repeat(300_000) })}\n`;
      sink.write(big, 30);
      let text = '';
      for (let i = 0; i < 200 && !text.endsWith('\n'); i++) {
        text += drain(r);
        sink.write('{"after":true}\n', 30); // dropped while the big line is unfinished, or written after it
        await sleep(5);
      }
      const got = lines(text + drain(r));
      assert.equal(got[0], big.trimEnd());
      for (const l of got.slice(1)) assert.equal(l, '{"after":true}');
    });

    it('survives the reader going away (EPIPE) and says so in its stats', () => {
      const r = reader();
      const sink = track(logFifo(fifo, { reopenIntervalMs: 60_000 }));
      sink.open();
      closeSync(r);
      fds.splice(fds.indexOf(r), 1);
      sink.write('{"a":1}\n', 30);
      sink.write('{"a":2}\n', 30);
      assert.deepEqual([sink.stats().dropped, sink.stats().lastError], [2, 'EPIPE']);
    });

    /** A sink that keeps its lines: the "other sinks" a refused pipe's warning goes to. */
    const recorder = (): LogSink & { lines: string[] } => {
      const kept: string[] = [];
      return { name: 'recorder', lines: kept, open: () => undefined, write: (l: string) => void kept.push(l), close: async () => undefined, stats: () => ({ written: kept.length, dropped: 0, lastError: undefined }) };
    };

    it('never writes through a symlink named log, to a file or even to a FIFO, and warns through the other sinks', () => {
      const text = tmp.file('notes.txt', 'untouched\n');
      const viaLink = path.join(tmp.path, 'link-to-file');
      symlinkSync(text, viaLink);
      const other = recorder();
      const log = createLogger({ level: 'info', name: 'kata', sinks: [track(logFifo(viaLink)), other] });
      for (let i = 0; i < 5; i++) log.info({ i }, 'a line');
      assert.equal(readFileSync(text, 'utf8'), 'untouched\n');
      assert.ok(other.lines.some((l) => /refusing the containerd log pipe .*link-to-file: it is a symlink, not a FIFO/.test(l)), other.lines.join(''));

      const r = reader();
      const toFifo = path.join(tmp.path, 'link-to-fifo');
      symlinkSync(fifo, toFifo);
      const sink = track(logFifo(toFifo, { reopenIntervalMs: 0 }));
      assert.match(sink.open() ?? '', /symlink/);
      sink.write('{"x":1}\n', 30);
      assert.equal(drain(r), '');
      assert.deepEqual([sink.stats().written, sink.stats().dropped], [0, 1]);
    });

    it('never writes into a regular file named log', () => {
      const file = tmp.file('log-file', 'untouched\n');
      const sink = track(logFifo(file, { reopenIntervalMs: 0 }));
      assert.match(sink.open() ?? '', /it is a regular file, not a FIFO/);
      for (let i = 0; i < 3; i++) sink.write('{"x":1}\n', 30);
      assert.equal(readFileSync(file, 'utf8'), 'untouched\n');
      assert.equal(sink.stats().lastError, 'ENOTFIFO');
    });

    it('refuses for good a non-FIFO that appears after the first open, telling onRefused once', async () => {
      const later = path.join(tmp.path, 'later-log');
      const told: string[] = [];
      const sink = track(logFifo(later, { reopenIntervalMs: 0, onRefused: (m) => told.push(m) }));
      assert.match(sink.open() ?? '', /ENOENT/);
      writeFileSync(later, 'untouched\n');
      for (let i = 0; i < 3; i++) sink.write('{"x":1}\n', 30);
      await sleep(10);
      assert.equal(readFileSync(later, 'utf8'), 'untouched\n');
      assert.equal(told.length, 1);
      assert.match(told[0]!, /later-log: it is a regular file, not a FIFO/);
      // Replaced by a FIFO now: still refused; what was refused once is not trusted again.
      execFileSync('rm', [later]);
      execFileSync('mkfifo', [later]);
      const fd = openSync(later, fsc.O_RDONLY | fsc.O_NONBLOCK);
      fds.push(fd);
      sink.write('{"x":2}\n', 30);
      assert.equal(drain(fd), '');
      assert.equal(sink.stats().dropped, 4);
    });
  });

  describe('systemLog', () => {
    it('speaks the journald stream protocol: header, then each line with its priority prefix', async () => {
      const sockPath = path.join(tmp.path, 'journal-stdout');
      let received = '';
      const closed = new Promise<void>((resolve) => {
        const server = net.createServer((c) => {
          c.setEncoding('utf8');
          c.on('data', (d: string) => (received += d));
          c.on('end', () => server.close(() => resolve()));
        });
        server.listen(sockPath);
      });
      await new Promise((r) => setTimeout(r, 20));
      const journal = track(systemLog({ journalSocket: sockPath, syslogSocket: path.join(tmp.path, 'none') }));
      const log = createLogger({ level: 'debug', name: 'kata', sinks: [journal] });
      log.child({ sandbox: 'sb-2' }).info('to the journal');
      log.error('an error');
      log.debug('a detail');
      assert.equal(journal.name, `journald:${sockPath}`);
      await closeSinks([journal]);
      await closed;
      assert.ok(received.startsWith(journalStreamHeader('kata')), JSON.stringify(received.slice(0, 40)));
      const header = received.split('\n').slice(0, 7);
      assert.deepEqual(header, ['kata', '', '6', '1', '0', '0', '0']);
      const body = lines(received.slice(journalStreamHeader('kata').length));
      assert.deepEqual(body.map((l) => l.slice(0, 3)), ['<6>', '<3>', '<7>']);
      const first = JSON.parse(body[0]!.slice(3)) as Record<string, unknown>;
      assert.deepEqual([first.sandbox, first.msg, first.name], ['sb-2', 'to the journal', 'kata']);
      assert.deepEqual(journal.stats(), { written: 3, dropped: 0, lastError: undefined });
    });

    it('prefers the journal when both journald and /dev/log exist', async () => {
      const j = path.join(tmp.path, 'j');
      const server = net.createServer((c) => c.resume()).listen(j);
      await new Promise((r) => server.once('listening', r));
      const dgram = net.createServer().listen(path.join(tmp.path, 'dev-log')); // any socket will do for the choice
      await new Promise((r) => dgram.once('listening', r));
      const sink = track(systemLog({ journalSocket: j, syslogSocket: path.join(tmp.path, 'dev-log') }));
      assert.equal(sink.open(), undefined);
      assert.equal(sink.name, `journald:${j}`);
      await closeSinks([sink]);
      server.close();
      dgram.close();
    });

    const syslogTools = hasCommand('socat') && hasCommand('logger');
    (syslogTools ? it : it.skip)('sends syslog datagrams through logger, tagged kata[<shim pid>] with each line\'s priority', async function () {
      const devLog = path.join(tmp.path, 'dev-log');
      let out = '';
      const socat: ChildProcess = spawn('socat', ['-u', `UNIX-RECV:${devLog}`, '-'], { stdio: ['ignore', 'pipe', 'inherit'] });
      socat.stdout!.setEncoding('utf8');
      socat.stdout!.on('data', (d: string) => (out += d));
      try {
        for (let i = 0; i < 100 && !existsSync(devLog); i++) await sleep(10);
        const sys = track(systemLog({ journalSocket: path.join(tmp.path, 'none'), syslogSocket: devLog }));
        const log = createLogger({ level: 'info', name: 'kata', sinks: [sys] });
        log.child({ sandbox: 'sb-3', container: 'c-3' }).info('via syslog');
        log.error('bad thing');
        assert.equal(sys.name, `syslog:${devLog}`);
        await closeSinks([sys]);
        for (let i = 0; i < 100 && !out.includes('bad thing'); i++) await sleep(10);
        // Datagrams carry no newline: split on the priority that starts each message.
        const msgs = out.split(/(?=<\d+>)/).filter(Boolean);
        assert.equal(msgs.length, 2, out);
        const [first, second] = msgs as [string, string];
        assert.match(first, new RegExp(`^<14>.* kata\\[${process.pid}\\]: \\{`));
        assert.match(second, new RegExp(`^<11>.* kata\\[${process.pid}\\]: \\{`));
        const json = JSON.parse(first.slice(first.indexOf(': {') + 2)) as Record<string, unknown>;
        assert.deepEqual([json.sandbox, json.container, json.msg], ['sb-3', 'c-3', 'via syslog']);
      } finally {
        socat.kill();
      }
    });

    it('costs one warning, to the log pipe, on a host with neither, and never an error', () => {
      const r = reader();
      const sys = track(noSystemLog());
      const log = createLogger({ level: 'info', name: 'kata', sinks: [track(logFifo(fifo)), sys] });
      for (let i = 0; i < 3; i++) log.info({ i }, 'line');
      log.warn('a warning of our own');
      const got = lines(drain(r)).map((l) => JSON.parse(l) as Record<string, unknown>);
      const aboutSyslog = got.filter((l) => typeof l.msg === 'string' && l.msg.includes('no system log'));
      assert.equal(aboutSyslog.length, 1);
      assert.equal(aboutSyslog[0]!.level, 40);
      assert.deepEqual(got.map((l) => l.msg).slice(1), ['line', 'line', 'line', 'a warning of our own']);
      assert.equal(sys.name, 'none');
      assert.equal(sys.stats().dropped, 5);
    });
  });
});
