/**
 * The container rootfs from containerd's mounts: overlay (also with more layers than fit in the
 * kernel's page of mount options), bind, a block device handed over unmounted, and no mounts.
 * Real mounts in a temp dir (root only).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { isMountPoint } from '../../../core/mounts.js';
import { compactOverlayOptions, prepareRootfs } from '../../../shim/rootfs.js';
import { blockRootfsSource } from '../../../plugins/devmapper/block-rootfs.js';
import { TempDir } from '../../helpers/tmp.js';

describe('shim: container rootfs from containerd mounts @integration', function () {
  let tmp: TempDir;
  before(function () {
    if (process.getuid?.() !== 0) this.skip();
  });
  beforeEach(() => (tmp = new TempDir()));
  afterEach(() => {
    try {
      execFileSync('umount', ['-R', path.join(tmp.path, 'rootfs')], { stdio: 'ignore' });
    } catch {
      /* not mounted: the test released it */
    }
    tmp.cleanup();
  });

  /** n overlay layers with long snapshot paths, as containerd's overlayfs snapshotter lays them out. */
  function layers(n: number): { lower: string[]; upper: string; work: string; target: string } {
    const root = path.join(tmp.path, 'var', 'lib', 'containerd', 'io.containerd.snapshotter.v1.overlayfs', 'snapshots');
    const lower: string[] = [];
    for (let i = 0; i < n; i++) {
      const fs = path.join(root, String(1000 + i), 'fs');
      mkdirSync(fs, { recursive: true });
      writeFileSync(path.join(fs, `layer${i}`), `${i}\n`);
      lower.push(fs);
    }
    const upper = path.join(root, 'top', 'fs');
    const work = path.join(root, 'top', 'work');
    mkdirSync(upper, { recursive: true });
    mkdirSync(work, { recursive: true });
    const target = path.join(tmp.path, 'rootfs');
    mkdirSync(target);
    return { lower, upper, work, target };
  }

  it('names the layers relative to their common parent only when the options would not fit in a page', () => {
    const short = ['index=off', 'lowerdir=/s/1/fs:/s/2/fs', 'upperdir=/s/3/fs'];
    assert.deepEqual(compactOverlayOptions(short), { options: short });
    const long = Array.from({ length: 150 }, (_, i) => `/var/lib/containerd/snapshots/${i}/fs`);
    const r = compactOverlayOptions(['index=off', `lowerdir=${long.join(':')}`, 'upperdir=/var/lib/containerd/snapshots/100/fs']);
    assert.equal(r.cwd, '/var/lib/containerd/snapshots');
    assert.equal(r.options[1], `lowerdir=${long.map((_, i) => `${i}/fs`).join(':')}`);
    assert.equal(r.options[2], 'upperdir=/var/lib/containerd/snapshots/100/fs');
  });

  it('mounts an overlay whose lowerdir list is longer than a page, and unmounts it on release', async () => {
    const { lower, upper, work, target } = layers(120);
    // containerd lists the top layer first.
    const options = ['index=off', `workdir=${work}`, `upperdir=${upper}`, `lowerdir=${[...lower].reverse().join(':')}`];
    assert.ok(options.join(',').length > 4096, 'the test needs options longer than a page');
    // Handed to mount(8) as they are, the kernel refuses them: this is what compaction is for.
    assert.throws(() => execFileSync('mount', ['-t', 'overlay', '-o', options.join(','), 'overlay', target], { stdio: 'pipe' }));
    const rootfs = await prepareRootfs([{ type: 'overlay', source: 'overlay', target: '', options }], target, '/unused');
    assert.deepEqual(rootfs.source, { kind: 'dir', path: target });
    assert.equal(readFileSync(path.join(target, 'layer0'), 'utf8'), '0\n');
    assert.equal(readFileSync(path.join(target, 'layer119'), 'utf8'), '119\n');
    await rootfs.release();
    assert.equal(await isMountPoint(target), false);
    await rootfs.release(); // idempotent
  });

  it('bind-mounts a native snapshot, and hands a block device over unmounted', async () => {
    const snap = path.join(tmp.path, 'snap');
    mkdirSync(snap);
    writeFileSync(path.join(snap, 'marker'), 'x');
    const target = path.join(tmp.path, 'rootfs');
    mkdirSync(target);
    const bind = await prepareRootfs([{ type: 'bind', source: snap, target: '', options: ['rbind', 'rw'] }], target, '/unused');
    assert.ok(existsSync(path.join(target, 'marker')));
    await bind.release();
    assert.equal(existsSync(path.join(target, 'marker')), false);

    const loop = execFileSync('losetup', ['-f'], { encoding: 'utf8' }).trim();
    const block = await prepareRootfs([{ type: 'ext4', source: loop, target: '', options: [] }], target, '/unused', blockRootfsSource);
    assert.deepEqual(block.source, { kind: 'block', path: loop, fstype: 'ext4' });
    assert.equal(await isMountPoint(target), false, 'a block rootfs is hot-plugged, not mounted on the host');
  });

  it('uses the spec root when containerd gives no mounts (ctr run --rootfs)', async () => {
    const r = await prepareRootfs([], path.join(tmp.path, 'rootfs'), '/some/dir');
    assert.deepEqual(r.source, { kind: 'dir', path: '/some/dir' });
  });

  it('refuses a mount the kernel refuses with a coded error, and leaves nothing mounted', async () => {
    const target = path.join(tmp.path, 'rootfs');
    mkdirSync(target);
    await assert.rejects(
      prepareRootfs([{ type: 'overlay', source: 'overlay', target: '', options: [`lowerdir=${path.join(tmp.path, 'missing')}`] }], target, '/unused'),
      (e: unknown) => e instanceof Error && 'code' in e && e.code === 'KATA_ERR_ROOTFS' && /cannot mount the container rootfs \(overlay/.test(e.message),
    );
    assert.equal(await isMountPoint(target), false);
  });
});
