import { join, resolve } from 'node:path';
import type { Logger } from './log.js';
import { deniedTo, probeInstallation, qemuFolderModes, secureFolder, type QemuUser } from '../launcher/index.js';
import type { InstallationsConfig, RefreshStrategy } from '../upgrade/index.js';
import { MachineRegistry, ScopeManager, SCOPE_PREFIX } from '../scope-manager/index.js';
import { DaemonError } from './errors.js';
import { startApiServer, toApiError } from './api-server.js';
import { countDaemonStart } from './metrics.js';
import { Operations, operationsDir } from './operations.js';
import { acquireDaemonLock } from './lock.js';
import { VmManager } from './manager.js';
import type { MachinePort, ScopePort } from './ports.js';
import { DEFAULT_OPERATOR_USER_NET, type OperatorUserNet } from './access.js';
import { startNotifier, type Notifier } from './notify.js';
import { recordsDir, RecordStore } from './records.js';
import { DEFAULT_LOG_KEEP, DEFAULT_LOG_MAX_BYTES } from './log-rotation.js';
import { takeControlSockets } from './socket-activation.js';
import { startStatusUpdates, statusText } from './status-text.js';
import { watchIdle, type IdleWatch } from './idle-exit.js';

export interface DaemonOptions {
  stateDir: string;
  runtimeDir: string;
  /** Each VM's serial console and QEMU logs, in LOG_DIR/NAME/. */
  logDir: string;
  socketPath: string;
  /** gid that may use the control socket (mode 0660, root-equivalent); default: root only (0600). */
  socketGid?: number;
  /** The operator socket (mode 0660, this group): what operators may do (daemon/access.ts). */
  operator?: { gid: number; socketPath: string };
  /** Folders the operators' disk images must be in. */
  storageRoots?: readonly string[];
  /** Bridges the operators' VMs may join (--operator-bridge; default none). */
  operatorBridges?: readonly string[];
  /** What operators' user-mode NICs reach (--operator-user-net). */
  operatorUserNet?: OperatorUserNet;
  /** The user every QEMU runs as (ARCHITECTURE.md, invariant 11); absent: vmkeepd's own. */
  qemuUser?: QemuUser;
  /** Slice of the VM scopes. */
  slice: string;
  /** false: --no-scope, every QEMU stays in the daemon's cgroup and dies with it. */
  useScopes: boolean;
  busAddress?: string;
  /** The installations and which is current per channel. */
  installations: InstallationsConfig;
  /** Refresh strategy of VMs that have none of their own (default manual: only report). */
  defaultPolicy?: RefreshStrategy;
  /** After reattaching, refresh every stale VM whose policy is not manual (a package's restart). */
  refreshAtStart?: boolean;
  /** The unit whose stop powers the guests off at host shutdown (default vmkeep-guests.service). */
  guestsUnit?: string;
  /** Test hook: SIGKILL self at this refresh step. */
  crashAt?: string;
  /** At a host boot: VMs started at once (default 2) and the pause between two starts. */
  autostartParallel?: number;
  autostartDelaySec?: number;
  /** With a socket from systemd: exit after this long with no QEMU, no operation and no client. */
  idleExitSec?: number;
  /** false: running VMs' TAPs found off their bridges are reported, not put back (--no-tap-repair). */
  tapRepair?: boolean;
  /** Bounds of each VM's serial and QEMU logs. */
  logMaxBytes?: number;
  logKeep?: number;
  version: string;
}

export interface DaemonHandle {
  manager: VmManager;
  /** Ends the daemon: closes the API and every monitor. Never signals a QEMU. */
  close(): Promise<void>;
  /** Resolves when --idle-exit found nothing to do for its time (never without it). */
  idle: Promise<void>;
}

/**
 * Brings vmkeepd up: single-daemon lock, records, scopes, reattach of every VM, control API,
 * then READY=1 to systemd. Resolves once it serves.
 */
