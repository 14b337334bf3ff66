import type { CliIo } from './app.js';
import { VERSION } from './version.js';

/** The plain version line (`--json` and `vmkeep version` are the full parser's). */
export function versionLine(): string {
  return `vmkeep ${VERSION} (Node.js ${process.versions.node})`;
}

/**
 * What the vmkeep program runs: a plain `--version` at once (what packaging scripts check),
 * the quick path for the commands it answers without yargs, else the full command line, each
 * loaded only when needed. Resolves to the exit code.
 */
export async function runCommandLine(argv: string[], io: CliIo): Promise<number> {
  if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
    io.stdout.write(`${versionLine()}\n`);
    return 0;
  }
  const { runQuick } = await import('./quick.js');
  const quick = await runQuick(argv, io);
  if (quick !== undefined) return quick;
  const { main } = await import('./app.js');
  return main(argv, io);
}
