/**
 * The Cloud Hypervisor simulator as a program, so that the clh driver spawns and supervises it as
 * it would `cloud-hypervisor` (test/fixtures/standins/cloud-hypervisor runs it). It takes the
 * command-line options the driver uses (`--api-socket path=<p>` or `--api-socket <p>`, `-v…`,
 * `--seccomp <bool>`, `--version`) and refuses any other, as Cloud Hypervisor's parser does.
 *
 * Environment (the simulator's own knobs):
 *   CLH_SIM_FEATURES       vmm.ping features, comma-separated (default "kvm"; add "tdx" for a TDX build)
 *   CLH_SIM_ERROR_FORMAT   "json" (an array of strings, v47 and later; default) or "text" (older releases)
 *   CLH_SIM_GUEST          "qemu" (boot a real guest under QEMU; default) or "none"
 *   CLH_SIM_REQUEST_LOG    append each request as a JSON line to this file
 *   CLH_SIM_QEMU           the QEMU binary (default qemu-system-x86_64)
 */
import path from 'node:path';
import { ClhSimulator, SIM_VERSION } from './clh-simulator.js';

function fail(message: string): never {
  process.stderr.write(`error: ${message}\n`);
  process.exit(1);
}

async function main(argv: string[]): Promise<void> {
  let apiSocket: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === '--version' || a === '-V') {
      process.stdout.write(`cloud-hypervisor v${SIM_VERSION}-simulator\n`);
      return;
    }
    if (/^-v+$/.test(a)) continue;
    if (a === '--seccomp') {
      const v = argv[++i];
      if (v !== 'true' && v !== 'false' && v !== 'log') fail(`invalid value '${v ?? ''}' for '--seccomp'`);
      continue;
    }
    if (a === '--api-socket') {
      const v = argv[++i];
      if (v === undefined) fail("a value is required for '--api-socket <api-socket>'");
      apiSocket = v.startsWith('path=') ? v.slice('path='.length) : v.includes('=') ? fail(`unsupported --api-socket option '${v}' (the simulator takes path=)`) : v;
      continue;
    }
    fail(`unexpected argument '${a}' found`);
  }
  if (!apiSocket) fail('the simulator needs --api-socket (it has no command-line VM)');

  const env = process.env;
  const errorFormat = env.CLH_SIM_ERROR_FORMAT === 'text' ? 'text' : 'json';
  const sim = await ClhSimulator.listen({
    apiSocket: path.resolve(apiSocket),
    features: (env.CLH_SIM_FEATURES ?? 'kvm').split(',').map((f) => f.trim()).filter(Boolean),
    errorFormat,
    requestLog: env.CLH_SIM_REQUEST_LOG || undefined,
    guest: env.CLH_SIM_GUEST === 'none' ? 'none' : 'qemu',
    qemuBinary: env.CLH_SIM_QEMU || 'qemu-system-x86_64',
    workDir: path.dirname(path.resolve(apiSocket)),
    log: (line) => process.stderr.write(`clh-simulator: ${line}\n`),
    console: (chunk) => process.stdout.write(chunk),
  });
  const shutdown = (): void => {
    void sim.close().then(() => process.exit(0));
  };
  sim.onVmmShutdown = shutdown;
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

main(process.argv.slice(2)).catch((e: unknown) => fail(e instanceof Error ? e.message : String(e)));
