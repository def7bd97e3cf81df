/**
 * Picks the kernel modules the guest needs out of an unpacked Debian kernel package, with their
 * dependencies, and stages them (decompressed) for busybox modprobe.
 *
 * Dependencies come from `depmod` run on the unpacked package (the .deb ships no modules.dep),
 * then depmod runs again on the staged subset so the guest's modules.dep, modules.alias and
 * modules.softdep describe exactly what is there.
 */
import { copyFile, mkdir, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { KataError } from '../../core/errors.js';
import { run, runBuffer } from './debian.js';

/**
 * The modules /init loads, in this order. Dependencies are pulled in too (depmod), but naming
 * them keeps the load order explicit and the list honest about what the guest relies on.
 */
export const GUEST_MODULES: readonly string[] = Object.freeze([
  // virtio over PCI: the transport of every device QEMU gives the guest
  'virtio_ring',
  'virtio',
  'virtio_pci_modern_dev',
  'virtio_pci_legacy_dev',
  'virtio_pci',
  // disks (hot-plugged container rootfs) and the agent's virtio-serial port
  'virtio_blk',
  'virtio_console',
  // virtio-scsi disks (block_device_driver = "virtio-scsi", Kata's QEMU default): the HBA, the
  // SCSI core and the disk driver (sd_mod registers /sys/class/scsi_disk)
  'scsi_common',
  'scsi_mod',
  'virtio_scsi',
  'sd_mod',
  // virtio-9p shared directory (kataShared)
  'netfs',
  'fscache',
  '9pnet',
  '9pnet_virtio',
  '9p',
  // virtio-fs shared directory (the agent's "virtio-fs" storage driver, for hosts with virtiofsd)
  'fuse',
  'virtiofs',
  // ext4 container rootfs on a hot-plugged disk; ext4 and jbd2 checksum metadata with crc32c
  // through the crypto API (a softdep, not a hard dependency, hence named here)
  'crc16',
  'mbcache',
  'jbd2',
  'crc32c_generic',
  'ext4',
  // the pod's interfaces (virtio-net-pci on a tap); virtio_net needs net_failover, which needs failover
  'failover',
  'net_failover',
  'virtio_net',
  // ACPI power button as an input event (QMP system_powerdown), read by busybox acpid
  'evdev',
  'button',
  // virtio-balloon's free-page reporting (reclaim_guest_freed_memory): freed guest pages, the
  // initramfs once unpacked first, go back to the host (the kernel has CONFIG_PAGE_REPORTING=y)
  'virtio_balloon',
]);

/**
 * Shipped but not in /init's load list: /init loads them only when booted with the agent disk
 * (`root=/dev/pmem…`): the ACPI NFIT driver finds QEMU's NVDIMM, nd_pmem makes /dev/pmem0 (with
 * libnvdimm and the DAX core as dependencies).
 */
export const AGENT_DISK_MODULES: readonly string[] = Object.freeze(['nfit', 'nd_pmem']);

/** Module name as the kernel spells it: `crc32c-intel.ko.xz` → `crc32c_intel`. */
export function moduleName(file: string): string {
  return path.basename(file).replace(/\.ko(\.(xz|zst|gz))?$/, '').replaceAll('-', '_');
}

/** `root/lib/modules/<release>`, made to exist under both /lib and /usr/lib (merged-/usr or not). */
export async function moduleDirOf(root: string, release: string): Promise<string> {
  const lib = path.join(root, 'lib', 'modules');
  const usrLib = path.join(root, 'usr', 'lib', 'modules');
  const exists = async (p: string) => stat(p).then(() => true, () => false);
  const inLib = await exists(path.join(lib, release));
  const inUsr = await exists(path.join(usrLib, release));
  if (!inLib && !inUsr) throw new KataError('KATA_ERR_GUEST_IMAGE', `the kernel package has no modules for ${release} (looked in /lib/modules and /usr/lib/modules)`);
  // depmod -b looks under whichever of the two its build was configured for.
  if (!inLib && !(await exists(lib))) {
    await mkdir(path.dirname(lib), { recursive: true });
    await symlink(path.join('..', 'usr', 'lib', 'modules'), lib);
  }
  if (!inUsr && !(await exists(usrLib))) {
    await mkdir(path.dirname(usrLib), { recursive: true });
    await symlink(path.join('..', '..', 'lib', 'modules'), usrLib);
  }
  return path.join(lib, release);
}

export async function depmod(root: string, release: string): Promise<void> {
  await run('depmod', ['-b', root, release]);
}

export interface ModuleSelection {
  /** Requested modules to load, in order (those built into the kernel left out). */
  readonly load: string[];
  /** Requested modules that are built into this kernel. */
  readonly builtin: string[];
  /** Every module file to ship (requested ones and their dependencies), relative to the module dir. */
  readonly files: string[];
}

function parseModulesDep(text: string): Map<string, { file: string; deps: string[] }> {
  const byName = new Map<string, { file: string; deps: string[] }>();
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const file = line.slice(0, colon).trim();
    const deps = line.slice(colon + 1).trim().split(/\s+/).filter(Boolean);
    byName.set(moduleName(file), { file, deps });
  }
  return byName;
}

