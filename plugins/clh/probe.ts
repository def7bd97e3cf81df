/**
 * `kata-runtime check` for Cloud Hypervisor: start the binary briefly with an API socket in a
 * private temporary directory, ask `vmm.ping` for its version and features, and shut it down
 * (`vmm.shutdown`, then SIGKILL). No VM is created. The features tell whether a TDX guest can run.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { KataError, errorText, productMismatch, spawnProbe, type HostCheck, type HostCheckContext } from '../../core/plugin-api.js';
import { ClhApiClient, clhApiFailure, type VmmPing } from './api.js';
import { PLUGIN_NAME, TDX_FEATURE } from './driver.js';

export const PROBE_TIMEOUT_MS = 5_000;

/** Starts `binary`, pings it, stops it. Rejects with a coded error when it does not answer. */
export async function probeVmm(binary: string, timeoutMs = PROBE_TIMEOUT_MS): Promise<VmmPing> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'kata-clh-probe-'));
  const socketPath = path.join(dir, 'api.sock');
  let probe: ReturnType<typeof spawnProbe>;
  try {
    // Its own process group: what it forks is killed with it, also when this process is interrupted.
    // Running as root, an untrusted binary is refused before it runs.
    probe = spawnProbe(binary, ['--api-socket', `path=${socketPath}`], { stdio: ['ignore', 'ignore', 'pipe'] }, 'the hypervisor binary', { plugin: PLUGIN_NAME });
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e;
  }
  const { child, kill } = probe;
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-2000)));
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  let spawnError: Error | undefined;
  child.once('error', (e) => (spawnError = e));
  const api = new ClhApiClient({ socketPath, timeoutMs: 1_000, plugin: PLUGIN_NAME });
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      if (spawnError) throw new KataError('KATA_ERR_VM_START', `cannot run ${binary}: ${spawnError.message}`, { plugin: PLUGIN_NAME });
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new KataError('KATA_ERR_VM_START', `${binary} exited before answering vmm.ping${stderr.trim() ? `: ${stderr.trim().split('\n').slice(-3).join(' / ')}` : ''}`, { plugin: PLUGIN_NAME });
      }
      try {
        return await api.ping();
      } catch (e) {
        if (clhApiFailure(e)?.status !== undefined || Date.now() > deadline) throw e;
      }
      await Promise.race([delay(20), exited]);
    }
  } finally {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
      await api.shutdownVmm().catch(() => undefined);
      const killer = setTimeout(kill, 1_000);
      await exited;
      clearTimeout(killer);
    }
    kill();
    await rm(dir, { recursive: true, force: true });
  }
}

/** The `hostChecks` lines: the VMM's own version and features, and for a TDX configuration whether it has `tdx`. */
export async function clhHostChecks(ctx: HostCheckContext): Promise<void> {
  if (ctx.config.hypervisorName !== 'clh') return;
  if (ctx.checks.find((c) => c.id === 'hypervisor-binary')?.status !== 'ok') return;
  const mismatch = productMismatch(ctx, 'cloud-hypervisor');
  if (mismatch) ctx.add(mismatch);
  const binary = ctx.plan?.vm.binary;
  const path_ = typeof binary === 'string' && binary ? binary : String((ctx.config.hypervisor as { path?: unknown }).path ?? '');
  const confidential = ctx.config.hypervisor.confidential_guest === true;
  let ping: VmmPing;
  try {
    ping = await probeVmm(path_);
  } catch (e) {
    const why = errorText(e);
    ctx.add({ id: 'hypervisor-api', status: confidential ? 'FAIL' : 'WARN', subject: 'Cloud Hypervisor API', message: `vmm.ping did not answer: ${why}` });
    return;
  }
  const features = ping.features;
  const build = ping.build_version ? ` (build ${ping.build_version})` : '';
  ctx.add({ id: 'hypervisor-api', status: 'info', subject: 'Cloud Hypervisor API', message: `vmm.ping: version ${ping.version}${build}, features: ${features?.length ? features.join(', ') : 'none reported'}` });
  const hasTdx = features?.includes(TDX_FEATURE) === true;
  const check: HostCheck = confidential
    ? hasTdx
      ? { id: 'hypervisor-tdx', status: 'ok', subject: 'Cloud Hypervisor TDX', message: `${path_} is built with the "${TDX_FEATURE}" feature` }
      : { id: 'hypervisor-tdx', status: 'FAIL', subject: 'Cloud Hypervisor TDX', message: `confidential_guest = true, but ${path_} is built without the "${TDX_FEATURE}" feature; install a cloud-hypervisor built with --features tdx` }
    : { id: 'hypervisor-tdx', status: 'info', subject: 'Cloud Hypervisor TDX', message: hasTdx ? `built with the "${TDX_FEATURE}" feature (not used: confidential_guest = false)` : `built without the "${TDX_FEATURE}" feature (not needed: confidential_guest = false)` };
  ctx.add(check);
}
