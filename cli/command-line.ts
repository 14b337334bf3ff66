import type { CliIo } from './app.js';
import { runQuick } from './quick.js';

/**
 * What the vmkeep program runs: the quick path for the commands it answers, else the full
 * command line (yargs), loaded only then. Resolves to the exit code.
 */
export async function runCommandLine(argv: string[], io: CliIo): Promise<number> {
  const quick = await runQuick(argv, io);
  if (quick !== undefined) return quick;
  const { main } = await import('./app.js');
  return main(argv, io);
}
