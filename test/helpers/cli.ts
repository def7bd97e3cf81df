import { chmodSync, cpSync } from 'node:fs';
import path from 'node:path';
import type { CliIO } from '../../cli/io.js';
import { DIST_ROOT, PACKAGE_ROOT } from '../../core/paths.js';
import type { TempDir } from './tmp.js';

export const HOST_FIXTURES = path.join(PACKAGE_ROOT, 'test', 'fixtures', 'host');
/** The unbundled entry point (the bundle is tested in cli-bundle.test.ts). */
export const CLI = path.join(DIST_ROOT, 'bin', 'kata-runtime.js');
export const STACK_FRAME = /^\s+at .+\(.*:\d+:\d+\)$/m;

/** An in-process CLI io that records what the command prints. */
export function capture(env: NodeJS.ProcessEnv) {
  const out: string[] = [];
  const err: string[] = [];
  const io: CliIO = { out: (t) => void out.push(t), err: (t) => void err.push(t), env };
  return { io, stdout: () => out.join(''), stderr: () => err.join('') };
}

export interface FakeHosts {
  /** Fake host roots by fixture name, copied so /dev/kvm is writable whoever runs the tests. */
  readonly hosts: Record<string, string>;
  /** Scripts that answer `--version` like QEMU and Cloud Hypervisor. */
  readonly qemuBin: string;
  readonly clhBin: string;
}

export function makeFakeHosts(tmp: TempDir): FakeHosts {
  const hosts: Record<string, string> = {};
  for (const h of ['paravirtual-kvm', 'intel-kvm', 'intel-tdx']) {
    hosts[h] = path.join(tmp.path, 'hosts', h);
    cpSync(path.join(HOST_FIXTURES, h), hosts[h] as string, { recursive: true });
  }
  const qemuBin = tmp.file('bin/qemu-system-x86_64', '#!/bin/sh\necho "QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7+deb12u6)"\n');
  const clhBin = tmp.file('bin/cloud-hypervisor', '#!/bin/sh\necho "cloud-hypervisor v40.0"\n');
  chmodSync(qemuBin, 0o755);
  chmodSync(clhBin, 0o755);
  return { hosts, qemuBin, clhBin };
}
