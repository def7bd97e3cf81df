/**
 * The agent half of the guest image: node, the shared libraries it links against, the agent
 * bundle and /agent/start, packed as a second, uncompressed cpio archive that follows the image's
 * gzip'd base archive in `initramfs.cpio.gz` (the kernel unpacks concatenated archives in order).
 *
 * Uncompressed because node is ~85 MB: under TCG the kernel took ~4.7 s longer to boot when it had
 * to inflate it (9.5 s → 4.8 s to `KATA-TS-GUEST: ready`, measured here), for 60 MB saved on disk.
 *
 *   /agent/node          the builder's own node (process.execPath, or --node), `strip`ped when binutils is there
 *   /agent/agent.mjs     guest/agent/main.ts bundled by esbuild (with wire/ttrpc and the generated protocol)
 *   /agent/start         guest/agent/start: PID 1 from /init's exec, runs node, reaps orphans
 *   /agent/node_modules/node-pty/…  node-pty's package.json, licence and native addon (build/Release/pty.node,
 *                        built by `npm install` for this very node): the agent's pseudo-terminals (guest/agent/pty.ts);
 *                        esbuild cannot bundle a native addon, so it ships as files
 *   /agent/bin/ip        iproute2's `ip` from the build host (Debian package iproute2): the agent adds neighbours
 *                        (kata-agent's AddARPNeighbors) with it, which busybox `ip` cannot do
 *   /lib…, /lib64/…      every library `ldd node` (or ldd of the addon, or of ip) lists, and the dynamic loader,
 *                        at the paths ldd prints
 */
