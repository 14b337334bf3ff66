import { StringDecoder } from 'node:string_decoder';
import type { Argv } from 'yargs';
import {
  ApiClient, AUTOSTART_MODES, DEFAULT_MIGRATE_TIMEOUT_SEC, DEFAULT_REBOOT_TIMEOUT_SEC, DEFAULT_STOP_TIMEOUT_SEC, openOfflineGuests, REFRESH_STRATEGIES, type EventFilter, type OfflineGuests, type Operation, type RefreshJobRequest, type RefreshStrategy, type AutostartMode, type VmSettings,
} from '../daemon/index.js';
import { isValidVmName } from '../launcher/index.js';
import { ACPI_REPEAT_MS } from '../qmp/index.js';
import type { CliIo } from './app.js';
import { reportError } from './errors.js';
import { createReporter } from './output.js';
import { EXIT_CLEAN, EXIT_FAILED, EXIT_POWEROFF_TIMEOUT } from './exit-codes.js';
import { readSpecJson } from './run.js';
import { followConsole } from './console-follow.js';
import { followRefreshJob } from './refresh-follow.js';
import { formatUpgradeStatus } from './refresh-view.js';
import { formatEvent, formatOperation, formatOperations, formatVmList, formatVmStatus, printable } from './table.js';
import { checkTimeout, socketOption } from './options.js';

const STRATEGIES = [...REFRESH_STRATEGIES];

/** What the commands need of the control API; tests may hand in their own. */
export type DaemonApi = Pick<
  ApiClient,
  | 'list' | 'get' | 'set' | 'create' | 'start' | 'stop' | 'delete' | 'qmp' | 'console' | 'events' | 'refresh' | 'startRefreshJob' | 'upgradeStatus'
  | 'beginStart' | 'beginStop' | 'operations' | 'operation' | 'cancelOperation' | 'finished' | 'acceptDisks'
>;

export interface VmCommandContext {
  io: CliIo;
  setExitCode(code: number): void;
}

interface CommonArgs {
  json: boolean;
  socket: string;
}

/** Writes results: human text, or exactly one JSON document (one per line when streaming). */
interface Out {
  json: boolean;
  document(value: unknown, human: string): void;
  line(text: string): void;
}

const NAME_RULE = '1 to 63 characters: lowercase letters, digits, "_", "." and "-", starting with a letter or digit';

function checkName(name: unknown): true | string {
  return typeof name === 'string' && isValidVmName(name) ? true : `${JSON.stringify(name)} is not a valid VM name: ${NAME_RULE}`;
}

/** The options every command that talks to vmkeepd takes. */
function daemonOptions<T>(y: Argv<T>, env: NodeJS.ProcessEnv) {
  return y.option('socket', socketOption(env));
}

function withName<T>(y: Argv<T>, env: NodeJS.ProcessEnv) {
  return daemonOptions(y, env)
    .positional('name', { type: 'string', demandOption: true, describe: 'VM name' })
    .check((a) => checkName(a.name));
}

/** Runs one command: its errors become `code + message` and exit 1. */
export function commandRunner(ctx: VmCommandContext) {
  const { io } = ctx;
  return <A extends CommonArgs>(body: (api: DaemonApi, out: Out, a: A) => Promise<number | void>) => async (a: A) => {
    const reporter = createReporter(a.json, io.stdout, io.stderr);
    const out: Out = {
      json: a.json,
      document: (value, human) => io.stdout.write(a.json ? `${JSON.stringify(value)}\n` : `${human}\n`),
      line: (text) => io.stdout.write(`${text}\n`),
    };
    try {
      const api = io.createApiClient?.(a.socket) ?? new ApiClient({ socketPath: a.socket });
      ctx.setExitCode((await body(api, out, a)) ?? EXIT_CLEAN);
    } catch (error) {
      reportError(error, reporter.failure);
      ctx.setExitCode(EXIT_FAILED);
    }
  };
}

