/**
 * OCI process → the busybox command lines the agent runs (guest/agent/oci.ts). The container's
 * setup script is also run by the host's sh with busybox stubbed out, to prove it parses and
 * reaches the ready handshake; the real chain runs in test/integration/guest-agent.test.ts.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import {
  DEFAULT_MOUNTS,
  READY_WORD,
  START_WORD,
  buildEnv,
  checkContainerId,
  checkSignal,
  execArgv,
  executableInRoot,
  exitStatus,
  finalChain,
  initArgv,
  initScript,
  lookPath,
  mountLines,
  parsePasswd,
  resolveInRoot,
  resolveUser,
  shq,
  ulimitLines,
  type ProcessPlan,
} from '../../../guest/agent/oci.js';
import { TempDir } from '../../helpers/tmp.js';

const hasCode = (code: number) => (e: unknown) => e instanceof TtrpcError && e.code === code;

const PLAN: ProcessPlan = {
  args: ['sh', '-c', "echo 'it''s'; exit 3"],
  env: ['PATH=/bin', 'A=b c', 'HOME=/root'],
  cwd: '/work',
  uid: 1000,
  gid: 100,
  noNewPrivileges: false,
  rlimits: [],
};

const PASSWD = 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:User:/home/user:/bin/sh\n# comment\nbroken line\n';
const GROUP = 'root:x:0:\nstaff:x:50:user\n';

describe('guest agent: OCI process to command line', () => {
  describe('ids and signals', () => {
    it('accepts kata-agent container ids and refuses others with INVALID_ARGUMENT', () => {
      for (const ok of ['c1', 'abc-DEF_1.2', '0a']) assert.doesNotThrow(() => checkContainerId(ok));
      for (const bad of ['', 'a', '-ab', '.ab', 'a/b', 'a b', '../x']) assert.throws(() => checkContainerId(bad), hasCode(GrpcCode.INVALID_ARGUMENT), bad);
    });

    it('takes signal numbers 0..64', () => {
      assert.equal(checkSignal(9), 9);
      assert.equal(checkSignal(0), 0);
      for (const bad of [-1, 65, 1.5]) assert.throws(() => checkSignal(bad), hasCode(GrpcCode.INVALID_ARGUMENT));
    });
  });

  describe('exit status', () => {
    it('is the exit code, or 128 + the signal that ended the process', () => {
      assert.equal(exitStatus(3, null), 3);
      assert.equal(exitStatus(0, null), 0);
      assert.equal(exitStatus(null, 'SIGKILL'), 137);
      assert.equal(exitStatus(null, 'SIGTERM'), 143);
      assert.equal(exitStatus(null, 'SIGSEGV'), 139);
    });
  });

  describe('users', () => {
    it('uses the OCI uid and gid, and the home of that uid', () => {
      assert.deepEqual(resolveUser({ UID: 1000, GID: 100, AdditionalGids: [], Username: '' }, undefined, { passwd: PASSWD }), { uid: 1000, gid: 100, home: '/home/user' });
      assert.deepEqual(resolveUser(undefined, undefined, {}), { uid: 0, gid: 0, home: undefined });
    });

    it('resolves StringUser names and numbers in the container files, the user primary group by default', () => {
      const files = { passwd: PASSWD, group: GROUP };
      assert.deepEqual(resolveUser(undefined, { uid: 'user', gid: '', additionalGids: [] }, files), { uid: 1000, gid: 1000, home: '/home/user' });
      assert.deepEqual(resolveUser(undefined, { uid: 'user', gid: 'staff', additionalGids: [] }, files), { uid: 1000, gid: 50, home: '/home/user' });
      assert.deepEqual(resolveUser(undefined, { uid: '42', gid: '7', additionalGids: [] }, files), { uid: 42, gid: 7, home: undefined });
      assert.deepEqual(resolveUser({ UID: 0, GID: 0, AdditionalGids: [], Username: 'user' }, undefined, files), { uid: 1000, gid: 1000, home: '/home/user' });
    });

    it('refuses unknown names with INVALID_ARGUMENT', () => {
      assert.throws(() => resolveUser(undefined, { uid: 'nobody', gid: '', additionalGids: [] }, { passwd: PASSWD }), hasCode(GrpcCode.INVALID_ARGUMENT));
      assert.throws(() => resolveUser(undefined, { uid: '0', gid: 'wheel', additionalGids: [] }, { group: GROUP }), hasCode(GrpcCode.INVALID_ARGUMENT));
    });

    it('skips malformed passwd lines', () => {
      assert.deepEqual(parsePasswd(PASSWD).map((e) => e.name), ['root', 'user']);
    });
  });

  describe('environment and executable', () => {
    it('drops entries without a name and adds HOME when absent', () => {
      assert.deepEqual(buildEnv(['A=1', 'junk', '=x', 'B='], '/home/user'), ['A=1', 'B=', 'HOME=/home/user']);
      assert.deepEqual(buildEnv(['HOME=/x'], '/home/user'), ['HOME=/x']);
      assert.deepEqual(buildEnv([], undefined), ['HOME=/']);
    });

    it('looks the program up in the container PATH, as execvp will, and answers its full path', async () => {
      const there = new Set(['/usr/bin/env', '/bin/sh', '/work/run.sh', '/opt/tool']);
      const executable = async (p: string) => there.has(p);
      assert.equal(await lookPath('sh', ['PATH=/usr/local/bin:/bin'], '/', executable), '/bin/sh');
      assert.equal(await lookPath('env', [], '/', executable), '/usr/bin/env', 'glibc default /bin:/usr/bin without PATH');
      assert.equal(await lookPath('/opt/tool', ['PATH=/bin'], '/', executable), '/opt/tool');
      assert.equal(await lookPath('./run.sh', ['PATH=/bin'], '/work', executable), './run.sh', 'a relative path stays relative to the cwd');
      assert.equal(await lookPath('tool', ['PATH=/bin'], '/', executable), undefined);
    });

    it('resolves symlinks inside the container root, absolute ones included, never above it', async () => {
      const tmp = new TempDir('kata-ts-root-');
      try {
        const r = tmp.path;
        mkdirSync(path.join(r, 'bin'));
        mkdirSync(path.join(r, 'usr', 'bin'), { recursive: true });
        writeFileSync(path.join(r, 'bin', 'busybox'), '', { mode: 0o755 });
        writeFileSync(path.join(r, 'bin', 'data'), '', { mode: 0o644 });
        symlinkSync('busybox', path.join(r, 'bin', 'sh'));
        symlinkSync('/bin/sh', path.join(r, 'usr', 'bin', 'sh'));
        symlinkSync('../../../../../bin/busybox', path.join(r, 'usr', 'bin', 'climb'));
        symlinkSync('/nowhere', path.join(r, 'bin', 'dangling'));
        symlinkSync('loop', path.join(r, 'bin', 'loop'));
        assert.equal(await resolveInRoot(r, '/usr/bin/sh'), path.join(r, 'bin', 'busybox'));
        assert.equal(await resolveInRoot(r, '/usr/bin/climb'), path.join(r, 'bin', 'busybox'), '.. stops at the root');
        assert.equal(await resolveInRoot(r, '/bin/dangling'), undefined);
        assert.equal(await resolveInRoot(r, '/bin/loop'), undefined);
        assert.equal(await executableInRoot(r, '/usr/bin/sh'), true);
        assert.equal(await executableInRoot(r, '/bin/data'), false, 'no execute bit');
        assert.equal(await executableInRoot(r, '/bin'), false, 'a directory');
        assert.equal(await executableInRoot(r, '/bin/dangling'), false);
      } finally {
        tmp.cleanup();
      }
    });
  });

  describe('rlimits', () => {
    it('sets each with ash ulimit in its unit, infinity as unlimited', () => {
      const [nofile, core] = ulimitLines([
        { Type: 'RLIMIT_NOFILE', Hard: 4096n, Soft: 1024n },
        { Type: 'RLIMIT_CORE', Hard: 0xffff_ffff_ffff_ffffn, Soft: 1024n },
      ]);
      assert.match(nofile as string, /ulimit -H -n 4096 && ulimit -S -n 1024/);
      assert.match(core as string, /ulimit -H -c unlimited && ulimit -S -c 2\b/);
      assert.match(core as string, /\|\| fail /);
    });

    it('refuses a type ash cannot set', () => {
      assert.throws(() => ulimitLines([{ Type: 'RLIMIT_RTTIME', Hard: 1n, Soft: 1n }]), hasCode(GrpcCode.INVALID_ARGUMENT));
    });
  });

  describe('mounts', () => {
    it("mounts containerd's defaults when the spec has none, and makes /dev usable", () => {
      const lines = mountLines('/run/c1', [], []).join('\n');
      for (const m of DEFAULT_MOUNTS) assert.ok(lines.includes(`'/run/c1${m.destination}'`), m.destination);
      assert.match(lines, /mount -t 'proc' -o 'nosuid,noexec,nodev' 'proc' '\/run\/c1\/proc'/);
      assert.match(lines, /mknod -m 666 '\/run\/c1\/dev\/null' c 1 3/);
      assert.match(lines, /ln -sf '\/proc\/self\/fd' '\/run\/c1\/dev\/fd'/);
      assert.ok(lines.indexOf('/dev/null') < lines.indexOf('/run/c1/dev/pts'), 'nodes are made right after the /dev tmpfs');
    });

    it('bind-mounts guest paths, read-only by a remount, and skips cgroup mounts', () => {
      const lines = mountLines(
        '/r',
        [
          { destination: '/etc/hosts', type: 'bind', source: '/run/shared/hosts', options: ['rbind', 'ro', 'rprivate'] },
          { destination: '/sys/fs/cgroup', type: 'cgroup', source: 'cgroup', options: [] },
        ],
        [],
      );
      const text = lines.join('\n');
      assert.match(text, /mount -o rbind '\/run\/shared\/hosts' '\/r\/etc\/hosts'/);
      assert.match(text, /mount -o remount,bind,ro '\/r\/etc\/hosts'/);
      assert.doesNotMatch(text, /cgroup/);
      assert.doesNotMatch(text, /rprivate/);
    });

    it('refuses destinations that climb out of the root, and makes spec devices', () => {
      assert.throws(() => mountLines('/r', [{ destination: '/../etc', type: 'tmpfs', source: 'tmpfs', options: [] }], []), hasCode(GrpcCode.INVALID_ARGUMENT));
      const [dev] = mountLines('/r', [{ destination: '/tmp', type: 'tmpfs', source: 'tmpfs', options: [] }], [
        { Path: '/dev/fuse', Type: 'c', Major: 10n, Minor: 229n, FileMode: 0o666, UID: 0, GID: 0 },
      ]).slice(1);
      assert.match(dev as string, /mknod -m 666 '\/r\/dev\/fuse' c 10 229 && .* chown 0:0/);
    });
  });

  describe('command lines', () => {
    it('runs the container init in new mount, pid and uts namespaces, then the process chrooted, as its user', () => {
      const argv = initArgv(PLAN, { root: '/run/c1', readonly: false, hostname: 'h1', mounts: [], devices: [] });
      assert.deepEqual(argv.slice(0, 10), ['/bin/busybox', 'unshare', '-m', '-u', '-p', '-f', '--propagation=private', '--', '/bin/busybox', 'sh']);
      assert.equal(argv[10], '-c');
      const script = argv[11] as string;
      assert.match(script, /hostname 'h1'/);
      assert.match(script, new RegExp(`echo ${READY_WORD} >&3\nread -r go <&3 \\|\\| exit 1\n\\[ "\\$go" = ${START_WORD} \\]`));
      assert.match(script, /exec '\/bin\/busybox' 'env' '-i' '--' 'PATH=\/bin' 'A=b c' 'HOME=\/root' '\/bin\/busybox' 'nsenter' '-r\/run\/c1' '-w\/run\/c1\/work' '-S' '1000' '-G' '100' '--' 'sh' '-c' 'echo '\\''it'\\'''\\''s'\\''; exit 3'\n$/);
    });

    it('execs into the namespaces and root of the init, with no-new-privileges and rlimits when asked', () => {
      assert.deepEqual(finalChain({ ...PLAN, env: [], args: ['id'] }, { kind: 'ns', pid: 42 }), [
        '/bin/busybox', 'env', '-i', '--', '/bin/busybox', 'nsenter', '-t', '42', '-m', '-u', '-p', '-r', '-w/proc/42/root/work', '-S', '1000', '-G', '100', '--', 'id',
      ]);
      const nnp = finalChain({ ...PLAN, env: [], args: ['id'], noNewPrivileges: true }, { kind: 'ns', pid: 42 });
      assert.deepEqual(nnp.slice(4, 8), ['/bin/busybox', 'setpriv', '--nnp', '/bin/busybox']);
      const limited = execArgv({ ...PLAN, rlimits: [{ Type: 'RLIMIT_NOFILE', Hard: 10n, Soft: 10n }] }, 42);
      assert.deepEqual(limited.slice(0, 2), ['/bin/busybox', 'sh']);
      assert.match(limited[3] as string, /ulimit -H -n 10[\s\S]*exec "\$@"$/);
      assert.equal(limited[5], '/bin/busybox');
    });

    it('makes a read-only root with a bind mount onto itself, remounted read-only after the mounts', () => {
      const script = initScript(PLAN, { root: '/r', readonly: true, hostname: '', mounts: [], devices: [] });
      const bind = script.indexOf("mount --bind '/r' '/r'");
      const proc = script.indexOf("'/r/proc'");
      const ro = script.indexOf("mount -o remount,bind,ro '/r'");
      assert.ok(bind >= 0 && bind < proc && proc < ro, script);
      assert.doesNotMatch(script, /hostname/, 'no hostname: the guest one');
    });

    it('quotes every word for sh', function () {
      assert.equal(shq("a'b"), `'a'\\''b'`);
      const sh = spawnSync('sh', ['-c', `printf '%s\\n' ${['a b', "it's", '$HOME', '`x`', '"q"'].map(shq).join(' ')}`], { encoding: 'utf8' });
      if (sh.error) this.skip();
      assert.equal(sh.stdout, 'a b\nit\'s\n$HOME\n`x`\n"q"\n');
    });

    it('is a script sh runs up to the ready handshake (mounts stubbed)', function () {
      const script = initScript({ ...PLAN, rlimits: [{ Type: 'RLIMIT_NOFILE', Hard: 512n, Soft: 256n }] }, { root: '/r', readonly: false, hostname: 'h', mounts: [], devices: [] });
      // Replace busybox with a function that only records, and stop before the exec.
      const stubbed = `bb() { echo "bb $*" >&2; }\n${script.replaceAll('/bin/busybox ', 'bb ').replace(/\nexec '\/bin\/busybox'[\s\S]*$/, '\necho "go=$go"\n')}`;
      const r = spawnSync('sh', ['-c', `${stubbed.replace('read -r go <&3', 'go=start')}`, 'x'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe', 'pipe'] });
      if (r.error) this.skip();
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stdout, /go=start/);
      assert.match(r.stderr, /bb hostname h\n/);
      assert.match(r.stderr, /bb mount -t proc -o nosuid,noexec,nodev proc \/r\/proc/);
    });
  });
});