export async function startDaemon(options: DaemonOptions, logger: Logger): Promise<DaemonHandle> {
  // Started first: its process is ready long before READY=1 is due.
  const notifier: Notifier = startNotifier();
  await secureFolders(options, logger);
  const lock = await acquireDaemonLock(options.stateDir);
  const cleanups: Array<() => Promise<void> | void> = [() => notifier.close(), () => lock.release()];
  const closeAll = async (): Promise<void> => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  };
  try {
    const store = new RecordStore(recordsDir(options.stateDir));
    await store.init();

    let scopes: ScopePort | null = null;
    let machines: MachinePort | undefined;
    if (options.useScopes) {
      const manager = new ScopeManager(options.busAddress === undefined ? {} : { busAddress: options.busAddress });
      cleanups.push(() => manager.close());
      // Fails now, with the alternatives in the message, rather than at the first VM start.
      await manager.listScopes(SCOPE_PREFIX);
      // In a container without --pid=host every recorded PID would name another process or none
      // (reattach would misjudge every VM) and no QEMU could be placed in a scope: refuse to run.
      await manager.checkPidNamespace();
      scopes = manager;
      // On the same connection: machined lists each VM under the scope it is already in.
      machines = new MachineRegistry(manager);
    } else {
      logger.warn('--no-scope: QEMU processes stay in the daemon\'s cgroup and die with it when its service stops');
    }

    const cacheDir = join(options.stateDir, 'cache');
    const manager = new VmManager({
      store,
      scopes,
      ...(machines === undefined ? {} : { machines }),
      slice: options.slice,
      installations: options.installations,
      defaultPolicy: options.defaultPolicy ?? 'manual',
      pinRoot: pinRootOf(options),
      ...(options.crashAt === undefined ? {} : { crashAt: options.crashAt }),
      ...(options.guestsUnit === undefined ? {} : { guestsUnit: options.guestsUnit }),
      probe: (installation) => probeInstallation(installation, { cacheDir }),
      runtimeDir: options.runtimeDir,
      logDir: options.logDir,
      storageRoots: (options.storageRoots ?? []).map((root) => resolve(root)),
      operatorBridges: options.operatorBridges ?? [],
      operatorUserNet: options.operatorUserNet ?? DEFAULT_OPERATOR_USER_NET,
      ...(options.qemuUser === undefined ? {} : { qemuUser: options.qemuUser }),
      ...(options.tapRepair === undefined ? {} : { tapRepair: options.tapRepair }),
      logger,
      ...(options.logMaxBytes === undefined && options.logKeep === undefined ? {} : {
        logLimits: { maxBytes: options.logMaxBytes ?? DEFAULT_LOG_MAX_BYTES, keep: options.logKeep ?? DEFAULT_LOG_KEEP },
      }),
      info: {
        version: options.version,
        pid: process.pid,
        stateDir: options.stateDir,
        runtimeDir: options.runtimeDir,
        startedAt: new Date().toISOString(),
      },
    });
    cleanups.push(() => manager.close());
    const started = performance.now();
    // A VM whose monitor is slow to answer (held by another client, a hung QEMU) goes on
    // reattaching after READY in its own lock; it does not keep every request waiting.
    await manager.reattachAll(READY_WAIT_MS);
    // Ended by manager.close() above (ARCHITECTURE.md, "Networking").
    manager.watchLinks();
    const vms = await manager.list();
    logger.info(
      { vms: vms.length, ms: Math.round(performance.now() - started), states: countStates(vms.map((v) => v.state)) },
      `reattached ${vms.length} VM(s)`,
    );

    const operations = new Operations({
      dir: operationsDir(options.stateDir),
      emit: (event) => manager.emit(event),
      toError: (error) => toApiError(error) ?? { code: 'INTERNAL', message: `failed unexpectedly (${(error as Error).message}); the details are in vmkeepd's log` },
      logError: (fields, message) => logger.error(fields as Record<string, unknown>, message),
    });
    cleanups.push(() => operations.close());
    // Operations a previous daemon left unfinished end as DAEMON_RESTARTED, saying where their
    // VMs stand once reattached (a refresh settled by its crash recovery).
    const interrupted = await operations.load();
    if (interrupted.length > 0) {
      logger.warn({ operations: interrupted.map((op) => op.id) }, `${interrupted.length} operation(s) were under way when the previous vmkeepd ended`);
      // Not awaited: a slow reattach must not hold READY back.
      void manager.reattachDone.then(async () => {
        const vms = await manager.list();
        for (const op of interrupted) {
          const after = vms.filter((vm) => op.vms.includes(vm.name)).map((vm) =>
            `${vm.name} ${vm.state} on "${vm.installation}"${vm.qemuVersion === undefined ? '' : ` (QEMU ${vm.qemuVersion})`}${vm.problem === undefined ? '' : ` (${vm.problem})`}`);
          operations.explainRestart(op.id, `after the restart: ${after.join(', ') || 'its VMs are gone'}`);
        }
      }).catch((error: unknown) => logger.error({ err: error }, 'could not tell where the VMs of interrupted operations stand'));
    }

    // Held by systemd (vmkeepd.socket) when it passed one: connections wait while we restart.
    const passed = takeControlSockets();
    // Clients on either socket keep an idle-exit away.
    const connections = { control: 0, operator: 0 };
    let idleWatch: IdleWatch | undefined;
    const api = await startApiServer({
      onConnections: (open) => {
        connections.control = open;
        idleWatch?.poke();
      },
      socketPath: options.socketPath,
      ops: manager,
      operations,
      logger,
      ...(options.socketGid === undefined ? {} : { group: options.socketGid }),
      ...(passed.control === undefined ? {} : { listenFd: passed.control }),
    });
    cleanups.push(() => api.close());
    if (options.operator !== undefined) {
      const operatorApi = await startApiServer({
        socketPath: options.operator.socketPath,
        ops: manager,
        operations,
        logger,
        level: 'operator',
        onConnections: (open) => {
          connections.operator = open;
          idleWatch?.poke();
        },
        group: options.operator.gid,
        ...(passed.operator === undefined ? {} : { listenFd: passed.operator }),
      });
      cleanups.push(() => operatorApi.close());
      if (options.socketGid === options.operator.gid) {
        logger.warn({ gid: options.socketGid }, 'the operator group may also use the admin socket (--socket-group): it is root-equivalent');
      }
      logger.info({ socket: options.operator.socketPath, gid: options.operator.gid, storageRoots: options.storageRoots ?? [], bridges: options.operatorBridges ?? [], userNet: options.operatorUserNet ?? DEFAULT_OPERATOR_USER_NET }, 'operator socket ready');
    }
    let idle: Promise<void> = new Promise<void>(() => undefined);
    if (options.idleExitSec !== undefined && passed.control === undefined) {
      logger.warn({ idleExitSec: options.idleExitSec }, '--idle-exit ignored: vmkeepd did not get its socket from systemd (vmkeepd.socket), so nothing would start it again');
    } else if (options.idleExitSec !== undefined) {
      const idleExitSec = options.idleExitSec;
      let exit: () => void = () => undefined;
      idle = new Promise<void>((resolve) => (exit = resolve));
      const watch = watchIdle(idleExitSec * 1000, () => ({
        connections: connections.control + connections.operator,
        vmsWithQemu: manager.entries().filter((e) => e.record.process !== undefined).length,
        operations: manager.entries().filter((e) => e.lock.current !== undefined).length,
      }), () => {
        logger.info({ idleExitSec }, `no VM running and no client for ${idleExitSec} s: exiting (vmkeepd.socket starts vmkeepd again at the next connection)`);
        exit();
      });
      idleWatch = watch;
      const unsubscribe = manager.subscribe(() => watch.poke());
      cleanups.push(() => {
        unsubscribe();
        watch.stop();
      });
    }
    // startupMs: since this process started (Node's time origin), for the start-up benchmark.
    // Logged before READY=1: whoever waits for READY (systemctl start) finds the line written.
    logger.info({ socket: options.socketPath, stateDir: options.stateDir, startupMs: Math.round(performance.now()), socketActivated: passed.control !== undefined }, 'vmkeepd ready');
    notifier.send('READY=1', `STATUS=${statusText({ states: vms.map((v) => v.state), jobs: [] })}`);
    // Kept up to date from here on: `systemctl status vmkeepd` shows it.
    cleanups.push(startStatusUpdates(manager, (text) => notifier.send(`STATUS=${text}`)));
    await manager.afterReady();
    manager.metrics.daemonStarts = await countDaemonStart(options.stateDir).catch((error: unknown) => {
      logger.warn({ err: error }, 'could not count this start in the state folder; the metric vmkeep_daemon_starts_total is left out');
      return undefined;
    });
    await reportStale(manager, operations, logger, options.refreshAtStart === true);
    // After READY: the API serves (and shows each VM starting) while the boot's starts run.
    void manager.autostartAtBoot({
      stateDir: options.stateDir,
      parallel: options.autostartParallel ?? 2,
      delayMs: (options.autostartDelaySec ?? 0) * 1000,
    }).catch((error: unknown) => logger.error({ err: error }, 'autostart at boot failed'));
    return { manager, close: closeAll, idle };
  } catch (error) {
    await closeAll();
    throw error;
  }
}

