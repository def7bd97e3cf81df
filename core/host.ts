/**
 * Host detection: what this machine offers a VM-based runtime. Used by `kata-runtime env` and
 * `check`, and by the QEMU driver to choose between KVM and TCG ({@link chooseAccelerator}).
 *
 * Everything is read below an injectable root directory (default `/`), so tests point it at a fake
 * `/proc`, `/sys`, `/dev` and `/etc` tree. Detection never throws: a file that cannot be read means
 * "not available", and the reason is recorded next to the answer.
 *
 * KVM is judged by three facts, because `/dev/kvm` alone proves little: some hosts expose a
 * paravirtual KVM (e.g. the kvm_pvm module) through `/dev/kvm` on a CPU without vmx/svm, and a stock
 * guest kernel does not boot on it. A standard guest needs the device, the hardware virtualisation
 * flag and the vendor KVM module together.
 */
import { closeSync, constants as fsConstants, openSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { spawnProbe } from './child.js';

export interface HostDetectOptions {
  /** Directory that stands for `/` (tests use a fake tree); default `/`. */
  root?: string;
  /** Node's `process.arch` value to report (default: this process's). */
  arch?: string;
}

/** A yes/no answer with the reason for it. */
export interface Availability {
  readonly available: boolean;
  readonly reason: string;
}

export type GuestProtection = 'tdx' | 'snp';
export type Accelerator = 'kvm' | 'tcg';
export type AcceleratorChoice = 'auto' | Accelerator;

export interface KvmInfo {
  /** `/dev/kvm` exists. */
  readonly devicePresent: boolean;
  /** `/dev/kvm` can be opened read-write by this process. */
  readonly deviceUsable: boolean;
  /** The hardware virtualisation CPU flag found (`vmx` Intel, `svm` AMD), or null. */
  readonly virtFlag: 'vmx' | 'svm' | null;
  /** The vendor KVM module loaded (`kvm_intel`, `kvm_amd`), or null. */
  readonly vendorModule: 'kvm_intel' | 'kvm_amd' | null;
  /** Other KVM modules loaded (e.g. `kvm`, `kvm_pvm`), for the explanation. */
  readonly otherModules: readonly string[];
  /** Device usable, CPU flag and vendor module together: a standard guest kernel can run. */
  readonly canRunStandardGuest: boolean;
  /** Why KVM can or cannot run a standard guest. */
  readonly reason: string;
}

export interface HostInfo {
  /** The root the facts were read under. */
  readonly root: string;
  /** Kernel release (`uname -r`), "" when unknown. */
  readonly kernel: string;
  /** Go-style architecture name, as Kata reports it (`amd64`, `arm64`, `s390x`, `ppc64le`). */
  readonly architecture: string;
  readonly distro: { readonly name: string; readonly version: string };
  readonly cpu: { readonly vendor: string; readonly model: string; readonly count: number; readonly flags: readonly string[] };
  /** kB, as in /proc/meminfo; 0 when unknown. */
  readonly memory: { readonly total: number; readonly free: number; readonly available: number };
  readonly kvm: KvmInfo;
  /** Same as `kvm.canRunStandardGuest`. */
  readonly kvmCanRunStandardGuest: boolean;
  /** `/dev/vhost-vsock` exists. */
  readonly vhostVsock: Availability;
  /** Intel TDX: kvm_intel's `tdx` parameter is `Y`. */
  readonly tdx: Availability;
  /** AMD SEV-SNP: kvm_amd's `sev_snp` parameter is `Y`. */
  readonly snp: Availability;
  /** Kata's AvailableGuestProtections: `tdx`, `snp`, or empty. */
  readonly guestProtections: readonly GuestProtection[];
  /** Files that should have been readable and were not, with the error. */
  readonly unreadable: readonly { readonly path: string; readonly error: string }[];
}

export const KVM_DEVICE = 'dev/kvm';
export const VHOST_VSOCK_DEVICE = 'dev/vhost-vsock';
export const TDX_PARAMETER = 'sys/module/kvm_intel/parameters/tdx';
export const SNP_PARAMETER = 'sys/module/kvm_amd/parameters/sev_snp';

/** Reads the host facts below `opts.root`. Synchronous and cheap: a handful of small files. */
export function detectHost(opts: HostDetectOptions = {}): HostInfo {
  const fs = new HostFs(opts.root ?? '/');

  const cpuinfo = fs.read('proc/cpuinfo');
  const cpu = parseCpuinfo(cpuinfo ?? '');
  const meminfo = parseMeminfo(fs.read('proc/meminfo') ?? '');
  // os-release(5): /etc/os-release, else /usr/lib/os-release; only the first is reported missing.
  const osRelease = parseOsRelease(fs.read('etc/os-release', { optional: true }) ?? fs.read('usr/lib/os-release', { optional: true }) ?? fs.read('etc/os-release') ?? '');

  const kvm = detectKvm(fs, cpu.flags, cpuinfo !== undefined);
  const vhostVsock = detectVhostVsock(fs);
  const tdx = detectModuleFlag(fs, TDX_PARAMETER, 'kvm_intel', 'Intel TDX', 'tdx');
  const snp = detectModuleFlag(fs, SNP_PARAMETER, 'kvm_amd', 'AMD SEV-SNP', 'sev_snp');
  const guestProtections: GuestProtection[] = [];
  if (tdx.available) guestProtections.push('tdx');
  if (snp.available) guestProtections.push('snp');

  return {
    root: fs.root,
    kernel: (fs.read('proc/sys/kernel/osrelease') ?? '').trim(),
    architecture: goArch(opts.arch ?? process.arch),
    distro: { name: osRelease.NAME ?? '', version: osRelease.VERSION_ID ?? '' },
    cpu,
    memory: { total: meminfo.MemTotal ?? 0, free: meminfo.MemFree ?? 0, available: meminfo.MemAvailable ?? 0 },
    kvm,
    kvmCanRunStandardGuest: kvm.canRunStandardGuest,
    vhostVsock,
    tdx,
    snp,
    guestProtections,
    unreadable: fs.unreadable,
  };
}

/**
 * KVM or TCG for a QEMU guest. `auto` takes KVM when it can run a standard guest and TCG (software
 * emulation, slow but it boots anywhere) otherwise; `kvm` and `tcg` are honoured as asked, the
 * reason saying when a forced KVM will not work here.
 */
export function chooseAccelerator(
  host: Pick<HostInfo, 'kvm' | 'kvmCanRunStandardGuest'>,
  forced: AcceleratorChoice = 'auto',
): { accelerator: Accelerator; reason: string } {
  if (forced === 'tcg') return { accelerator: 'tcg', reason: 'TCG (software emulation) requested by the configuration' };
  if (forced === 'kvm') {
    return host.kvmCanRunStandardGuest
      ? { accelerator: 'kvm', reason: `KVM requested by the configuration; ${host.kvm.reason}` }
      : { accelerator: 'kvm', reason: `KVM requested by the configuration, but ${host.kvm.reason}; a standard guest will not start` };
  }
  return host.kvmCanRunStandardGuest
    ? { accelerator: 'kvm', reason: host.kvm.reason }
    : { accelerator: 'tcg', reason: `${host.kvm.reason}; using TCG (software emulation)` };
}

// ---------------------------------------------------------------------------------------------
// Hypervisor version

export type HypervisorProduct = 'qemu' | 'cloud-hypervisor';

/** How a product is called in messages. */
export function productName(product: HypervisorProduct | null): string {
  return product === 'qemu' ? 'QEMU' : product === 'cloud-hypervisor' ? 'Cloud Hypervisor' : 'an unknown hypervisor';
}

export interface HypervisorVersion {
  /** `7.2.0`, `40.0`; null when unknown. */
  readonly version: string | null;
  readonly product: HypervisorProduct | null;
  /** First line of the `--version` output ("" when there was none). */
  readonly output: string;
  /** Why the version is unknown; "" when known. */
  readonly reason: string;
}

export const VERSION_TIMEOUT_MS = 2000;

/** Parses `--version` output of QEMU (`QEMU emulator version 7.2.0 (…)`) or Cloud Hypervisor (`cloud-hypervisor v40.0`). */
export function parseHypervisorVersion(output: string): { product: HypervisorProduct; version: string } | null {
  const qemu = /QEMU emulator version (\d+(?:\.\d+)*)/.exec(output);
  if (qemu?.[1]) return { product: 'qemu', version: qemu[1] };
  const clh = /cloud-hypervisor v?(\d+(?:\.\d+)*)/i.exec(output);
  if (clh?.[1]) return { product: 'cloud-hypervisor', version: clh[1] };
  return null;
}

/**
 * Runs `<binary> --version` (2 s timeout by default) and parses the answer. Never rejects. The
 * binary runs in a process group of its own, killed as a whole on timeout and once it has answered,
 * so a wrapper script that forks (or hangs in a grandchild) leaves nothing running.
 */
export function hypervisorVersion(binary: string, opts: { timeoutMs?: number } = {}): Promise<HypervisorVersion> {
  const timeoutMs = opts.timeoutMs ?? VERSION_TIMEOUT_MS;
  let probe: ReturnType<typeof spawnProbe>;
  try {
    // Running as root, an untrusted binary is not run even to ask its version.
    probe = spawnProbe(binary, ['--version'], { stdio: ['ignore', 'pipe', 'pipe'], windowsHide: true }, 'the hypervisor binary');
  } catch (e) {
    return Promise.resolve({ version: null, product: null, output: '', reason: e instanceof Error ? e.message : String(e) });
  }
  return new Promise((resolve) => {
    const { child, kill } = probe;
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let bytes = 0;
    const collect = (into: Buffer[]) => (d: Buffer) => {
      bytes += d.length;
      if (bytes <= 64 * 1024) into.push(d);
      else finish({ kind: 'too-much' });
    };
    child.stdout?.on('data', collect(out));
    child.stderr?.on('data', collect(err));
    const timer = setTimeout(() => finish({ kind: 'timeout' }), timeoutMs);
    let done = false;
    type End = { kind: 'exit'; code: number | null; signal: NodeJS.Signals | null } | { kind: 'error'; error: NodeJS.ErrnoException } | { kind: 'timeout' } | { kind: 'too-much' };
    function finish(end: End): void {
      if (done) return;
      done = true;
      clearTimeout(timer);
      kill();
      child.stdout?.destroy();
      child.stderr?.destroy();
      const text = `${Buffer.concat(out).toString()}\n${Buffer.concat(err).toString()}`.trim();
      const output = text.split('\n')[0]?.trim() ?? '';
      let reason: string | undefined;
      if (end.kind === 'error') {
        const code = end.error.code;
        reason = code === 'ENOENT' ? `${binary} does not exist` : code === 'EACCES' ? `${binary} is not executable` : `${binary} --version failed: ${code ?? end.error.message}`;
      } else if (end.kind === 'timeout') reason = `${binary} --version did not answer within ${timeoutMs / 1000} s`;
      else if (end.kind === 'too-much') reason = `${binary} --version printed more than 64 KiB`;
      else if (end.signal) reason = `${binary} --version was killed by ${end.signal}`;
      else if (end.code !== 0) reason = `${binary} --version exited with status ${end.code}`;
      if (reason !== undefined) {
        resolve({ version: null, product: null, output, reason });
        return;
      }
      const parsed = parseHypervisorVersion(text);
      resolve(parsed ? { ...parsed, output, reason: '' } : { version: null, product: null, output, reason: `unrecognised ${binary} --version output: ${JSON.stringify(output)}` });
    }
    child.once('error', (error) => finish({ kind: 'error', error }));
    // A grandchild that keeps the pipes open must not hold the answer back until the timeout.
    child.once('exit', () => kill());
    child.once('close', (code, signal) => finish({ kind: 'exit', code, signal }));
  });
}

// ---------------------------------------------------------------------------------------------
// Parsers (pure)

export function parseCpuinfo(text: string): HostInfo['cpu'] {
  let vendor = '';
  let model = '';
  let count = 0;
  let flags: string[] = [];
  for (const line of text.split('\n')) {
    const i = line.indexOf(':');
    if (i < 0) continue;
    const key = line.slice(0, i).trim();
    const value = line.slice(i + 1).trim();
    if (key === 'processor') count++;
    else if (key === 'vendor_id' && !vendor) vendor = value;
    else if (key === 'model name' && !model) model = value;
    else if (key === 'flags' && flags.length === 0) flags = value.split(/\s+/).filter(Boolean);
  }
  return { vendor, model, count, flags };
}

/** `Key: value kB` lines, values in kB. */
export function parseMeminfo(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split('\n')) {
    const m = /^(\w+):\s+(\d+)/.exec(line);
    if (m?.[1] && m[2]) out[m[1]] = Number(m[2]);
  }
  return out;
}

