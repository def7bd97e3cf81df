/**
 * The guest image builder: Debian's generic kernel plus an initramfs (busybox-static, the
 * virtio / 9p / ext4 modules, /init from guest/rootfs/, and in /agent node with the guest agent)
 * in a cache directory, for QEMU's `-kernel` / `-initrd`. guest/README.md has the contract of the image.
 *
 *   node dist/guest/image/build-image.js [--cache-dir DIR] [--force] [--no-agent] [--node PATH]   (npm run guest:build)
 *
 * The initramfs is two archives back to back: the base (gzip'd cpio) and the agent (plain cpio,
 * agent-payload.ts). With the agent, the base archive is also written alone (initramfs-base.cpio.gz)
 * beside agent.img, the agent's files on a read-only disk (agent-disk.ts), to boot together. Idempotent: `<cache>/guest/manifest.json` records what the outputs were
 * built from (builder code, guest/rootfs, module list, package versions, the agent's inputs) and
 * their sha256. When all of it still holds, the builder says so and does nothing; when only the
 * agent's inputs changed, it keeps the base archive and replaces the agent archive.
 */
import { createHash } from 'node:crypto';
import { cp, chmod, copyFile, mkdir, mkdtemp, open, readFile, readdir, rename, rm, stat, symlink, unlink, writeFile } from 'node:fs/promises';
import { createReadStream, createWriteStream } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { pipeline } from 'node:stream/promises';
import { KataError } from '../../core/errors.js';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { writeAgentDisk } from './agent-disk.js';
import { agentInputs, writeAgentArchive, type AgentInputs, type AgentManifest } from './agent-payload.js';
import { CpioGzWriter, collectTree, type CpioEntry } from './cpio.js';
import { ensureBusyboxRootfs } from './busybox-rootfs.js';
import { aptDownload, aptListsPresent, findTool, requireTools, resolvePackages, run, unpackDeb, type DebPackage, type KernelPackage } from './debian.js';
import { AGENT_DISK_MODULES, GUEST_MODULES, depmod, moduleDirOf, selectModules, stageModules } from './kernel-modules.js';
import { extractVmlinux } from './vmlinux.js';

/** Bumped when the image layout changes in a way a reader of the manifest should know about. */
export const BUILDER_VERSION = '3';
export const KERNEL_META_PACKAGE = 'linux-image-amd64';
export const BUSYBOX_PACKAGE = 'busybox-static';
/** Files copied as they are into the initramfs root (/init, /etc/acpi/…). Not compiled: read at run time. */
export const GUEST_ROOTFS_DIR = path.join(PACKAGE_ROOT, 'guest', 'rootfs');
const OUTPUT_KERNEL = 'vmlinuz';
const OUTPUT_VMLINUX = 'vmlinux';
const OUTPUT_INITRD = 'initramfs.cpio.gz';
/** The base archive alone (no /agent): the initrd to boot with {@link OUTPUT_AGENT_DISK}. */
const OUTPUT_BASE_INITRD = 'initramfs-base.cpio.gz';
/** The agent payload as a read-only ext4 disk image (agent-disk.ts), for `image =` on an NVDIMM. */
const OUTPUT_AGENT_DISK = 'agent.img';
const MANIFEST = 'manifest.json';
/** The compiled builder modules, hashed into the manifest: a change to the builder rebuilds the image. */
const BUILDER_MODULES = ['build-image.js', 'agent-disk.js', 'cpio.js', 'debian.js', 'kernel-modules.js', 'vmlinux.js'];

export interface GuestImagePaths {
  /** `<cache>/guest` */
  readonly dir: string;
  /** The bzImage from the kernel package (what the shipped configuration boots). */
  readonly kernel: string;
  /** The same kernel uncompressed, bootable through PVH: about twice as fast under TCG. */
  readonly vmlinux: string;
  readonly initrd: string;
  /** The initramfs without the agent, booted together with {@link agentDisk}. */
  readonly baseInitrd: string;
  /** The agent disk image (agent-disk.ts). */
  readonly agentDisk: string;
  readonly manifest: string;
}

export function guestImagePaths(cacheDir: string): GuestImagePaths {
  const dir = path.join(cacheDir, 'guest');
  return {
    dir,
    kernel: path.join(dir, OUTPUT_KERNEL),
    vmlinux: path.join(dir, OUTPUT_VMLINUX),
    initrd: path.join(dir, OUTPUT_INITRD),
    baseInitrd: path.join(dir, OUTPUT_BASE_INITRD),
    agentDisk: path.join(dir, OUTPUT_AGENT_DISK),
    manifest: path.join(dir, MANIFEST),
  };
}

