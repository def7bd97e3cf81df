/**
 * `npm run demo`: the main job from a fresh clone. Installs the Debian packages it needs when run
 * as root (else says which), builds the guest image on first run (with progress), then runs `echo`
 * in a busybox container whose rootfs is an ext4 image hot-plugged into the VM as virtio-blk — the
 * same data path as a TDX sandbox with a devmapper rootfs — and prints the timings of each phase.
 *
 * The guest image goes to the builder's cache (KATA_TS_CACHE_DIR, else /var/cache/kata-ts as root,
 * else ~/.cache/kata-ts); the run is told that cache through KATA_TS_CACHE_DIR, so the shipped
 * configuration's guest files are taken from it. Headings are bold only on a terminal.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { bold } from '../cli/io.js';
import { PACKAGE_ROOT } from '../core/paths.js';
import { defaultCacheDir } from '../guest/image/build-image.js';

const say = (s: string) => process.stdout.write(`\n${bold(s, process.stdout)}\n`);
const NEEDED: Record<string, string> = {
  'qemu-system-x86_64': 'qemu-system-x86',
  'mkfs.ext4': 'e2fsprogs',
  depmod: 'kmod',
  xz: 'xz-utils',
  strip: 'binutils',
};

const missing = Object.entries(NEEDED).filter(([bin]) => spawnSync('sh', ['-c', `command -v ${bin} || test -x /sbin/${bin} || test -x /usr/sbin/${bin}`]).status !== 0).map(([, pkg]) => pkg);
if (missing.length > 0) {
  if (process.getuid?.() !== 0) {
    process.stderr.write(`demo: missing Debian packages: ${missing.join(' ')}\n  run: sudo apt-get install -y ${missing.join(' ')}\n`);
    process.exit(1);
  }
  say(`$ apt-get install -y ${missing.join(' ')}`);
  execFileSync('apt-get', ['update', '-qq'], { stdio: 'inherit' });
  execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...missing], { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
}

say('$ npm run guest:build   # Debian kernel + busybox initramfs + node and the guest agent (cached after the first run)');
execFileSync(process.execPath, [path.join(PACKAGE_ROOT, 'dist', 'guest', 'image', 'build-image.js')], { stdio: ['ignore', 'inherit', 'inherit'] });

const cli = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');
const config = path.join(PACKAGE_ROOT, 'configs', 'configuration-qemu.toml');
if (!existsSync(cli)) throw new Error('run `npm run build` first');
const cmd = ['--config', config, 'run', '--timings', '--', 'sh', '-c', 'echo "hello from a container in a VM: $(uname -r), rootfs $(awk \'$2 == "/" {print $1, $3}\' /proc/mounts)"'];
say(`$ kata-runtime ${cmd.map((a) => (/\s|\$|'/.test(a) ? `'${a.replace(/'/g, `'\\''`)}'` : a)).join(' ')}`);
const r = spawnSync(process.execPath, [cli, ...cmd], { stdio: 'inherit', env: { ...process.env, KATA_TS_CACHE_DIR: defaultCacheDir() } });
process.exitCode = r.status ?? 1;