/** `vmkeep list`: also run without yargs by cli/quick.ts. */
export async function listVms(api: DaemonApi, out: Out, io: CliIo): Promise<void> {
  const vms = await api.list();
  if (!out.json && vms.length === 0) {
    io.stderr.write('vmkeep: no VMs yet; create one with: vmkeep create SPEC.json\n');
    return;
  }
  out.document(vms, formatVmList(vms));
}

/** Adds create, start, stop, delete, list, status, logs, qmp and events to the parser. */
export function addVmCommands<T extends { json: boolean }>(parser: Argv<T>, ctx: VmCommandContext): Argv<T> {
  const { io } = ctx;
  const env = io.env;

  const run = commandRunner(ctx);

  /** Lets Ctrl-C end a stream cleanly. */
  const untilSignal = async (work: (signal: AbortSignal) => Promise<void>): Promise<void> => {
    const controller = new AbortController();
    const off = io.onSignal(() => controller.abort());
    try {
      await work(controller.signal);
    } finally {
      off();
    }
  };

  return parser
    .command(
      'create <spec>',
      'create a VM in vmkeepd from a spec file and start it',
      (y) =>
        daemonOptions(y, env)
          .positional('spec', { type: 'string', demandOption: true, describe: 'VM spec (JSON file)' })
          .option('start', { type: 'boolean', default: true, describe: 'start the VM once created (--no-start: only create it)' })
          .option('channel', { type: 'string', describe: 'installations channel whose current QEMU the VM runs on', defaultDescription: 'default' })
          .option('policy', { type: 'string', choices: STRATEGIES, describe: "this VM's refresh strategy after a QEMU upgrade", defaultDescription: "the daemon's --refresh-policy" })
          .example('$0 create vm.json', 'create and start the VM described in vm.json')
          .example('$0 create vm.json --no-start', 'only record it; start it later with vmkeep start NAME'),
      run(async (api, out, a: CommonArgs & { spec: string; start: boolean; channel?: string; policy?: string }) => {
        const vm = await api.create(await readSpecJson(a.spec), {
          start: a.start,
          ...(a.channel === undefined ? {} : { channel: a.channel }),
          ...(a.policy === undefined ? {} : { policy: a.policy as RefreshStrategy }),
        });
        const pid = vm.pid === undefined ? '' : `, pid ${vm.pid}`;
        out.document(vm, a.start ? `${vm.name}: created, ${vm.state}${pid}` : `${vm.name}: created (${vm.state}); start it with: vmkeep start ${vm.name}`);
      }),
    )
    .command(
      'start <name>',
      'start a VM',
      (y) => withName(y, env).option('async', ASYNC_OPTION),
      run(async (api, out, a: CommonArgs & { name: string; async: boolean }) => {
        if (a.async) return printOperation(out, await api.beginStart(a.name));
        const vm = await api.start(a.name);
        out.document(vm, `${vm.name}: ${vm.state}${vm.pid === undefined ? '' : `, pid ${vm.pid}`}`);
      }),
    )
    .command(
      'stop [name]',
      'power a VM off through ACPI and wait for the guest (--force: quit QEMU at once; --all: every VM, as at host shutdown)',
      (y) =>
        daemonOptions(y, env)
          .positional('name', { type: 'string', describe: 'VM name (or --all)' })
          .option('all', { type: 'boolean', default: false, describe: 'power off every VM that has a QEMU, all at once; guests still running at the end are named' })
          .option('timeout', { type: 'number', describe: 'seconds the guest gets to power off', defaultDescription: `the daemon's, ${DEFAULT_STOP_TIMEOUT_SEC}` })
          .option('force', { type: 'boolean', default: false, describe: 'quit QEMU at once: the guest loses what it had not written to disk' })
          .option('host-shutdown', {
            type: 'boolean',
            default: false,
            describe: 'with --all: the host is shutting down (vmkeep-guests.service): the VMs stay wanted running, so autostart=last-state starts them at the next boot',
          })
          .option('state-dir', {
            type: 'string',
            describe: "with --all: if vmkeepd does not answer, power the guests off straight from its records in DIR, under its lock (vmkeep-guests.service at host shutdown)",
          })
          .option('async', ASYNC_OPTION)
          .check((a) => {
            if (a.async && a.all) return '--async goes with one VM (stop --all waits for every guest)';
            if ((a.name !== undefined) === a.all) return 'name one VM or give --all (exactly one of them)';
            if (a.stateDir !== undefined && !a.all) return '--state-dir goes with --all';
            if (a.hostShutdown && !a.all) return '--host-shutdown goes with --all';
            if (a.name !== undefined && checkName(a.name) !== true) return checkName(a.name);
            // ARCHITECTURE.md invariant 3: powering every guest off never hard-kills one.
            if (a.all && a.force) return '--all never forces a guest off; quit one that ignores ACPI with: vmkeep stop NAME --force';
            return checkTimeout(a.timeout);
          })
          .example('$0 stop web1', `ACPI power-off of web1, waiting up to ${DEFAULT_STOP_TIMEOUT_SEC} s for the guest`)
          .example('$0 stop --all --timeout 120', 'what vmkeep-guests.service runs at host shutdown'),
      run(async (api, out, a: CommonArgs & { name?: string; all: boolean; timeout?: number; force: boolean; stateDir?: string; hostShutdown: boolean; async: boolean }) => {
        if (a.name === undefined) {
          const timeoutSec = a.timeout ?? DEFAULT_STOP_TIMEOUT_SEC;
          if (a.stateDir === undefined) return await stopAll(api, out, io, timeoutSec, a.hostShutdown);
          // The records first, under vmkeepd's lock; only a vmkeepd that holds it is asked. The
          // control socket may be held by a socket unit, and a connection to it would start a
          // vmkeepd: one systemd refuses at host shutdown, one that must not run while a snap is
          // removed (ARCHITECTURE.md, invariant 12).
          const stateDir = a.stateDir;
          const offlineStop = async (): Promise<number> => {
            const offline = await openOfflineGuests(stateDir);
            io.stderr.write(`vmkeep: no vmkeepd runs on ${stateDir}; powering the guests off straight from its records\n`);
            try {
              return await stopAll(offline, out, io, timeoutSec, a.hostShutdown);
            } finally {
              await offline.close();
            }
          };
          const codeOf = (error: unknown): unknown => (error as { code?: unknown }).code;
          try {
            return await offlineStop();
          } catch (error) {
            if (codeOf(error) !== 'LOCKED') throw error;
          }
          try {
            return await stopAll(api, out, io, timeoutSec, a.hostShutdown);
          } catch (error) {
            // The vmkeepd that held the lock ended in between: its records are free now.
            if (codeOf(error) !== 'DAEMON_DOWN') throw error;
            return await offlineStop();
          }
        }
        if (!out.json && !a.force) {
          const timeoutSec = a.timeout ?? DEFAULT_STOP_TIMEOUT_SEC;
          io.stderr.write(`vmkeep: asking ${a.name} to power off (ACPI), pressing the button again every ${ACPI_REPEAT_MS / 1000} s until the guest acts (a booting guest misses the first press), for up to ${timeoutSec} s\n`);
        }
        const stopOptions = { ...(a.timeout === undefined ? {} : { timeoutSec: a.timeout }), ...(a.force ? { force: true } : {}) };
        if (a.async) return printOperation(out, await api.beginStop(a.name, stopOptions));
        const vm = await api.stop(a.name, stopOptions);
        out.document(vm, `${vm.name}: ${vm.state}${vm.problem === undefined ? '' : ` (${vm.problem})`}`);
      }),
    )
    .command(
      'delete <name>',
      'delete a stopped VM and its record (its disk images are left alone)',
      (y) => withName(y, env),
      run(async (api, out, a: CommonArgs & { name: string }) => {
        await api.delete(a.name);
        out.document({ deleted: a.name }, `deleted ${a.name}`);
      }),
    )
    .command(
      'set <name> <settings..>',
      'change settings of a VM: autostart=always|never|last-state (whether a host boot starts it)',
      (y) =>
        withName(y, env)
          .positional('settings', { type: 'string', array: true, demandOption: true, describe: 'KEY=VALUE pairs' })
          .check((a) => {
            const parsed = parseSettings(a.settings as string[]);
            return typeof parsed === 'string' ? parsed : true;
          })
          .example('$0 set web1 autostart=always', 'start web1 at every host boot, whatever its state at shutdown')
          .example('$0 set web1 autostart=last-state', 'start it at boot only if it was running when the host went down (the default)'),
      run(async (api, out, a: CommonArgs & { name: string; settings: string[] }) => {
        const vm = await api.set(a.name, parseSettings(a.settings) as VmSettings);
        out.document(vm, `${vm.name}: autostart=${vm.autostart}`);
      }),
    )
    .command(
      'disk <action> <name>',
      "disk chains: `accept` records each disk's backing chain as it is now, after BACKING_CHAIN_CHANGED, once you checked it",
      (y) =>
        withName(y, env)
          .positional('action', { type: 'string', choices: ['accept'], demandOption: true, describe: 'what to do' })
          .example('$0 disk accept web1', 'after checking it with qemu-img info --backing-chain, let web1 start from its new chain'),
      run(async (api, out, a: CommonArgs & { name: string }) => {
        const result = await api.acceptDisks(a.name);
        const lines = result.disks.map((chain, d) => `  disks[${d}]: ${chain.map((l) => `${l.path} (${l.format})`).join(' <- ')}`);
        out.document(result, `${result.vm}: accepted the chains of its disks (top first):\n${lines.join('\n')}`);
      }),
    )
    .command(
      ['list', 'ls'],
      'list the VMs vmkeepd manages',
      (y) => daemonOptions(y, env),
      run((api, out) => listVms(api, out, io)),
    )
    .command(
      'status <name>',
      "show one VM's state, process and QEMU",
      (y) => withName(y, env),
      run(async (api, out, a: CommonArgs & { name: string }) => {
        const vm = await api.get(a.name);
        out.document(vm, formatVmStatus(vm));
      }),
    )
    .command(
      'logs <name>',
      "print a VM's serial console (-f: keep following it, across vmkeepd restarts; Ctrl-C ends)",
      (y) => withName(y, env).option('follow', { alias: 'f', type: 'boolean', default: false, describe: 'keep printing what the guest writes' }),
      run(async (api, out, a: CommonArgs & { name: string; follow: boolean }) => {
        if (!a.follow) {
          const log = await api.console(a.name);
          if (out.json) out.document({ vm: a.name, console: log.toString('utf8') }, '');
          else io.stdout.write(log);
          return;
        }
        const reporter = createReporter(true, io.stdout, io.stderr);
        const decoder = new StringDecoder('utf8');
        let pending = '';
        await untilSignal((signal) =>
          followConsole(api, a.name, {
            signal,
            onNotice: (text) => io.stderr.write(`vmkeep: ${printable(text)}\n`),
            onData: (chunk) => {
              if (!out.json) {
                io.stdout.write(chunk);
                return;
              }
              const lines = (pending + decoder.write(chunk)).split('\n');
              pending = lines.pop() ?? '';
              for (const line of lines) reporter.console(line.replace(/\r$/, ''));
            },
          }),
        );
        const rest = pending + decoder.end();
        if (out.json && rest !== '') reporter.console(rest);
      }),
    )
    .command(
      'qmp <name> <command> [arguments]',
      'run one QMP command on a VM and print its return value as JSON',
      (y) =>
        withName(y, env)
          .positional('command', { type: 'string', demandOption: true, describe: 'QMP command, e.g. query-status' })
          .positional('arguments', { type: 'string', describe: 'its arguments as a JSON object' })
          .check((a) => (a.arguments === undefined || parseArguments(a.arguments) !== undefined ? true : `arguments must be a JSON object, e.g. '{"command-line": "info status"}', got ${a.arguments}`))
          .example('$0 qmp web1 query-status', "the guest's run state")
          .example(`$0 qmp web1 human-monitor-command '{"command-line":"info mtree"}'`, 'a HMP command through QMP'),
      run(async (api, out, a: CommonArgs & { name: string; command: string; arguments?: string }) => {
        const result = await api.qmp(a.name, a.command, a.arguments === undefined ? undefined : parseArguments(a.arguments));
        out.document(result ?? {}, JSON.stringify(result ?? {}, null, 2));
      }),
    )
    .command(
      'refresh [name]',
      'move running VMs onto the current QEMU installation: live migration, ACPI reboot, or at the next guest shutdown',
      (y) =>
        daemonOptions(y, env)
          .positional('name', { type: 'string', describe: 'VM to refresh (or use --all / --stale)' })
          .option('all', { type: 'boolean', default: false, describe: 'every VM (current ones are left as they are)' })
          .option('stale', { type: 'boolean', default: false, describe: 'every stale VM whose strategy is not manual' })
          .option('strategy', { type: 'string', choices: STRATEGIES, describe: 'how to move each VM', defaultDescription: "each VM's policy" })
          .option('parallel', { type: 'number', default: 1, describe: 'VMs refreshed at the same time' })
          .option('timeout', { type: 'number', describe: 'seconds per VM for the migration, or for the guest to power off', defaultDescription: `migrate ${DEFAULT_MIGRATE_TIMEOUT_SEC}, reboot ${DEFAULT_REBOOT_TIMEOUT_SEC}` })
          .option('force', { type: 'boolean', default: false, describe: 'reboot: quit a guest that ignores ACPI (it loses unwritten data)' })
          .option('stop-on-error', { type: 'boolean', default: false, describe: 'begin no further VM once one failed (the same as --max-failures 1)' })
          .option('max-failures', { type: 'number', describe: 'stop the job after N failed VMs: none is begun after that, the rest are reported not attempted' })
          .option('batch-interval', { type: 'number', describe: 'seconds to pause between batches of --parallel VMs (each batch ends before the pause)', defaultDescription: 'no pause' })
          .option('async', ASYNC_OPTION)
          .check((a) => {
            const chosen = [a.name !== undefined, a.all, a.stale].filter(Boolean).length;
            if (chosen !== 1) return 'name one VM, or give --all or --stale (exactly one of them)';
            if (a.name !== undefined && checkName(a.name) !== true) return checkName(a.name);
            if (!Number.isSafeInteger(a.parallel) || a.parallel < 1 || a.parallel > 64) return '--parallel must be a whole number from 1 to 64';
            if (checkTimeout(a.timeout) !== true) return checkTimeout(a.timeout);
            if (a['max-failures'] !== undefined && !(Number.isSafeInteger(a['max-failures']) && a['max-failures'] >= 1)) return '--max-failures must be a whole number from 1';
            if (a['batch-interval'] !== undefined && !(Number.isFinite(a['batch-interval']) && a['batch-interval'] >= 0)) return '--batch-interval must be a number of seconds, 0 or more';
            return true;
          })
          .example('$0 refresh web1 --strategy migrate', 'live-migrate web1 onto the current QEMU (the guest keeps running)')
          .example('$0 refresh web1 --strategy cpr', 'hand web1 over to the current QEMU without copying its RAM (QEMU >= 10.0 on both sides, memfd-shared RAM)')
          .example('$0 refresh --stale --parallel 2', "refresh every stale VM by its own policy, two at a time")
          .example('$0 refresh --all --strategy reboot --stop-on-error', 'power-cycle every stale VM onto the new QEMU, halting at the first failure')
          .example('$0 refresh --stale --strategy migrate-or-reboot --parallel 2 --batch-interval 60 --max-failures 2 --json',
            'two VMs at a time, a minute between batches, stop after two failures; reboot the VMs that cannot migrate'),
      run(async (api, out, a: CommonArgs & RefreshArgs) => {
        const request: RefreshJobRequest = {
          ...(a.name === undefined ? (a.all ? { all: true } : { stale: true }) : { vms: [a.name] }),
          ...(a.strategy === undefined ? {} : { strategy: a.strategy as RefreshStrategy }),
          ...(a.timeout === undefined ? {} : { timeoutSec: a.timeout }),
          ...(a.force ? { force: true } : {}),
          ...(a.stopOnError ? { stopOnError: true } : {}),
          ...(a.maxFailures === undefined ? {} : { maxFailures: a.maxFailures }),
          ...(a.batchInterval === undefined ? {} : { batchIntervalSec: a.batchInterval }),
          parallel: a.parallel,
        };
        if (a.async) return printOperation(out, await api.startRefreshJob(request));
        return followRefreshJob(api, request, { json: out.json, stdout: io.stdout, stderr: io.stderr, onSignal: io.onSignal });
      }),
    )
    .command(
      'upgrade-status',
      'which VMs run an old QEMU (stale), on what, and what their refresh policy will do',
      (y) => daemonOptions(y, env),
      run(async (api, out) => {
        const status = await api.upgradeStatus();
        out.document(status, formatUpgradeStatus(status));
      }),
    )
    .command(
      'operations [id]',
      'list the operations (long requests run in vmkeepd), show one, wait for it, or cancel it',
      (y) =>
        daemonOptions(y, env)
          .positional('id', { type: 'string', describe: 'operation id (as --async or the API printed it)' })
          .option('wait', { type: 'boolean', default: false, describe: 'wait until the operation finished; exit 0 only if it succeeded' })
          .option('cancel', { type: 'boolean', default: false, describe: 'cancel it where it can stop safely (a rolling refresh, a live migration)' })
          .check((a) => ((a.wait || a.cancel) && a.id === undefined ? '--wait and --cancel need an operation id' : true))
          .example('$0 operations', 'every operation kept (running, and finished ones for 24 h)')
          .example('$0 operations 5f0c...e1 --wait', 'wait for one, then show how it ended'),
      run(async (api, out, a: CommonArgs & { id?: string; wait: boolean; cancel: boolean }) => {
        if (a.id === undefined) {
          const ops = await api.operations();
          out.document(ops, ops.length === 0 ? 'no operations kept' : formatOperations(ops));
          return;
        }
        let op = a.cancel ? await api.cancelOperation(a.id) : await api.operation(a.id);
        if (a.wait) op = await api.finished(op);
        out.document(op, formatOperation(op));
        return a.wait && op.status !== 'succeeded' ? EXIT_FAILED : undefined;
      }),
    )
    .command(
      'events',
      "stream vmkeepd's events, one per line, until Ctrl-C",
      (y) =>
        daemonOptions(y, env)
          .option('type', { type: 'string', describe: `only these event types, comma-separated (${EVENT_FILTER_HINT})` })
          .option('vm', { type: 'string', describe: 'only events about these VMs, comma-separated' }),
      run(async (api, out, a: CommonArgs & { type?: string; vm?: string }) => {
        const filter = {
          ...(a.type === undefined ? {} : { type: a.type.split(',') as NonNullable<EventFilter['type']> }),
          ...(a.vm === undefined ? {} : { vm: a.vm.split(',') }),
        };
        await untilSignal((signal) => api.events((event) => out.line(out.json ? JSON.stringify(event) : formatEvent(event)), { signal, filter }));
      }),
    );
}

