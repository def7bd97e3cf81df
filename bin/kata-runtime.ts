#!/usr/bin/env node
// Thin entry point: parse argv and hand over to the core.
import { main } from '../cli/main.js';

process.exitCode = await main(process.argv.slice(2));
