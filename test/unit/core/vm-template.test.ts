import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { judgeConfig, loadValidatedConfig } from '../../../core/runtime.js';
import { TEMPLATE_CAPABILITY, resolveTemplateDir, templateFingerprint, templateLayout, templateStatus } from '../../../core/template-files.js';
import type { KataError } from '../../../core/errors.js';
import { processStartTime } from '../../../core/run-dirs.js';
import { destroyTemplate, initTemplate, takeInitLock } from '../../../core/template.js';
import { renderQemuArgv, substituteTokens, type QemuLaunchSpec } from '../../../plugins/qemu/index.js';
import { applyTemplateRole, checkTemplateAccelerator, recordTemplateAccelerator, reserveNicPorts, VMGENID_ID } from '../../../plugins/qemu/template.js';
import { TempDir } from '../../helpers/tmp.js';

const FIRMWARE = '/usr/share/ovmf/OVMF.inteltdx.fd';

function qemu(extra = '', factory = 'enable_template = true\ntemplate_path = "/run/vc/vm/template"'): string {
  return `[hypervisor.qemu]\nkernel = "/k"\ninitrd = "/i"\ndefault_memory = 512\nshared_fs = "virtio-9p"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"\n${extra}\n[factory]\n${factory}\n`;
}

describe('VM templating in the validated config phase', () => {
  it('accepts enable_template with qemu, whose plugin declares vm:template', async () => {
    const j = await judgeConfig({ text: qemu() });
    assert.deepEqual(j.problems, []);
    assert.ok(j.capabilities.some((c) => c.name === TEMPLATE_CAPABILITY && c.by === 'qemu'));
  });

  it('refuses enable_template with Cloud Hypervisor through the missing vm:template capability', async () => {
    const j = await judgeConfig({ text: `[hypervisor.clh]\nkernel = "/k"\ninitrd = "/i"\nshared_fs = "none"\n[factory]\nenable_template = true\n` });
    assert.equal(j.valid, false);
    const p = j.problems.find((x) => x.key === 'factory.enable_template');
    assert.ok(p, JSON.stringify(j.problems));
    assert.equal(p.code, 'KATA_ERR_CAPABILITY_MISSING');
    assert.equal(p.plugin, 'core');
    assert.match(p.reason, /vm:template/);
  });

  it('refuses enable_template with virtio-fs on QEMU (a clone cannot share its private RAM with virtiofsd)', async () => {
    const j = await judgeConfig({ text: qemu('virtio_fs_daemon = "/usr/libexec/virtiofsd"').replace('shared_fs = "virtio-9p"', 'shared_fs = "virtio-fs"') });
    assert.equal(j.problems.find((x) => x.key === 'factory.enable_template')?.code, 'KATA_ERR_CAPABILITY_MISSING');
  });

  it('lets the tdx plugin veto enable_template, with a reason and a fix', async () => {
    const text = `[hypervisor.qemu]\nkernel = "/k"\ninitrd = "/i"\nfirmware = "${FIRMWARE}"\nconfidential_guest = true\nshared_fs = "none"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"\n[factory]\nenable_template = true\n`;
    const j = await judgeConfig({ text });
    const p = j.problems.find((x) => x.key === 'factory.enable_template');
    assert.ok(p, JSON.stringify(j.problems));
    assert.equal(p.code, 'KATA_ERR_CONFIG_VETO');
    assert.equal(p.plugin, 'tdx');
    assert.ok(p.fix && p.fix.includes('enable_template = false'));
  });

  for (const bad of ['relative/path', '/tmp/a b', '/tmp/../etc', '/tmp/x;reboot', '/tmp/$(id)', '/run/vc/vm/template/', '/run//vc/vm/template', '/run/./vc']) {
    it(`refuses template_path ${JSON.stringify(bad)}: it would reach QEMU's exec: migration command, or name a directory two ways`, async () => {
      const j = await judgeConfig({ text: qemu('', `enable_template = true\ntemplate_path = ${JSON.stringify(bad)}`) });
      const p = j.problems.find((x) => x.key === 'factory.template_path');
      assert.equal(p?.code, 'KATA_ERR_CONFIG_VALUE');
    });
  }

  it('does not judge template_path while templating is off', async () => {
    const j = await judgeConfig({ text: qemu('', 'enable_template = false\ntemplate_path = "relative"') });
    assert.deepEqual(j.problems, []);
  });
});

