// vmkeepd's command line: the daemon's option table through the small parser (no yargs: systemd
// starts this at every restart, and the daemon needs no help layout). `vmkeep daemon` parses
// the same table with yargs.
import { daemonCommandArgs, runDaemonCommand, type ParsedDaemonOptions } from './daemon-command.js';
import { CliError, reportError } from './errors.js';
import { EXIT_FAILED, EXIT_USAGE } from './exit-codes.js';
import { vmkeepdOptions } from './options.js';
import { createReporter } from './output.js';
import { formatOptionsHelp, parseOptions } from './small-args.js';
import { VERSION } from './version.js';
import type { CliIo } from './app.js';

const USAGE = 'vmkeepd: the vmkeep daemon (what the vmkeepd service runs); its VMs live in their own scopes and outlive it\n\nUsage: vmkeepd [options]';

/** Runs vmkeepd until SIGINT/SIGTERM; resolves to the exit code. */
export async function daemonMain(argv: string[], io: CliIo): Promise<number> {
  // Version reports belong to the full command line (`vmkeep daemon --version`).
  if (argv.includes('--version') || argv.includes('-V')) {
    const { main } = await import('./app.js');
    return main(['daemon', ...argv], io);
  }
  const table = vmkeepdOptions(io.env);
  let parsed: ReturnType<typeof parseOptions>;
  try {
    parsed = parseOptions(table, argv, io.env, 'VMKEEP');
  } catch (error) {
    if (!(error instanceof CliError)) throw error;
    io.stderr.write(`vmkeepd: ${error.message}\nRun 'vmkeepd --help' for usage.\n`);
    return EXIT_USAGE;
  }
  if (parsed.help) {
    io.stdout.write(formatOptionsHelp(USAGE, table));
    return 0;
  }
  try {
    const { args, installations } = daemonCommandArgs(parsed.values as unknown as ParsedDaemonOptions, io.env);
    return await runDaemonCommand(args, installations, VERSION, io.onSignal);
  } catch (error) {
    reportError(error, createReporter(false, io.stdout, io.stderr).failure);
    return EXIT_FAILED;
  }
}
