import assert from 'node:assert/strict';
import { chmodSync, cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { chooseAccelerator, detectHost, goArch, hypervisorVersion, parseHypervisorVersion, parseOsRelease } from '../../core/host.js';

/** What a fake host tree holds; every file is written below the root. */
interface FakeHost {
  vendor?: 'GenuineIntel' | 'AuthenticAMD';
  flags?: string[];
  cpus?: number;
  kvmDevice?: 'file' | 'unopenable' | 'absent';
  modules?: string[];
  tdx?: string;
  snp?: string;
  vhostVsock?: boolean;
  /** Paths (relative to the root) to make unreadable: created as directories. */
  unreadable?: string[];
}

/** Writes a fake /proc, /sys, /dev and /etc tree. Directories stand in for unreadable files (tests may run as root, for whom modes do not bite). */
function writeFakeHost(root: string, h: FakeHost = {}): string {
  const put = (rel: string, text: string) => {
    const p = path.join(root, rel);
    mkdirSync(path.dirname(p), { recursive: true });
    if (!h.unreadable?.includes(rel)) writeFileSync(p, text);
  };
  const cpus = h.cpus ?? 2;
  const flags = (h.flags ?? ['fpu', 'lm', 'sse4_1']).join(' ');
  let cpuinfo = '';
  for (let i = 0; i < cpus; i++) {
    cpuinfo += `processor\t: ${i}\nvendor_id\t: ${h.vendor ?? 'GenuineIntel'}\ncpu family\t: 6\nmodel name\t: Test CPU @ 2.10GHz\nflags\t\t: ${flags}\n\n`;
  }
  put('proc/cpuinfo', cpuinfo);
  put('proc/meminfo', 'MemTotal:       16384000 kB\nMemFree:         8192000 kB\nMemAvailable:   12288000 kB\nBuffers:           1000 kB\n');
  put('proc/sys/kernel/osrelease', '6.1.0-test-amd64\n');
  put('etc/os-release', 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n');
  const kvm = h.kvmDevice ?? 'file';
  if (kvm === 'file') put('dev/kvm', '');
  if (kvm === 'unopenable') mkdirSync(path.join(root, 'dev/kvm'), { recursive: true });
  for (const m of h.modules ?? []) mkdirSync(path.join(root, 'sys/module', m), { recursive: true });
  if (h.tdx !== undefined) put('sys/module/kvm_intel/parameters/tdx', h.tdx);
  if (h.snp !== undefined) put('sys/module/kvm_amd/parameters/sev_snp', h.snp);
  if (h.vhostVsock) put('dev/vhost-vsock', '');
  for (const rel of h.unreadable ?? []) mkdirSync(path.join(root, rel), { recursive: true });
  return root;
}

const INTEL_KVM: FakeHost = { vendor: 'GenuineIntel', flags: ['fpu', 'vmx', 'lm'], modules: ['kvm', 'kvm_intel'] };
const PARAVIRTUAL_KVM: FakeHost = { vendor: 'GenuineIntel', flags: ['fpu', 'lm', 'hypervisor'], modules: ['kvm', 'kvm_pvm'] };

describe('host detection (detectHost)', () => {
  let dir: string;
  let n = 0;
  const fake = (h: FakeHost) => writeFakeHost(path.join(dir, String(n++)), h);
  before(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'kata-host-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('reads kernel, distro, CPU and memory from the tree', () => {
    const host = detectHost({ root: fake({ cpus: 4 }), arch: 'x64' });
    assert.equal(host.kernel, '6.1.0-test-amd64');
    assert.equal(host.architecture, 'amd64');
    assert.deepEqual(host.distro, { name: 'Debian GNU/Linux', version: '12' });
    assert.equal(host.cpu.vendor, 'GenuineIntel');
    assert.equal(host.cpu.model, 'Test CPU @ 2.10GHz');
    assert.equal(host.cpu.count, 4);
    assert.ok(host.cpu.flags.includes('lm'));
    assert.deepEqual(host.memory, { total: 16384000, free: 8192000, available: 12288000 });
    assert.deepEqual(host.unreadable, []);
  });

  it('finds KVM able to run a standard guest on Intel with vmx and kvm_intel', () => {
    const host = detectHost({ root: fake(INTEL_KVM) });
    assert.equal(host.kvmCanRunStandardGuest, true);
    assert.equal(host.kvm.devicePresent, true);
    assert.equal(host.kvm.deviceUsable, true);
    assert.equal(host.kvm.virtFlag, 'vmx');
    assert.equal(host.kvm.vendorModule, 'kvm_intel');
    assert.equal(chooseAccelerator(host).accelerator, 'kvm');
  });

  it('finds KVM able to run a standard guest on AMD with svm and kvm_amd', () => {
    const host = detectHost({ root: fake({ vendor: 'AuthenticAMD', flags: ['svm'], modules: ['kvm', 'kvm_amd'] }) });
    assert.equal(host.kvmCanRunStandardGuest, true);
    assert.equal(host.kvm.virtFlag, 'svm');
    assert.equal(host.kvm.vendorModule, 'kvm_amd');
  });

  it('treats /dev/kvm without vmx/svm as a paravirtual KVM and chooses TCG with a reason', () => {
    const host = detectHost({ root: fake(PARAVIRTUAL_KVM) });
    assert.equal(host.kvm.devicePresent, true);
    assert.equal(host.kvm.deviceUsable, true);
    assert.equal(host.kvm.virtFlag, null);
    assert.equal(host.kvm.vendorModule, null);
    assert.deepEqual(host.kvm.otherModules, ['kvm', 'kvm_pvm']);
    assert.equal(host.kvmCanRunStandardGuest, false);
    const choice = chooseAccelerator(host, 'auto');
    assert.equal(choice.accelerator, 'tcg');
    assert.match(choice.reason, /vmx\/svm/);
    assert.match(choice.reason, /TCG/);
  });

  it('needs the vendor module as well as the CPU flag', () => {
    const host = detectHost({ root: fake({ flags: ['vmx'], modules: ['kvm'] }) });
    assert.equal(host.kvm.virtFlag, 'vmx');
    assert.equal(host.kvm.vendorModule, null);
    assert.equal(host.kvmCanRunStandardGuest, false);
  });

  it('reports KVM absent when /dev/kvm does not exist', () => {
    const host = detectHost({ root: fake({ ...INTEL_KVM, kvmDevice: 'absent' }) });
    assert.equal(host.kvm.devicePresent, false);
    assert.equal(host.kvm.deviceUsable, false);
    assert.equal(host.kvmCanRunStandardGuest, false);
  });

  it('reports KVM unusable when /dev/kvm cannot be opened read-write', () => {
    const host = detectHost({ root: fake({ ...INTEL_KVM, kvmDevice: 'unopenable' }) });
    assert.equal(host.kvm.devicePresent, true);
    assert.equal(host.kvm.deviceUsable, false);
    assert.equal(host.kvmCanRunStandardGuest, false);
    assert.match(host.kvm.reason, /EISDIR/);
  });

  it('names every KVM shortfall, not only the first', () => {
    const host = detectHost({ root: fake({ ...PARAVIRTUAL_KVM, kvmDevice: 'unopenable' }) });
    assert.equal(host.kvm.deviceUsable, false);
    assert.equal(host.kvm.virtFlag, null);
    assert.match(host.kvm.reason, /EISDIR/);
    assert.match(host.kvm.reason, /vmx\/svm/);
  });

  it('finds TDX when kvm_intel parameter tdx is Y', () => {
    const host = detectHost({ root: fake({ ...INTEL_KVM, tdx: 'Y\n' }) });
    assert.equal(host.tdx.available, true);
    assert.deepEqual(host.guestProtections, ['tdx']);
  });

  it('finds no TDX when the tdx parameter is N', () => {
    const host = detectHost({ root: fake({ ...INTEL_KVM, tdx: 'N\n' }) });
    assert.equal(host.tdx.available, false);
    assert.deepEqual(host.guestProtections, []);
    assert.notEqual(host.tdx.reason, '');
  });

  it('finds no TDX when kvm_intel has no tdx parameter', () => {
    const host = detectHost({ root: fake(INTEL_KVM) });
    assert.equal(host.tdx.available, false);
    assert.match(host.tdx.reason, /does not exist/);
  });

  it('finds no TDX when kvm_intel is not loaded', () => {
    const host = detectHost({ root: fake(PARAVIRTUAL_KVM) });
    assert.equal(host.tdx.available, false);
    assert.match(host.tdx.reason, /not loaded/);
  });

  it('finds no TDX, without throwing, when the tdx parameter cannot be read', () => {
    const host = detectHost({ root: fake({ ...INTEL_KVM, unreadable: ['sys/module/kvm_intel/parameters/tdx'] }) });
    assert.equal(host.tdx.available, false);
    assert.match(host.tdx.reason, /EISDIR/);
  });

  it('finds SEV-SNP when kvm_amd parameter sev_snp is Y', () => {
    const host = detectHost({ root: fake({ vendor: 'AuthenticAMD', flags: ['svm'], modules: ['kvm', 'kvm_amd'], snp: 'Y' }) });
    assert.equal(host.snp.available, true);
    assert.equal(host.tdx.available, false);
    assert.deepEqual(host.guestProtections, ['snp']);
  });

  it('finds vhost-vsock when /dev/vhost-vsock exists', () => {
    assert.equal(detectHost({ root: fake({ vhostVsock: true }) }).vhostVsock.available, true);
  });

  it('finds no vhost-vsock when only the module is loaded', () => {
    const host = detectHost({ root: fake({ modules: ['vhost_vsock'] }) });
    assert.equal(host.vhostVsock.available, false);
    assert.match(host.vhostVsock.reason, /module is loaded/);
  });

  it('records unreadable files and answers "not available" instead of throwing', () => {
    const host = detectHost({ root: fake({ ...INTEL_KVM, unreadable: ['proc/cpuinfo', 'proc/meminfo'] }) });
    assert.deepEqual(
      host.unreadable.map((u) => [u.path, u.error]),
      [
        ['/proc/cpuinfo', 'EISDIR'],
        ['/proc/meminfo', 'EISDIR'],
      ],
    );
    assert.equal(host.cpu.count, 0);
    assert.equal(host.memory.total, 0);
    // No flags could be read, so KVM cannot be trusted with a standard guest.
    assert.equal(host.kvmCanRunStandardGuest, false);
    assert.match(host.kvm.reason, /cpuinfo/);
  });

  it('reads this machine without throwing', () => {
    const host = detectHost();
    assert.equal(host.root, '/');
    assert.equal(typeof host.kvmCanRunStandardGuest, 'boolean');
  });

  it('answers for an empty root without throwing', () => {
    const root = path.join(dir, 'empty');
    mkdirSync(root);
    const host = detectHost({ root });
    assert.equal(host.kernel, '');
    assert.equal(host.kvmCanRunStandardGuest, false);
    assert.equal(host.vhostVsock.available, false);
    assert.deepEqual(host.guestProtections, []);
    assert.ok(host.unreadable.length >= 3);
  });
});

describe('host fixture trees (test/fixtures/host)', () => {
  let dir: string;
  const fixture = (name: string) => {
    // Copied, so that dev/kvm opens read-write whoever owns the checkout.
    const root = path.join(dir, name);
    cpSync(path.join(PACKAGE_ROOT, 'test', 'fixtures', 'host', name), root, { recursive: true });
    return detectHost({ root });
  };
  before(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'kata-hostfx-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('paravirtual-kvm has /dev/kvm that cannot run a standard guest', () => {
    const host = fixture('paravirtual-kvm');
    assert.equal(host.kvm.deviceUsable, true);
    assert.equal(host.kvmCanRunStandardGuest, false);
    assert.equal(chooseAccelerator(host).accelerator, 'tcg');
    assert.equal(host.vhostVsock.available, false);
    assert.deepEqual(host.unreadable, []);
  });

  it('intel-kvm has usable KVM and vhost-vsock but no TDX', () => {
    const host = fixture('intel-kvm');
    assert.equal(host.kvmCanRunStandardGuest, true);
    assert.equal(host.vhostVsock.available, true);
    assert.equal(host.tdx.available, false);
    assert.deepEqual(host.unreadable, []);
  });

  it('intel-tdx has TDX', () => {
    const host = fixture('intel-tdx');
    assert.equal(host.kvmCanRunStandardGuest, true);
    assert.deepEqual(host.guestProtections, ['tdx']);
  });
});

