import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { createLogger, isLogLevel, OPERATOR_SOCKET_NAME, startDaemon, type DaemonOptions, type OperatorUserNet } from '../daemon/index.js';
import { IFNAME_RE, type Installation, type QemuUser } from '../launcher/index.js';
import { loadInstallationsConfig, parseStrategy, singleInstallation } from '../upgrade/index.js';
import { CliError } from './errors.js';
import { DEFAULT_QEMU_USER, installationFrom } from './options.js';

export interface DaemonCommandArgs {
  stateDir: string;
  runtimeDir: string;
  logDir: string;
  socket: string;
  socketGroup?: string;
  operatorGroup?: string;
  operatorSocket?: string;
  storageRoots?: string[];
  operatorBridges?: string[];
  operatorUserNet: OperatorUserNet;
  qemuUser: string;
  allowQemuRoot: boolean;
  slice: string;
  scope: boolean;
  tapRepair: boolean;
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
  idleExit?: number;
}

/** The parsed daemon options (from yargs or vmkeepd's own parser), camelCase. */
export interface ParsedDaemonOptions {
  qemu: string;
  moduleDir?: string | undefined;
  firmwareDir?: string[] | undefined;
  stateDir: string;
  runtimeDir: string;
  logDir: string;
  socket: string;
  socketGroup?: string | undefined;
  operatorGroup?: string | undefined;
  operatorSocket?: string | undefined;
  storageRoot?: string[] | undefined;
  operatorBridge?: string[] | undefined;
  /** One of OPERATOR_USER_NETS: the parser checks the choices. */
  operatorUserNet: string;
  qemuUser: string;
  allowQemuRoot: boolean;
  slice: string;
  scope: boolean;
  tapRepair: boolean;
  busAddress?: string | undefined;
  installations?: string | undefined;
  refreshAtStart: boolean;
  guestsUnit?: string | undefined;
  testCrashAt?: string | undefined;
  refreshPolicy: string;
  logLevel: string;
  autostartParallel: string;
  autostartDelay: string;
  logMaxKib: string;
  logKeep: string;
  idleExit?: string | undefined;
}

