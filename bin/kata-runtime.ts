#!/usr/bin/env node
// Thin entry point: argv and the built-in plugins to the CLI.
import { main } from '../cli/main.js';
import { BUILTIN_PLUGINS } from '../plugins/builtin.js';

process.exitCode = await main(process.argv.slice(2), undefined, { builtins: BUILTIN_PLUGINS });
