#!/usr/bin/env node
// The containerd runtime v2 shim is not built yet (issue 5); it says so instead of pretending.
process.stderr.write('containerd-shim-kata-v2: not implemented yet (see the README, "What is not built yet")\n');
process.exitCode = 1;
