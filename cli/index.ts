// The vmkeep command line: `main()` takes argv and its I/O, so tests run it in-process.
export { main, type CliIo } from './app.js';
export { CliError, type CliErrorCode } from './errors.js';
