/**
 * Network namespaces for the networking tests: a "pod" namespace holding `eth0` (192.0.2.2/24,
 * 2001:db8::2/64, default route via the peer) and a "peer" namespace holding the other end of the
 * veth (192.0.2.1/24, 2001:db8::1/64). Documentation ranges only, and nothing connected to the
 * host's own interfaces. The caller removes them with {@link removeNetns} in an after() hook.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';

export const ip = (...args: string[]): string => execFileSync('ip', args, { encoding: 'utf8' });
export const tc = (...args: string[]): string => execFileSync('tc', args, { encoding: 'utf8' });

export interface PodAndPeer {
  readonly pod: string;
  readonly peer: string;
  /** The pod namespace's path, as a runtime is given it. */
  readonly podPath: string;
}

export function createPodAndPeer(prefix: string): PodAndPeer {
  const pod = `${prefix}-pod-${process.pid}`;
  const peer = `${prefix}-peer-${process.pid}`;
  ip('netns', 'add', pod);
  ip('netns', 'add', peer);
  ip('-n', pod, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'peer0', 'netns', peer);
  ip('-n', pod, 'addr', 'add', '192.0.2.2/24', 'dev', 'eth0');
  ip('-n', pod, 'addr', 'add', '2001:db8::2/64', 'dev', 'eth0', 'nodad');
  ip('-n', pod, 'link', 'set', 'eth0', 'up');
  ip('-n', pod, 'route', 'add', 'default', 'via', '192.0.2.1');
  ip('-n', peer, 'addr', 'add', '192.0.2.1/24', 'dev', 'peer0');
  ip('-n', peer, 'addr', 'add', '2001:db8::1/64', 'dev', 'peer0', 'nodad');
  ip('-n', peer, 'link', 'set', 'peer0', 'up');
  ip('-n', peer, 'link', 'set', 'lo', 'up');
  return { pod, peer, podPath: `/var/run/netns/${pod}` };
}

/** Deletes the namespaces (their veth ends and any tap left in them go too); absent ones are skipped. */
export function removeNetns(names: readonly string[]): void {
  for (const ns of names) {
    try {
      ip('netns', 'del', ns);
    } catch {
      // never created
    }
  }
}

/** A TCP server on port 8080 of the peer namespace (node; IPv4 and IPv6): greets, then answers what it reads, prefixed. */
export function peerServer(peer: string): Promise<ChildProcess> {
  const code = `const net=require('net');net.createServer((s)=>{s.write('hello from the peer\\n');s.on('data',(d)=>s.end('peer got '+d));}).listen(8080,'::',()=>console.log('listening'));`;
  const child = spawn('ip', ['netns', 'exec', peer, process.execPath, '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (c) => reject(new Error(`the peer server exited (${c})`)));
    child.stdout.once('data', () => resolve(child));
  });
}

/** Connects from the peer namespace to `host:port` and answers what the server sent; at most 40 tries, 250 ms apart, while the server starts. */
export async function fromPeer(peer: string, host: string, port: number): Promise<string> {
  const code = `const s=require('net').connect(${port},'${host}');let b='';s.on('data',(d)=>b+=d);s.on('end',()=>{process.stdout.write(b);process.exit(0)});s.on('error',(e)=>{console.error(e.message);process.exit(1)});setTimeout(()=>process.exit(2),5000);`;
  let last = '';
  for (let i = 0; i < 40; i++) {
    try {
      return execFileSync('ip', ['netns', 'exec', peer, process.execPath, '-e', code], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      last = String((e as { stderr?: string }).stderr ?? e);
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  throw new Error(`no answer from ${host}:${port}: ${last}`);
}