/** A whole number option within bounds, or a usage error naming the option and what it takes. */
function wholeNumber(option: string, value: string, min: number, max: number): number {
  const n = Number(value);
  if (!/^\d+$/.test(value.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new CliError('USAGE', `--${option} must be a whole number from ${min} to ${max}, got ${JSON.stringify(value)}`);
  }
  return n;
}

/** The daemon's arguments and its installation(s) from its parsed options. */
export function daemonCommandArgs(a: ParsedDaemonOptions, env: NodeJS.ProcessEnv): { args: DaemonCommandArgs; installations: Installation | string } {
  return {
    args: {
      stateDir: a.stateDir,
      runtimeDir: a.runtimeDir,
      logDir: a.logDir,
      socket: a.socket,
      slice: a.slice,
      scope: a.scope,
      tapRepair: a.tapRepair,
      logLevel: a.logLevel,
      ...(a.socketGroup === undefined ? {} : { socketGroup: a.socketGroup }),
      ...(a.operatorGroup === undefined ? {} : { operatorGroup: a.operatorGroup }),
      ...(a.operatorSocket === undefined ? {} : { operatorSocket: a.operatorSocket }),
      ...(a.storageRoot === undefined ? {} : { storageRoots: a.storageRoot }),
      ...(a.operatorBridge === undefined ? {} : { operatorBridges: a.operatorBridge.map(bridgeName) }),
      operatorUserNet: a.operatorUserNet as OperatorUserNet,
      qemuUser: a.qemuUser,
      allowQemuRoot: a.allowQemuRoot,
      ...(a.busAddress === undefined ? {} : { busAddress: a.busAddress }),
      refreshPolicy: a.refreshPolicy,
      refreshAtStart: a.refreshAtStart,
      ...(a.guestsUnit === undefined ? {} : { guestsUnit: a.guestsUnit }),
      ...(a.testCrashAt === undefined ? {} : { crashAt: a.testCrashAt }),
      autostartParallel: wholeNumber('autostart-parallel', String(a.autostartParallel), 1, 64),
      autostartDelay: wholeNumber('autostart-delay', String(a.autostartDelay), 0, 3600),
      logMaxKib: wholeNumber('log-max-kib', String(a.logMaxKib), 1, 1024 * 1024),
      logKeep: wholeNumber('log-keep', String(a.logKeep), 0, 9),
      ...(a.idleExit === undefined ? {} : { idleExit: wholeNumber('idle-exit', String(a.idleExit), 1, 86_400) }),
    },
    installations: a.installations === undefined ? installationFrom(a, env) : a.installations,
  };
}

function usage(message: string): never {
  throw new CliError('USAGE', message);
}

function bridgeName(name: string): string {
  if (IFNAME_RE.test(name)) return name;
  return usage(`--operator-bridge ${JSON.stringify(name)} is not a network interface name; name a Linux bridge, e.g. br0 (\`ip -br link show type bridge\` lists them)`);
}

/** A group name or number as a gid (reads /etc/group: Node has no getgrnam). */
function resolveGroup(option: string, group: string, groupFile = '/etc/group'): number {
  if (/^\d+$/.test(group)) return Number(group);
  for (const line of readFileSync(groupFile, 'utf8').split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new CliError('USAGE', `--${option} ${group}: no such group in ${groupFile}; create it (groupadd ${group}) or give a numeric gid`);
}

/** A user name or number as its uid and primary gid (reads /etc/passwd: Node has no getpwnam). */
export function resolveQemuUser(user: string, allowRoot: boolean, passwdFile = '/etc/passwd'): QemuUser {
  let found: QemuUser | undefined;
  for (const line of readFileSync(passwdFile, 'utf8').split('\n')) {
    const [name, , uid, gid] = line.split(':');
    if (name === undefined || uid === undefined || gid === undefined || !/^\d+$/.test(uid) || !/^\d+$/.test(gid)) continue;
    if (name === user || uid === user) {
      found = { name, uid: Number(uid), gid: Number(gid) };
      break;
    }
  }
  if (found === undefined) {
    throw new CliError('USAGE', `--qemu-user ${user}: no such user in ${passwdFile}; create it (useradd --system --no-create-home --shell /usr/sbin/nologin ${user}) or name another`);
  }
  if (found.uid === 0 && !allowRoot) {
    throw new CliError('USAGE', `--qemu-user ${user} is root: a QEMU escape would be a root shell; fix: use an unprivileged user (default ${DEFAULT_QEMU_USER}), or add --allow-qemu-root if you must`);
  }
  return found;
}

/** Runs vmkeepd in the foreground until SIGINT/SIGTERM; resolves to the exit code. */
export async function runDaemonCommand(
  args: DaemonCommandArgs,
  /** The one installation (--qemu ...), or the path of an installations file. */
  installations: Installation | string,
  version: string,
  onSignal: (listener: (signal: NodeJS.Signals) => void) => () => void,
): Promise<number> {
  if (!isLogLevel(args.logLevel)) throw new CliError('USAGE', `--log-level ${args.logLevel}: not a log level`);
  // JSON lines on stderr: journald keeps them.
  const logger = createLogger({ name: 'vmkeepd', level: args.logLevel });
  const qemuUser = resolveQemuUser(args.qemuUser, args.allowQemuRoot);
  if (qemuUser.uid === 0) logger.warn({ qemuUser: qemuUser.name }, 'QEMU runs as root (--allow-qemu-root): a guest that escapes QEMU owns the host; use an unprivileged --qemu-user');
  const options: DaemonOptions = {
    installations: typeof installations === 'string' ? await loadInstallationsConfig(installations) : singleInstallation(installations),
    defaultPolicy: parseStrategy(args.refreshPolicy, '--refresh-policy'),
    refreshAtStart: args.refreshAtStart,
    tapRepair: args.tapRepair,
    ...(args.guestsUnit === undefined ? {} : { guestsUnit: args.guestsUnit }),
    ...(args.crashAt === undefined ? {} : { crashAt: args.crashAt }),
    ...(args.autostartParallel === undefined ? {} : { autostartParallel: args.autostartParallel }),
    ...(args.autostartDelay === undefined ? {} : { autostartDelaySec: args.autostartDelay }),
    ...(args.logMaxKib === undefined ? {} : { logMaxBytes: args.logMaxKib * 1024 }),
    ...(args.logKeep === undefined ? {} : { logKeep: args.logKeep }),
    ...(args.idleExit === undefined ? {} : { idleExitSec: args.idleExit }),
    stateDir: args.stateDir,
    runtimeDir: args.runtimeDir,
    logDir: args.logDir,
    socketPath: args.socket,
    slice: args.slice,
    useScopes: args.scope,
    version,
    ...(args.busAddress === undefined ? {} : { busAddress: args.busAddress }),
    ...(args.socketGroup === undefined ? {} : { socketGid: resolveGroup('socket-group', args.socketGroup) }),
    ...(args.operatorGroup === undefined ? {} : {
      operator: {
        gid: resolveGroup('operator-group', args.operatorGroup),
        socketPath: args.operatorSocket ?? join(dirname(args.socket), OPERATOR_SOCKET_NAME),
      },
    }),
    ...(args.operatorSocket !== undefined && args.operatorGroup === undefined ? usage('--operator-socket needs --operator-group GROUP (the group that may use it)') : {}),
    storageRoots: args.storageRoots ?? [],
    operatorBridges: args.operatorBridges ?? [],
    operatorUserNet: args.operatorUserNet,
    qemuUser,
  };
  // Listening from before the start: READY=1 goes out before startDaemon resolves (the staleness
  // report follows it), and a SIGTERM in between must close the daemon, not end it mid-way.
  const signalled = new Promise<NodeJS.Signals>((resolve) => {
    const off = onSignal((s) => {
      off();
      resolve(s);
    });
  });
  const daemon = await startDaemon(options, logger);
  const signal = await Promise.race([signalled, daemon.idle.then(() => undefined)]);
  if (signal !== undefined) logger.info({ signal }, 'stopping vmkeepd; VMs keep running');
  await daemon.close();
  return 0;
}
