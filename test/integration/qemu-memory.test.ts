/**
 * The host memory of a booted QEMU guest with the shipped configuration's memory settings
 * (configs/configuration-qemu.toml: tcg_tb_size, reclaim_guest_freed_memory, default_memory),
 * through the core (loadValidatedConfig → launchVm), measured from /proc/<pid>/smaps:
 *
 * - under TCG, QEMU runs with `-accel tcg,tb-size=N` and its translation buffer stays within N MiB;
 * - the guest loads virtio_balloon and negotiates free-page reporting with QEMU's virtio-balloon;
 * - the pages the guest frees at boot (the initramfs, once unpacked) go back to the host: the guest
 *   RAM QEMU holds ends well below that of the same guest without the balloon, booted just before.
 */
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { SANDBOX_DIR } from '../../core/plan.js';
import { loadValidatedConfig } from '../../core/runtime.js';
import { launchVm, type RunningVm } from '../../core/vm-lifecycle.js';
import { SANDBOX_PATHS } from '../../plugins/qemu/config.js';
import { QemuVm } from '../../plugins/qemu/driver.js';
import { qemuPssSplit } from '../../bench/pss.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { killQemuMentioning, qemuBinary, qemuConfigText, qemuLeftBehind, waitForConsole } from '../helpers/qemu.js';
import { TempDir } from '../helpers/tmp.js';

const READY = /^KATA-TS-GUEST: ready kernel=(\S+)$/;
const BOOT_TIMEOUT_MS = 120_000;

/** A key's value in the shipped configuration's [hypervisor.qemu]. */
function shipped(key: string): string {
  const text = readFileSync(path.join(PACKAGE_ROOT, 'configs', 'configuration-qemu.toml'), 'utf8');
  const m = new RegExp(`^${key}\\s*=\\s*(\\S+)`, 'm').exec(text);
  assert.ok(m, `configs/configuration-qemu.toml has no ${key}`);
  return m[1]!;
}

describe('QEMU guest memory with the shipped settings (TCG buffer, free-page reporting) @integration', function () {
  this.timeout(2 * BOOT_TIMEOUT_MS + 60_000);
  let binary: string | undefined;
  let image: GuestImage;
  let tmp: TempDir;
  const memory = Number(shipped('default_memory'));
  const tbSize = Number(shipped('tcg_tb_size'));

  before(async function () {
    binary = qemuBinary();
    if (!binary) this.skip();
    this.timeout(600_000);
    image = await ensureGuestImage();
    tmp = new TempDir('kata-ts-qemu-mem-');
  });

  after(async () => {
    if (!tmp) return;
    const left = await qemuLeftBehind(tmp.path);
    killQemuMentioning(tmp.path);
    tmp.cleanup();
    assert.deepEqual(left, [], 'a QEMU process was left running');
  });

  async function boot(id: string, reclaim: boolean): Promise<{ running: RunningVm; vm: QemuVm }> {
    const extra = `default_memory = ${memory}\ntcg_tb_size = ${tbSize}\nreclaim_guest_freed_memory = ${reclaim}`;
    const validated = await loadValidatedConfig({ text: qemuConfigText({ binary: binary as string, kernel: image.kernel, initrd: image.initrd, extra }).replace(/^default_memory = 512\n/m, '') });
    const running = await launchVm(validated, { sandboxId: id, runRoot: path.join(tmp.path, 'run') });
    assert.ok(running.vm instanceof QemuVm);
    try {
      await waitForConsole(SANDBOX_PATHS.consoleLog.replace(SANDBOX_DIR, running.ctx.runDir), READY, BOOT_TIMEOUT_MS);
    } catch (e) {
      await running.stop();
      throw e;
    }
    return { running, vm: running.vm };
  }

  it('keeps the TCG buffer within tcg_tb_size and gives the pages the guest freed back to the host', async () => {
    const initrdMiB = statSync(image.initrd).size / (1024 * 1024);
    // Without the balloon first: what the same guest holds once booted.
    const control = await boot('no-balloon', false);
    let withoutKiB: number;
    try {
      await delay(5000);
      withoutKiB = qemuPssSplit(control.vm.pid as number, memory).guestRam;
    } finally {
      await control.running.stop();
    }

    const { running, vm } = await boot('balloon', true);
    try {
      const pid = vm.pid as number;
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'latin1').split('\0');
      const accel = argv[argv.indexOf('-accel') + 1];
      if (vm.accelerator?.accelerator === 'tcg') {
        // thread=single follows where vCPUs may be hot-plugged (plugins/qemu/argv.ts).
        assert.match(accel ?? '', new RegExp(`^tcg,tb-size=${tbSize}(,thread=single)?$`));
        assert.ok(qemuPssSplit(pid, memory).tcg <= tbSize * 1024, 'the translation buffer grew past tcg_tb_size');
      } else {
        assert.equal(accel, 'kvm');
      }

      const status = await vm.qmp!.execute<{ 'guest-features': { 'dev-features': string[] } }>('x-query-virtio-status', { path: '/machine/peripheral/balloon0/virtio-backend' });
      assert.ok(status['guest-features']['dev-features'].some((f) => f.startsWith('VIRTIO_BALLOON_F_REPORTING')), JSON.stringify(status['guest-features']));

      // The guest reports free pages 2 s after they are freed, in 2 MiB blocks.
      let withKiB = Infinity;
      for (let i = 0; i < 30 && withKiB > withoutKiB - (initrdMiB / 2) * 1024; i++) {
        await delay(1000);
        withKiB = qemuPssSplit(pid, memory).guestRam;
      }
      assert.ok(withKiB <= withoutKiB - (initrdMiB / 2) * 1024, `guest RAM held by QEMU: ${withKiB >> 10} MiB with free-page reporting, ${withoutKiB >> 10} MiB without (initramfs ${initrdMiB.toFixed(0)} MiB)`);
    } finally {
      await running.stop();
    }
  });
});