describe('chooseAccelerator', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'kata-accel-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('honours a forced tcg on a KVM host', () => {
    const host = detectHost({ root: writeFakeHost(path.join(dir, 'intel'), INTEL_KVM) });
    assert.equal(chooseAccelerator(host, 'tcg').accelerator, 'tcg');
  });

  it('honours a forced kvm on a paravirtual KVM host, saying it will not work', () => {
    const host = detectHost({ root: writeFakeHost(path.join(dir, 'pvm'), PARAVIRTUAL_KVM) });
    const choice = chooseAccelerator(host, 'kvm');
    assert.equal(choice.accelerator, 'kvm');
    assert.match(choice.reason, /will not start/);
  });

  it('defaults to auto', () => {
    const host = detectHost({ root: writeFakeHost(path.join(dir, 'pvm2'), PARAVIRTUAL_KVM) });
    assert.deepEqual(chooseAccelerator(host), chooseAccelerator(host, 'auto'));
  });
});

describe('parseHypervisorVersion', () => {
  it('parses QEMU output', () => {
    assert.deepEqual(parseHypervisorVersion('QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7+deb12u6)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n'), {
      product: 'qemu',
      version: '7.2.0',
    });
  });

  it('parses Cloud Hypervisor output', () => {
    assert.deepEqual(parseHypervisorVersion('cloud-hypervisor v40.0\n'), { product: 'cloud-hypervisor', version: '40.0' });
  });

  it('parses a Cloud Hypervisor development build', () => {
    assert.deepEqual(parseHypervisorVersion('cloud-hypervisor v32.0-121-g1a2b3c4d'), { product: 'cloud-hypervisor', version: '32.0' });
  });

  it('returns null for other output', () => {
    assert.equal(parseHypervisorVersion('firecracker v1.4.0'), null);
    assert.equal(parseHypervisorVersion(''), null);
  });
});

