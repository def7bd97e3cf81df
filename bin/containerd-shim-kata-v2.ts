#!/usr/bin/env node
// containerd-shim-kata-v2: the containerd runtime v2 shim (shim/main.ts), with the built-in plugins.
import { readFileSync } from 'node:fs';
import { BUILTIN_PLUGINS } from '../plugins/builtin.js';
import { shimMain } from '../shim/main.js';

const code = await shimMain({
  env: process.env,
  argv: process.argv.slice(2),
  stdin: () => readFileSync(0),
  stdout: (s) => process.stdout.write(s),
  stderr: (s) => process.stderr.write(s),
  builtins: BUILTIN_PLUGINS,
});
process.exitCode = code;
