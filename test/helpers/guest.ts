import { buildGuestImage, defaultCacheDir } from '../../guest/image/build-image.js';
import { ensureBusyboxRootfs } from '../../guest/image/busybox-rootfs.js';
import { qemuBinary } from './qemu.js';
import { TempDir } from './tmp.js';

/** Paths of the guest image the tests boot (built by guest/image/build-image.ts into the cache dir). */
export interface GuestImage {
  /** The Debian generic kernel, `<cacheDir>/guest/vmlinuz`. */
  kernel: string;
  /** busybox-static, the virtio/9p/ext4 modules and /init, `<cacheDir>/guest/initramfs.cpio.gz`. */
  initrd: string;
  /** `uname -r` inside the guest, e.g. `6.1.0-41-amd64`. */
  kernelVersion: string;
  /** The cache root (KATA_TS_CACHE_DIR, /var/cache/kata-ts for root, else ~/.cache/kata-ts). */
  cacheDir: string;
  /** An ext4 busybox container rootfs next to the initrd (guest/image/busybox-rootfs.ts). */
  busyboxRootfs?: string;
  /** The agent-less initramfs and the agent disk (`image =`) to boot it with, when the builder made them. */
  agentDisk?: { initrd: string; image: string };
}

let pending: Promise<GuestImage> | undefined;

/**
 * Builds the guest image once per test run (the builder itself does nothing when the cached
 * outputs match their manifest, about 1 s) and returns its paths. Concurrent callers share one
 * build; builders in other processes wait on the cache's lock file. Call it from a `before` hook
 * with a long timeout (`this.timeout(600_000)`): a cold build downloads the kernel package and
 * takes 10–20 s here, more on a slow mirror. Progress goes to stderr. A failure is a KataError
 * with code KATA_ERR_GUEST_IMAGE.
 *
 * guest/README.md has the console-line contract of the guest's /init (`KATA-TS-GUEST: ready …`,
 * `KATA-TS-BLOCK: …`, `KATA-TS-9P: …`). The same kernel, uncompressed for PVH boot (about twice
 * as fast under TCG), is at `guestImagePaths(cacheDir).vmlinux` when the manifest lists it.
 */
export async function ensureGuestImage(): Promise<GuestImage> {
  pending ??= (async () => {
    const cacheDir = defaultCacheDir();
    const r = await buildGuestImage({ cacheDir, log: (line) => process.stderr.write(`      [guest:build] ${line}\n`) });
    const busyboxRootfs = await ensureBusyboxRootfs(r.initrd, (line) => process.stderr.write(`      [guest:build] ${line}\n`));
    // The uncompressed kernel boots directly (PVH), about twice as fast under TCG as the bzImage.
    return { kernel: r.vmlinux ?? r.kernel, initrd: r.initrd, kernelVersion: r.kernelVersion, cacheDir, busyboxRootfs, ...(r.agentDisk ? { agentDisk: r.agentDisk } : {}) };
  })();
  try {
    return await pending;
  } catch (err) {
    pending = undefined; // a failed build is retried by the next caller
    throw err;
  }
}

/**
 * The set-up of a suite that boots sandboxes from the guest image with the busybox rootfs:
 * mocha `before` skips the suite without QEMU or a busybox rootfs, builds the image and makes a
 * temporary directory named with `prefix`; `after` removes it. Read the fields in tests and hooks
 * (they are set by `before`).
 */
export function guestImageSuite(prefix: string): { readonly image: GuestImage; readonly tmp: TempDir } {
  const state: { image?: GuestImage; tmp?: TempDir } = {};
  before(async function () {
    if (!qemuBinary()) this.skip();
    state.image = await ensureGuestImage();
    if (!state.image.busyboxRootfs) this.skip();
    state.tmp = new TempDir(prefix);
  });
  after(() => state.tmp?.cleanup());
  return {
    get image() {
      return state.image as GuestImage;
    },
    get tmp() {
      return state.tmp as TempDir;
    },
  };
}
