import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, cpSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { hostChecks, mergeChecks, type CheckReport, type CheckStatus, type HostCheck } from '../../cli/check.js';
import type { SandboxPlan } from '../../core/plan.js';
import { main } from '../../cli/main.js';
import { detectHost } from '../../core/host.js';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { TempDir } from '../helpers/tmp.js';
import { pidAlive, until } from '../helpers/wait.js';
import { CLI, HOST_FIXTURES, STACK_FRAME, capture, makeFakeHosts } from '../helpers/cli.js';



/** id → status, for assertions that do not depend on wording. */
function statuses(checks: readonly HostCheck[]): Record<string, CheckStatus> {
  return Object.fromEntries(checks.map((c) => [c.id, c.status]));
}

describe('kata-runtime check', () => {
  let tmp: TempDir;
  let hosts: Record<string, string> = {};
  let qemuBin: string;
  let clhBin: string;

  before(() => {
    tmp = new TempDir('kata-check-');
    ({ hosts, qemuBin, clhBin } = makeFakeHosts(tmp));
  });
  after(() => tmp.cleanup());

  /**
   * A qemu configuration in its own folder; the guest files exist unless listed in `missing`.
   * `extra` lines go into the [hypervisor.qemu] section.
   */
  function qemuConfig(name: string, opts: { extra?: string; binary?: string; missing?: string[] } = {}): string {
    const dir = path.join(tmp.path, name);
    for (const f of ['vmlinuz', 'initrd.img']) if (!opts.missing?.includes(f)) tmp.file(`${name}/${f}`, 'guest file\n');
    return tmp.file(
      `${name}/configuration.toml`,
      `[hypervisor.qemu]
path = "${opts.binary ?? qemuBin}"
kernel = "${dir}/vmlinuz"
initrd = "${dir}/initrd.img"
shared_fs = "none"
disable_block_device_use = true
${opts.extra ?? ''}
`,
    );
  }

  function clhConfig(name: string): string {
    const dir = path.join(tmp.path, name);
    tmp.file(`${name}/vmlinux`, 'guest file\n');
    tmp.file(`${name}/rootfs.img`, 'guest file\n');
    return tmp.file(
      `${name}/configuration.toml`,
      `[hypervisor.clh]\npath = "${clhBin}"\nkernel = "${dir}/vmlinux"\nimage = "${dir}/rootfs.img"\nshared_fs = "none"\ndisable_block_device_use = true\n`,
    );
  }

  async function check(file: string, host = 'paravirtual-kvm', json = true) {
    const c = capture({ KATA_TS_SYSROOT: hosts[host] });
    const code = await main(['--config', file, 'check', ...(json ? ['--json'] : [])], c.io);
    return { code, stdout: c.stdout(), stderr: c.stderr(), report: json ? (JSON.parse(c.stdout()) as CheckReport) : undefined };
  }

  it('passes a QEMU configuration on a paravirtual KVM host, warning about TCG and vhost-vsock', async () => {
    const r = await check(qemuConfig('qemu-ok'));
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.report?.capable, true);
    assert.equal(r.report?.valid, true);
    assert.deepEqual(statuses(r.report?.checks ?? []), {
      kvm: 'WARN',
      'vhost-vsock': 'WARN',
      'hypervisor-binary': 'ok',
      'hypervisor-version': 'info',
      kernel: 'ok',
      initrd: 'ok',
    });
    assert.match(r.report?.checks.find((c) => c.id === 'hypervisor-version')?.message ?? '', /7\.2\.0/);
  });

  it('prints one line per check, status first, and exits 0 in text mode', async () => {
    const r = await check(qemuConfig('qemu-text'), 'paravirtual-kvm', false);
    assert.equal(r.code, 0, r.stderr);
    const statusColumn = r.stdout
      .split('\n')
      .map((l) => /^(ok|info|WARN|FAIL)\s/.exec(l)?.[1])
      .filter(Boolean);
    assert.deepEqual(statusColumn, ['WARN', 'WARN', 'ok', 'info', 'ok', 'ok']);
    assert.equal(r.stderr, '');
  });

  it('passes KVM and vhost-vsock on an Intel host with vmx and kvm_intel', async () => {
    const r = await check(qemuConfig('qemu-intel'), 'intel-kvm');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(statuses(r.report?.checks ?? []).kvm, 'ok');
    assert.equal(statuses(r.report?.checks ?? [])['vhost-vsock'], 'ok');
  });

  it('fails each missing guest file and a missing hypervisor binary, explaining every failure on stderr', async () => {
    const binary = path.join(tmp.path, 'no-such-qemu');
    const r = await check(qemuConfig('qemu-missing', { binary, missing: ['vmlinuz', 'initrd.img'] }));
    assert.equal(r.code, 1);
    assert.equal(r.report?.capable, false);
    const s = statuses(r.report?.checks ?? []);
    assert.equal(s['hypervisor-binary'], 'FAIL');
    assert.equal(s['hypervisor-version'], undefined);
    assert.equal(s.kernel, 'FAIL');
    assert.equal(s.initrd, 'FAIL');
    for (const p of [binary, path.join(tmp.path, 'qemu-missing', 'vmlinuz'), path.join(tmp.path, 'qemu-missing', 'initrd.img')]) assert.ok(r.stderr.includes(p), p);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  });

  it('leaves nothing running after a hypervisor --version probe that hangs in a grandchild (check and env, as processes)', async function () {
    this.timeout(20_000);
    for (const command of ['check', 'env']) {
      const pidfile = path.join(tmp.path, `hang-${command}.pid`);
      const binary = tmp.file(`bin/hanging-qemu-${command}`, `#!/bin/sh\nsleep 1000 >/dev/null 2>&1 &\necho $! > ${pidfile}\nwait\n`);
      chmodSync(binary, 0o755);
      const r = spawnSync(process.execPath, [CLI, '--config', qemuConfig(`qemu-hang-${command}`, { binary }), command, '--json'], { encoding: 'utf8', env: { ...process.env, KATA_TS_SYSROOT: hosts['paravirtual-kvm'], KATA_CONF_FILE: '' }, timeout: 15_000 });
      assert.equal(r.signal, null, `${command} returned (${r.stderr})`);
      const doc = JSON.parse(r.stdout) as CheckReport & { Hypervisor?: { VersionReason: string } };
      const reason = command === 'check' ? doc.checks.find((c) => c.id === 'hypervisor-version')?.message : doc.Hypervisor?.VersionReason;
      assert.match(reason ?? '', /did not answer within 2 s/);
      const pid = Number(readFileSync(pidfile, 'utf8').trim());
      try {
        await until(`the probe's grandchild (${command}) to be gone`, () => !pidAlive(pid), 3_000);
      } finally {
        if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
      }
    }
  });

  it('fails a hypervisor binary that is not executable', async () => {
    const binary = tmp.file('bin/not-executable', '#!/bin/sh\n');
    chmodSync(binary, 0o644);
    const r = await check(qemuConfig('qemu-noexec', { binary }));
    assert.equal(r.code, 1);
    assert.equal(statuses(r.report?.checks ?? [])['hypervisor-binary'], 'FAIL');
  });

  it('warns when the binary is another hypervisor', async () => {
    const r = await check(qemuConfig('qemu-is-clh', { binary: clhBin }));
    assert.equal(r.code, 0, r.stderr);
    assert.equal(statuses(r.report?.checks ?? [])['hypervisor-version'], 'WARN');
  });

  it('fails KVM when the configuration forces accelerator = "kvm" on a paravirtual KVM host', async () => {
    const r = await check(qemuConfig('qemu-forced-kvm', { extra: 'accelerator = "kvm"' }));
    assert.equal(r.code, 1);
    assert.equal(statuses(r.report?.checks ?? []).kvm, 'FAIL');
  });

  it('does not warn about KVM when the configuration asks for TCG', async () => {
    const r = await check(qemuConfig('qemu-forced-tcg', { extra: 'accelerator = "tcg"' }));
    assert.equal(r.code, 0, r.stderr);
    assert.equal(statuses(r.report?.checks ?? []).kvm, 'info');
  });

  it('fails Cloud Hypervisor without usable KVM, and does not ask it for vhost-vsock', async () => {
    const file = clhConfig('clh');
    const pvm = await check(file);
    assert.equal(pvm.code, 1);
    assert.equal(statuses(pvm.report?.checks ?? []).kvm, 'FAIL');
    assert.equal(statuses(pvm.report?.checks ?? [])['vhost-vsock'], 'info');
    const intel = await check(file, 'intel-kvm');
    assert.equal(intel.code, 0, intel.stderr);
    assert.equal(statuses(intel.report?.checks ?? []).kvm, 'ok');
  });

  it('reports an invalid configuration on stderr and exits 1', async () => {
    const r = await check(qemuConfig('qemu-invalid', { extra: 'default_memory = 0' }));
    assert.equal(r.code, 1);
    assert.equal(r.report?.valid, false);
    assert.equal(r.report?.capable, false);
    assert.deepEqual(
      r.report?.problems.map((p) => [p.code, p.key]),
      [['KATA_ERR_CONFIG_VALUE', 'hypervisor.qemu.default_memory']],
    );
    assert.match(r.stderr, /KATA_ERR_CONFIG_VALUE/);
  });

  it('rejects arguments with a usage error', async () => {
    const c = capture({ KATA_TS_SYSROOT: hosts['paravirtual-kvm'] });
    assert.equal(await main(['--config', qemuConfig('args'), 'check', 'now'], c.io), 2);
  });

  describe("with Cloud Hypervisor's vmm.ping (the API simulator standing in for the binary)", () => {
    const standin = path.join(PACKAGE_ROOT, 'test', 'fixtures', 'standins', 'cloud-hypervisor');
    let savedFeatures: string | undefined;
    beforeEach(() => (savedFeatures = process.env.CLH_SIM_FEATURES));
    afterEach(() => {
      if (savedFeatures === undefined) delete process.env.CLH_SIM_FEATURES;
      else process.env.CLH_SIM_FEATURES = savedFeatures;
    });

    function simConfig(name: string, confidential: boolean): string {
      const dir = path.join(tmp.path, name);
      for (const f of ['vmlinux', 'rootfs.img', 'td-shim.bin']) tmp.file(`${name}/${f}`, 'guest file\n');
      const tdx = confidential ? `confidential_guest = true\nfirmware = "${dir}/td-shim.bin"\ndisable_block_device_use = false\n` : 'disable_block_device_use = true\n';
      return tmp.file(`${name}/configuration.toml`, `[hypervisor.clh]\npath = "${standin}"\nkernel = "${dir}/vmlinux"\nimage = "${dir}/rootfs.img"\nshared_fs = "none"\n${tdx}`);
    }

    it('reports the version and features vmm.ping gives, and leaves no VMM running', async () => {
      process.env.CLH_SIM_FEATURES = 'kvm,io_uring';
      // A mark only the simulators this test starts inherit: others (another run on the host) are not ours to count.
      const mark = `clh-ping-${process.pid}-${Date.now()}`;
      process.env.KATA_TS_TEST_MARK = mark;
      const r = await check(simConfig('clh-ping', false), 'intel-kvm').finally(() => delete process.env.KATA_TS_TEST_MARK);
      const api = r.report?.checks.find((c) => c.id === 'hypervisor-api');
      assert.equal(api?.status, 'info');
      assert.match(api?.message ?? '', /version 53\.0\.0 .*features: kvm, io_uring/);
      assert.equal(statuses(r.report?.checks ?? [])['hypervisor-tdx'], 'info');
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(processesMarked(mark), [], 'no simulator left running');
    });

    it('fails a TDX configuration when the binary lacks the tdx feature, and passes it when it has it', async () => {
      process.env.CLH_SIM_FEATURES = 'kvm';
      const without = await check(simConfig('clh-notdx', true), 'intel-tdx');
      assert.equal(statuses(without.report?.checks ?? [])['hypervisor-tdx'], 'FAIL');
      assert.equal(without.code, 1);
      assert.match(without.stderr, /built without the "tdx" feature/);
      process.env.CLH_SIM_FEATURES = 'kvm,tdx';
      const withTdx = await check(simConfig('clh-tdx', true), 'intel-tdx');
      assert.equal(statuses(withTdx.report?.checks ?? [])['hypervisor-tdx'], 'ok');
    });
  });

  describe('as a process', () => {
    function run(args: string[]) {
      const childEnv: NodeJS.ProcessEnv = { ...process.env, KATA_TS_SYSROOT: hosts['paravirtual-kvm'] };
      delete childEnv.KATA_CONF_FILE;
      return spawnSync(process.execPath, [CLI, ...args], { env: childEnv, encoding: 'utf8', timeout: 30_000 });
    }

    it('exits 0 when the host can run the configuration', () => {
      const r = run(['--config', qemuConfig('process-ok'), 'check']);
      assert.equal(r.status, 0, r.stderr);
    });

    it('exits 1 without a stack trace when it cannot', () => {
      const r = run(['--config', qemuConfig('process-fail', { missing: ['vmlinuz'] }), 'kata-check']);
      assert.equal(r.status, 1);
      assert.ok(r.stderr.includes(path.join(tmp.path, 'process-fail', 'vmlinuz')));
      assert.doesNotMatch(r.stderr, STACK_FRAME);
    });
  });
});

