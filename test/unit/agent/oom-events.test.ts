/**
 * The sandbox's GetOOMEvent long poll (core/agent/oom-events.ts) through the real agent client,
 * against an in-test ttrpc server on a unix socket.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { AgentClient } from '../../../core/agent/client.js';
import { AgentError } from '../../../core/agent/errors.js';
import { OomEventLoop } from '../../../core/agent/oom-events.js';
import { AgentService } from '../../../wire/agent/proto.gen.js';
import { createLogger, type Logger } from '../../../core/logger.js';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { TtrpcServer } from '../../../wire/ttrpc/server.js';
import { TempDir } from '../../helpers/tmp.js';
import { until, within } from '../../helpers/wait.js';

interface Line {
  level: number;
  msg: string;
  container?: string;
}

describe('agent: OOM event loop (GetOOMEvent long poll)', () => {
  let tmp: TempDir;
  let server: TtrpcServer;
  let sock: string;
  let agent: AgentClient;
  let lines: Line[];
  let log: Logger;
  /** Answers for the server's GetOOMEvent calls: a container id, or an error to answer with. */
  let answers: (string | TtrpcError)[];
  let waiting: ((a: string | TtrpcError) => void)[];
  let calls: number;

  const answer = (a: string | TtrpcError): void => {
    const w = waiting.shift();
    if (w) w(a);
    else answers.push(a);
  };

  async function serve(withOom: boolean): Promise<void> {
    server = new TtrpcServer();
    server.register(AgentService, {
      ...(withOom
        ? {
            GetOOMEvent: async () => {
              calls++;
              const a = answers.shift() ?? (await new Promise<string | TtrpcError>((resolve) => waiting.push(resolve)));
              if (a instanceof TtrpcError) throw a;
              return { containerId: a };
            },
          }
        : {}),
      CloseStdin: () => ({}),
    });
    await server.listen(sock);
    agent = new AgentClient(net.connect(sock));
  }

  beforeEach(() => {
    tmp = new TempDir('kata-ts-oom-loop-');
    sock = path.join(tmp.path, 'agent.sock');
    lines = [];
    log = createLogger({ level: 'debug', stream: { write: (l) => lines.push(JSON.parse(l) as Line) } });
    answers = [];
    waiting = [];
    calls = 0;
  });
  afterEach(async () => {
    agent?.close();
    for (const w of waiting.splice(0)) w('');
    await server?.close();
    tmp.cleanup();
  });

  it('hands on each event in order and keeps one call pending', async () => {
    await serve(true);
    const seen: string[] = [];
    const loop = new OomEventLoop(agent, { log, onOom: (id) => seen.push(id) });
    answer('c1');
    answer('c2');
    await until('two events', () => seen.length === 2);
    assert.deepEqual(seen, ['c1', 'c2']);
    await until('the next call', () => calls === 3 && waiting.length === 1);
    answer('c1');
    await until('the third event', () => seen.length === 3);
    assert.deepEqual(seen, ['c1', 'c2', 'c1']);
    loop.stop();
    await within(loop.done, 'the loop to end');
  });

  it('ends quietly when the agent connection closes', async () => {
    await serve(true);
    const loop = new OomEventLoop(agent, { log, onOom: () => assert.fail('no event expected') });
    await until('the call', () => waiting.length === 1);
    await server.close();
    await within(loop.done, 'the loop to end');
    assert.equal(agent.isClosed, true);
    assert.deepEqual(lines.filter((l) => l.level >= 40), [], 'no warning');
  });

  it('ends with one debug line when the agent has no GetOOMEvent (UNIMPLEMENTED)', async () => {
    await serve(false);
    const loop = new OomEventLoop(agent, { log, onOom: () => assert.fail('no event expected') });
    await within(loop.done, 'the loop to end');
    assert.deepEqual(lines.map((l) => [l.level, l.msg]), [[20, 'the agent has no GetOOMEvent: no OOM events for this sandbox']]);
    assert.equal(agent.isClosed, false, 'the connection stays up');
    await agent.closeStdin({ containerId: 'c1', execId: '' });
  });

  it('asks again after a pause when a call fails otherwise, and goes on past a listener that throws', async () => {
    await serve(true);
    const seen: string[] = [];
    const loop = new OomEventLoop(agent, {
      log,
      retryMs: 20,
      onOom: (id) => {
        seen.push(id);
        if (id === 'bad') throw new Error('listener bug');
      },
    });
    answer(new TtrpcError(GrpcCode.INTERNAL, 'channel closed'));
    answer('bad');
    answer('c1');
    await until('the events after the failure', () => seen.length === 2);
    assert.deepEqual(seen, ['bad', 'c1']);
    const warn = lines.find((l) => l.level === 40);
    assert.equal(warn?.msg, 'GetOOMEvent failed; asking again shortly');
    assert.ok(lines.some((l) => l.level === 50 && l.msg === 'an OOM event listener failed' && l.container === 'bad'));
    loop.stop();
    await within(loop.done, 'the loop to end');
  });

  it('gives the agent client a long poll without deadline that fails "closed" when the connection goes', async () => {
    await serve(true);
    const pending = agent.getOOMEvent();
    await until('the call', () => waiting.length === 1);
    agent.close();
    await assert.rejects(pending, (e: unknown) => e instanceof AgentError && e.kind === 'closed' && e.method === 'GetOOMEvent');
  });
});