/** KATA_TS_CACHE_DIR, else /var/cache/kata-ts for root, else ~/.cache/kata-ts. */
export function defaultCacheDir(env: NodeJS.ProcessEnv = process.env, uid: number = process.getuid?.() ?? -1, home: string = os.homedir()): string {
  const fromEnv = env.KATA_TS_CACHE_DIR;
  if (fromEnv) return path.resolve(fromEnv);
  return uid === 0 ? '/var/cache/kata-ts' : path.join(home, '.cache', 'kata-ts');
}

export interface OutputInfo {
  readonly sha256: string;
  readonly bytes: number;
}

export interface GuestManifest {
  readonly schemaVersion: 1;
  readonly builder: {
    readonly version: string;
    /** sha256 of the compiled builder modules. */
    readonly codeSha256: string;
    /** sha256 of guest/rootfs (paths, modes, contents): /init and friends. */
    readonly rootfsSha256: string;
  };
  readonly kernel: { readonly metaPackage: string; readonly package: string; readonly version: string; readonly release: string };
  /** Every Debian package the image is made from, name → version. */
  readonly packages: Record<string, string>;
  readonly modules: {
    /** What the builder was asked for (GUEST_MODULES). */
    readonly requested: string[];
    /** What /init loads, in order (/etc/kata-ts/modules). */
    readonly load: string[];
    /** Requested but built into the kernel. */
    readonly builtin: string[];
    /** Every module file shipped, dependencies included. */
    readonly shipped: string[];
  };
  /** The base (gzip'd) archive at the start of the initramfs; the agent archive follows it, 4-byte aligned. */
  readonly initramfs: { readonly baseBytes: number; readonly baseSha256: string };
  /** node, its libraries and the agent bundle in /agent; null when built without (`agentSkipped` says why). */
  readonly agent: AgentManifest | null;
  readonly agentSkipped?: string;
  /** vmlinux is there only when the kernel can be booted through PVH (see `vmlinuxSkipped`). */
  readonly outputs: Record<typeof OUTPUT_KERNEL | typeof OUTPUT_INITRD, OutputInfo> & {
    readonly [OUTPUT_VMLINUX]?: OutputInfo;
    /** With the agent only: the base initramfs and the agent disk, booted together. */
    readonly [OUTPUT_BASE_INITRD]?: OutputInfo;
    readonly [OUTPUT_AGENT_DISK]?: OutputInfo;
  };
  /** Why no vmlinux was written. */
  readonly vmlinuxSkipped?: string;
  readonly builtAt: string;
  readonly buildMs: number;
}

export interface BuildOptions {
  /** Default: {@link defaultCacheDir}. */
  readonly cacheDir?: string;
  /** Rebuild even when the outputs are up to date. */
  readonly force?: boolean;
  /** One line per step (no trailing newline). Default: nothing. */
  readonly log?: (line: string) => void;
  /** Parent of the temporary work directory. Default: the OS temp dir. */
  readonly tmpDir?: string;
  /** Put node and the guest agent into /agent (default true). Without, /init falls back to its block-device loop. */
  readonly agent?: boolean;
  /** The node binary to ship. Default: the one running the builder. */
  readonly node?: string;
}

export interface StepTiming {
  readonly step: string;
  readonly ms: number;
}

export interface BuildResult {
  /** False when the cached outputs were up to date and nothing was done. */
  readonly built: boolean;
  /** Why it built (missing outputs, changed input …) or why it did not. */
  readonly reason: string;
  readonly kernel: string;
  /** The PVH-bootable uncompressed kernel, when there is one. */
  readonly vmlinux: string | undefined;
  readonly initrd: string;
  /** The agent-less initramfs and the agent disk to boot it with (`image =`), when built with the agent. */
  readonly agentDisk: { readonly initrd: string; readonly image: string } | undefined;
  readonly manifestPath: string;
  readonly kernelVersion: string;
  readonly manifest: GuestManifest;
  readonly steps: StepTiming[];
  readonly totalMs: number;
}

const sec = (ms: number) => `${(ms / 1000).toFixed(2)} s`;

async function sha256File(file: string): Promise<OutputInfo> {
  const hash = createHash('sha256');
  let bytes = 0;
  for await (const chunk of createReadStream(file)) {
    hash.update(chunk as Buffer);
    bytes += (chunk as Buffer).length;
  }
  return { sha256: hash.digest('hex'), bytes };
}

