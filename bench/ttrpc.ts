/**
 * ttrpc and agent-protocol benchmarks (run: `node dist/bench/ttrpc.js` after a build):
 *
 * 1. Start-up of the protobuf layer, each in a fresh process (median of several): our generated
 *    codecs (scripts/gen-protos.ts), as modules and bundled with esbuild the way the CLI and the
 *    guest agent ship, against protobufjs parsing the .proto files at run time and protobufjs
 *    loading a prebuilt JSON descriptor. Measured: importing, preparing, and the first encode +
 *    decode of a CreateContainerRequest inside a ttrpc Request.
 * 2. Calls over a unix socket in one process: sequential round trips, 32 concurrent, 1 MiB echoes.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { build } from 'esbuild';
import { performance } from 'node:perf_hooks';
import { PACKAGE_ROOT } from '../core/paths.js';
import { TtrpcClient } from '../wire/ttrpc/client.js';
import { TtrpcServer } from '../wire/ttrpc/server.js';
import { method, service } from '../wire/ttrpc/codec.js';
import { Request } from '../wire/ttrpc/proto.gen.js';
import { loadProtos, PROTOS_DIR } from '../scripts/gen-protos.js';

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
};
const dist = (rel: string): string => path.join(PACKAGE_ROOT, 'dist', rel);

const SAMPLE = `{
  containerId: 'c1', execId: 'c1', stringUser: { uid: '0', gid: '0' },
  storages: [{ driver: 'blk', source: '02/00', fstype: 'ext4', mountPoint: '/run/kata-containers/shared/containers/c1' }],
  OCI: { Version: '1.0.2', Process: { Args: ['/bin/sh', '-c', 'echo hi'], Env: ['PATH=/bin'], Cwd: '/', User: { UID: 0, GID: 0 } },
         Root: { Path: '/run/kata-containers/shared/containers/c1/rootfs' }, Hostname: 'h',
         Linux: { Namespaces: [{ Type: 'pid' }, { Type: 'mount' }] } } }`;

function startupScripts(descriptorFile: string): Record<string, string> {
  const tail = (enc: string, dec: string): string => `
const s = ${SAMPLE};
const body = ${enc};
const back = ${dec};
if (back.storages[0].source !== '02/00') throw new Error('round trip failed');
const t1 = performance.now();
process.stdout.write(JSON.stringify({ script: t1 - t0, sinceProcessStart: t1 }));`;
  return {
    'generated codecs (ours)': `const t0 = performance.now();
const { Request } = await import('${dist('wire/ttrpc/proto.gen.js')}');
const { CreateContainerRequest } = await import('${dist('wire/agent/proto.gen.js')}');
${tail(`Request.encode({ service: 'grpc.AgentService', method: 'CreateContainer', payload: CreateContainerRequest.encode(s) })`, `CreateContainerRequest.decode(Request.decode(body).payload)`)}`,
    'protobufjs, .proto parsed at run time': `const t0 = performance.now();
const { default: pb } = await import('protobufjs');
const root = new pb.Root();
root.resolvePath = (o, t) => (t.startsWith('google/protobuf/') ? t : ${JSON.stringify(PROTOS_DIR)} + '/' + t);
root.loadSync(['ttrpc/request.proto', 'kata/agent.proto', 'kata/health.proto']);
root.resolveAll();
const R = root.lookupType('ttrpc.Request'), C = root.lookupType('grpc.CreateContainerRequest');
${tail(`R.encode({ service: 'grpc.AgentService', method: 'CreateContainer', payload: C.encode(s).finish() }).finish()`, `C.decode(R.decode(body).payload)`)}`,
    'protobufjs/light, JSON descriptor': `const t0 = performance.now();
const { default: pb } = await import('protobufjs/light.js');
const { readFileSync } = await import('node:fs');
const root = pb.Root.fromJSON(JSON.parse(readFileSync(${JSON.stringify(descriptorFile)}, 'utf8')));
const R = root.lookupType('ttrpc.Request'), C = root.lookupType('grpc.CreateContainerRequest');
${tail(`R.encode({ service: 'grpc.AgentService', method: 'CreateContainer', payload: C.encode(s).finish() }).finish()`, `C.decode(R.decode(body).payload)`)}`,
  };
}

async function startup(): Promise<void> {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'kata-ts-bench-'));
  try {
    const descriptor = path.join(tmp, 'agent.json');
    writeFileSync(descriptor, JSON.stringify(loadProtos(['ttrpc/request.proto', 'kata/agent.proto', 'kata/health.proto']).toJSON()));
    const scripts = startupScripts(descriptor);
    const entry = path.join(tmp, 'entry.mjs');
    writeFileSync(entry, scripts['generated codecs (ours)']!);
    const bundle = path.join(tmp, 'bundle.mjs');
    await build({ entryPoints: [entry], outfile: bundle, bundle: true, minify: true, platform: 'node', format: 'esm', target: 'node20', logLevel: 'warning',
      banner: { js: "import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" } });
    const runs = 25;
    const bare: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t = performance.now();
      spawnSync(process.execPath, ['-e', '0']);
      bare.push(performance.now() - t);
    }
    console.log(`1. protobuf start-up, fresh process each, median of ${runs} (bare \`node -e 0\`: ${median(bare).toFixed(1)} ms)`);
    const variants: [string, string[]][] = Object.entries(scripts).map(([name, code]) => [name, ['--input-type=module', '-e', code]]);
    variants.splice(1, 0, ['generated codecs, esbuild bundle', [bundle]]);
    for (const [name, args] of variants) {
      const script: number[] = [];
      const wall: number[] = [];
      for (let i = 0; i < runs; i++) {
        const t = performance.now();
        const r = spawnSync(process.execPath, args, { cwd: PACKAGE_ROOT, encoding: 'utf8' });
        wall.push(performance.now() - t);
        if (r.status !== 0) throw new Error(`${name}: ${r.stderr}`);
        script.push((JSON.parse(r.stdout) as { script: number }).script);
      }
      console.log(`   ${name.padEnd(40)} import+prepare+first call ${median(script).toFixed(1).padStart(6)} ms   whole process ${median(wall).toFixed(1).padStart(6)} ms`);
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

async function calls(): Promise<void> {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'kata-ts-bench-'));
  const sock = path.join(tmp, 'b.sock');
  const Bench = service('bench.Echo', { Echo: method('Echo', Request, Request) });
  const server = new TtrpcServer().register(Bench, { Echo: (req) => req });
  await server.listen(sock);
  const client = new TtrpcClient(net.connect(sock));
  const echo = client.service(Bench);
  try {
    for (let i = 0; i < 200; i++) await echo.Echo({ service: 'warm' });
    const n = 2000;
    let t = performance.now();
    const lat: number[] = [];
    for (let i = 0; i < n; i++) {
      const t1 = performance.now();
      await echo.Echo({ service: 'x', method: 'y' });
      lat.push(performance.now() - t1);
    }
    let el = performance.now() - t;
    console.log(`2. calls over a unix socket, one process`);
    console.log(`   sequential small calls   ${n} in ${el.toFixed(0)} ms   ${((n / el) * 1000).toFixed(0)} calls/s   median round trip ${(median(lat) * 1000).toFixed(0)} µs`);
    t = performance.now();
    const conc = 32;
    await Promise.all(Array.from({ length: conc }, async () => {
      for (let i = 0; i < n / conc; i++) await echo.Echo({ service: 'x', method: 'y' });
    }));
    el = performance.now() - t;
    console.log(`   ${conc} concurrent callers      ${n} in ${el.toFixed(0)} ms   ${((n / el) * 1000).toFixed(0)} calls/s`);
    const payload = new Uint8Array(1 << 20).fill(7);
    const m = 20;
    t = performance.now();
    for (let i = 0; i < m; i++) await echo.Echo({ payload });
    el = performance.now() - t;
    console.log(`   1 MiB echo               ${m} in ${el.toFixed(0)} ms   ${((2 * m) / (el / 1000)).toFixed(0)} MiB/s (both ways)`);
  } finally {
    client.close();
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  }
}

await startup();
await calls();
