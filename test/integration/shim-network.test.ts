/**
 * Pod networking through containerd: `ctr run --with-ns network:<path>` puts the path in the OCI
 * spec's linux.namespaces, the shim hands it to the sandbox, the container sees the pod
 * namespace's address and reaches a peer namespace over TCP. Namespaces, addresses and traffic
 * as in network.test.ts (documentation ranges, only between the two namespaces it creates).
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import path from 'node:path';
import { startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { ensureGuestImage } from '../helpers/guest.js';
import { createPodAndPeer, ip, peerServer, removeNetns, tc, type PodAndPeer } from '../helpers/netns.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';
import { TempDir } from '../helpers/tmp.js';

describe('containerd-shim-kata-v2 pod networking with the real containerd @integration', function () {
  this.timeout(180_000);
  let tmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let ns: PodAndPeer | undefined;
  let server: ChildProcess | undefined;

  before(async function () {
    this.timeout(600_000);
    if (process.getuid?.() !== 0) this.skip();
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-shim-net-');
    ns = createPodAndPeer('ktsc');
    server = await peerServer(ns.peer);
    ctrd = await startContainerd(this, { pathPrefix: [shimBinDir(tmp)], env: { KATA_CONF_FILE: shimConfig(tmp, image), KATA_TS_RUN_ROOT: path.join(tmp.path, 'run') } });
  });

  after(async () => {
    await ctrd?.stop();
    if (server?.pid !== undefined && server.exitCode === null) server.kill('SIGKILL');
    if (ns) removeNetns([ns.pod, ns.peer]);
    tmp?.cleanup();
  });

  it('ctr run --with-ns network:<path>: the container has the namespace address and TCP reaches the peer; the taps go with the task', async () => {
    const { pod, podPath } = ns!;
    const script = 'ip -o addr show dev eth0; echo guest | nc -w 5 192.0.2.1 8080';
    const r = await ctrd!.run('net1', ['sh', '-c', script], { runtime: 'io.containerd.kata.v2', timeoutMs: 120_000, flags: ['--with-ns', `network:${podPath}`] });
    const why = `stdout: ${r.stdout}\nstderr: ${r.stderr}\n--- containerd log ---\n${ctrd!.logTail(40)}`;
    assert.equal(r.code, 0, why);
    assert.match(r.stdout, /inet 192\.0\.2\.2\/24/, why);
    assert.match(r.stdout, /hello from the peer\npeer got guest/, why);
    assert.doesNotMatch(ip('-n', pod, 'link', 'show'), /_kata/, 'no tap left');
    assert.doesNotMatch(tc('-n', pod, 'qdisc', 'show', 'dev', 'eth0'), /ingress/, 'no filter left');
  });
});
