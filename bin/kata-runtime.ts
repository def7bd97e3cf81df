#!/usr/bin/env node
// Thin entry point: hand the built-in plugins to the core, then argv to the CLI.
import { main } from '../cli/main.js';
import { useBuiltinPlugins } from '../core/plugin-loader.js';
import { BUILTIN_PLUGINS } from '../plugins/builtin.js';

useBuiltinPlugins(BUILTIN_PLUGINS);

process.exitCode = await main(process.argv.slice(2));