/**
 * The state and runtime folders belong to vmkeepd alone (the manager secures the VMs' folders): 0700,
 * or 0750 for the group that reaches the control sockets through the runtime folder. An
 * existing one with a looser mode is tightened, one owned by someone else or a link is refused
 * (ARCHITECTURE.md, invariant 11).
 */
async function secureFolders(options: DaemonOptions, logger: Logger): Promise<void> {
  if (options.socketGid !== undefined && options.operator !== undefined && options.socketGid !== options.operator.gid) {
    throw new DaemonError('START_FAILED', `--socket-group (gid ${options.socketGid}) and --operator-group (gid ${options.operator.gid}) differ, and the runtime folder can let only one group reach its sockets; fix: give one of them, or the same group`);
  }
  const gid = options.socketGid ?? options.operator?.gid;
  const qemu = qemuFolderModes(options.qemuUser);
  // QEMU's user passes through the state and runtime folders (never lists them) to its pinned
  // modules and its VM's folder, which only its group may enter (ARCHITECTURE.md, invariant 11).
  const pass = qemu.pass.gid === undefined ? 0 : 0o011;
  const wanted: Array<[string, { mode: number; gid?: number }]> = [
    [options.stateDir, { mode: 0o700 | pass }],
    [options.runtimeDir, gid === undefined ? { mode: 0o700 | pass } : { mode: 0o750 | (pass & 0o001), gid }],
    [pinRootOf(options), qemu.pass],
  ];
  for (const [path, want] of wanted) {
    const changed = await secureFolder(path, want);
    if (changed !== undefined) logger.warn({ path }, `set ${changed}`);
  }
  // Every start would fail later, less clearly, when QEMU's user cannot reach them.
  if (options.qemuUser !== undefined && pass !== 0) {
    for (const folder of [options.stateDir, options.runtimeDir]) {
      const denied = await deniedTo(folder, options.qemuUser, 'pass');
      if (denied !== undefined) {
        throw new DaemonError('START_FAILED', `QEMU's user ${options.qemuUser.name} cannot reach ${folder}: ${denied}; fix: chmod o+x that folder, or choose a folder under passable ones`);
      }
    }
  }
}