/** Resolves `wanted` against a module dir that has a modules.dep (run {@link depmod} first). */
export async function selectModules(moduleDir: string, wanted: readonly string[]): Promise<ModuleSelection> {
  const dep = parseModulesDep(await readFile(path.join(moduleDir, 'modules.dep'), 'utf8'));
  const builtinText = await readFile(path.join(moduleDir, 'modules.builtin'), 'utf8').catch(() => '');
  const builtins = new Set(builtinText.split('\n').filter(Boolean).map(moduleName));
  const load: string[] = [];
  const builtin: string[] = [];
  const files = new Set<string>();
  const missing: string[] = [];
  for (const raw of wanted) {
    const name = raw.replaceAll('-', '_');
    const entry = dep.get(name);
    if (entry) {
      load.push(name);
      files.add(entry.file);
      for (const d of entry.deps) files.add(d);
    } else if (builtins.has(name)) {
      builtin.push(name);
    } else {
      missing.push(name);
    }
  }
  if (missing.length > 0) {
    throw new KataError('KATA_ERR_GUEST_IMAGE', `the kernel has neither a module nor a built-in driver for: ${missing.join(', ')}`, {
      fix: "Use Debian's generic kernel (linux-image-amd64), not the cloud kernel, which lacks 9p; or change GUEST_MODULES in guest/image/kernel-modules.ts.",
    });
  }
  return { load, builtin, files: [...files].sort() };
}

/** Reads a module file, decompressing .ko.xz / .ko.zst / .ko.gz: busybox modprobe may only read plain .ko. */
async function readModule(file: string): Promise<Buffer> {
  if (file.endsWith('.ko.xz')) return runBuffer('xz', ['-dc', file]);
  if (file.endsWith('.ko.zst')) return runBuffer('zstd', ['-dc', file]);
  if (file.endsWith('.ko.gz')) return gunzipSync(await readFile(file));
  return readFile(file);
}

/**
 * Copies the selected modules (decompressed, as .ko) into `<destRoot>/lib/modules/<release>`,
 * writes the load list to `<destRoot>/etc/kata-ts/modules` and runs depmod on the result.
 * Returns the shipped module names.
 */
export async function stageModules(srcModuleDir: string, sel: ModuleSelection, destRoot: string, release: string): Promise<string[]> {
  const destDir = path.join(destRoot, 'lib', 'modules', release);
  await mkdir(destDir, { recursive: true });
  for (const rel of sel.files) {
    const out = path.join(destDir, rel.replace(/\.ko\.(xz|zst|gz)$/, '.ko'));
    await mkdir(path.dirname(out), { recursive: true });
    await writeFile(out, await readModule(path.join(srcModuleDir, rel)));
  }
  // What is built in, so that depmod and modprobe know those names.
  for (const f of ['modules.builtin', 'modules.builtin.modinfo']) {
    await copyFile(path.join(srcModuleDir, f), path.join(destDir, f)).catch(() => undefined);
  }
  await mkdir(path.join(destRoot, 'etc', 'kata-ts'), { recursive: true });
  await writeFile(path.join(destRoot, 'etc', 'kata-ts', 'modules'), sel.load.map((m) => `${m}\n`).join(''));
  await moduleDirOf(destRoot, release);
  await depmod(destRoot, release);
  await stat(path.join(destDir, 'modules.dep')).catch((cause: unknown) => {
    throw new KataError('KATA_ERR_GUEST_IMAGE', `depmod wrote no modules.dep under ${destDir}`, { cause });
  });
  return sel.files.map(moduleName).sort();
}
