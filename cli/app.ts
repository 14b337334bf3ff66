import { accessSync, constants, existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, dirname, isAbsolute, join, resolve } from 'node:path';
import type { Writable } from 'node:stream';
import yargs, { type Argv } from 'yargs';
import type { Installation } from '../launcher/index.js';
import { CliError, reportError } from './errors.js';
import { createReporter } from './output.js';
import { EXIT_FAILED, runVm } from './run.js';
import { addVmCommands, type DaemonApi } from './vm-commands.js';
import { runDaemonCommand } from './daemon-command.js';
import { DEFAULT_SOCKET_PATH } from '../daemon/index.js';
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

const EXIT_USAGE = 2;
/** Thrown from yargs' fail handler to stop the parse once a usage error is reported. */
const usageFailed = new Error('usage error (reported)');

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

// Where distributions put the modules of the QEMU in /usr/bin: named, so that they are pinned
// per build and a package upgrade cannot swap them under a running QEMU.
const SYSTEM_MODULE_DIRS = ['/usr/lib/x86_64-linux-gnu/qemu', '/usr/lib/aarch64-linux-gnu/qemu', '/usr/lib64/qemu', '/usr/lib/qemu'];

/** The installation named by --qemu, --module-dir and --firmware-dir. */
function installationFrom(
  a: { qemu: string; moduleDir?: string | undefined; firmwareDir?: string[] | undefined },
  env: NodeJS.ProcessEnv,
): Installation {
  const binary = findProgram(a.qemu, env);
  const moduleDir = a.moduleDir ?? (dirname(binary) === '/usr/bin' ? SYSTEM_MODULE_DIRS.find((dir) => existsSync(dir)) : undefined);
  return {
    name: 'default',
    binary,
    firmwareDirs: a.firmwareDir ?? [],
    ...(moduleDir === undefined ? {} : { moduleDir }),
  };
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
    .option('json', { type: 'boolean', default: false, describe: 'machine-readable output: one JSON document (one per line for streams)' })
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
          .check((a) => (Number.isFinite(a.timeout) && a.timeout > 0 ? true : '--timeout must be a positive number of seconds'))
          .example('$0 run vm.json', 'boot the VM described in vm.json and show its console')
          .example('$0 run vm.json --json', 'the same, with progress and console lines as JSON'),
      async (a) => {
        const reporter = createReporter(a.json, io.stdout, io.stderr);
        try {
          const installation = installationFrom(a, io.env);
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
    (y) =>
      installationOptions(y)
        .option('state-dir', {
          type: 'string',
          default: io.env.VMKEEP_STATE_DIR ?? (io.env.SNAP_COMMON ? join(io.env.SNAP_COMMON, 'state') : '/var/lib/vmkeep'),
          defaultDescription: '$SNAP_COMMON/state under a snap, else /var/lib/vmkeep',
          describe: 'durable records of the VMs (env VMKEEP_STATE_DIR)',
        })
        .option('runtime-dir', {
          type: 'string',
          default: io.env.VMKEEP_RUNTIME_DIR ?? '/run/vmkeep',
          describe: 'QMP sockets, consoles and QEMU logs (env VMKEEP_RUNTIME_DIR)',
        })
        .option('socket', {
          type: 'string',
          default: io.env.VMKEEP_SOCKET ?? DEFAULT_SOCKET_PATH,
          describe: 'control socket to serve (env VMKEEP_SOCKET)',
        })
        .option('socket-group', { type: 'string', describe: 'group allowed to use the control socket (mode 0660)' })
        .option('slice', { type: 'string', default: 'vmkeep.slice', describe: 'systemd slice of the VM scopes, e.g. machine.slice' })
        .option('scope', {
          type: 'boolean',
          default: true,
          describe: 'put each QEMU in its own systemd scope; --no-scope keeps them in the daemon\'s cgroup, where they DIE with the daemon service',
        })
        .option('bus-address', { type: 'string', describe: 'D-Bus address of the system bus (default DBUS_SYSTEM_BUS_ADDRESS or the standard socket)' })
        .option('installations', {
          type: 'string',
          describe: 'JSON file of QEMU installations and the current one per channel (env VMKEEP_INSTALLATIONS); without it, --qemu names the only one',
        })
        .option('refresh-at-start', {
          type: 'boolean',
          default: false,
          describe: 'once reattached, refresh every stale VM whose policy is not manual (for a package\'s post-upgrade restart)',
        })
        .option('guests-unit', {
          type: 'string',
          describe: 'the unit whose stop powers every guest off at host shutdown; each VM scope is ordered Before= it',
          defaultDescription: 'vmkeep-guests.service',
        })
        .option('autostart-parallel', {
          type: 'number',
          default: 2,
          describe: 'at a host boot, how many VMs (autostart always, or last-state and running at shutdown) start at once',
        })
        .option('autostart-delay', { type: 'number', default: 0, describe: 'at a host boot, seconds between two VM starts' })
        .option('log-max-kib', { type: 'number', default: 2048, describe: "each VM's serial console log and QEMU log is rotated above this size (KiB)" })
        .option('log-keep', { type: 'number', default: 3, describe: 'rotated files kept per log (NAME.1 ... NAME.N); vmkeep logs reads across them' })
        .check((a) => {
          const parallel = a.autostartParallel as number;
          const delay = a.autostartDelay as number;
          if (!Number.isSafeInteger(parallel) || parallel < 1) return `--autostart-parallel must be a whole number of at least 1, got ${parallel}`;
          const maxKib = a.logMaxKib as number;
          const keep = a.logKeep as number;
          if (!Number.isSafeInteger(maxKib) || maxKib < 1) return `--log-max-kib must be a whole number of at least 1, got ${maxKib}`;
          if (!Number.isSafeInteger(keep) || keep < 0 || keep > 9) return `--log-keep must be a whole number from 0 to 9, got ${keep}`;
          return Number.isFinite(delay) && delay >= 0 ? true : `--autostart-delay must be 0 or more seconds, got ${delay}`;
        })
        // Hidden test hook (env VMKEEP_TEST_CRASH_AT): vmkeepd SIGKILLs itself at this refresh step.
        .option('test-crash-at', { type: 'string', hidden: true })
        .option('refresh-policy', {
          type: 'string',
          choices: ['manual', 'migrate', 'reboot', 'on-guest-shutdown'],
          default: 'manual',
          describe: 'how stale VMs move onto the current installation unless a VM has its own policy; manual only reports',
        })
        .option('log-level', { type: 'string', default: 'info', choices: ['trace', 'debug', 'info', 'warn', 'error'] }),
    async (a) => {
      try {
        exitCode = await runDaemonCommand(
          {
            stateDir: a.stateDir,
            runtimeDir: a.runtimeDir,
            socket: a.socket,
            slice: a.slice,
            scope: a.scope,
            logLevel: a.logLevel,
            ...(a.socketGroup === undefined ? {} : { socketGroup: a.socketGroup }),
            ...(a.busAddress === undefined ? {} : { busAddress: a.busAddress }),
            refreshPolicy: a.refreshPolicy,
            refreshAtStart: a.refreshAtStart,
            ...(a.guestsUnit === undefined ? {} : { guestsUnit: a.guestsUnit }),
            ...(a.testCrashAt === undefined ? {} : { crashAt: a.testCrashAt }),
            autostartParallel: a.autostartParallel,
            autostartDelay: a.autostartDelay,
            logMaxKib: a.logMaxKib,
            logKeep: a.logKeep,
          },
          a.installations === undefined ? installationFrom(a, io.env) : a.installations,
          VERSION,
          io.onSignal,
        );
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
