#!/usr/bin/env node
// containerd-shim-kata-v2: the containerd runtime v2 shim (shim/main.ts).
import { readFileSync } from 'node:fs';
import { useBuiltinPlugins } from '../core/plugin-loader.js';
import { BUILTIN_PLUGINS } from '../plugins/builtin.js';
import { shimMain } from '../shim/main.js';

useBuiltinPlugins(BUILTIN_PLUGINS);

const code = await shimMain({
  env: process.env,
  argv: process.argv.slice(2),
  stdin: () => readFileSync(0),
  stdout: (s) => process.stdout.write(s),
  stderr: (s) => process.stderr.write(s),
});
process.exitCode = code;
