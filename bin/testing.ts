// Thin entry point of `kata-ts/testing`: the test kit for plugin authors (core/testing.ts), with the built-in plugins.
import { useBuiltinPlugins } from '../core/plugin-loader.js';
import { BUILTIN_PLUGINS } from '../plugins/builtin.js';

useBuiltinPlugins(BUILTIN_PLUGINS);

export * from '../core/testing.js';
