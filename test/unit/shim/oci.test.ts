import assert from 'node:assert/strict';
import { KataError } from '../../../core/errors.js';
import { parseExecSpec, readBundleSpec } from '../../../shim/oci.js';
import { TempDir } from '../../helpers/tmp.js';

const isSpecError = (text: RegExp) => (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_OCI_SPEC' && text.test(e.message);

describe('shim: OCI specs', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir()));
  afterEach(() => tmp.cleanup());

  const bundle = (spec: unknown) => {
    tmp.file('b/config.json', typeof spec === 'string' ? spec : JSON.stringify(spec));
    return `${tmp.path}/b`;
  };

  it('reads the process, the rootfs path relative to the bundle and the hostname', async () => {
    const b = bundle({
      ociVersion: '1.0.2',
      process: { args: ['sh', '-c', 'echo hi'], env: ['A=1'], cwd: '/work', user: { uid: 1000, gid: 100 }, terminal: false },
      root: { path: 'rootfs' },
      hostname: 'box',
    });
    const s = await readBundleSpec(b, 'c1');
    assert.deepEqual(s.process, { args: ['sh', '-c', 'echo hi'], env: ['A=1'], cwd: '/work', uid: 1000, gid: 100 });
    assert.equal(s.rootPath, `${b}/rootfs`);
    assert.equal(s.hostname, 'box');
    assert.equal(s.terminal, false);
    assert.equal(s.sandboxId, 'c1');
    assert.equal(s.joinsSandbox, false);
  });

  it('takes the network namespace path from linux.namespaces, and none for a new or absent one', async () => {
    const withNs = (namespaces: unknown) => readBundleSpec(bundle({ process: { args: ['sh'] }, linux: { namespaces } }), 'c1');
    assert.equal((await withNs([{ type: 'pid' }, { type: 'network', path: '/var/run/netns/pod' }])).netns, '/var/run/netns/pod');
    assert.equal((await withNs([{ type: 'network' }])).netns, undefined);
    assert.equal((await readBundleSpec(bundle({ process: { args: ['sh'] } }), 'c1')).netns, undefined);
    await assert.rejects(withNs([{ type: 'network', path: 'netns/pod' }]), isSpecError(/network namespace path/));
  });

  it('tells a pod container from a pod sandbox by the CRI annotations', async () => {
    const ann = (type: string) => ({ 'io.kubernetes.cri.container-type': type, 'io.kubernetes.cri.sandbox-id': 'pod1' });
    const sandbox = await readBundleSpec(bundle({ process: { args: ['/pause'] }, annotations: ann('sandbox') }), 'pod1');
    assert.equal(sandbox.joinsSandbox, false);
    assert.equal(sandbox.sandboxId, 'pod1');
    const member = await readBundleSpec(bundle({ process: { args: ['app'] }, annotations: ann('container') }), 'app1');
    assert.equal(member.joinsSandbox, true);
    assert.equal(member.sandboxId, 'pod1');
  });

  it('refuses a bundle it cannot act on, naming the field', async () => {
    await assert.rejects(readBundleSpec(`${tmp.path}/none`, 'c1'), isSpecError(/config.json: cannot read/));
    await assert.rejects(readBundleSpec(bundle('{not json'), 'c1'), isSpecError(/not valid JSON/));
    await assert.rejects(readBundleSpec(bundle({ root: { path: 'rootfs' } }), 'c1'), isSpecError(/process is missing/));
    await assert.rejects(readBundleSpec(bundle({ process: { args: [] } }), 'c1'), isSpecError(/process.args is empty/));
    await assert.rejects(readBundleSpec(bundle({ process: { args: ['x'], cwd: 'rel' } }), 'c1'), isSpecError(/process.cwd must be an absolute path/));
    await assert.rejects(readBundleSpec(bundle({ process: { args: ['x'], user: { uid: -1 } } }), 'c1'), isSpecError(/process.user.uid/));
    await assert.rejects(readBundleSpec(bundle({ process: { args: ['x'], env: [1] } }), 'c1'), isSpecError(/process.env must be an array of strings/));
  });

  it('reads the mounts, and refuses a bind mount without an absolute host source', async () => {
    const mounts = [
      { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid'] },
      { destination: '/data', type: 'bind', source: '/srv/data', options: ['rbind', 'ro'] },
    ];
    assert.deepEqual((await readBundleSpec(bundle({ process: { args: ['x'] }, mounts }), 'c1')).mounts, mounts);
    assert.deepEqual((await readBundleSpec(bundle({ process: { args: ['x'] } }), 'c1')).mounts, []);
    await assert.rejects(readBundleSpec(bundle({ process: { args: ['x'] }, mounts: [{ destination: '/d', type: 'bind', source: 'rel', options: [] }] }), 'c1'), isSpecError(/mounts\[0\]\.source must be an absolute host path/));
    await assert.rejects(readBundleSpec(bundle({ process: { args: ['x'] }, mounts: [{ destination: 'd', type: 'tmpfs' }] }), 'c1'), isSpecError(/mounts\[0\]\.destination must be an absolute path/));
    await assert.rejects(readBundleSpec(bundle({ process: { args: ['x'] }, mounts: {} }), 'c1'), isSpecError(/mounts must be an array/));
  });

  it('reads an exec process from the JSON in the request', () => {
    const json = new TextEncoder().encode(JSON.stringify({ args: ['ls'], cwd: '/', terminal: true, consoleSize: { height: 40, width: 120 } }));
    assert.deepEqual(parseExecSpec(json, 'e1'), { process: { args: ['ls'], cwd: '/', terminal: { rows: 40, cols: 120 } }, terminal: true });
    const noSize = new TextEncoder().encode(JSON.stringify({ args: ['ls'], terminal: true }));
    assert.deepEqual(parseExecSpec(noSize, 'e1'), { process: { args: ['ls'], terminal: { rows: 0, cols: 0 } }, terminal: true });
    assert.throws(() => parseExecSpec(new TextEncoder().encode(JSON.stringify({ args: ['ls'], terminal: true, consoleSize: { height: -1 } })), 'e1'), isSpecError(/consoleSize\.height/));
    assert.throws(() => parseExecSpec(undefined, 'e1'), isSpecError(/exec e1: the request carries no process spec/));
    assert.throws(() => parseExecSpec(new TextEncoder().encode('{'), 'e1'), isSpecError(/not valid JSON/));
  });
});