describe('QEMU launch description for template roles', () => {
  const files = { dir: '/run/t', memoryFile: '/run/t/memory', stateFile: '/run/t/state' };
  const argvFor = async (role?: 'save' | 'clone', extra = '') => {
    const v = await loadValidatedConfig({ text: qemu(extra) });
    // The plan's own launch description, as the driver gets it.
    const spec = substituteTokens(v.plan.vm.native as QemuLaunchSpec, { sandboxDir: '/run/sb' });
    if (role) applyTemplateRole(spec, { role, files });
    return renderQemuArgv(spec, { accelerator: 'tcg' });
  };

  it('maps the template RAM shared for the template and privately for a clone, with a vmgenid device; only the clone waits for an incoming state', async () => {
    const save = await argvFor('save');
    const clone = await argvFor('clone');
    const cold = await argvFor();
    const ram = (argv: string[]) => argv[argv.findIndex((a) => a.startsWith('memory-backend-file,id=guest-ram'))];
    assert.equal(ram(save), 'memory-backend-file,id=guest-ram,size=512M,mem-path=/run/t/memory,share=on');
    assert.equal(ram(clone), 'memory-backend-file,id=guest-ram,size=512M,mem-path=/run/t/memory,share=off');
    assert.equal(ram(cold), undefined);
    for (const argv of [save, clone]) {
      assert.ok(argv[argv.indexOf('-machine') + 1]?.includes('memory-backend=guest-ram'));
      assert.ok(argv.includes(`vmgenid,id=${VMGENID_ID},guid=auto`));
    }
    assert.deepEqual(clone.slice(clone.indexOf('-incoming') - 1, clone.indexOf('-incoming') + 2), ['-S', '-incoming', 'defer']);
    assert.equal(save.includes('-incoming'), false);
    // Everything else is the same machine: the saved device state must fit the clone.
    const strip = (argv: string[]) => argv.filter((a) => !a.startsWith('memory-backend-file') && !['-S', '-incoming', 'defer'].includes(a));
    assert.deepEqual(strip(save), strip(clone));
  });

  it('leaves the free-page-reporting balloon out of a template and a clone (a clone would punch holes in the template file), not out of a cold boot', async () => {
    const balloon = (argv: string[]) => argv.filter((a) => a.startsWith('virtio-balloon-pci'));
    const reclaim = 'reclaim_guest_freed_memory = true';
    assert.deepEqual(balloon(await argvFor(undefined, reclaim)), ['virtio-balloon-pci,id=balloon0,free-page-reporting=on']);
    assert.deepEqual(balloon(await argvFor('save', reclaim)), []);
    assert.deepEqual(balloon(await argvFor('clone', reclaim)), []);
  });

  it("keeps the last hot-plug root ports for a clone's network interfaces, and refuses when none would be left for the rootfs disk", () => {
    const spec = { hotplugPorts: ['rp0', 'rp1', 'rp2', 'rp3'] };
    assert.deepEqual(reserveNicPorts(spec, 0), []);
    assert.deepEqual(reserveNicPorts(spec, 2), ['rp2', 'rp3']);
    assert.deepEqual(spec.hotplugPorts, ['rp0', 'rp1', 'rp2', 'rp3'], 'the ports stay in the launch description');
    assert.throws(() => reserveNicPorts(spec, 4), { code: 'KATA_ERR_VM_START' });
    assert.throws(() => reserveNicPorts({ hotplugPorts: [] }, 1), { code: 'KATA_ERR_VM_START' });
  });

  it('refuses template files whose path could change the meaning of the exec: command', async () => {
    const v = await loadValidatedConfig({ text: qemu() });
    const spec = substituteTokens(v.plan.vm.native as QemuLaunchSpec, { sandboxDir: '/run/sb' });
    assert.throws(() => applyTemplateRole(spec, { role: 'clone', files: { ...files, memoryFile: '/run/t/m;reboot' } }), { code: 'KATA_ERR_INTERNAL' });
  });
});

