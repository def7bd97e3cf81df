/**
 * Bundles the `kata-runtime` entry point, with the core and the built-in plugins, into one file
 * (dist/bundle/kata-runtime.mjs, the package's `kata-runtime` bin). One module instead of ~60 saves
 * Node's module loader a large share of a CLI start (issue 2's target: `validate` within 2x a bare
 * `node -e 0`; `npm run bench` measures it). Dependencies loaded lazily (pino, prom-client for metrics, ajv for third-party
 * schemas) and the precompiled schema validators stay separate files.
 */
import path from 'node:path';
import { build } from 'esbuild';
import { PACKAGE_ROOT } from '../core/paths.js';

export const BUNDLE = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');

export const SHIM_BUNDLE = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'containerd-shim-kata-v2.mjs');

for (const [entry, outfile] of [
  ['kata-runtime.js', BUNDLE],
  ['containerd-shim-kata-v2.js', SHIM_BUNDLE],
] as const) {
  await build({
    entryPoints: [path.join(PACKAGE_ROOT, 'dist', 'bin', entry)],
    outfile,
    bundle: true,
    minify: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    // CommonJS dependencies inside an ES module bundle need a `require`.
    banner: { js: "import { createRequire as __kataCreateRequire } from 'node:module'; const require = __kataCreateRequire(import.meta.url);" },
    external: ['pino', 'ajv', 'prom-client', 'node:*'],
    logLevel: 'warning',
  });
}
process.stdout.write(`bundled ${path.relative(PACKAGE_ROOT, BUNDLE)} and ${path.relative(PACKAGE_ROOT, SHIM_BUNDLE)}\n`);
