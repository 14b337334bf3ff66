// vmkeep, the program. Started by the bin loader (main.ts), from the bundle or as compiled modules.
import { runCommandLine } from './command-line.js';
import { processIo } from './process-io.js';

process.exitCode = await runCommandLine(process.argv.slice(2), processIo);