describe('the accelerator a QEMU template was saved under', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir('kata-tmpl-accel-')));
  afterEach(() => tmp.cleanup());

  it('lets a clone restore only under the accelerator the template was saved under (accelerator = "auto" is resolved at start)', async () => {
    const files = templateLayout(tmp.path);
    await assert.rejects(checkTemplateAccelerator(files, 'tcg'), (e: KataError) => e.code === 'KATA_ERR_TEMPLATE' && /unknown accelerator/.test(e.message));
    await recordTemplateAccelerator(files, 'tcg');
    await checkTemplateAccelerator(files, 'tcg');
    await assert.rejects(checkTemplateAccelerator(files, 'kvm'), (e: KataError) => {
      assert.equal(e.code, 'KATA_ERR_TEMPLATE');
      assert.equal(e.key, 'hypervisor.qemu.accelerator');
      assert.match(e.message, /saved under QEMU's tcg, and this VM runs under kvm/);
      assert.match(e.fix ?? '', /factory destroy/);
      return true;
    });
  });
});

describe('template status', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir('kata-tmpl-unit-')));
  afterEach(() => tmp.cleanup());

  async function setup(memoryBytes = 512 * 1024 * 1024) {
    const dir = path.join(tmp.path, 'tpl');
    const v = await loadValidatedConfig({ text: qemu('', `enable_template = true\ntemplate_path = "${dir}"`) });
    const files = templateLayout(dir);
    mkdirSync(dir);
    writeFileSync(files.memoryFile, '');
    truncateSync(files.memoryFile, memoryBytes);
    writeFileSync(files.stateFile, 'QEVM');
    const { fingerprint } = await templateFingerprint(v.plan);
    writeFileSync(files.metaFile, JSON.stringify({ format: 1, fingerprint }));
    return { v, files, dir };
  }

  it('says a complete template made for this configuration is usable', async () => {
    const { v } = await setup();
    const s = await templateStatus(v.config, v.plan);
    assert.equal(s.usable, true, s.reason);
  });

  it('says why a template is not usable: no template, no template.json, a missing memory file, a memory size or a fingerprint that does not match', async () => {
    const { v, files } = await setup();
    const reason = async () => (await templateStatus(v.config, v.plan)).reason ?? '';
    writeFileSync(files.metaFile, JSON.stringify({ format: 1, fingerprint: 'f00' }));
    assert.match(await reason(), /another configuration/);
    writeFileSync(files.metaFile, 'not json');
    assert.match(await reason(), /incomplete/);
    const { fingerprint } = await templateFingerprint(v.plan);
    writeFileSync(files.metaFile, JSON.stringify({ format: 1, fingerprint }));
    truncateSync(files.memoryFile, 1024);
    assert.match(await reason(), /not the 512 MiB/);
    rmSync(files.memoryFile);
    assert.match(await reason(), /memory file .* is missing/);
    rmSync(files.dir, { recursive: true });
    const s = await templateStatus(v.config, v.plan);
    assert.equal(s.exists, false);
    assert.match(s.reason ?? '', /no template/);
  });

  it('changes the fingerprint when what shapes the VM changes (memory, kernel parameters)', async () => {
    const a = await loadValidatedConfig({ text: qemu() });
    const b = await loadValidatedConfig({ text: qemu().replace('default_memory = 512', 'default_memory = 384') });
    const c = await loadValidatedConfig({ text: qemu('kernel_params = "quiet"') });
    const fp = async (x: typeof a) => (await templateFingerprint(x.plan)).fingerprint;
    assert.equal(await fp(a), await fp(await loadValidatedConfig({ text: qemu() })));
    assert.notEqual(await fp(a), await fp(b));
    assert.notEqual(await fp(a), await fp(c));
  });

  it('factory init refuses a configuration without enable_template, with a coded error', async () => {
    const v = await loadValidatedConfig({ text: qemu('', 'enable_template = false') });
    await assert.rejects(initTemplate(v), { code: 'KATA_ERR_TEMPLATE', key: 'factory.enable_template' });
  });

  it('lets one factory init at a time hold the template lock, and takes over a lock whose process is gone', async () => {
    const dir = path.join(tmp.path, 'tpl');
    const release = await takeInitLock(dir);
    await assert.rejects(takeInitLock(dir), (e: KataError) => e.code === 'KATA_ERR_TEMPLATE' && e.message.includes(`pid ${process.pid}`));
    await release();
    // A pid above the kernel's maximum (4194304) belongs to no process.
    writeFileSync(`${dir}.lock`, '4194305\n');
    const again = await takeInitLock(dir);
    const mine = readFileSync(`${dir}.lock`, 'utf8');
    assert.match(mine, new RegExp(`^${process.pid} \\d+\n$`), 'the lock names this process by pid and start time');
    await again();
    assert.equal(existsSync(`${dir}.lock`), false);
    // This pid with another start time: the pid was reused by a process that is not an init.
    writeFileSync(`${dir}.lock`, `${process.pid} 1\n`);
    const third = await takeInitLock(dir);
    // A release does not remove a lock that is no longer its own; a live holder (pid 1, its own
    // start time) keeps it.
    const init = `1 ${processStartTime(1)}\n`;
    writeFileSync(`${dir}.lock`, init);
    await third();
    assert.equal(readFileSync(`${dir}.lock`, 'utf8'), init);
    await assert.rejects(takeInitLock(dir), (e: KataError) => e.code === 'KATA_ERR_TEMPLATE' && e.key === 'factory.template_path' && /\(pid 1\) holds the template lock/.test(e.message));
    rmSync(`${dir}.lock`);
  });

  it('destroy takes the same lock: it refuses while an init holds it', async () => {
    const { files } = await setup();
    const release = await takeInitLock(files.dir);
    await assert.rejects(destroyTemplate(files.dir), (e: KataError) => e.code === 'KATA_ERR_TEMPLATE' && e.message.includes('holds the template lock'));
    await release();
  });

  it('destroy leaves alone a directory with no tmpfs on it (not made by factory init), removes it only when empty, and does nothing when there is none', async () => {
    const { files } = await setup();
    await assert.rejects(destroyTemplate(files.dir), (e: KataError) => e.code === 'KATA_ERR_TEMPLATE' && e.key === 'factory.template_path' && /no tmpfs is mounted there/.test(e.message));
    for (const f of [files.memoryFile, files.stateFile, files.metaFile]) assert.ok(existsSync(f), `${f} was left alone`);
    rmSync(files.dir, { recursive: true });
    mkdirSync(files.dir);
    assert.deepEqual(await destroyTemplate(files.dir), { removed: true });
    assert.deepEqual(await destroyTemplate(files.dir), { removed: false });
    assert.equal(existsSync(`${files.dir}.lock`), false, 'the lock is released');
  });

  it('resolves template_path through symlinked directories above it (/var/run is /run), so the mount table and the lock see one path', () => {
    mkdirSync(path.join(tmp.path, 'real'));
    symlinkSync(path.join(tmp.path, 'real'), path.join(tmp.path, 'link'));
    assert.equal(resolveTemplateDir(path.join(tmp.path, 'link', 'vm', 'template')), path.join(tmp.path, 'real', 'vm', 'template'));
    assert.throws(() => resolveTemplateDir('/run/vc/'), (e: KataError) => e.code === 'KATA_ERR_TEMPLATE' && e.key === 'factory.template_path');
  });

  it('as root, does not use template files another user could have written: a file writable by others, or a symlink', async function () {
    if (process.geteuid?.() !== 0) this.skip();
    const { v, files } = await setup();
    chmodSync(files.stateFile, 0o666);
    const a = await templateStatus(v.config, v.plan);
    assert.equal(a.usable, false);
    assert.match(a.reason ?? '', /cannot be trusted: .*state is writable by group or others/);
    chmodSync(files.stateFile, 0o600);
    assert.equal((await templateStatus(v.config, v.plan)).usable, true);
    writeFileSync(path.join(tmp.path, 'elsewhere'), readFileSync(files.metaFile));
    rmSync(files.metaFile);
    symlinkSync(path.join(tmp.path, 'elsewhere'), files.metaFile);
    assert.match((await templateStatus(v.config, v.plan)).reason ?? '', /template\.json is a symlink/);
  });
});
