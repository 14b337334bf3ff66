import { accessSync, constants } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, isAbsolute, join, resolve } from 'node:path';
import type { Writable } from 'node:stream';
import yargs, { type Argv } from 'yargs';
import type { Installation } from '../launcher/index.js';
import { CliError } from './errors.js';
import { createReporter } from './output.js';
import { EXIT_FAILED, runVm } from './run.js';

export interface CliIo {
  stdout: Writable;
  stderr: Writable;
  env: NodeJS.ProcessEnv;
  /** Subscribes to SIGINT/SIGTERM; returns the unsubscribe function. */
  onSignal(listener: (signal: NodeJS.Signals) => void): () => void;
}

const EXIT_USAGE = 2;

/** Finds a program the way a shell would; an absolute or relative path is taken as it is. */
function findProgram(name: string, env: NodeJS.ProcessEnv): string {
  if (name.includes('/')) return resolve(name);
  for (const dir of (env.PATH ?? '/usr/bin:/bin').split(delimiter)) {
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this folder
    }
  }
  throw new CliError(
    'USAGE',
    `${name} not found in PATH: install QEMU (apt-get install qemu-system-x86) or name the binary with --qemu /path/to/qemu-system-x86_64`,
  );
}

function defaultCacheDir(env: NodeJS.ProcessEnv): string {
  if (env.VMKEEP_CACHE_DIR) return env.VMKEEP_CACHE_DIR;
  const base = env.XDG_CACHE_HOME && isAbsolute(env.XDG_CACHE_HOME) ? env.XDG_CACHE_HOME : join(homedir(), '.cache');
  return join(base, 'vmkeep');
}

function installationOptions<T>(y: Argv<T>) {
  return y
    .option('qemu', {
      type: 'string',
      describe: 'QEMU binary to run (env VMKEEP_QEMU)',
      default: 'qemu-system-x86_64',
      defaultDescription: 'qemu-system-x86_64 from PATH',
    })
    .option('module-dir', {
      type: 'string',
      describe: "QEMU's module directory (QEMU_MODULE_DIR), for a binary outside its package's place",
    })
    .option('firmware-dir', {
      type: 'string',
      array: true,
      describe: 'firmware directory passed as -L (repeatable, in order)',
    })
    .option('cache-dir', {
      type: 'string',
      describe: 'where probed QEMU versions and machine types are cached (env VMKEEP_CACHE_DIR)',
    });
}

/** Runs the vmkeep command line; resolves to the process exit code. */
export async function main(argv: string[], io: CliIo): Promise<number> {
  let exitCode = 0;
  const parser = yargs(argv)
    .scriptName('vmkeep')
    .usage('vmkeep: QEMU virtual machines that survive daemon restarts and package upgrades\n\nUsage: $0 <command> [options]')
    .env('VMKEEP')
    .option('json', { type: 'boolean', default: false, describe: 'machine-readable output: one JSON object per line' })
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
          .check((a) => {
            if (!Number.isFinite(a.timeout) || a.timeout <= 0) throw new Error('--timeout must be a positive number of seconds');
            return true;
          })
          .example('$0 run vm.json', 'boot the VM described in vm.json and show its console')
          .example('$0 run vm.json --json', 'the same, with progress and console lines as JSON'),
      async (a) => {
        const reporter = createReporter(a.json, io.stdout, io.stderr);
        try {
          const installation: Installation = {
            name: 'default',
            binary: findProgram(a.qemu, io.env),
            firmwareDirs: a.firmwareDir ?? [],
            ...(a.moduleDir === undefined ? {} : { moduleDir: a.moduleDir }),
          };
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
          exitCode = reportError(error, reporter.failure);
        }
      },
    )
    .demandCommand(1, 'Name a command; see vmkeep --help')
    .strict()
    .recommendCommands()
    .help()
    .alias('h', 'help')
    .version(false)
    .wrap(Math.min(110, (io.stdout as { columns?: number }).columns ?? 100))
    .exitProcess(false)
    .fail((message, error) => {
      if (error !== undefined && error !== null) throw error;
      io.stderr.write(`vmkeep: ${message}\nRun 'vmkeep --help' for usage.\n`);
      exitCode = EXIT_USAGE;
    });

  await parser.parseAsync(argv, {}, (error, _parsed, output) => {
    if (output) (error ? io.stderr : io.stdout).write(`${output}\n`);
  });
  return exitCode;
}

/** Every vmkeep error carries a code; anything else is a bug and says so. */
function reportError(error: unknown, failure: (code: string, message: string) => void): number {
  const code = error instanceof Error ? (error as Error & { code?: unknown }).code : undefined;
  if (error instanceof Error && typeof code === 'string') {
    failure(code, error.message);
  } else {
    failure('INTERNAL', `unexpected error (please report it): ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
  }
  return EXIT_FAILED;
}
