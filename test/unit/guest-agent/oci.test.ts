/**
 * OCI process → the busybox command lines the agent runs (guest/agent/oci.ts). The container's
 * setup script is also run by the host's sh with busybox stubbed out (a script recording each
 * call's argv), to prove it parses, reaches the ready handshake, and passes hostile values through
 * as plain arguments; the real chain runs in test/integration/guest-agent.test.ts.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readlinkSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import {
  DEFAULT_MOUNTS,
  READY_WORD,
  START_WORD,
  Script,
  addMounts,
  addUlimits,
  buildEnv,
  checkContainerId,
  checkHostname,
  checkMountOptions,
  checkSignal,
  execArgv,
  executableInRoot,
  exitStatus,
  finalChain,
  initArgv,
  initScript,
  lookPath,
  mountTargets,
  parsePasswd,
  resolveInRoot,
  resolveUser,
  secureJoin,
  openDirInRoot,
  readFileInRoot,
  MAX_USER_FILE_BYTES,
  type InitSpec,
  type ProcessPlan,
} from '../../../guest/agent/oci.js';
import { BUSYBOX } from '../../../guest/agent/sys.js';
import { TempDir } from '../../helpers/tmp.js';

const hasCode = (code: number) => (e: unknown) => e instanceof TtrpcError && e.code === code;

/** A script line with its parameters put back, for reading (never for running): `"${N}"` → the value, `"$b"` → `$b`. */
const expand = (s: Script, line: string) => line.replace(/"\$\{(\d+)\}"/g, (_, n: string) => s.params[Number(n) - 1] ?? '?').replaceAll('"$b"', '$b');

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

  describe('hostnames', () => {
    it('takes DNS-like names and refuses what busybox hostname would read as an option', () => {
      assert.equal(checkHostname('pod-1.example_x', 'hostname'), 'pod-1.example_x');
      for (const bad of ['-F/etc/shadow', '.x', 'a b', 'a;b', 'x'.repeat(65), '']) {
        assert.throws(() => checkHostname(bad, 'hostname'), hasCode(GrpcCode.INVALID_ARGUMENT), bad);
      }
    });
  });

  describe('environment and executable', () => {
    it('drops entries without a name and adds HOME when absent', () => {
      assert.deepEqual(buildEnv(['A=1', 'junk', '=x', 'B='], '/home/user'), ['A=1', 'B=', 'HOME=/home/user']);
      assert.deepEqual(buildEnv(['HOME=/x'], '/home/user'), ['HOME=/x']);
      assert.deepEqual(buildEnv([], undefined), ['HOME=/']);
    });

    it('adds TERM=xterm for a process with a terminal unless the spec sets TERM', () => {
      assert.deepEqual(buildEnv(['A=1'], '/root', true), ['A=1', 'HOME=/root', 'TERM=xterm']);
      assert.deepEqual(buildEnv(['TERM=vt100'], '/root', true), ['TERM=vt100', 'HOME=/root']);
      assert.deepEqual(buildEnv(['A=1'], '/root', false), ['A=1', 'HOME=/root']);
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
      const s = new Script();
      addUlimits(s, [
        { Type: 'RLIMIT_NOFILE', Hard: 4096n, Soft: 1024n },
        { Type: 'RLIMIT_CORE', Hard: 0xffff_ffff_ffff_ffffn, Soft: 1024n },
      ]);
      const [nofile, core] = s.lines.slice(1).map((l) => expand(s, l));
      assert.match(nofile as string, /ulimit -H -n 4096 && ulimit -S -n 1024/);
      assert.match(core as string, /ulimit -H -c unlimited && ulimit -S -c 2\b/);
      assert.match(core as string, /\|\| fail cannot set RLIMIT_CORE/);
    });

    it('refuses a type ash cannot set', () => {
      assert.throws(() => addUlimits(new Script(), [{ Type: 'RLIMIT_RTTIME', Hard: 1n, Soft: 1n }]), hasCode(GrpcCode.INVALID_ARGUMENT));
    });
  });

  describe('scripts', () => {
    it('put every interpolated value in a positional parameter, never in the text', () => {
      const s = new Script();
      const evil = `'; touch /x; "$(id)" \`id\` \${HOME}`;
      s.line`echo ${evil} ${42}`;
      assert.deepEqual(s.params, [BUSYBOX, evil, '42']);
      assert.deepEqual(s.lines, ['b="${1}"', 'echo "${2}" "${3}"']);
      assert.equal(s.text(true), 'b="${1}"\necho "${2}" "${3}"\nshift 3\nexec "$@"\n');
      assert.deepEqual(s.argv('name', ['/bin/true']), [BUSYBOX, 'sh', '-c', s.text(true), 'name', BUSYBOX, evil, '42', '/bin/true']);
    });
  });

  describe('mounts', () => {
    it('accepts the mount flags and, except on bind mounts, the known filesystem options', () => {
      const m = (type: string, options: string[]) => ({ destination: '/d', type, source: type, options });
      assert.deepEqual(checkMountOptions(m('bind', ['rbind', 'ro', 'nosuid', 'nodev', 'noexec', 'rprivate']), '/d'), ['rbind', 'ro', 'nosuid', 'nodev', 'noexec']);
      for (const d of DEFAULT_MOUNTS) assert.deepEqual(checkMountOptions(d, d.destination), d.options, d.destination);
      assert.deepEqual(checkMountOptions(m('tmpfs', ['size=10m', 'mode=1777', 'uid=0', 'nr_inodes=4k']), '/d'), ['size=10m', 'mode=1777', 'uid=0', 'nr_inodes=4k']);
    });

    it('refuses any other option with INVALID_ARGUMENT naming it: a shell payload, data options on a bind mount, bad values, remount', () => {
      const refused = (type: string, option: string) => {
        assert.throws(
          () => checkMountOptions({ destination: '/data', type, source: '/s', options: ['rbind', option].filter((o) => type === 'bind' || o !== 'rbind') }, '/data'),
          (e: unknown) => hasCode(GrpcCode.INVALID_ARGUMENT)(e) && (e as TtrpcError).statusMessage.includes(`option ${JSON.stringify(option)} is not supported`),
          `${type} ${option}`,
        );
      };
      refused('bind', 'nosuid;/bin/busybox ls / >/run/x;true');
      refused('bind', 'nosuid,exec');
      refused('bind', 'mode=0777');
      refused('bind', 'remount');
      refused('tmpfs', 'size=1m;reboot');
      refused('tmpfs', 'mode=$(id)');
      refused('tmpfs', 'newinstance=1');
      refused('tmpfs', 'context=x');
      refused('tmpfs', '');
      assert.throws(() => checkMountOptions({ destination: '/d', type: 'tmpfs;id', source: 'x', options: [] }, '/d'), hasCode(GrpcCode.INVALID_ARGUMENT));
      // Not a shell matter, but busybox mount would read it as an option.
      assert.throws(() => checkMountOptions({ destination: '/d', type: 'tmpfs', source: '-oexec,suid', options: [] }, '/d'), hasCode(GrpcCode.INVALID_ARGUMENT));
    });

    it('opens a working directory inside the root however the image links it (nsenter gets it by /proc/<agent>/fd), and refuses one that is missing or not a directory', async () => {
      const tmp = new TempDir('kata-ts-cwd-');
      try {
        const r = realpathSync(tmp.path);
        mkdirSync(path.join(r, 'app', 'sub'), { recursive: true });
        writeFileSync(path.join(r, 'app', 'file'), 'x');
        symlinkSync('/', path.join(r, 'work'));
        symlinkSync('app', path.join(r, 'rel'));
        for (const [cwd, want] of [['/work', r], ['/rel/sub', path.join(r, 'app', 'sub')], ['/work/../app', path.join(r, 'app')]] as const) {
          const h = await openDirInRoot(r, cwd);
          try {
            assert.equal(readlinkSync(`/proc/self/fd/${h.fd}`), want, cwd);
          } finally {
            await h.close();
          }
        }
        await assert.rejects(openDirInRoot(r, '/nowhere'), (e: TtrpcError) => e.code === GrpcCode.INVALID_ARGUMENT && /no such directory/.test(e.message));
        await assert.rejects(openDirInRoot(r, '/app/file'), hasCode(GrpcCode.INVALID_ARGUMENT));
      } finally {
        tmp.cleanup();
      }
    });

    it('reads /etc/passwd only when it is a regular file of at most 1 MiB: a FIFO does not block the agent, a huge file is not read', async function () {
      if (spawnSync('mkfifo', ['--version']).error) this.skip();
      const tmp = new TempDir('kata-ts-passwd-');
      try {
        const r = realpathSync(tmp.path);
        mkdirSync(path.join(r, 'etc'));
        writeFileSync(path.join(r, 'etc', 'passwd'), 'root:x:0:0::/root:/bin/sh\n');
        assert.equal(await readFileInRoot(r, '/etc/passwd'), 'root:x:0:0::/root:/bin/sh\n');
        assert.equal(spawnSync('mkfifo', [path.join(r, 'etc', 'group')]).status, 0);
        const t0 = Date.now();
        assert.equal(await readFileInRoot(r, '/etc/group'), undefined);
        assert.ok(Date.now() - t0 < 1000, 'a FIFO is not waited on');
        writeFileSync(path.join(r, 'etc', 'passwd'), Buffer.alloc(MAX_USER_FILE_BYTES + 1, 0x61));
        assert.equal(await readFileInRoot(r, '/etc/passwd'), undefined);
        assert.equal(await readFileInRoot(r, '/etc/shadow'), undefined);
      } finally {
        tmp.cleanup();
      }
    });

    it('resolves mount targets inside the root: symlinks absolute or climbing land in it, missing parts are kept', async () => {
      const tmp = new TempDir('kata-ts-targets-');
      try {
        const r = realpathSync(tmp.path);
        mkdirSync(path.join(r, 'run'));
        mkdirSync(path.join(r, 'var'));
        symlinkSync('/run', path.join(r, 'var', 'run'));
        symlinkSync('/', path.join(r, 'data'));
        symlinkSync('../../../../../../etc', path.join(r, 'up'));
        symlinkSync('loop', path.join(r, 'loop'));
        assert.equal(await secureJoin(r, '/var/run/secrets/token'), path.join(r, 'run', 'secrets', 'token'));
        assert.equal(await secureJoin(r, '/data'), r);
        assert.equal(await secureJoin(r, '/data/etc/passwd'), path.join(r, 'etc', 'passwd'));
        assert.equal(await secureJoin(r, '/up/x'), path.join(r, 'etc', 'x'));
        await assert.rejects(secureJoin(r, '/loop/x'), hasCode(GrpcCode.INVALID_ARGUMENT));
        const targets = await mountTargets(r, [{ destination: '/var/run/x', type: 'bind', source: '/s', options: [] }], [{ Path: '/up/fuse', Type: 'c', Major: 10n, Minor: 229n, FileMode: 0, UID: 0, GID: 0 }]);
        assert.deepEqual([...targets], [
          ['/var/run/x', path.join(r, 'run', 'x')],
          ['/up/fuse', path.join(r, 'etc', 'fuse')],
        ]);
        await assert.rejects(mountTargets(r, [{ destination: '/../etc', type: 'tmpfs', source: 'tmpfs', options: [] }], []), hasCode(GrpcCode.INVALID_ARGUMENT));
      } finally {
        tmp.cleanup();
      }
    });

    it("mounts containerd's defaults when the spec has none, and makes /dev usable", async () => {
      const s = new Script();
      addMounts(s, [], [], await mountTargets('/run/c1', [], []));
      const lines = s.lines.map((l) => expand(s, l)).join('\n');
      assert.match(lines, /\$b mount -t proc -o nosuid,noexec,nodev proc \/run\/c1\/proc/);
      assert.match(lines, /\$b mknod -m 666 \/run\/c1\/dev\/null c 1 3/);
      assert.match(lines, /\$b ln -sf \/proc\/self\/fd \/run\/c1\/dev\/fd/);
      assert.ok(lines.indexOf('/dev/null') < lines.indexOf('/run/c1/dev/pts'), 'nodes are made right after the /dev tmpfs');
    });

    it('bind-mounts guest paths, read-only by a remount, and skips cgroup mounts', async () => {
      const mounts = [
        { destination: '/etc/hosts', type: 'bind', source: '/run/shared/hosts', options: ['rbind', 'ro', 'rprivate'] },
        { destination: '/sys/fs/cgroup', type: 'cgroup', source: 'cgroup', options: [] },
      ];
      const s = new Script();
      addMounts(s, mounts, [], await mountTargets('/r', mounts, []));
      const text = s.lines.map((l) => expand(s, l)).join('\n');
      assert.match(text, /\$b mount -o rbind \/run\/shared\/hosts \/r\/etc\/hosts/);
      assert.match(text, /\$b mount -o remount,bind,ro \/r\/etc\/hosts/);
      assert.doesNotMatch(text, /cgroup/);
      assert.doesNotMatch(text, /rprivate/);
    });

    it('makes spec devices', async () => {
      const devices = [{ Path: '/dev/fuse', Type: 'c', Major: 10n, Minor: 229n, FileMode: 0o666, UID: 0, GID: 0 }];
      const s = new Script();
      const mounts = [{ destination: '/tmp', type: 'tmpfs', source: 'tmpfs', options: [] }];
      addMounts(s, mounts, devices, await mountTargets('/r', mounts, devices));
      const text = s.lines.map((l) => expand(s, l)).join('\n');
      assert.match(text, /\$b mknod -m 666 \/r\/dev\/fuse c 10 229 && \$b chown 0:0/);
    });
  });

  describe('command lines', () => {
    const spec = async (root: string, over: Partial<InitSpec> = {}): Promise<InitSpec> => {
      const base = { root, readonly: false, hostname: '', mounts: [], devices: [], cwdTarget: `${root}/work`, ...over };
      return { ...base, targets: await mountTargets(root, base.mounts, base.devices) };
    };

    it('runs the container init in new mount, pid and uts namespaces, then the process chrooted, as its user', async () => {
      const argv = initArgv(PLAN, await spec('/run/c1', { hostname: 'h1' }));
      assert.deepEqual(argv.slice(0, 10), ['/bin/busybox', 'unshare', '-m', '-u', '-p', '-f', '--propagation=private', '--', '/bin/busybox', 'sh']);
      assert.equal(argv[10], '-c');
      const script = argv[11] as string;
      assert.equal(argv[12], 'kata-ts-init');
      assert.match(script, new RegExp(`\n"\\$b" hostname "\\$\\{\\d+\\}"`));
      assert.ok(argv.includes('h1'));
      assert.match(script, /echo "\$\{\d+\}" >&3\nread -r go <&3 \|\| exit 1\n\[ "\$go" = "\$\{\d+\}" \] \|\| exit 1\nexec 3>&-\nshift \d+\nexec "\$@"\n$/);
      const shift = Number(/shift (\d+)/.exec(script)?.[1]);
      assert.deepEqual(argv.slice(13 + shift), finalChain(PLAN, { kind: 'root', root: '/run/c1' }), 'the chain follows the data');
      assert.deepEqual(argv.slice(13 + shift), [
        '/bin/busybox', 'env', '-i', '--', 'PATH=/bin', 'A=b c', 'HOME=/root', '/bin/busybox', 'nsenter', '-r/run/c1', '-w.', '-S', '1000', '-G', '100', '--', 'sh', '-c', "echo 'it''s'; exit 3",
      ]);
    });

    it("changes into the working directory in the script and checks where it landed is inside the root, so nsenter's -w is never a path into the container", async () => {
      const s = initScript(PLAN, await spec('/run/c1'));
      const script = s.lines.map((l) => expand(s, l)).join('\n');
      const cd = script.indexOf('cd -P -- /run/c1/work ');
      const check = script.indexOf('case "$(pwd -P)" in /run/c1|/run/c1/*) ;; *) fail cwd "/work" resolves outside the container\'s root ;; esac');
      const ready = script.indexOf('echo ready >&3');
      assert.ok(cd > 0 && cd < check && check < ready, script);
    });

    it('execs into the namespaces and root of the init, with no-new-privileges and rlimits when asked', () => {
      const target = { kind: 'ns', pid: 42, cwdDir: '/proc/7/fd/21' } as const;
      assert.deepEqual(finalChain({ ...PLAN, env: [], args: ['id'] }, target), [
        '/bin/busybox', 'env', '-i', '--', '/bin/busybox', 'nsenter', '-t', '42', '-m', '-u', '-p', '-r', '-w/proc/7/fd/21', '-S', '1000', '-G', '100', '--', 'id',
      ]);
      const nnp = finalChain({ ...PLAN, env: [], args: ['id'], noNewPrivileges: true }, target);
      assert.deepEqual(nnp.slice(4, 8), ['/bin/busybox', 'setpriv', '--nnp', '/bin/busybox']);
      assert.deepEqual(execArgv(PLAN, 42, '/proc/7/fd/21'), finalChain(PLAN, target), 'no shell without rlimits');
      const limited = execArgv({ ...PLAN, rlimits: [{ Type: 'RLIMIT_NOFILE', Hard: 10n, Soft: 10n }] }, 42, '/proc/7/fd/21');
      assert.deepEqual(limited.slice(0, 3), ['/bin/busybox', 'sh', '-c']);
      assert.match(limited[3] as string, /ulimit -H "\$\{\d\}" "\$\{\d\}"[\s\S]*shift \d+\nexec "\$@"\n$/);
      assert.equal(limited[4], 'kata-ts-exec');
      assert.deepEqual(limited.slice(-3), ['sh', '-c', "echo 'it''s'; exit 3"]);
    });

    it('makes a read-only root with a bind mount onto itself, remounted read-only after the mounts', async () => {
      const s = initScript(PLAN, await spec('/r', { readonly: true }));
      const script = s.lines.map((l) => expand(s, l)).join('\n');
      const bind = script.indexOf('$b mount --bind /r /r');
      const proc = script.indexOf('/r/proc');
      const ro = script.indexOf('$b mount -o remount,bind,ro /r ');
      assert.ok(bind >= 0 && bind < proc && proc < ro, script);
      assert.doesNotMatch(script, /hostname/, 'no hostname: the guest one');
    });

    describe('run by sh with busybox stubbed (records its calls)', () => {
      let tmp: TempDir;
      let root: string;
      let log: string;
      let stub: string;
      before(function () {
        if (spawnSync('sh', ['-c', 'true']).error) this.skip();
        tmp = new TempDir('kata-ts-setup-');
        root = path.join(realpathSync(tmp.path), 'rootfs');
        mkdirSync(path.join(root, 'work'), { recursive: true });
        log = path.join(tmp.path, 'calls');
        stub = path.join(tmp.path, 'busybox');
        // readlink is the host's; every other applet only records its argv (one record per call).
        writeFileSync(stub, '#!/bin/sh\nif [ "$1" = readlink ]; then shift; exec readlink "$@"; fi\nfor a in "$@"; do printf "%s\\037" "$a"; done >> "$LOG"\nprintf "\\036" >> "$LOG"\n', { mode: 0o755 });
      });
      after(() => tmp?.cleanup());

      /** Runs the init's setup up to the handshake: what it said on fd 3 and the busybox calls it made. */
      const runSetup = (s: Script) => {
        writeFileSync(log, '');
        const params = [stub, ...s.params.slice(1)];
        const text = s.text(false).replace('read -r go <&3 || exit 1', 'go=start') + 'echo "go=$go"\n';
        const r = spawnSync('sh', ['-c', text, 'kata-ts-init', ...params], {
          encoding: 'utf8',
          cwd: tmp.path,
          env: { PATH: process.env.PATH, LOG: log },
          stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
        });
        const calls = readFileSync(log, 'utf8').split('\x1e').filter(Boolean).map((c) => c.split('\x1f').slice(0, -1));
        return { status: r.status, stdout: r.stdout, fd3: (r.output[3] as string | null) ?? '', stderr: r.stderr, calls };
      };

      it('reaches the ready handshake, each busybox call with its own arguments', async () => {
        const s = initScript({ ...PLAN, rlimits: [{ Type: 'RLIMIT_NOFILE', Hard: 512n, Soft: 256n }] }, await spec(root, { hostname: 'h' }));
        const r = runSetup(s);
        assert.equal(r.status, 0, r.stderr + r.fd3);
        assert.match(r.stdout, /go=start/);
        assert.equal(r.fd3, `${READY_WORD}\n`);
        assert.deepEqual(r.calls[0], ['hostname', 'h']);
        assert.ok(r.calls.some((c) => c.join(' ') === `mount -t proc -o nosuid,noexec,nodev proc ${root}/proc`), JSON.stringify(r.calls));
        assert.equal(START_WORD, 'start');
      });

      it('passes hostile paths and sources through as single arguments: nothing they hold runs', async () => {
        const marker = path.join(tmp.path, 'pwned');
        const payload = `;touch ${marker};#`;
        const sub = '$(touch pwned)'; // sh runs in tmp.path: this would make the marker too
        const src = path.join(tmp.path, `src ${sub}`);
        mkdirSync(src);
        const mounts = [
          { destination: `/data${payload}`, type: 'bind', source: src, options: ['rbind', 'ro'] },
          { destination: `/t\`touch ${marker}\``, type: 'tmpfs', source: `tmpfs${payload}`, options: ['size=1m'] },
        ];
        const s = initScript(PLAN, await spec(root, { hostname: 'h', mounts }));
        for (const v of [payload, sub, marker]) assert.ok(!s.text(true).includes(v), `the script's text holds no value (${v})`);
        const r = runSetup(s);
        assert.equal(r.status, 0, r.stderr + r.fd3);
        assert.equal(existsSync(marker), false, 'no payload ran');
        const made = (argv: string[]) => r.calls.some((c) => c.join('\0') === argv.join('\0'));
        assert.deepEqual(r.calls[0], ['hostname', 'h']);
        assert.ok(made(['mount', '-o', 'rbind', src, `${root}/data${payload}`]), JSON.stringify(r.calls));
        assert.ok(made(['mount', '-o', 'remount,bind,ro', `${root}/data${payload}`]), JSON.stringify(r.calls));
        assert.ok(made(['mount', '-t', 'tmpfs', '-o', 'size=1m', `tmpfs${payload}`, `${root}/t\`touch ${marker}\``]), JSON.stringify(r.calls));
      });

      it('ends in the working directory, and stops when that has become a symlink out of the root since it was resolved', async () => {
        const ok = runSetup(initScript({ ...PLAN, args: ['true'] }, await spec(root)));
        assert.equal(ok.fd3, `${READY_WORD}\n`, ok.stderr);
        // The image's /work2 → / was resolved inside the root; then it became a link out of it.
        const s = initScript(PLAN, await spec(root, { cwdTarget: path.join(root, 'work2') }));
        symlinkSync(tmp.path, path.join(root, 'work2'));
        const r = runSetup(s);
        assert.notEqual(r.status, 0);
        assert.equal(r.fd3, `cwd "/work" resolves outside the container's root\n`);
        const missing = runSetup(initScript(PLAN, await spec(root, { cwdTarget: path.join(root, 'nowhere') })));
        assert.equal(missing.fd3, `chdir to cwd "/work": no such directory in the container\n`);
      });

      it('stops before mounting on a target that has become a symlink out of the root since it was resolved', async () => {
        const mounts = [{ destination: '/late/x', type: 'tmpfs', source: 'tmpfs', options: [] }];
        const targets = await mountTargets(root, mounts, []);
        // What an earlier mount in the list could bring: a symlink on the way out of the root.
        symlinkSync(tmp.path, path.join(root, 'late'));
        const r = runSetup(initScript(PLAN, { root, readonly: false, hostname: '', mounts, devices: [], targets, cwdTarget: path.join(root, 'work') }));
        assert.notEqual(r.status, 0);
        assert.equal(r.fd3, "/late/x resolves outside the container's root\n");
        assert.deepEqual(r.calls, [], 'no mkdir, no mount');
      });
    });
  });
});
