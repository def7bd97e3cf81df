import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { parse as parseToml } from 'smol-toml';
import { main } from '../../cli/main.js';
import type { EnvInfo } from '../../cli/env.js';
import { TempDir } from '../helpers/tmp.js';
import { CLI, STACK_FRAME, capture, makeFakeHosts } from '../helpers/cli.js';



describe('kata-runtime env', () => {
  let tmp: TempDir;
  let hosts: Record<string, string> = {};
  let qemuBin: string;
  let clhBin: string;

  before(() => {
    tmp = new TempDir('kata-env-');
    ({ hosts, qemuBin, clhBin } = makeFakeHosts(tmp));
  });
  after(() => tmp.cleanup());

  /** A qemu configuration that loads only the qemu plugin; `extra` lines go into its section. */
  function qemuConfig(name: string, extra = '', binary = qemuBin): string {
    return tmp.file(
      `${name}/configuration.toml`,
      `[hypervisor.qemu]
path = "${binary}"
kernel = "${tmp.path}/${name}/vmlinuz"
initrd = "${tmp.path}/${name}/initrd.img"
kernel_params = "agent.log=debug"
shared_fs = "none"
disable_block_device_use = true
${extra}

[agent.kata]
enable_debug = true

[runtime]
enable_tracing = true
`,
    );
  }

  async function env(argv: string[], host = 'paravirtual-kvm', extraEnv: NodeJS.ProcessEnv = {}) {
    const c = capture({ KATA_TS_SYSROOT: hosts[host], ...extraEnv });
    const code = await main(argv, c.io);
    return { code, stdout: c.stdout(), stderr: c.stderr() };
  }

  it('prints the configuration, hypervisor, runtime, agent and host as JSON and exits 0', async () => {
    const file = qemuConfig('valid');
    const r = await env(['--config', file, 'env', '--json']);
    assert.equal(r.code, 0, r.stderr);
    const doc = JSON.parse(r.stdout) as EnvInfo;
    assert.deepEqual(doc.Runtime.Config, { Path: file, Source: 'flag', Valid: true });
    assert.equal(doc.Meta.Version.split('+')[0], '1.0.27');
    assert.equal(doc.Kernel.Path, path.join(tmp.path, 'valid', 'vmlinuz'));
    assert.equal(doc.Kernel.Parameters, 'agent.log=debug');
    assert.equal(doc.Initrd.Path, path.join(tmp.path, 'valid', 'initrd.img'));
    assert.equal(doc.Image.Path, '');
    assert.equal(doc.Hypervisor.Name, 'qemu');
    assert.equal(doc.Hypervisor.Path, qemuBin);
    assert.equal(doc.Hypervisor.Version, '7.2.0');
    assert.equal(doc.Hypervisor.VersionReason, '');
    assert.equal(doc.Hypervisor.SharedFS, 'none');
    assert.equal(doc.Hypervisor.MachineType, 'q35');
    assert.equal(doc.Hypervisor.SecurityInfo.ConfidentialGuest, false);
    assert.equal(doc.Runtime.Trace, true);
    assert.deepEqual(doc.Agent, { Debug: true, Trace: false });
    assert.ok(doc.Plugins.some((p) => p.Name === 'qemu' && p.Builtin));
    assert.match(doc.Runtime.Version.Version.Semver, /^\d+\.\d+\.\d+/);
  });

  it('reports the paravirtual KVM host as TCG-only, still able to run QEMU guests', async () => {
    const r = await env(['--config', qemuConfig('pvm'), 'env', '--json']);
    const h = (JSON.parse(r.stdout) as EnvInfo).Host;
    assert.equal(h.KVMUsable, false);
    assert.equal(h.Accelerator, 'tcg');
    assert.notEqual(h.AcceleratorReason, '');
    assert.equal(h.VMContainerCapable, true);
    assert.equal(h.SupportVSocks, false);
    assert.deepEqual(h.AvailableGuestProtections, []);
    assert.deepEqual(h.KVM.OtherModules, ['kvm', 'kvm_pvm']);
    assert.equal(h.CPU.CPUs, 4);
    assert.equal(h.CPU.Vendor, 'GenuineIntel');
    assert.deepEqual(h.Distro, { Name: 'Debian GNU/Linux', Version: '12' });
    assert.deepEqual(h.Memory, { Total: 16384000, Free: 8192000, Available: 12288000 });
    assert.equal(h.Kernel, '6.1.0-test-amd64');
  });

  it('reports KVM, vhost-vsock and TDX on a TDX host', async () => {
    const r = await env(['--config', qemuConfig('tdx-host'), 'env', '--json'], 'intel-tdx');
    const h = (JSON.parse(r.stdout) as EnvInfo).Host;
    assert.equal(h.KVMUsable, true);
    assert.equal(h.Accelerator, 'kvm');
    assert.equal(h.SupportVSocks, true);
    assert.deepEqual(h.AvailableGuestProtections, ['tdx']);
    assert.equal(h.TDX.Available, true);
  });

  it('honours a forced accelerator', async () => {
    const r = await env(['--config', qemuConfig('forced-tcg', 'accelerator = "tcg"'), 'env', '--json'], 'intel-kvm');
    assert.equal(r.code, 0, r.stderr);
    assert.equal((JSON.parse(r.stdout) as EnvInfo).Host.Accelerator, 'tcg');
  });

  it('prints the same document as TOML without --json', async () => {
    const file = qemuConfig('toml');
    const json = await env(['--config', file, 'env', '--json']);
    const text = await env(['--config', file, 'env']);
    assert.equal(text.code, 0, text.stderr);
    // smol-toml builds null-prototype objects; compare plain data.
    const fromToml = JSON.parse(JSON.stringify(parseToml(text.stdout))) as Record<string, unknown>;
    assert.deepEqual(fromToml, JSON.parse(json.stdout));
    for (const table of ['Kernel', 'Meta', 'Image', 'Initrd', 'Hypervisor', 'Runtime', 'Host', 'Agent']) assert.ok(table in fromToml, table);
  });

  it('does not need the files the configuration names to exist', async () => {
    const r = await env(['--config', qemuConfig('missing-files', '', path.join(tmp.path, 'no-such-qemu')), 'env', '--json']);
    assert.equal(r.code, 0, r.stderr);
    const doc = JSON.parse(r.stdout) as EnvInfo;
    assert.equal(doc.Hypervisor.Version, '');
    assert.match(doc.Hypervisor.VersionReason, /does not exist/);
  });

  it('reads the configuration named by KATA_CONF_FILE and says so', async () => {
    const file = qemuConfig('from-env');
    const r = await env(['env', '--json'], 'paravirtual-kvm', { KATA_CONF_FILE: file });
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual((JSON.parse(r.stdout) as EnvInfo).Runtime.Config, { Path: file, Source: 'env', Valid: true });
  });

  it('shows an invalid configuration, lists its problems on stderr and exits 1', async () => {
    const file = qemuConfig('invalid', 'default_memory = 0');
    const r = await env(['--config', file, 'env', '--json']);
    assert.equal(r.code, 1);
    const doc = JSON.parse(r.stdout) as EnvInfo;
    assert.deepEqual(doc.Runtime.Config, { Path: file, Source: 'flag', Valid: false });
    assert.equal(doc.Hypervisor.Name, 'qemu');
    assert.equal(doc.Host.CPU.CPUs, 4);
    assert.match(r.stderr, /hypervisor\.qemu\.default_memory/);
    assert.match(r.stderr, /KATA_ERR_CONFIG_VALUE/);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
    assert.deepEqual(doc.problems.map((p) => [p.code, p.key]), [['KATA_ERR_CONFIG_VALUE', 'hypervisor.qemu.default_memory']]);
  });

  it('shows the raw values of a configuration that fails the shape check', async () => {
    const file = qemuConfig('bad-shape', 'default_memory = "lots"');
    const r = await env(['--config', file, 'env', '--json']);
    assert.equal(r.code, 1);
    const doc = JSON.parse(r.stdout) as EnvInfo;
    assert.equal(doc.Runtime.Config.Valid, false);
    assert.equal(doc.Kernel.Path, path.join(tmp.path, 'bad-shape', 'vmlinuz'));
    assert.equal(doc.Hypervisor.Path, qemuBin);
    assert.match(r.stderr, /KATA_ERR_CONFIG_SCHEMA/);
  });

  it('shows the configuration path and the host for a file that is not TOML', async () => {
    const file = tmp.file('not-toml/configuration.toml', '[hypervisor.qemu\nkernel = 1\n');
    const r = await env(['--config', file, 'env', '--json']);
    assert.equal(r.code, 1);
    const doc = JSON.parse(r.stdout) as EnvInfo;
    assert.equal(doc.Runtime.Config.Path, file);
    assert.equal(doc.Runtime.Config.Valid, false);
    assert.equal(doc.Host.CPU.CPUs, 4);
    assert.match(r.stderr, /KATA_ERR_CONFIG_PARSE/);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
    assert.deepEqual(doc.problems.map((p) => p.code), ['KATA_ERR_CONFIG_PARSE']);
  });

  it('writes integers beyond 2^53 in both formats', async () => {
    const file = qemuConfig('bigint', 'msize_9p = 9223372036854775807');
    const json = await env(['--config', file, 'env', '--json']);
    const text = await env(['--config', file, 'env']);
    assert.equal(String((JSON.parse(json.stdout) as EnvInfo).Hypervisor.Msize9p), '9223372036854775807');
    const fromToml = parseToml(text.stdout, { integersAsBigInt: 'asNeeded' }) as unknown as EnvInfo;
    assert.equal(fromToml.Hypervisor.Msize9p, 9223372036854775807n);
    assert.equal(json.code, text.code);
  });

  it('says Cloud Hypervisor runs on KVM only', async () => {
    const file = tmp.file(
      'clh/configuration.toml',
      `[hypervisor.clh]\npath = "${clhBin}"\nkernel = "/k"\nimage = "/i"\nshared_fs = "none"\ndisable_block_device_use = true\n`,
    );
    const pvm = JSON.parse((await env(['--config', file, 'env', '--json'])).stdout) as EnvInfo;
    assert.deepEqual(pvm.problems, []);
    assert.equal(pvm.Hypervisor.Version, '40.0');
    assert.equal(pvm.Host.Accelerator, 'kvm');
    assert.equal(pvm.Host.VMContainerCapable, false);
    const intel = JSON.parse((await env(['--config', file, 'env', '--json'], 'intel-kvm')).stdout) as EnvInfo;
    assert.equal(intel.Host.VMContainerCapable, true);
  });

  it('rejects arguments with a usage error', async () => {
    const r = await env(['--config', qemuConfig('args'), 'env', 'extra']);
    assert.equal(r.code, 2);
  });

  it('answers to the kata-env alias', async () => {
    const r = await env(['--config', qemuConfig('alias'), 'kata-env', '--json']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal((JSON.parse(r.stdout) as EnvInfo).Hypervisor.Name, 'qemu');
  });

  describe('as a process', () => {
    function run(args: string[]) {
      const childEnv: NodeJS.ProcessEnv = { ...process.env, KATA_TS_SYSROOT: hosts['paravirtual-kvm'] };
      delete childEnv.KATA_CONF_FILE;
      return spawnSync(process.execPath, [CLI, ...args], { env: childEnv, encoding: 'utf8', timeout: 30_000 });
    }

    it('exits 0 with a TOML document for a valid configuration', () => {
      const file = qemuConfig('process-ok');
      const r = run(['--config', file, 'env']);
      assert.equal(r.status, 0, r.stderr);
      const doc = parseToml(r.stdout) as unknown as EnvInfo;
      assert.equal(doc.Runtime.Config.Path, file);
      assert.equal(doc.Host.Accelerator, 'tcg');
    });

    it('exits 1 without a stack trace for an invalid configuration', () => {
      const r = run(['--config', qemuConfig('process-invalid', 'default_memory = 0'), 'env', '--json']);
      assert.equal(r.status, 1);
      assert.match(r.stderr, /KATA_ERR_CONFIG_VALUE/);
      assert.doesNotMatch(r.stderr, STACK_FRAME);
      assert.equal((JSON.parse(r.stdout) as EnvInfo).Runtime.Config.Valid, false);
    });
  });
});