const ASYNC_OPTION = {
  type: 'boolean',
  default: false,
  describe: 'do not wait: print the operation id (with --json the operation) and return; follow it with vmkeep operations ID --wait',
} as const;

const EVENT_FILTER_HINT = 'vm, refresh, operation, daemon, vm-state, ...';

/** --async: the operation's id for a shell (`op=$(vmkeep start web1 --async)`), or the operation as JSON. */
function printOperation(out: Out, op: Operation): void {
  out.document(op, op.id);
}

type StopResult =
  | { vm: string; result: 'stopped'; state: string }
  | { vm: string; result: 'timeout' | 'failed'; code: string; message: string };

/**
 * `stop --all`: every VM with a QEMU gets its ACPI request at once and the same timeout (host
 * shutdown waits for the slowest guest, not for the sum). A line per VM as each one ends; the
 * guests still running at the end are named in one stderr line, so the journal shows which
 * ones systemd will stop the hard way. Exit 0: all powered off; 3: some ignored the request;
 * 1: some could not be asked (e.g. an unreachable monitor).
 */
/** What stopAll needs: the daemon's API, or the records while it is down. */
type GuestStopper = Pick<OfflineGuests, 'list' | 'stop'>;

/** KEY=VALUE pairs of `vmkeep set` as settings, or what is wrong with them. */
function parseSettings(pairs: readonly string[]): VmSettings | string {
  const settings: VmSettings = {};
  for (const pair of pairs) {
    const [key, value] = pair.split('=', 2);
    if (key !== 'autostart' || value === undefined) return `unknown setting ${JSON.stringify(pair)}; the settings are: autostart=${AUTOSTART_MODES.join('|')}`;
    if (!(AUTOSTART_MODES as readonly string[]).includes(value)) return `autostart must be one of ${AUTOSTART_MODES.join(', ')}, got ${JSON.stringify(value)}`;
    settings.autostart = value as AutostartMode;
  }
  return settings;
}

