/**
 * `npm run explain`: the config explainer on the two bundled examples. The TDX sandbox with a
 * block-device rootfs validates; the CCv0-era TDX + virtio-fs configuration is vetoed by the tdx
 * plugin before any VM starts. Exits non-zero unless both verdicts are what they should be.
 */
import path from 'node:path';
import { bold } from '../cli/io.js';
import { main } from '../cli/main.js';
import { PACKAGE_ROOT } from '../core/paths.js';
import { BUILTIN_PLUGINS } from '../plugins/builtin.js';

const example = (f: string) => path.join(PACKAGE_ROOT, 'examples', f);
const say = (s: string) => process.stdout.write(`\n${bold(s, process.stdout)}\n\n`);

say('$ kata-runtime --config examples/configuration-clh-tdx.toml validate');
const good = await main(['--config', example('configuration-clh-tdx.toml'), 'validate'], undefined, { builtins: BUILTIN_PLUGINS });
say('$ kata-runtime --config examples/configuration-clh-tdx-virtiofs.toml validate   # exit 1 expected');
const vetoed = await main(['--config', example('configuration-clh-tdx-virtiofs.toml'), 'validate'], undefined, { builtins: BUILTIN_PLUGINS });
process.stdout.write(`\nexit codes: ${good} (valid), ${vetoed} (vetoed)\n`);
process.exitCode = good === 0 && vetoed === 1 ? 0 : 1;
