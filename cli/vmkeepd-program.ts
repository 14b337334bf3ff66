// vmkeepd, the program: the daemon's own small entry (no yargs, none of the CLI's commands).
// Started by the bin loader (vmkeepd.ts), from the bundle or as compiled modules.
import { daemonMain } from './daemon-main.js';
import { processIo } from './process-io.js';

process.exitCode = await daemonMain(process.argv.slice(2), processIo);