async function hashEntries(entries: CpioEntry[]): Promise<string> {
  const hash = createHash('sha256');
  for (const e of entries) {
    hash.update(`${e.kind}\0${e.path}\0`);
    if (e.kind === 'symlink') hash.update(e.target);
    else if (e.kind === 'file') {
      hash.update(`${(e.mode & 0o111) !== 0 ? 'x' : '-'}\0`);
      hash.update(typeof e.data === 'string' ? await readFile(e.data) : e.data);
    }
    hash.update('\0');
  }
  return hash.digest('hex');
}

interface LocalInputs {
  readonly codeSha256: string;
  readonly rootfsSha256: string;
}

async function localInputs(): Promise<LocalInputs> {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const code = createHash('sha256');
  for (const m of BUILDER_MODULES) code.update(await readFile(path.join(here, m)));
  const rootfs = await collectTree(GUEST_ROOTFS_DIR).catch((cause: unknown) => {
    throw new KataError('KATA_ERR_GUEST_IMAGE', `cannot read the guest root files in ${GUEST_ROOTFS_DIR}`, { cause });
  });
  return { codeSha256: code.digest('hex'), rootfsSha256: await hashEntries(rootfs) };
}

async function readManifest(file: string): Promise<GuestManifest | undefined> {
  try {
    const m = JSON.parse(await readFile(file, 'utf8')) as GuestManifest;
    return m?.schemaVersion === 1 ? m : undefined;
  } catch {
    return undefined;
  }
}

/** Why the cached image cannot be reused, or undefined when it can (apart from package versions). */
async function staleReason(m: GuestManifest, local: LocalInputs, paths: GuestImagePaths): Promise<string | undefined> {
  if (m.builder.version !== BUILDER_VERSION) return `builder version ${m.builder.version} → ${BUILDER_VERSION}`;
  if (m.builder.codeSha256 !== local.codeSha256) return 'the builder code changed';
  if (m.builder.rootfsSha256 !== local.rootfsSha256) return 'guest/rootfs (/init) changed';
  if (m.modules.requested.join(',') !== GUEST_MODULES.join(',')) return 'the module list changed';
  for (const [name, file] of [
    [OUTPUT_KERNEL, paths.kernel],
    [OUTPUT_INITRD, paths.initrd],
    [OUTPUT_VMLINUX, paths.vmlinux],
    [OUTPUT_BASE_INITRD, paths.baseInitrd],
    [OUTPUT_AGENT_DISK, paths.agentDisk],
  ] as const) {
    const want = m.outputs[name];
    if (!want) continue;
    const have = await sha256File(file).catch(() => undefined);
    if (!have) return `${name} is missing`;
    if (have.sha256 !== want.sha256) return `${name} does not match the manifest`;
  }
  return undefined;
}

