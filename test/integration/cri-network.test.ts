/**
 * The Kubernetes networking path without a kubelet: containerd's CRI plugin with a CNI
 * configuration (Debian's containernetworking-plugins: bridge + host-local, loopback) creates each
 * pod's network namespace under /var/run/netns and a veth into it; our shim mirrors the veth into
 * the pod's VM (tap + tc mirred). containerd runs in a network namespace this test creates, so the
 * CNI bridge (ktsbr0, 10.244.250.0/24, no masquerade) and the veths' host ends exist only there;
 * the host's own interfaces are never touched. The pods' namespaces are removed by CRI; the
 * after() hook removes any this test's pods left (bounded, by the paths their specs named).
 * host-local keeps its leases in the temp dir (dataDir); libcni's result cache is containerd's
 * default, /var/lib/cni/results, whose entries CNI DEL removes.
 * Also: the pod's hostname and CRI's DNS config reach the containers' /etc/hostname, hostname and
 * /etc/resolv.conf (CRI writes the files and passes them as bind mounts; the shim shares them).
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { BUSYBOX_IMAGE, CRI_NAMESPACE, NO_LEFTOVERS, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { CriClient } from '../helpers/cri.js';
import { ensureGuestImage } from '../helpers/guest.js';
import { ip, removeNetns } from '../helpers/netns.js';
import { processesMentioning } from '../helpers/procs.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';
import { TempDir } from '../helpers/tmp.js';
import { until as untilFast } from '../helpers/wait.js';

const HANDLER = 'kata';
const SUBNET = '10.244.250.0/24';
const BRIDGE = 'ktsbr0';
const DNS = { servers: ['10.244.250.53'], searches: ['svc.test.example', 'test.example'], options: ['ndots:2'] };

const until = <T>(what: string, ok: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 60_000) => untilFast(what, ok, timeoutMs, 200);

describe("pod networking under containerd's CRI plugin with CNI (bridge, host-local, loopback) @integration", function () {
  this.timeout(180_000);
  let tmp: TempDir;
  let runTmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let cri: CriClient | undefined;
  let runRoot: string;
  const hostNs = `ktscni-${process.pid}`;
  const pods: Record<string, { id: string; netns: string }> = {};
  const containers: Record<string, string> = {};

  before(async function () {
    this.timeout(600_000);
    if (process.getuid?.() !== 0 || !existsSync('/usr/lib/cni/bridge')) this.skip();
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-cri-cni-');
    runTmp = new TempDir('kn-');
    runRoot = runTmp.path;
    ip('netns', 'add', hostNs);
    ip('-n', hostNs, 'link', 'set', 'lo', 'up');
    ctrd = await startContainerd(this, {
      pathPrefix: [shimBinDir(tmp)],
      env: { KATA_TS_RUN_ROOT: runRoot },
      image: false,
      netns: hostNs,
      cri: {
        runtimes: { [HANDLER]: 'io.containerd.kata.v2' },
        handlers: { [HANDLER]: { configPath: shimConfig(tmp, image) } },
        cni: {
          binDir: '/usr/lib/cni',
          conflist: {
            cniVersion: '0.4.0',
            name: 'kata-ts-test',
            plugins: [
              { type: 'bridge', bridge: BRIDGE, isGateway: true, ipMasq: false, ipam: { type: 'host-local', ranges: [[{ subnet: SUBNET }]], routes: [{ dst: '0.0.0.0/0' }], dataDir: path.join(tmp.path, 'cni-ipam') } },
              { type: 'loopback' },
            ],
          },
        },
      },
    });
    cri = new CriClient(ctrd.socket);
  });

  after(async () => {
    cri?.close();
    await ctrd?.stop();
    // CRI removes a pod's namespace at StopPodSandbox; one left by a failed test goes here.
    for (const { netns } of Object.values(pods)) if (existsSync(netns)) removeNetns([path.basename(netns)]);
    removeNetns([hostNs]);
    tmp?.cleanup();
    runTmp?.cleanup();
  });

  const api = () => cri!;
  const log = () => `--- containerd log ---\n${ctrd!.logTail(60)}`;
  const logDir = (pod: string) => path.join(tmp.path, 'pods', pod);
  const sandboxConfig = (pod: string) => ({
    metadata: { name: pod, uid: `uid-${pod}`, namespace: 'default', attempt: 0 },
    hostname: pod,
    log_directory: logDir(pod),
    dns_config: DNS,
    linux: { security_context: { namespace_options: { network: 'POD', pid: 'CONTAINER', ipc: 'POD' } } },
  });
  /** The pod network namespace CRI named in the sandbox container's spec (containerd's bundle). */
  const specNetns = (id: string): string => {
    const spec = JSON.parse(readFileSync(path.join(ctrd!.stateDir, 'io.containerd.runtime.v2.task', CRI_NAMESPACE, id, 'config.json'), 'utf8')) as { linux: { namespaces: { type: string; path?: string }[] } };
    const p = spec.linux.namespaces.find((n) => n.type === 'network')?.path;
    assert.ok(p, 'the sandbox spec names a network namespace');
    return p;
  };
  const podIp = async (pod: string) => ((await api().runtime('PodSandboxStatus', { pod_sandbox_id: pods[pod]!.id })).status as { network: { ip: string } }).network.ip;
  const run = async (pod: string, name: string, script: string) => {
    const config = { metadata: { name, attempt: 0 }, image: { image: BUSYBOX_IMAGE }, command: ['sh', '-c', script], log_path: `${name}_0.log` };
    const r = await api().runtime('CreateContainer', { pod_sandbox_id: pods[pod]!.id, config, sandbox_config: sandboxConfig(pod) });
    containers[name] = r.container_id as string;
    await api().runtime('StartContainer', { container_id: containers[name] });
  };
  const exec = async (name: string, cmd: string[]) => {
    const r = await api().runtime('ExecSync', { container_id: containers[name], cmd, timeout: 30 });
    return { out: Buffer.from(r.stdout as Uint8Array).toString(), err: Buffer.from(r.stderr as Uint8Array).toString(), code: r.exit_code as number };
  };
  const qemus = (id: string) => processesMentioning(`${path.join(runRoot, CRI_NAMESPACE, id)}/`).filter((p) => p.argv[0]?.includes('qemu-system'));

  it('RunPodSandbox gives two pods on the kata handler a CNI address on the test subnet, each mirrored into its VM by a tap and tc filters', async () => {
    for (const pod of ['pod-a', 'pod-b']) {
      mkdirSync(logDir(pod), { recursive: true });
      const r = await api().runtime('RunPodSandbox', { config: sandboxConfig(pod), runtime_handler: HANDLER }).catch((e: Error) => assert.fail(`${e.message}\n${log()}`));
      const id = r.pod_sandbox_id as string;
      pods[pod] = { id, netns: specNetns(id) };
      assert.equal(qemus(id).length, 1, `one VM for ${pod}`);
      assert.match(await podIp(pod), /^10\.244\.250\.\d+$/);
      const ns = path.basename(pods[pod]!.netns);
      assert.match(ip('-n', ns, '-o', 'link', 'show', 'type', 'tun'), /tap0_kata/, `a tap in ${ns}`);
    }
    assert.notEqual(await podIp('pod-a'), await podIp('pod-b'));
    assert.match(ip('-n', hostNs, '-o', 'link', 'show', 'dev', BRIDGE), /ktsbr0/, 'the bridge lives in the test namespace');
  });

  it('a container of one pod reaches a server in a container of the other pod over TCP', async () => {
    await run('pod-a', 'server', 'trap "exit 143" TERM; i=0; while [ $i -lt 1000 ]; do echo hello from pod-a | nc -l -p 8080; i=$((i+1)); done');
    await run('pod-b', 'client', 'trap "exit 143" TERM; sleep 1000 & wait');
    const a = await podIp('pod-a');
    let last = { out: '', err: '', code: -1 };
    for (let i = 0; i < 20 && !last.out.includes('hello from pod-a'); i++) {
      last = await exec('client', ['sh', '-c', `nc -w 5 ${a} 8080 </dev/null`]);
      if (!last.out.includes('hello from pod-a')) await new Promise((r) => setTimeout(r, 500));
    }
    assert.equal(last.out, 'hello from pod-a\n', `${JSON.stringify(last)}\n${log()}`);
    const addr = await exec('client', ['ip', '-o', '-4', 'addr', 'show', 'dev', 'eth0']);
    assert.match(addr.out, new RegExp(`inet ${(await podIp('pod-b')).replace(/\./g, '\\.')}/24`));
  });

  it("the pod's DNS config is the container's /etc/resolv.conf, and its hostname the container's hostname and /etc/hostname", async () => {
    const r = await exec('client', ['sh', '-c', 'cat /etc/resolv.conf; echo ---; hostname; cat /etc/hostname; echo ---; cat /etc/hosts']);
    const [resolv, names, hosts] = r.out.split('---\n');
    const lines = resolv!.split('\n').map((l) => l.trim()).filter(Boolean);
    assert.deepEqual(lines, ['search svc.test.example test.example', 'nameserver 10.244.250.53', 'options ndots:2'], r.out);
    assert.deepEqual(names!.trim().split('\n'), ['pod-b', 'pod-b']);
    assert.match(hosts!, /localhost/);
  });

  it('removing the pods leaves no VM, no pod namespace (so no tap or tc filter), and no veth on the bridge', async () => {
    for (const pod of ['pod-a', 'pod-b']) {
      const { id, netns } = pods[pod]!;
      await api().runtime('StopPodSandbox', { pod_sandbox_id: id });
      await api().runtime('RemovePodSandbox', { pod_sandbox_id: id });
      await until(`the VM of ${pod} to go`, () => qemus(id).length === 0);
      assert.equal(existsSync(netns), false, `${netns} is gone`);
    }
    assert.equal(ip('-n', hostNs, '-o', 'link', 'show', 'type', 'veth').trim(), '', 'no veth left');
    const cached = existsSync('/var/lib/cni/results') ? readdirSync('/var/lib/cni/results').filter((f) => f.startsWith('kata-ts-test-')) : [];
    assert.deepEqual(cached, [], 'no CNI result left in the cache');
    assert.deepEqual(await ctrd!.stop(), NO_LEFTOVERS, log());
  });
});
