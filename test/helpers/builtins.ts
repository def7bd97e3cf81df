/**
 * Hands the built-in plugins to the runtime, as the executables do (bin/). Loaded before every test
 * file by .mocharc.json (`require`); a test run with --no-config must pass
 * `--require dist/test/helpers/builtins.js`.
 */
import { useBuiltinPlugins } from '../../core/plugin-loader.js';
import { BUILTIN_PLUGINS } from '../../plugins/builtin.js';

useBuiltinPlugins(BUILTIN_PLUGINS);
