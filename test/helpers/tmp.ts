import { mkdtempSync, rmSync, writeFileSync, mkdirSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';

/** A temporary directory removed by `cleanup()`. Outside the project tree, as a user's would be. */
export class TempDir {
  readonly path: string;
  constructor(prefix = 'kata-ts-test-') {
    this.path = mkdtempSync(path.join(os.tmpdir(), prefix));
  }
  file(rel: string, content: string): string {
    const p = path.join(this.path, rel);
    mkdirSync(path.dirname(p), { recursive: true });
    writeFileSync(p, content);
    return p;
  }
  /** Makes `import 'kata-ts/plugin'` resolve from inside this directory, as an installed package would. */
  linkPackage(): void {
    mkdirSync(path.join(this.path, 'node_modules'), { recursive: true });
    symlinkSync(PACKAGE_ROOT, path.join(this.path, 'node_modules', 'kata-ts'));
  }
  cleanup(): void {
    rmSync(this.path, { recursive: true, force: true });
  }
}

/**
 * A minimal third-party hypervisor plugin for core tests that must not depend on the built-in
 * hypervisor plugins: it serves `[hypervisor.<name>]`, declares that it renders vhost-user-fs
 * shares and net devices, and renders a trivial launch description from the core's VM description.
 */
export function fakeHypervisorSource(name: string, extra = ''): string {
  return `
export default {
  manifest: { name: '${name}', version: '1.0.0', runtime: '^1.0.0', provides: ['hypervisor', 'hypervisor:${name}'] },
  apply({ hooks }) {
    hooks.capabilities.tap({ stage: -100 }, (caps, cfg) => {
      if (!cfg.hypervisor.disable_block_device_use) { caps.add('block-device'); caps.add('block-device-hotplug'); caps.add('virtio-blk'); }
      if (cfg.hypervisor.shared_fs !== 'none') { caps.add('fs-sharing'); caps.add('fs-sharing:' + cfg.hypervisor.shared_fs); }
      if (cfg.hypervisor.shared_fs === 'virtio-fs') caps.add('render:device:vhost-user-fs');
      caps.add('render:device:net');
      caps.add('cpu-hotplug');
    });
    hooks.plan.tap({ stage: 1000 }, (plan) => { plan.vm.launch = ['${name}', '--kernel', plan.vm.kernel]; return plan; });
    ${extra}
  },
};
`;
}

/** A valid config for the fake hypervisor, with `extra` lines appended to its section. */
export function fakeConfig(name: string, pluginPath: string, extra = '', tail = ''): string {
  return `[hypervisor.${name}]
kernel = "/k"
image = "/i"
shared_fs = "none"
disable_block_device_use = true
${extra}

[runtime]
plugins = ["${pluginPath}"]
${tail}
`;
}