/** os-release(5): `KEY=value`, values optionally quoted. */
export function parseOsRelease(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (!m?.[1]) continue;
    let v = (m[2] ?? '').trim();
    if (v.length >= 2 && (v[0] === '"' || v[0] === "'") && v.endsWith(v[0])) v = v.slice(1, -1).replace(/\\(["'\\$`])/g, '$1');
    out[m[1]] = v;
  }
  return out;
}

/** Node's arch names to Go's, which Kata prints. */
export function goArch(nodeArch: string): string {
  const map: Record<string, string> = { x64: 'amd64', ia32: '386', arm64: 'arm64', arm: 'arm', s390x: 's390x', ppc64: 'ppc64le', riscv64: 'riscv64' };
  return map[nodeArch] ?? nodeArch;
}

// ---------------------------------------------------------------------------------------------
// Detection pieces

function detectKvm(fs: HostFs, flags: readonly string[], cpuinfoRead: boolean): KvmInfo {
  const device = `/${KVM_DEVICE}`;
  const devicePresent = fs.exists(KVM_DEVICE);
  const open = devicePresent ? fs.openReadWrite(KVM_DEVICE) : `${device} does not exist`;
  const deviceUsable = devicePresent && open === '';
  const virtFlag = flags.includes('vmx') ? 'vmx' : flags.includes('svm') ? 'svm' : null;
  const vendorModule = fs.isDir('sys/module/kvm_intel') ? 'kvm_intel' : fs.isDir('sys/module/kvm_amd') ? 'kvm_amd' : null;
  const otherModules = ['kvm', 'kvm_pvm'].filter((m) => fs.isDir(`sys/module/${m}`));
  const canRunStandardGuest = deviceUsable && virtFlag !== null && vendorModule !== null;

  // Every shortfall is named: a user who fixes the first should not discover the next one later.
  const shortfalls: string[] = [];
  if (!devicePresent) shortfalls.push(`${device} does not exist: KVM is not available`);
  else {
    if (!deviceUsable) shortfalls.push(`${device} cannot be opened read-write (${open})`);
    if (virtFlag === null) {
      const via = otherModules.includes('kvm_pvm') ? ' (kvm_pvm loaded)' : '';
      shortfalls.push(
        cpuinfoRead
          ? `no vmx/svm CPU flag: ${device} is a paravirtual KVM${via} that cannot run a standard guest`
          : `cannot read /proc/cpuinfo to find the vmx/svm CPU flag, so ${device} cannot be trusted to run a standard guest`,
      );
    } else if (vendorModule === null) {
      const want = virtFlag === 'vmx' ? 'kvm_intel' : 'kvm_amd';
      shortfalls.push(`CPU flag ${virtFlag} present but ${want} is not loaded (no /sys/module/${want}): load it with modprobe ${want}`);
    }
  }
  const reason = canRunStandardGuest ? `KVM can run a standard guest (${device} usable, CPU flag ${virtFlag}, ${vendorModule} loaded)` : shortfalls.join('; ');
  return { devicePresent, deviceUsable, virtFlag, vendorModule, otherModules, canRunStandardGuest, reason };
}

function detectVhostVsock(fs: HostFs): Availability {
  const device = `/${VHOST_VSOCK_DEVICE}`;
  if (fs.exists(VHOST_VSOCK_DEVICE)) return { available: true, reason: `${device} exists` };
  if (fs.isDir('sys/module/vhost_vsock')) return { available: false, reason: `the vhost_vsock module is loaded but ${device} does not exist` };
  return { available: false, reason: `${device} does not exist (load it with modprobe vhost_vsock)` };
}

/** A `Y`/`N` module parameter, e.g. kvm_intel's `tdx`. Only a value starting with `Y` counts (Kata's rule). */
function detectModuleFlag(fs: HostFs, rel: string, module: string, what: string, param: string): Availability {
  const file = `/${rel}`;
  if (!fs.isDir(`sys/module/${module}`)) return { available: false, reason: `${what} is not available: ${module} is not loaded` };
  const r = fs.readDetailed(rel);
  if (r.error === 'ENOENT') return { available: false, reason: `${what} is not available: ${module} has no ${param} parameter (${file} does not exist)` };
  if (r.error !== undefined) return { available: false, reason: `${what} is not available: cannot read ${file} (${r.error})` };
  const value = r.text.trim();
  if (value.startsWith('Y')) return { available: true, reason: `${file} is ${value}` };
  return { available: false, reason: `${what} is disabled: ${file} is ${JSON.stringify(value)} (load ${module} with ${param}=Y on a capable host)` };
}

/** File access below the root, recording what could not be read. */
class HostFs {
  readonly root: string;
  readonly unreadable: { path: string; error: string }[] = [];

  constructor(root: string) {
    this.root = path.resolve(root);
  }

  private at(rel: string): string {
    return path.join(this.root, rel);
  }

  readDetailed(rel: string): { text: string; error?: undefined } | { text?: undefined; error: string } {
    try {
      return { text: readFileSync(this.at(rel), 'utf8') };
    } catch (e) {
      return { error: errCode(e) };
    }
  }

  /** The file's text, or undefined (recorded unless `optional`). */
  read(rel: string, opts: { optional?: boolean } = {}): string | undefined {
    const r = this.readDetailed(rel);
    if (r.error === undefined) return r.text;
    if (!opts.optional) this.unreadable.push({ path: `/${rel}`, error: r.error });
    return undefined;
  }

  exists(rel: string): boolean {
    try {
      statSync(this.at(rel));
      return true;
    } catch {
      return false;
    }
  }

  isDir(rel: string): boolean {
    try {
      return statSync(this.at(rel)).isDirectory();
    } catch {
      return false;
    }
  }

  /** "" when the path opens read-write, else the error code. Non-blocking, so a FIFO cannot hang us. */
  openReadWrite(rel: string): string {
    try {
      closeSync(openSync(this.at(rel), fsConstants.O_RDWR | fsConstants.O_NONBLOCK));
      return '';
    } catch (e) {
      return errCode(e);
    }
  }
}

function errCode(e: unknown): string {
  return (e as NodeJS.ErrnoException).code ?? (e instanceof Error ? e.message : String(e));
}