async function stopAll(api: GuestStopper, out: Out, io: CliIo, timeoutSec: number, hostShutdown = false): Promise<number> {
  const names = (await api.list()).filter((vm) => vm.pid !== undefined).map((vm) => vm.name);
  if (!out.json) {
    io.stderr.write(
      names.length === 0
        ? 'vmkeep: no VM has a running QEMU; nothing to power off\n'
        : `vmkeep: asking ${names.length} VM${names.length === 1 ? '' : 's'} to power off (ACPI), waiting up to ${timeoutSec} s: ${names.join(', ')}\n`,
    );
  }
  const results = await Promise.all(
    names.map(async (name): Promise<StopResult> => {
      let result: StopResult;
      try {
        const vm = await api.stop(name, { timeoutSec, ...(hostShutdown ? { hostShutdown } : {}) });
        result = { vm: name, result: 'stopped', state: vm.state };
      } catch (error) {
        const code = (error as { code?: unknown }).code;
        result = {
          vm: name,
          result: code === 'STOP_TIMEOUT' ? 'timeout' : 'failed',
          code: typeof code === 'string' ? code : 'INTERNAL',
          message: error instanceof Error ? error.message : String(error),
        };
      }
      out.line(out.json ? JSON.stringify({ type: 'vm', ...result }) : stopLine(result, timeoutSec));
      return result;
    }),
  );
  const left = results.filter((r) => r.result !== 'stopped');
  const summary = {
    type: 'result',
    timeoutSec,
    stopped: results.filter((r) => r.result === 'stopped').map((r) => r.vm),
    timedOut: left.filter((r) => r.result === 'timeout').map((r) => r.vm),
    failed: left.filter((r) => r.result === 'failed').map((r) => r.vm),
    stillRunning: left.map((r) => r.vm),
  };
  if (out.json) out.line(JSON.stringify(summary));
  if (left.length > 0) io.stderr.write(`vmkeep: still running after ${timeoutSec} s: ${summary.stillRunning.join(', ')}\n`);
  return summary.failed.length > 0 ? EXIT_FAILED : summary.timedOut.length > 0 ? EXIT_POWEROFF_TIMEOUT : EXIT_CLEAN;
}

function stopLine(r: StopResult, timeoutSec: number): string {
  if (r.result === 'stopped') return `${r.vm}: ${r.state}`;
  if (r.result === 'timeout') return `${r.vm}: did not power off within ${timeoutSec} s; left running`;
  return `${r.vm}: could not be asked to power off [${r.code}]: ${r.message}`;
}

interface RefreshArgs {
  name?: string;
  all: boolean;
  stale: boolean;
  strategy?: string;
  parallel: number;
  timeout?: number;
  force: boolean;
  stopOnError: boolean;
  maxFailures?: number;
  batchInterval?: number;
  async: boolean;
}

function parseArguments(text: string): Record<string, unknown> | undefined {
  try {
    const value: unknown = JSON.parse(text);
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}