import { createHash } from 'node:crypto';
import { chmod, copyFile, mkdir, readFile, realpath, stat, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { KataError } from '../../core/errors.js';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { CpioWriter, type CpioEntry } from './cpio.js';
import { findTool, run } from './debian.js';

export const AGENT_SOURCE_DIR = path.join(PACKAGE_ROOT, 'guest', 'agent');
export const AGENT_ENTRY = path.join(AGENT_SOURCE_DIR, 'main.ts');
export const AGENT_START_SCRIPT = path.join(AGENT_SOURCE_DIR, 'start');
/** Where iproute2's `ip` goes in the guest (guest/agent/network.ts runs it from there). */
export const GUEST_IPROUTE2 = 'agent/bin/ip';

export interface LibraryFile {
  /** Where it goes in the guest, as ldd printed it (e.g. /lib/x86_64-linux-gnu/libc.so.6). */
  readonly guestPath: string;
  /** The file to copy (symlinks resolved). */
  readonly hostPath: string;
  readonly sha256: string;
}

export interface AgentInputs {
  readonly bundle: Buffer;
  readonly bundleSha256: string;
  readonly start: Buffer;
  readonly startSha256: string;
  readonly node: { readonly path: string; readonly version: string; readonly sha256: string; readonly bytes: number };
  readonly libraries: readonly LibraryFile[];
  /** node-pty's files (guestPath relative to the archive root). */
  readonly addons: readonly LibraryFile[];
  /** Programs shipped beside node: iproute2's `ip` (guestPath relative to the archive root). */
  readonly tools: readonly LibraryFile[];
  /** Whether `strip` is there to shrink node (recorded: it changes the image). */
  readonly strip: boolean;
  /** sha256 over all of the above and this module's code: equal means the same agent archive. */
  readonly sha256: string;
}

/** The agent's record in the manifest. */
export interface AgentManifest {
  readonly inputsSha256: string;
  readonly bundleSha256: string;
  readonly bundleBytes: number;
  readonly startSha256: string;
  /** `sha256` is the binary's as found (before `strip`); `bytes` is the size shipped. */
  readonly node: { readonly path: string; readonly version: string; readonly sha256: string; readonly stripped: boolean; readonly bytes: number };
  readonly libraries: readonly { readonly path: string; readonly sha256: string }[];
  readonly addons: readonly { readonly path: string; readonly sha256: string }[];
  readonly tools?: readonly { readonly path: string; readonly sha256: string }[];
  /** The uncompressed agent archive appended to the initramfs. */
  readonly archiveBytes: number;
}

const sha256 = (b: Uint8Array | string) => createHash('sha256').update(b).digest('hex');

async function sha256File(file: string): Promise<string> {
  return sha256(await readFile(file));
}

/** guest/agent/main.ts and what it imports, as one ES module for node in the guest. */
export async function bundleAgent(): Promise<Buffer> {
  let esbuild: typeof import('esbuild');
  try {
    esbuild = await import('esbuild');
  } catch (cause) {
    throw new KataError('KATA_ERR_GUEST_IMAGE', 'esbuild is not installed, so the guest agent cannot be bundled', {
      cause,
      fix: 'Run `npm install` (esbuild is a devDependency of kata-ts), or build the image without the agent: --no-agent.',
    });
  }
  try {
    const r = await esbuild.build({
      entryPoints: [AGENT_ENTRY],
      absWorkingDir: PACKAGE_ROOT,
      bundle: true,
      write: false,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      // protobufjs (CommonJS) looks for node's Buffer through `require`.
      banner: { js: "import { createRequire as __kataCreateRequire } from 'node:module'; const require = __kataCreateRequire(import.meta.url);" },
      legalComments: 'none',
      logLevel: 'silent',
    });
    const out = r.outputFiles[0];
    if (!out) throw new Error('esbuild produced no output');
    return Buffer.from(out.contents);
  } catch (cause) {
    if (cause instanceof KataError) throw cause;
    throw new KataError('KATA_ERR_GUEST_IMAGE', `cannot bundle the guest agent (${path.relative(PACKAGE_ROOT, AGENT_ENTRY)}): ${(cause as Error).message}`, { cause });
  }
}

/** Where the agent finds node-pty in the guest: next to agent.mjs, as node's resolution from /agent looks. */
export const GUEST_NODE_PTY_DIR = 'agent/node_modules/node-pty';
/** node-pty's files the agent needs (it loads the addon directly, not node-pty's JavaScript). */
export const NODE_PTY_FILES = ['package.json', 'LICENSE', 'build/Release/pty.node'] as const;

/** node-pty's files, as installed with kata-ts (`npm install` builds the addon for the node that runs it). */
export async function nodePtyFiles(): Promise<LibraryFile[]> {
  let dir: string;
  try {
    dir = path.dirname(createRequire(path.join(PACKAGE_ROOT, 'package.json')).resolve('node-pty/package.json'));
  } catch (cause) {
    throw new KataError('KATA_ERR_GUEST_IMAGE', 'node-pty is not installed, so the guest agent would have no terminals', {
      cause,
      fix: 'Run `npm install` in the kata-ts checkout (node-pty is a dependency; its install script builds build/Release/pty.node with node-gyp: python3, make and g++).',
    });
  }
  const out: LibraryFile[] = [];
  for (const f of NODE_PTY_FILES) {
    const hostPath = path.join(dir, f);
    const hash = await sha256File(hostPath).catch((cause: unknown) => {
      throw new KataError('KATA_ERR_GUEST_IMAGE', `node-pty is incomplete: ${hostPath} is missing`, {
        cause,
        fix: 'Rebuild it: `npm rebuild node-pty` (needs python3, make and g++); npm 11 runs its install script only as package.json\'s allowScripts allows.',
      });
    });
    out.push({ guestPath: `${GUEST_NODE_PTY_DIR}/${f}`, hostPath, sha256: hash });
  }
  return out;
}

/**
 * The libraries the dynamic loader maps for `binary`, loader included, from `ldd` output; none
 * for a static binary. A library ldd cannot find is an error.
 */
export function parseLdd(text: string): string[] {
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (!t || t.startsWith('linux-vdso') || t.startsWith('linux-gate')) continue;
    if (/not a dynamic executable|statically linked/.test(t)) return [];
    const arrow = /^(\S+)\s+=>\s+(\S+)/.exec(t);
    if (arrow) {
      if (arrow[2] === 'not') throw new KataError('KATA_ERR_GUEST_IMAGE', `ldd: ${arrow[1]} not found`);
      out.push(arrow[2] as string);
      continue;
    }
    const direct = /^(\/\S+)\s+\(/.exec(t);
    if (direct) out.push(direct[1] as string);
  }
  return out;
}

/** Gathers and hashes what the agent archive is made of. */
export async function agentInputs(nodePath: string = process.execPath): Promise<AgentInputs> {
  const node = await realpath(nodePath).catch((cause: unknown) => {
    throw new KataError('KATA_ERR_GUEST_IMAGE', `node binary ${nodePath} not found`, { cause });
  });
  const [bundle, start, nodeSha, nodeStat] = await Promise.all([bundleAgent(), readFile(AGENT_START_SCRIPT), sha256File(node), stat(node)]);
  const version = (await run(node, ['--version'])).stdout.trim();
  const ldd = findTool('ldd');
  if (!ldd) throw new KataError('KATA_ERR_GUEST_IMAGE', 'ldd is not installed (Debian package libc-bin)', { fix: 'apt-get install libc-bin' });
  const lddOut = await run(ldd, [node]).catch((e: KataError) => {
    if (/not a dynamic executable/.test(e.message)) return { stdout: 'not a dynamic executable', stderr: '' };
    throw e;
  });
  const libraries: LibraryFile[] = [];
  for (const guestPath of parseLdd(lddOut.stdout)) {
    const hostPath = await realpath(guestPath);
    libraries.push({ guestPath, hostPath, sha256: await sha256File(hostPath) });
  }
  const addons = await nodePtyFiles();
  // The addon's own libraries (libstdc++ and libc today, which node links too): any it adds.
  for (const a of addons.filter((f) => f.hostPath.endsWith('.node'))) {
    for (const guestPath of parseLdd((await run(ldd, [a.hostPath])).stdout)) {
      if (libraries.some((l) => l.guestPath === guestPath)) continue;
      const hostPath = await realpath(guestPath);
      libraries.push({ guestPath, hostPath, sha256: await sha256File(hostPath) });
    }
  }
  // iproute2's ip, for what busybox ip cannot do (neighbours); its libraries as for node.
  const ipHost = findTool('ip');
  if (!ipHost) throw new KataError('KATA_ERR_GUEST_IMAGE', 'iproute2 (ip) is not installed: the guest agent adds neighbours with it', { fix: 'apt-get install iproute2' });
  const ipPath = await realpath(ipHost);
  const tools: LibraryFile[] = [{ guestPath: GUEST_IPROUTE2, hostPath: ipPath, sha256: await sha256File(ipPath) }];
  for (const guestPath of parseLdd((await run(ldd, [ipPath])).stdout)) {
    if (libraries.some((l) => l.guestPath === guestPath)) continue;
    const hostPath = await realpath(guestPath);
    libraries.push({ guestPath, hostPath, sha256: await sha256File(hostPath) });
  }
  const strip = findTool('strip') !== undefined;
  const here = path.dirname(fileURLToPath(import.meta.url));
  const code = await readFile(path.join(here, 'agent-payload.js')).catch(() => Buffer.alloc(0));
  const all = createHash('sha256');
  for (const part of [sha256(code), sha256(bundle), sha256(start), nodeSha, String(strip), ...libraries.map((l) => `${l.guestPath}=${l.sha256}`), ...addons.map((a) => `${a.guestPath}=${a.sha256}`), ...tools.map((t) => `${t.guestPath}=${t.sha256}`)]) all.update(`${part}\0`);
  return {
    bundle,
    bundleSha256: sha256(bundle),
    start,
    startSha256: sha256(start),
    node: { path: node, version, sha256: nodeSha, bytes: nodeStat.size },
    libraries,
    addons,
    tools,
    strip,
    sha256: all.digest('hex'),
  };
}

/** Writes directory and file entries under `root` (relative paths made by this module, never from a pod). */
async function writeTree(entries: readonly CpioEntry[], root: string): Promise<void> {
  for (const e of entries) {
    const dest = path.join(root, e.path);
    if (e.kind === 'dir') await mkdir(dest, { recursive: true, mode: e.mode });
    else if (e.kind === 'file') {
      await mkdir(path.dirname(dest), { recursive: true });
      if (typeof e.data === 'string') await copyFile(e.data, dest);
      else await writeFile(dest, e.data);
      await chmod(dest, e.mode);
    }
  }
}

/**
 * Writes the agent archive (uncompressed newc) to `out`; `work` is a scratch directory for the stripped node.
 * With `treeDir`, the same files are also written there as a directory tree (the agent disk's contents).
 */
export async function writeAgentArchive(inputs: AgentInputs, out: string, work: string, treeDir?: string): Promise<AgentManifest> {
  let nodeFile = inputs.node.path;
  let stripped = false;
  if (inputs.strip) {
    const s = path.join(work, 'node.stripped');
    try {
      await run('strip', ['--strip-all', '-o', s, inputs.node.path]);
      stripped = true;
      nodeFile = s;
    } catch {
      await copyFile(inputs.node.path, s); // an unstrippable node still works
      nodeFile = s;
    }
  }
  const files = new Map<string, CpioEntry>();
  const dirs = new Set<string>(['agent']);
  const addFile = (p: string, mode: number, data: Buffer | string) => {
    const rel = p.replace(/^\/+/, '');
    for (let d = path.posix.dirname(rel); d !== '.'; d = path.posix.dirname(d)) dirs.add(d);
    files.set(rel, { kind: 'file', path: rel, mode, data });
  };
  addFile('agent/node', 0o755, nodeFile);
  addFile('agent/agent.mjs', 0o644, inputs.bundle);
  addFile('agent/start', 0o755, inputs.start);
  // The loader must be executable (the kernel opens it like a program); the others may as well be.
  for (const l of inputs.libraries) addFile(l.guestPath, 0o755, l.hostPath);
  for (const a of inputs.addons) addFile(a.guestPath, a.guestPath.endsWith('.node') ? 0o755 : 0o644, a.hostPath);
  for (const t of inputs.tools) addFile(t.guestPath, 0o755, t.hostPath);
  // /agent/start last: if the kernel runs out of memory while unpacking (it then stops), /init
  // finds no /agent/start and says so, rather than starting a node whose libraries are missing.
  const entries: CpioEntry[] = [...[...dirs].map((d) => ({ kind: 'dir' as const, path: d, mode: 0o755 })), ...files.values()]
    .sort((a, b) => Buffer.compare(Buffer.from(a.path), Buffer.from(b.path)))
    .sort((a, b) => Number(a.path === 'agent/start') - Number(b.path === 'agent/start'));
  const w = new CpioWriter(out, { gzip: false });
  for (const e of entries) await w.add(e);
  await w.finish();
  if (treeDir !== undefined) await writeTree(entries, treeDir);
  return {
    inputsSha256: inputs.sha256,
    bundleSha256: inputs.bundleSha256,
    bundleBytes: inputs.bundle.length,
    startSha256: inputs.startSha256,
    node: { ...inputs.node, stripped, bytes: (await stat(nodeFile)).size },
    libraries: inputs.libraries.map((l) => ({ path: l.guestPath, sha256: l.sha256 })),
    addons: inputs.addons.map((a) => ({ path: a.guestPath, sha256: a.sha256 })),
    tools: inputs.tools.map((t) => ({ path: t.guestPath, sha256: t.sha256 })),
    archiveBytes: (await stat(out)).size,
  };
}