/** A lock file next to the outputs, so two builders (two test processes, say) never interleave. */
async function acquireLock(dir: string, log: (l: string) => void): Promise<() => Promise<void>> {
  const file = path.join(dir, '.build.lock');
  const deadline = Date.now() + 20 * 60_000;
  let told = false;
  for (;;) {
    try {
      const fh = await open(file, 'wx');
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      return () => unlink(file).catch(() => undefined);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const pid = Number.parseInt(await readFile(file, 'utf8').catch(() => ''), 10);
    let alive = false;
    if (Number.isInteger(pid) && pid > 0) {
      try {
        process.kill(pid, 0);
        alive = true;
      } catch (err) {
        alive = (err as NodeJS.ErrnoException).code === 'EPERM';
      }
    }
    if (!alive) {
      await unlink(file).catch(() => undefined); // stale: its builder died
      continue;
    }
    if (Date.now() > deadline) throw new KataError('KATA_ERR_GUEST_IMAGE', `another guest image build (pid ${pid}) holds ${file} for too long`);
    if (!told) log(`waiting for another guest image build (pid ${pid}) to finish`);
    told = true;
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Builds the guest image into `<cacheDir>/guest`, or does nothing when it is up to date. */
export async function buildGuestImage(opts: BuildOptions = {}): Promise<BuildResult> {
  const t0 = performance.now();
  const log = opts.log ?? (() => undefined);
  const cacheDir = path.resolve(opts.cacheDir ?? defaultCacheDir());
  const paths = guestImagePaths(cacheDir);
  const steps: StepTiming[] = [];
  const step = async <T>(name: string, fn: () => Promise<T>, detail?: (r: T) => string): Promise<T> => {
    const s = performance.now();
    const r = await fn();
    const ms = performance.now() - s;
    steps.push({ step: name, ms });
    log(`${name}${detail ? `: ${detail(r)}` : ''} (${sec(ms)})`);
    return r;
  };
  const result = (built: boolean, reason: string, manifest: GuestManifest): BuildResult => ({
    built,
    reason,
    kernel: paths.kernel,
    vmlinux: manifest.outputs[OUTPUT_VMLINUX] ? paths.vmlinux : undefined,
    initrd: paths.initrd,
    agentDisk: manifest.outputs[OUTPUT_AGENT_DISK] ? { initrd: paths.baseInitrd, image: paths.agentDisk } : undefined,
    manifestPath: paths.manifest,
    kernelVersion: manifest.kernel.release,
    manifest,
    steps,
    totalMs: performance.now() - t0,
  });

  try {
    await mkdir(paths.dir, { recursive: true });
  } catch (cause) {
    throw new KataError('KATA_ERR_GUEST_IMAGE', `cannot create the cache directory ${paths.dir}`, {
      cause,
      fix: 'Choose a writable cache directory with --cache-dir or KATA_TS_CACHE_DIR.',
    });
  }
  const local = await localInputs();
  const withAgent = opts.agent !== false;
  const agent = withAgent
    ? await step('bundle the agent, find node and its libraries', () => agentInputs(opts.node), (a) => `${a.bundle.length} byte bundle, node ${a.node.version}, ${a.libraries.length} libraries`)
    : undefined;
  const unlock = await acquireLock(paths.dir, log);
  try {
    // Half-written outputs of a builder that was killed (we hold the lock: nobody else writes).
    for (const f of await readdir(paths.dir)) if (/^\..+\.\d+\.tmp$/.test(f)) await rm(path.join(paths.dir, f), { force: true });
    const asRoot = process.getuid?.() === 0;
    const listsPresent = await aptListsPresent();
    let reason = opts.force ? 'forced (--force)' : 'no image in the cache';
    const cached = opts.force ? undefined : await readManifest(paths.manifest);
    let agentOnly = false;
    if (cached) {
      const checked = await step('check cache', async () => {
        const stale = await staleReason(cached, local, paths);
        if (stale) return stale;
        if (!listsPresent || !findTool('apt-cache')) return undefined; // nothing to compare with; keep what we have
        const { kernel, versions } = await resolvePackages(KERNEL_META_PACKAGE, [BUSYBOX_PACKAGE]);
        if (kernel && (kernel.name !== cached.kernel.package || kernel.version !== cached.kernel.version)) {
          return `${KERNEL_META_PACKAGE} now means ${kernel.name} ${kernel.version} (cached: ${cached.kernel.package} ${cached.kernel.version})`;
        }
        const bb = versions.get(BUSYBOX_PACKAGE);
        if (bb && bb !== cached.packages[BUSYBOX_PACKAGE]) return `${BUSYBOX_PACKAGE} is now ${bb} (cached: ${cached.packages[BUSYBOX_PACKAGE]})`;
        return undefined;
      }, (stale) => stale ?? 'base image matches the manifest and inputs');
      const agentStale = checked === undefined ? agentChange(cached, agent) : undefined;
      if (checked === undefined && agentStale === undefined) {
        const why = `guest image is up to date (kernel ${cached.kernel.release}, built ${cached.builtAt}${listsPresent ? '' : '; apt has no package lists, so newer packages were not looked for'}): nothing to do`;
        log(why);
        return result(false, why, cached);
      }
      reason = checked ?? (agentStale as string);
      agentOnly = checked === undefined;
    }
    if (agentOnly && cached) {
      log(`replacing the agent archive in ${paths.initrd} (${reason})`);
      const manifest = await rebuildAgent(paths, cached, agent, { tmpDir: opts.tmpDir ?? os.tmpdir(), step, t0 }).catch((e: Error) => {
        log(`cannot reuse the base archive (${e.message}): building everything`);
        return undefined;
      });
      if (manifest) {
        log(`built ${paths.initrd} (${manifest.outputs[OUTPUT_INITRD].bytes} bytes) in ${sec(manifest.buildMs)}`);
        return result(true, reason, manifest);
      }
    }
    log(`building the guest image in ${paths.dir} (${reason})`);
    requireTools(['apt-get', 'apt-cache', 'dpkg-deb', 'depmod']);
    const manifest = await build(paths, local, agent, { asRoot, listsPresent, tmpDir: opts.tmpDir ?? os.tmpdir(), step, t0 });
    const vmlinuxNote = manifest.outputs[OUTPUT_VMLINUX] ? `, ${paths.vmlinux} (${manifest.outputs[OUTPUT_VMLINUX].bytes} bytes)` : '';
    log(
      `built ${paths.kernel} (${manifest.outputs[OUTPUT_KERNEL].bytes} bytes), ${paths.initrd} (${manifest.outputs[OUTPUT_INITRD].bytes} bytes)${vmlinuxNote} in ${sec(manifest.buildMs)}`,
    );
    return result(true, reason, manifest);
  } catch (err) {
    if (err instanceof KataError) throw err;
    throw new KataError('KATA_ERR_GUEST_IMAGE', `guest image build failed: ${(err as Error).message}`, { cause: err });
  } finally {
    await unlock();
  }
}

interface StepContext {
  readonly tmpDir: string;
  readonly t0: number;
  readonly step: <T>(name: string, fn: () => Promise<T>, detail?: (r: T) => string) => Promise<T>;
}

interface BuildContext extends StepContext {
  readonly asRoot: boolean;
  readonly listsPresent: boolean;
}

const NO_AGENT = 'built without the agent (--no-agent)';

/** Why the agent archive in the cached image is not the one wanted now, or undefined when it is. */
function agentChange(cached: GuestManifest, agent: AgentInputs | undefined): string | undefined {
  if (!agent) return cached.agent ? 'the image is wanted without the agent' : undefined;
  if (!cached.agent) return 'the image is wanted with the agent';
  if (cached.agent.inputsSha256 === agent.sha256) return undefined;
  if (cached.agent.bundleSha256 !== agent.bundleSha256) return 'the agent bundle changed';
  if (cached.agent.node.sha256 !== agent.node.sha256) return `node changed (${cached.agent.node.version} → ${agent.node.version})`;
  if (cached.agent.startSha256 !== agent.startSha256) return '/agent/start changed';
  return 'the agent archive\'s inputs changed (libraries, strip, or the builder)';
}

/** Appends the agent archive (if any) to the base archive, 4-byte aligned as the kernel wants a plain cpio. */
async function composeInitrd(base: string, agentArchive: string | undefined, out: string): Promise<void> {
  await copyFile(base, out);
  if (!agentArchive) return;
  const size = (await stat(base)).size;
  const fh = await open(out, 'a');
  try {
    if (size % 4) await fh.write(Buffer.alloc(4 - (size % 4)));
  } finally {
    await fh.close();
  }
  await pipeline(createReadStream(agentArchive), createWriteStream(out, { flags: 'a' }));
}

const diskTemps = (paths: GuestImagePaths) => [paths.baseInitrd, paths.agentDisk].map((f) => path.join(paths.dir, `.${path.basename(f)}.${process.pid}.tmp`));

function withoutDisk(outputs: GuestManifest['outputs']): GuestManifest['outputs'] {
  const { [OUTPUT_BASE_INITRD]: _base, [OUTPUT_AGENT_DISK]: _disk, ...rest } = outputs;
  return rest;
}

/**
 * With the agent tree: the base archive alone and the agent disk, written to temp files; `install`
 * renames them into place. Without: no outputs, and `install` removes stale ones.
 */
async function stageAgentDisk(
  paths: GuestImagePaths,
  base: string,
  tree: string | undefined,
  step: StepContext['step'],
): Promise<{ outputs: Partial<Record<typeof OUTPUT_BASE_INITRD | typeof OUTPUT_AGENT_DISK, OutputInfo>>; install: () => Promise<void> }> {
  const [tmpBase, tmpDisk] = diskTemps(paths) as [string, string];
  if (tree === undefined) {
    return { outputs: {}, install: async () => void (await Promise.all([paths.baseInitrd, paths.agentDisk].map((f) => rm(f, { force: true })))) };
  }
  await copyFile(base, tmpBase);
  await step('make the agent disk (MBR + ext4, mke2fs -d)', () => writeAgentDisk(tree, tmpDisk), (bytes) => `${bytes} bytes`);
  return {
    outputs: { [OUTPUT_BASE_INITRD]: await sha256File(tmpBase), [OUTPUT_AGENT_DISK]: await sha256File(tmpDisk) },
    install: async () => {
      await rename(tmpBase, paths.baseInitrd);
      await rename(tmpDisk, paths.agentDisk);
    },
  };
}

/** Keeps the cached base archive and replaces the agent archive after it (the kernel and modules are untouched). */
async function rebuildAgent(paths: GuestImagePaths, cached: GuestManifest, agent: AgentInputs | undefined, ctx: StepContext): Promise<GuestManifest> {
  const { step } = ctx;
  const work = await mkdtemp(path.join(ctx.tmpDir, 'kata-ts-guest-'));
  const tmpInitrd = path.join(paths.dir, `.${OUTPUT_INITRD}.${process.pid}.tmp`);
  const tmpManifest = path.join(paths.dir, `.${MANIFEST}.${process.pid}.tmp`);
  try {
    const base = path.join(work, 'base.cpio.gz');
    const whole = await readFile(paths.initrd);
    const baseBytes = whole.subarray(0, cached.initramfs.baseBytes);
    if (createHash('sha256').update(baseBytes).digest('hex') !== cached.initramfs.baseSha256) throw new Error('the base archive does not match the manifest');
    await writeFile(base, baseBytes);
    const agentArchive = path.join(work, 'agent.cpio');
    const agentManifest = agent
      ? await step('pack the agent archive (cpio newc, plain)', () => writeAgentArchive(agent, agentArchive, work, path.join(work, 'agent-tree')), (m) => `${m.archiveBytes} bytes, node ${m.node.stripped ? 'stripped' : 'as is'}`)
      : null;
    await composeInitrd(base, agentManifest ? agentArchive : undefined, tmpInitrd);
    const disk = await stageAgentDisk(paths, base, agentManifest ? path.join(work, 'agent-tree') : undefined, step);
    const { agentSkipped: _dropped, ...rest } = cached;
    const manifest: GuestManifest = {
      ...rest,
      agent: agentManifest,
      ...(agentManifest ? {} : { agentSkipped: NO_AGENT }),
      outputs: { ...withoutDisk(cached.outputs), [OUTPUT_INITRD]: await sha256File(tmpInitrd), ...disk.outputs },
      builtAt: new Date().toISOString(),
      buildMs: Math.round(performance.now() - ctx.t0),
    };
    await writeFile(tmpManifest, `${JSON.stringify(manifest, null, 2)}\n`);
    await rename(tmpInitrd, paths.initrd);
    await disk.install();
    await rename(tmpManifest, paths.manifest);
    return manifest;
  } finally {
    await rm(work, { recursive: true, force: true });
    await Promise.all([tmpInitrd, tmpManifest, ...diskTemps(paths)].map((f) => rm(f, { force: true })));
  }
}

async function build(paths: GuestImagePaths, local: LocalInputs, agent: AgentInputs | undefined, ctx: BuildContext): Promise<GuestManifest> {
  const { step } = ctx;
  const work = await mkdtemp(path.join(ctx.tmpDir, 'kata-ts-guest-'));
  const tmpKernel = path.join(paths.dir, `.${OUTPUT_KERNEL}.${process.pid}.tmp`);
  const tmpVmlinux = path.join(paths.dir, `.${OUTPUT_VMLINUX}.${process.pid}.tmp`);
  const tmpInitrd = path.join(paths.dir, `.${OUTPUT_INITRD}.${process.pid}.tmp`);
  const tmpManifest = path.join(paths.dir, `.${MANIFEST}.${process.pid}.tmp`);
  try {
    if (!ctx.listsPresent) {
      if (!ctx.asRoot) {
        throw new KataError('KATA_ERR_GUEST_IMAGE', 'apt has no package lists, so the kernel package cannot be found', {
          fix: 'Run `apt-get update` as root, then build again.',
        });
      }
      await step('apt-get update (no package lists yet)', () => run('apt-get', ['-q', 'update']));
    }

    const { kernel, busybox } = await step(
      'resolve packages',
      async () => {
        const { kernel, versions } = await resolvePackages(KERNEL_META_PACKAGE, [BUSYBOX_PACKAGE]);
        if (!kernel) throw new KataError('KATA_ERR_GUEST_IMAGE', `apt knows no package ${KERNEL_META_PACKAGE}`, { fix: 'Run `apt-get update` (Debian main must be in the sources).' });
        const bbVersion = versions.get(BUSYBOX_PACKAGE);
        if (!bbVersion) throw new KataError('KATA_ERR_GUEST_IMAGE', `apt knows no package ${BUSYBOX_PACKAGE}`, { fix: 'Run `apt-get update` (Debian main must be in the sources).' });
        return { kernel, busybox: { name: BUSYBOX_PACKAGE, version: bbVersion } as DebPackage };
      },
      (r) => `${r.kernel.meta} → ${r.kernel.name} ${r.kernel.version}, ${r.busybox.name} ${r.busybox.version}`,
    );

    const debs = path.join(work, 'debs');
    await mkdir(debs);
    const [kernelDeb, busyboxDeb] = await step(
      'download',
      () => Promise.all([aptDownload(kernel, debs, ctx.asRoot), aptDownload(busybox, debs, ctx.asRoot)]),
      (files) => files.map((f) => path.basename(f)).join(', '),
    );

    const kroot = path.join(work, 'kernel');
    const vmlinuz = await step(`unpack ${kernel.name}`, () => unpackKernel(kernelDeb, kroot, kernel), () => `boot/vmlinuz-${kernel.release}`);

    const vmlinux = await step(
      'extract vmlinux (PVH boot)',
      async () => {
        const config = await readFile(path.join(kroot, 'boot', `config-${kernel.release}`), 'utf8').catch(() => '');
        const r = await extractVmlinux(await readFile(vmlinuz), config);
        if (r.ok) await writeFile(tmpVmlinux, r.data, { mode: 0o644 });
        return r;
      },
      (r) => (r.ok ? `${r.data.length} bytes` : `skipped: ${r.why}`),
    );

    const kmodDir = await moduleDirOf(kroot, kernel.release);
    const selection = await step(
      'select modules',
      async () => {
        await depmod(kroot, kernel.release);
        const all = await selectModules(kmodDir, [...GUEST_MODULES, ...AGENT_DISK_MODULES]);
        // /init loads the NVDIMM drivers itself, only when booted with the agent disk.
        return { ...all, load: all.load.filter((m) => !AGENT_DISK_MODULES.includes(m)) };
      },
      (s) => `${s.load.length} to load, ${s.files.length} files with dependencies${s.builtin.length ? `, built in: ${s.builtin.join(' ')}` : ''}`,
    );

    const stage = path.join(work, 'initramfs');
    const shipped = await step(
      'stage initramfs tree',
      () => stageTree(stage, busyboxDeb, path.join(work, 'busybox'), kmodDir, selection, kernel.release),
      (mods) => `busybox, ${mods.length} modules, /init, empty /agent`,
    );

    const base = path.join(work, 'base.cpio.gz');
    await step('pack the base archive (cpio newc + gzip)', () => packInitramfs(stage, base), () => path.basename(paths.initrd));
    const agentArchive = path.join(work, 'agent.cpio');
    const agentManifest = agent
      ? await step('pack the agent archive (cpio newc, plain)', () => writeAgentArchive(agent, agentArchive, work, path.join(work, 'agent-tree')), (m) => `${m.archiveBytes} bytes, node ${m.node.stripped ? 'stripped' : 'as is'}`)
      : null;
    await composeInitrd(base, agentManifest ? agentArchive : undefined, tmpInitrd);
    const disk = await stageAgentDisk(paths, base, agentManifest ? path.join(work, 'agent-tree') : undefined, step);
    const baseInfo = await sha256File(base);

    return await step(
      'install outputs',
      async () => {
        await copyFile(vmlinuz, tmpKernel);
        await chmod(tmpKernel, 0o644);
        const manifest: GuestManifest = {
          schemaVersion: 1,
          builder: { version: BUILDER_VERSION, codeSha256: local.codeSha256, rootfsSha256: local.rootfsSha256 },
          kernel: { metaPackage: kernel.meta, package: kernel.name, version: kernel.version, release: kernel.release },
          packages: { [kernel.name]: kernel.version, [busybox.name]: busybox.version },
          modules: { requested: [...GUEST_MODULES], load: selection.load, builtin: selection.builtin, shipped },
          initramfs: { baseBytes: baseInfo.bytes, baseSha256: baseInfo.sha256 },
          agent: agentManifest,
          ...(agentManifest ? {} : { agentSkipped: NO_AGENT }),
          outputs: {
            [OUTPUT_KERNEL]: await sha256File(tmpKernel),
            [OUTPUT_INITRD]: await sha256File(tmpInitrd),
            ...(vmlinux.ok ? { [OUTPUT_VMLINUX]: await sha256File(tmpVmlinux) } : {}),
            ...disk.outputs,
          },
          ...(vmlinux.ok ? {} : { vmlinuxSkipped: vmlinux.why }),
          builtAt: new Date().toISOString(),
          buildMs: Math.round(performance.now() - ctx.t0),
        };
        await writeFile(tmpManifest, `${JSON.stringify(manifest, null, 2)}\n`);
        // The manifest last: a reader that finds it finds the outputs it describes.
        await rename(tmpKernel, paths.kernel);
        if (vmlinux.ok) await rename(tmpVmlinux, paths.vmlinux);
        else await rm(paths.vmlinux, { force: true });
        await rename(tmpInitrd, paths.initrd);
        await disk.install();
        await rename(tmpManifest, paths.manifest);
        return manifest;
      },
      () => paths.dir,
    );
  } finally {
    await rm(work, { recursive: true, force: true });
    await Promise.all([tmpKernel, tmpVmlinux, tmpInitrd, tmpManifest, ...diskTemps(paths)].map((f) => rm(f, { force: true })));
  }
}

async function unpackKernel(deb: string, root: string, kernel: KernelPackage): Promise<string> {
  await unpackDeb(deb, root);
  const vmlinuz = path.join(root, 'boot', `vmlinuz-${kernel.release}`);
  await stat(vmlinuz).catch((cause: unknown) => {
    throw new KataError('KATA_ERR_GUEST_IMAGE', `${kernel.name} has no boot/vmlinuz-${kernel.release}`, { cause });
  });
  return vmlinuz;
}

async function stageTree(
  stage: string,
  busyboxDeb: string,
  busyboxRoot: string,
  kmodDir: string,
  selection: Awaited<ReturnType<typeof selectModules>>,
  release: string,
): Promise<string[]> {
  for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc', 'proc', 'sys', 'dev', 'run', 'tmp', 'mnt', 'agent']) {
    await mkdir(path.join(stage, d), { recursive: true });
  }
  await unpackDeb(busyboxDeb, busyboxRoot);
  const busybox = path.join(stage, 'bin', 'busybox');
  await copyFile(path.join(busyboxRoot, 'bin', 'busybox'), busybox);
  await chmod(busybox, 0o755);
  // Applet links at the paths busybox itself names; /init re-creates them at boot if this fails
  // (it runs the static binary on the build host, which a noexec temp dir would forbid).
  const applets = await run(busybox, ['--list-full']).then((r) => r.stdout.split('\n').filter(Boolean), () => ['bin/sh']);
  for (const rel of applets) {
    const link = path.join(stage, rel);
    if (rel === 'bin/busybox') continue;
    await mkdir(path.dirname(link), { recursive: true });
    await symlink('/bin/busybox', link).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST') throw err;
    });
  }
  await cp(GUEST_ROOTFS_DIR, stage, { recursive: true });
  return stageModules(kmodDir, selection, stage, release);
}

