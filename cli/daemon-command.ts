import { readFileSync } from 'node:fs';
import { journalDestination, startDaemon, type DaemonOptions } from '../daemon/index.js';
import type { Installation } from '../launcher/index.js';
import { loadInstallationsConfig, parseStrategy, singleInstallation } from '../upgrade/index.js';
import { CliError } from './errors.js';

export interface DaemonCommandArgs {
  stateDir: string;
  runtimeDir: string;
  socket: string;
  socketGroup?: string;
  slice: string;
  scope: boolean;
  busAddress?: string;
  logLevel: string;
  refreshPolicy: string;
  refreshAtStart: boolean;
  guestsUnit?: string;
  /** Test hook (VMKEEP_TEST_CRASH_AT): SIGKILL self at this refresh step. */
  crashAt?: string;
  autostartParallel?: number;
  autostartDelay?: number;
  logMaxKib?: number;
  logKeep?: number;
}

/** A group name or number as a gid (reads /etc/group: Node has no getgrnam). */
function resolveGroup(group: string, groupFile = '/etc/group'): number {
  if (/^\d+$/.test(group)) return Number(group);
  for (const line of readFileSync(groupFile, 'utf8').split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new CliError('USAGE', `--socket-group ${group}: no such group in ${groupFile}; create it (groupadd ${group}) or give a numeric gid`);
}

/** Runs vmkeepd in the foreground until SIGINT/SIGTERM; resolves to the exit code. */
export async function runDaemonCommand(
  args: DaemonCommandArgs,
  /** The one installation (--qemu ...), or the path of an installations file. */
  installations: Installation | string,
  version: string,
  onSignal: (listener: (signal: NodeJS.Signals) => void) => () => void,
): Promise<number> {
  // Loaded here: only the daemon needs its logger. JSON lines on stderr: journald keeps them,
  // each with its priority when stderr is the journal's stream.
  const { pino } = await import('pino');
  const logger = pino({ name: 'vmkeepd', level: args.logLevel }, journalDestination(pino.destination({ fd: 2, sync: true }), 2));
  const options: DaemonOptions = {
    installations: typeof installations === 'string' ? await loadInstallationsConfig(installations) : singleInstallation(installations),
    defaultPolicy: parseStrategy(args.refreshPolicy, '--refresh-policy'),
    refreshAtStart: args.refreshAtStart,
    ...(args.guestsUnit === undefined ? {} : { guestsUnit: args.guestsUnit }),
    ...(args.crashAt === undefined ? {} : { crashAt: args.crashAt }),
    ...(args.autostartParallel === undefined ? {} : { autostartParallel: args.autostartParallel }),
    ...(args.autostartDelay === undefined ? {} : { autostartDelaySec: args.autostartDelay }),
    ...(args.logMaxKib === undefined ? {} : { logMaxBytes: args.logMaxKib * 1024 }),
    ...(args.logKeep === undefined ? {} : { logKeep: args.logKeep }),
    stateDir: args.stateDir,
    runtimeDir: args.runtimeDir,
    socketPath: args.socket,
    slice: args.slice,
    useScopes: args.scope,
    version,
    ...(args.busAddress === undefined ? {} : { busAddress: args.busAddress }),
    ...(args.socketGroup === undefined ? {} : { socketGid: resolveGroup(args.socketGroup) }),
  };
  const daemon = await startDaemon(options, logger);
  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    const off = onSignal((s) => {
      off();
      resolve(s);
    });
  });
  logger.info({ signal }, 'stopping vmkeepd; VMs keep running');
  await daemon.close();
  return 0;
}
