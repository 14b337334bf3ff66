// The vmkeep command line: `runCommandLine()` (what the program runs) and `main()` (the full
// parser) take argv and their I/O, so tests run them in-process.
export { main, type CliIo } from './app.js';
export { runCommandLine } from './command-line.js';
export { CliError, type CliErrorCode } from './errors.js';