function pinRootOf(options: Pick<DaemonOptions, 'stateDir'>): string {
  return join(options.stateDir, 'modules');
}


/** The longest vmkeepd waits for its VMs' reattach before it serves the API and reports ready. */
const READY_WAIT_MS = 1_000;

/** Logs every stale VM; with refreshAtStart, begins the rolling refresh the policies ask for. */
async function reportStale(manager: VmManager, operations: Operations, logger: Logger, refresh: boolean): Promise<void> {
  try {
    const status = await manager.upgradeStatus();
    for (const vm of status.vms.filter((v) => v.stale || v.warnings !== undefined)) {
      const what = vm.stale ? `${vm.name} is stale: ${vm.outcome}` : `${vm.name}: ${vm.warnings?.join('; ')}`;
      logger.warn({ vm: vm.name, reasons: vm.reasons, warnings: vm.warnings, policy: vm.policy }, what);
    }
    if (!refresh) return;
    const plan = await manager.planRefreshJob({ stale: true });
    const op = operations.begin('rolling-refresh', plan.vms, (context) => manager.runRefreshJob(plan, context));
    logger.info({ operation: op.id, vms: plan.vms }, `refresh at start: ${plan.vms.length} stale VM(s) to move by their policy (operation ${op.id})`);
  } catch (error) {
    logger.error({ err: error }, 'could not check the VMs for staleness at start');
  }
}

function countStates(states: string[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const state of states) counts[state] = (counts[state] ?? 0) + 1;
  return counts;
}
