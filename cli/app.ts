import type { Writable } from 'node:stream';
import yargs, { type Argv } from 'yargs';
import { reportError } from './errors.js';
import { EXIT_FAILED, EXIT_USAGE } from './exit-codes.js';
import { createReporter } from './output.js';
import { addVmCommands, type DaemonApi } from './vm-commands.js';
import { checkTimeout, defaultCacheDir, installationFrom, INSTALLATION_OPTIONS, JSON_OPTION, vmkeepdOptions } from './options.js';
import { VERSION } from './version.js';
import { formatVersion, versionReport, versionRequest } from './version-command.js';

export interface CliIo {
  stdout: Writable;
  stderr: Writable;
  env: NodeJS.ProcessEnv;
  /** Subscribes to SIGINT/SIGTERM; returns the unsubscribe function. */
  onSignal(listener: (signal: NodeJS.Signals) => void): () => void;
  /** Makes the control-API client for a socket path; default: an ApiClient on that socket. */
  createApiClient?: (socketPath: string) => DaemonApi;
}

/** Thrown from yargs' fail handler to stop the parse once a usage error is reported. */
const usageFailed = new Error('usage error (reported)');

function installationOptions<T>(y: Argv<T>) {
  return y.options(INSTALLATION_OPTIONS);
}

/** Removes from `args` the options that came from VMKEEP_* variables and the command does not have. */
function dropForeignEnvOptions(args: Record<string, unknown>, known: Record<string, unknown>, env: NodeJS.ProcessEnv, argv: readonly string[]): void {
  for (const name of Object.keys(env)) {
    if (!name.startsWith('VMKEEP_') || name.includes('__')) continue;
    const kebab = name.slice('VMKEEP_'.length).toLowerCase().replaceAll('_', '-');
    const camel = kebab.replace(/-([a-z0-9])/g, (_, c: string) => c.toUpperCase());
    if (known[kebab] !== undefined || known[camel] !== undefined) continue;
    // Typed on the command line too (in any spelling): left for the parser to refuse.
    const typed = [kebab, camel, `no-${kebab}`];
    if (argv.some((arg) => typed.some((t) => arg === `--${t}` || arg.startsWith(`--${t}=`)))) continue;
    delete args[kebab];
    delete args[camel];
  }
}

/** Runs the vmkeep command line; resolves to the process exit code. */
export async function main(givenArgv: string[], io: CliIo): Promise<number> {
  let exitCode = 0;
  const argv = versionRequest(givenArgv) ?? givenArgv;
  const base = yargs(argv)
    .scriptName('vmkeep')
    .usage('vmkeep: QEMU virtual machines that survive daemon restarts and package upgrades\n\nUsage: $0 <command> [options]')
    .env('VMKEEP')
    .option('json', JSON_OPTION)
    .command(
      'run <spec>',
      'run one VM in the foreground from a spec file (no daemon); Ctrl-C powers the guest off, a second Ctrl-C quits QEMU',
      (y) =>
        installationOptions(y)
          .positional('spec', { type: 'string', demandOption: true, describe: 'VM spec (JSON file)' })
          .option('timeout', {
            type: 'number',
            default: 30,
            describe: 'seconds the guest gets to power off after Ctrl-C before QEMU is quit',
          })
          .option('state-dir', {
            type: 'string',
            describe: "keep the VM's socket, console and QEMU log here (default: a temporary folder, removed at the end)",
          })
          // A returned message (not a throw) is what yargs treats as a usage error: exit 2.
          .check((a) => checkTimeout(a.timeout))
          .example('$0 run vm.json', 'boot the VM described in vm.json and show its console')
          .example('$0 run vm.json --json', 'the same, with progress and console lines as JSON'),
      async (a) => {
        const reporter = createReporter(a.json, io.stdout, io.stderr);
        try {
          const installation = installationFrom(a, io.env);
          const { runVm } = await import('./run.js');
          exitCode = await runVm(
            {
              specPath: a.spec,
              installation,
              cacheDir: a.cacheDir ?? defaultCacheDir(io.env),
              timeoutSec: a.timeout,
              ...(a.stateDir === undefined ? {} : { stateDir: a.stateDir }),
            },
            { reporter, onSignal: io.onSignal },
          );
        } catch (error) {
          reportError(error, reporter.failure);
          exitCode = EXIT_FAILED;
        }
      },
    );
  // VMKEEP_* variables that name no option of the command at hand (VMKEEP_QEMU for `list`, a
  // unit's VMKEEP_SHUTDOWN_TIMEOUT) are dropped before validation: only what a person typed is
  // refused as an unknown argument.
  // getOptions() exists at run time (yargs 18) but not in @types/yargs 17.
  const optionsOf = base as unknown as { getOptions(): { key: Record<string, unknown> } };
  base.middleware((args) => dropForeignEnvOptions(args, optionsOf.getOptions().key, process.env, argv), true);
  base.command(
    'version',
    'print vmkeep\'s version (also --version); with --json, also the QEMU installations it sees',
    (y) =>
      installationOptions(y).option('installations', {
        type: 'string',
        describe: 'JSON file of QEMU installations to report (env VMKEEP_INSTALLATIONS); without it, --qemu names the only one',
      }),
    async (a) => {
      const report = await versionReport(
        a.json,
        {
          ...(a.installations === undefined ? {} : { installationsFile: a.installations }),
          single: () => installationFrom(a, io.env),
        },
        a.cacheDir ?? defaultCacheDir(io.env),
      );
      io.stdout.write(a.json ? `${JSON.stringify(report)}\n` : `${formatVersion(report)}\n`);
    },
  );
  base.command(
    'daemon',
    'run vmkeepd in the foreground (what the vmkeepd service runs); its VMs live in their own scopes and outlive it',
    (y) => y.options(vmkeepdOptions(io.env)),
    async (a) => {
      try {
        // Loaded here: only this command needs the daemon's runtime.
        const { daemonCommandArgs, runDaemonCommand } = await import('./daemon-command.js');
        const { args, installations } = daemonCommandArgs(a, io.env);
        exitCode = await runDaemonCommand(args, installations, VERSION, io.onSignal);
      } catch (error) {
        reportError(error, createReporter(false, io.stdout, io.stderr).failure);
        exitCode = EXIT_FAILED;
      }
    },
  );

  const parser = addVmCommands(base, { io, setExitCode: (code) => (exitCode = code) })
    .completion('completion', 'print the bash/zsh completion script, e.g. vmkeep completion >> ~/.bashrc')
    .demandCommand(1, 'Name a command; see vmkeep --help')
    .strict()
    .recommendCommands()
    .help()
    .alias('h', 'help')
    .version(false)
    .wrap(Math.min(110, (io.stdout as { columns?: number }).columns ?? 100))
    .exitProcess(false)
    .fail((message, error) => {
      // yargs passes a message for every usage problem (checks included); an error alone is a bug.
      if (error === usageFailed || (!message && error !== undefined && error !== null)) throw error;
      io.stderr.write(`vmkeep: ${message}\nRun 'vmkeep --help' for usage.\n`);
      exitCode = EXIT_USAGE;
      // Without a throw yargs goes on to run the command whose check just failed.
      throw usageFailed;
    });

  try {
    await parser.parseAsync(argv, {}, (error, _parsed, output) => {
      if (output && error !== usageFailed) (error ? io.stderr : io.stdout).write(`${output}\n`);
    });
  } catch (error) {
    if (error !== usageFailed) throw error;
  }
  return exitCode;
}