describe('hostChecks', () => {
  let tmp: TempDir;
  const host = (name: string) => {
    const root = path.join(tmp.path, 'hosts', name);
    cpSync(path.join(HOST_FIXTURES, name), root, { recursive: true });
    return detectHost({ root });
  };
  let binary: string;
  let kernel: string;
  let image: string;
  const base = () => ({ path: binary, kernel, image, shared_fs: 'none' });

  before(() => {
    tmp = new TempDir('kata-hostchecks-');
    binary = tmp.file('qemu', '#!/bin/sh\necho "QEMU emulator version 8.2.2"\n');
    chmodSync(binary, 0o755);
    kernel = tmp.file('vmlinuz', 'k');
    image = tmp.file('rootfs.img', 'i');
  });
  after(() => tmp.cleanup());

  it('passes TDX for a confidential guest on a TDX host', async () => {
    const checks = await hostChecks({ hypervisor: 'qemu', section: { ...base(), confidential_guest: true }, plan: undefined, host: host('intel-tdx') });
    assert.equal(statuses(checks).tdx, 'ok');
    assert.equal(statuses(checks).kvm, 'ok');
  });

  it('fails TDX for a confidential guest on a host without it', async () => {
    const checks = await hostChecks({ hypervisor: 'qemu', section: { ...base(), confidential_guest: true }, plan: undefined, host: host('intel-kvm') });
    assert.equal(statuses(checks).tdx, 'FAIL');
  });

  it('fails KVM for a confidential QEMU guest, which cannot fall back to TCG', async () => {
    const checks = await hostChecks({ hypervisor: 'qemu', section: { ...base(), confidential_guest: true }, plan: undefined, host: host('paravirtual-kvm') });
    assert.equal(statuses(checks).kvm, 'FAIL');
  });

  it('checks no TDX for an ordinary guest', async () => {
    const checks = await hostChecks({ hypervisor: 'qemu', section: base(), plan: undefined, host: host('intel-kvm') });
    assert.equal(statuses(checks).tdx, undefined);
  });

  it('fails virtio-fs without a daemon, and with a daemon that does not exist', async () => {
    const unset = await hostChecks({ hypervisor: 'qemu', section: { ...base(), shared_fs: 'virtio-fs', virtio_fs_daemon: '' }, plan: undefined, host: host('intel-kvm') });
    assert.equal(statuses(unset)['virtio-fs-daemon'], 'FAIL');
    const missing = await hostChecks({
      hypervisor: 'qemu',
      section: { ...base(), shared_fs: 'virtio-fs-nydus', virtio_fs_daemon: path.join(tmp.path, 'virtiofsd') },
      plan: undefined,
      host: host('intel-kvm'),
    });
    assert.equal(statuses(missing)['virtio-fs-daemon'], 'FAIL');
  });

  it('passes virtio-fs with an executable daemon', async () => {
    const daemon = tmp.file('virtiofsd', '#!/bin/sh\n');
    chmodSync(daemon, 0o755);
    const checks = await hostChecks({ hypervisor: 'qemu', section: { ...base(), shared_fs: 'virtio-fs', virtio_fs_daemon: daemon }, plan: undefined, host: host('intel-kvm') });
    assert.equal(statuses(checks)['virtio-fs-daemon'], 'ok');
  });

  it('checks the firmware only when it is set', async () => {
    const unset = await hostChecks({ hypervisor: 'qemu', section: { ...base(), firmware: '' }, plan: undefined, host: host('intel-kvm') });
    assert.equal(statuses(unset).firmware, undefined);
    const missing = await hostChecks({ hypervisor: 'qemu', section: { ...base(), firmware: path.join(tmp.path, 'OVMF.fd') }, plan: undefined, host: host('intel-kvm') });
    assert.equal(statuses(missing).firmware, 'FAIL');
  });

  it('fails a guest file that is a directory', async () => {
    const checks = await hostChecks({ hypervisor: 'qemu', section: { ...base(), kernel: tmp.path }, plan: undefined, host: host('intel-kvm') });
    assert.equal(statuses(checks).kernel, 'FAIL');
  });

  describe('judged from the plan, whatever the hypervisor is called', () => {
    const plan = (vm: Partial<SandboxPlan['vm']>): SandboxPlan => ({ hypervisor: 'othervmm', vm: { hypervisor: 'othervmm', binary, devices: [], ...vm } }) as unknown as SandboxPlan;
    const other = (p: SandboxPlan, h = 'paravirtual-kvm') => hostChecks({ hypervisor: 'othervmm', section: base(), plan: p, host: host(h) });

    it('fails KVM for a VM that needs it, warns for one that falls back to TCG, and tells for one on TCG', async () => {
      assert.equal(statuses(await other(plan({ accelerator: 'kvm' }))).kvm, 'FAIL');
      assert.equal(statuses(await other(plan({ accelerator: 'auto' }))).kvm, 'WARN');
      assert.equal(statuses(await other(plan({}))).kvm, 'WARN');
      assert.equal(statuses(await other(plan({ accelerator: 'tcg' }))).kvm, 'info');
      assert.equal(statuses(await other(plan({ accelerator: 'kvm' }), 'intel-kvm')).kvm, 'ok');
    });

    it('judges vhost-vsock by the agent channel the plan has', async () => {
      const channel = (transport: string) => plan({ devices: [{ kind: 'agent-channel', transport, socket: '/s', cid: 3, port: 1024, name: 'agent' } as never] });
      assert.equal(statuses(await other(channel('hybrid-vsock')))['vhost-vsock'], 'info');
      assert.equal(statuses(await other(channel('virtio-serial')))['vhost-vsock'], 'WARN');
      assert.equal(statuses(await other(channel('vsock')))['vhost-vsock'], 'FAIL');
      assert.equal(statuses(await other(channel('vsock'), 'intel-kvm'))['vhost-vsock'], 'ok');
    });

    it('lets a plugin line replace the core line of the same id, and appends the others', () => {
      const core: HostCheck[] = [
        { id: 'kvm', status: 'ok', subject: 'KVM', message: 'fine' },
        { id: 'hypervisor-version', status: 'info', subject: 'v', message: 'QEMU 8' },
      ];
      const merged = mergeChecks(core, [
        { id: 'hypervisor-version', status: 'WARN', subject: 'v', message: 'not mine' },
        { id: 'hypervisor-api', status: 'ok', subject: 'api', message: 'pong' },
      ]);
      assert.deepEqual(merged.map((c) => [c.id, c.status]), [['kvm', 'ok'], ['hypervisor-version', 'WARN'], ['hypervisor-api', 'ok']]);
    });
  });
});

/** Pids of the processes whose environment holds KATA_TS_TEST_MARK=`mark` (this one excluded). */
function processesMarked(mark: string): number[] {
  const needle = Buffer.from(`KATA_TS_TEST_MARK=${mark}\0`);
  return readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d) && Number(d) !== process.pid)
    .filter((d) => {
      try {
        return readFileSync(`/proc/${d}/environ`).includes(needle);
      } catch {
        return false; // gone, or not ours to read
      }
    })
    .map(Number);
}