describe('hypervisorVersion', () => {
  let dir: string;
  const script = (name: string, body: string, mode = 0o755) => {
    const p = path.join(dir, name);
    writeFileSync(p, `#!/bin/sh\n${body}\n`);
    chmodSync(p, mode);
    return p;
  };
  before(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'kata-hvver-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('runs the binary with --version and parses QEMU output', async () => {
    const v = await hypervisorVersion(script('qemu', 'test "$1" = --version && echo "QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7+deb12u6)"'));
    assert.equal(v.product, 'qemu');
    assert.equal(v.version, '7.2.0');
    assert.equal(v.reason, '');
  });

  it('parses Cloud Hypervisor output', async () => {
    const v = await hypervisorVersion(script('clh', 'echo "cloud-hypervisor v40.0"'));
    assert.equal(v.product, 'cloud-hypervisor');
    assert.equal(v.version, '40.0');
  });

  it('gives an unknown version with a reason for a missing binary', async () => {
    const v = await hypervisorVersion(path.join(dir, 'no-such-binary'));
    assert.equal(v.version, null);
    assert.match(v.reason, /does not exist/);
  });

  it('gives an unknown version for a binary that fails', async () => {
    const v = await hypervisorVersion(script('failing', 'echo broken >&2; exit 3'));
    assert.equal(v.version, null);
    assert.match(v.reason, /status 3/);
  });

  it('gives an unknown version for unrecognised output', async () => {
    const v = await hypervisorVersion(script('other', 'echo "something 1.0"'));
    assert.equal(v.version, null);
    assert.equal(v.output, 'something 1.0');
  });

  it('gives up after the timeout', async () => {
    const v = await hypervisorVersion(script('slow', 'sleep 5'), { timeoutMs: 200 });
    assert.equal(v.version, null);
    assert.match(v.reason, /did not answer/);
  });
});

describe('host helpers', () => {
  it('maps Node architecture names to Go names', () => {
    assert.equal(goArch('x64'), 'amd64');
    assert.equal(goArch('arm64'), 'arm64');
    assert.equal(goArch('ppc64'), 'ppc64le');
  });

  it('parses os-release quoting', () => {
    assert.deepEqual(parseOsRelease('NAME="Debian GNU/Linux"\nVERSION_ID=\'12\'\nID=debian\n# comment\n'), { NAME: 'Debian GNU/Linux', VERSION_ID: '12', ID: 'debian' });
  });
});