async function packInitramfs(stage: string, out: string): Promise<void> {
  const entries = await collectTree(stage);
  // The kernel opens /dev/console for /init before anything is mounted; Debian's kernel does not
  // mount devtmpfs by itself, so the node must be in the archive.
  const devAt = entries.findIndex((e) => e.path === 'dev');
  entries.splice(devAt + 1, 0, { kind: 'char', path: 'dev/console', mode: 0o600, major: 5, minor: 1 });
  const writer = new CpioGzWriter(out);
  for (const e of entries) await writer.add(e);
  await writer.finish();
}

const USAGE = `usage: node dist/guest/image/build-image.js [--cache-dir DIR] [--force] [--no-agent] [--node PATH]
Builds the guest kernel and initramfs into <cache>/guest (default cache: KATA_TS_CACHE_DIR,
else /var/cache/kata-ts as root, else ~/.cache/kata-ts). Does nothing when they are up to date.
  --no-agent    leave /agent empty (no node, no agent: /init reports block devices instead)
  --node PATH   the node binary to put into the guest (default: the one running this)`;

export async function main(argv: readonly string[]): Promise<number> {
  let cacheDir: string | undefined;
  let force = false;
  let agent = true;
  let node: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === '--force') force = true;
    else if (a === '--no-agent') agent = false;
    else if (a === '--node' && argv[i + 1] !== undefined) node = argv[++i];
    else if (a.startsWith('--node=')) node = a.slice('--node='.length);
    else if (a === '--cache-dir' && argv[i + 1] !== undefined) cacheDir = argv[++i];
    else if (a.startsWith('--cache-dir=')) cacheDir = a.slice('--cache-dir='.length);
    else if (a === '-h' || a === '--help') {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    } else {
      process.stderr.write(`guest:build: unknown argument "${a}" [KATA_ERR_USAGE]\n${USAGE}\n`);
      return 2;
    }
  }
  try {
    const log = (line: string) => process.stderr.write(`guest:build: ${line}\n`);
    const r = await buildGuestImage({ cacheDir, force, agent, node, log });
    const rootfs = await ensureBusyboxRootfs(r.initrd, log);
    process.stdout.write(`kernel=${r.kernel}\n${r.vmlinux ? `vmlinux=${r.vmlinux}\n` : ''}initrd=${r.initrd}\nrootfs=${rootfs}\nkernel_version=${r.kernelVersion}\n`);
    return 0;
  } catch (err) {
    const e = err instanceof KataError ? err : new KataError('KATA_ERR_GUEST_IMAGE', String(err));
    process.stderr.write(`guest:build: ${e.message} [${e.code}]\n  fix: ${e.fix}\n`);
    return 1;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  process.exitCode = await main(process.argv.slice(2));
}
