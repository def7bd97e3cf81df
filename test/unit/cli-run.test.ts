/**
 * `kata-runtime run`'s pure decisions and its early failures, without a VM: exit statuses for a
 * command that cannot be started, the guest files taken from KATA_TS_CACHE_DIR, and a non-root
 * user told that a sandbox needs root or KATA_TS_RUN_ROOT.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync } from 'node:fs';
import path from 'node:path';
import { execFailureStatus, withCacheDir } from '../../cli/run.js';
import { RUN_EXIT } from '../../cli/main.js';
import { KataError } from '../../core/errors.js';
import { findExecutable } from '../../core/child.js';
import { parseToml } from '../../core/config/parse.js';
import { TempDir } from '../helpers/tmp.js';
import { CLI, STACK_FRAME } from '../helpers/cli.js';

describe('kata-runtime run (no VM)', () => {
  describe('execFailureStatus', () => {
    const agentError = (what: string) => new KataError('KATA_ERR_AGENT_CALL', `agent CreateContainer failed: the agent at unix:///x answered INVALID_ARGUMENT: exec: "/nonexistent": ${what}`);
    it('is 127 for a command the agent cannot find, as docker and podman', () => {
      assert.equal(execFailureStatus(agentError('executable file not found in the container (root /r, PATH /bin)')), RUN_EXIT.NOT_FOUND);
      assert.equal(RUN_EXIT.NOT_FOUND, 127);
    });
    it('is 126 for a command that cannot be executed', () => {
      assert.equal(execFailureStatus(agentError('permission denied')), RUN_EXIT.CANNOT_EXECUTE);
      assert.equal(RUN_EXIT.CANNOT_EXECUTE, 126);
    });
    it('is undefined for other failures (they are runtime failures, 125)', () => {
      assert.equal(execFailureStatus(new KataError('KATA_ERR_AGENT_CALL', 'agent CreateContainer failed: mount /dev/vda: no such file or directory')), undefined);
      assert.equal(execFailureStatus(new KataError('KATA_ERR_AGENT_CLOSED', 'closed')), undefined);
    });
  });

  describe('withCacheDir', () => {
    const shipped = parseToml('[hypervisor.qemu]\nkernel = "/var/cache/kata-ts/guest/vmlinux"\ninitrd = "/var/cache/kata-ts/guest/initramfs.cpio.gz"\npath = "/usr/bin/qemu-system-x86_64"\n');
    const qemu = (raw: Record<string, unknown>) => (raw.hypervisor as Record<string, Record<string, unknown>>).qemu as Record<string, unknown>;

    it("takes the shipped guest files from KATA_TS_CACHE_DIR's guest directory", () => {
      const { raw, moved } = withCacheDir(shipped, { KATA_TS_CACHE_DIR: '/srv/cache' });
      assert.deepEqual([qemu(raw).kernel, qemu(raw).initrd, qemu(raw).path], ['/srv/cache/guest/vmlinux', '/srv/cache/guest/initramfs.cpio.gz', '/usr/bin/qemu-system-x86_64']);
      assert.deepEqual(moved.map((m) => m.key), ['hypervisor.qemu.kernel', 'hypervisor.qemu.initrd']);
      assert.equal(qemu(shipped).kernel, '/var/cache/kata-ts/guest/vmlinux', 'the parsed configuration is not changed');
    });

    it('leaves paths the administrator chose, and everything without KATA_TS_CACHE_DIR', () => {
      const own = parseToml('[hypervisor.qemu]\nkernel = "/opt/guest/vmlinux"\n');
      assert.deepEqual(withCacheDir(own, { KATA_TS_CACHE_DIR: '/srv/cache' }).moved, []);
      assert.deepEqual(withCacheDir(shipped, {}).moved, []);
    });
  });

  describe('as a non-root user', () => {
    let tmp: TempDir;
    before(function () {
      if (process.getuid?.() !== 0 || !findExecutable('setpriv')) this.skip();
      tmp = new TempDir('kata-run-nobody-');
      chmodSync(tmp.path, 0o755);
    });
    after(() => tmp?.cleanup());

    it('says that a sandbox needs root or KATA_TS_RUN_ROOT, with a code and no stack trace', () => {
      const config = tmp.file('configuration.toml', '[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\nkernel = "/k"\ninitrd = "/i"\nshared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"\n');
      const rootfs = tmp.file('rootfs.ext4', '\0'.repeat(2048));
      chmodSync(config, 0o644);
      chmodSync(rootfs, 0o644);
      const env = { ...process.env, KATA_CONF_FILE: '', KATA_TS_RUN_ROOT: '', HOME: tmp.path };
      const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, CLI, '--config', config, 'run', '--rootfs', rootfs, '--', 'true'], { encoding: 'utf8', env, cwd: tmp.path });
      assert.equal(r.status, RUN_EXIT.RUNTIME_FAILED, r.stderr);
      assert.match(r.stderr, /code: KATA_ERR_RUN_DIR/);
      assert.match(r.stderr, /fix: .*root.*KATA_TS_RUN_ROOT/);
      assert.match(r.stderr, new RegExp(`${path.sep}run${path.sep}kata-ts${path.sep}run-`));
      assert.doesNotMatch(r.stderr, STACK_FRAME);
      assert.doesNotMatch(r.stderr, /KATA_ERR_INTERNAL/);
    });
  });
});
