#!/usr/bin/env node
// vmkeepd: the daemon, as `vmkeep daemon` with its own name for units and packages.
import { main } from './index.js';
import { processIo } from './process-io.js';

process.exitCode = await main(['daemon', ...process.argv.slice(2)], processIo);
