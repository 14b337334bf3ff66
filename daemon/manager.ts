// vmkeepd's VM manager: the API's operations on top of the parts it is split into
// (ARCHITECTURE.md, "daemon/"): supervision.ts watches monitors, reattach.ts finds VMs again
// after a restart, migration.ts moves them live, refresh-plan.ts decides a refresh,
// refresh-jobs.ts runs many, upgrade-status.ts reports, pins.ts keeps module folders.
import { randomUUID } from 'node:crypto';
import { closeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { Logger } from './log.js';
import {
  checkSpecFiles, isValidVmName, LaunchError, memoryBackendOf, openOwnFile, ownVmFolder, probeNetdevs, qemuFolderModes, QUIT_EXIT_TIMEOUT_MS, realRoots,
  removeStaleSocket, removeVmFolder, resolveMachineType, resolveWithinRoots, scopeLimits, secureFolder, validateSpec,
  validateSpecAndFiles, withinRoots, withMacs, withMemoryDefault,
  type DiskChain, type Installation, type InstallationInfo, type LaunchedVm, type QemuUser, type ScopeLimits, type VmSpec,
} from '../launcher/index.js';
import { isQmpError, powerDownGuest, type QmpClient } from '../qmp/index.js';
import { scopeUnitName } from '../scope-manager/index.js';
import {
  checkRefreshTarget, chooseLiveStrategy, currentInstallation, pausedCopyReason, DEFAULT_CHANNEL, parseStrategy,
  type InstallationsConfig, type RefreshStrategy,
} from '../upgrade/index.js';
import { checkOperatorSpec, DEFAULT_OPERATOR_USER_NET, forbidden, type OperatorUserNet } from './access.js';
import { DaemonError } from './errors.js';
import { DEFAULT_REBOOT_TIMEOUT_SEC, DEFAULT_STOP_TIMEOUT_SEC, MONITOR_GREETING_TIMEOUT_MS } from './model.js';
import { AUTOSTART_MODES } from './model.js';
import type {
  CreateOptions, DaemonEvent, DaemonInfo, DaemonOps, DiskAcceptResult, RefreshJob, RefreshJobPlan, RefreshJobRequest, RefreshOptions, RefreshOutcome,
  StopOptions, UpgradeStatus, VmSettings, VmView,
} from './model.js';
import { asDaemonDiskError, chainsForStart, refuseSharedImages } from './disks.js';
import { autostartAtBoot, type AutostartOptions, type AutostartPlan } from './autostart.js';
import { DEFAULT_LOG_KEEP, DEFAULT_LOG_MAX_BYTES, rotateIfLarge, startLogRotation, type LogLimits } from './log-rotation.js';
import { MachineSync } from './machines.js';
import { migrateNow, MigrationRolledBack } from './migration.js';
import { ModulePins } from './pins.js';
import { realQemu, type MachinePort, type QemuPort, type ScopePort } from './ports.js';
import { NicRepair } from './nic-repair.js';
import { reattachIsolated } from './reattach.js';
import { bridgesOf, nicHostProblems, orphanTaps, realNet, refuseNicHostProblems, TapKeeper, tapList, tapsClaimed, tapsForNewQemu, tapsReleased, type NetPort } from './taps.js';
import { RECORD_SCHEMA, type RecordStore, type VmRecord } from './records.js';
import type { OperationContext, RunAs } from './operations.js';
import { RefreshJobs } from './refresh-jobs.js';
import { planFallback, planRefresh } from './refresh-plan.js';
import { DaemonMetrics, formatExposition } from './metrics.js';
import { startHealthChecks, superviseMonitor } from './supervision.js';
import { stalenessOf, upgradeStatus } from './upgrade-status.js';
import type { CoreOptions, Launch, LaunchArgs, VmCore } from './vm-core.js';
import { binaryOf, newEntry, toView, truncate, type VmEntry } from './vm-entry.js';

export type { ScopePort, QemuPort, MachinePort } from './ports.js';

export interface VmManagerOptions {
  store: RecordStore;
  scopes: ScopePort | null;
  /** systemd-machined, which lists each running VM (absent: not registered). */
  machines?: MachinePort;
  /** QEMU processes and monitors (default: the real ones). */
  qemu?: QemuPort;
  /** The host's links: bridges and TAP devices (default: the real ones). */
  net?: NetPort;
  slice: string;
  /** The installations and which is current per channel. */
  installations: InstallationsConfig;
  /** The refresh strategy of VMs that have none of their own. */
  defaultPolicy: RefreshStrategy;
  /** Where module folders are pinned (one copy per installation build). */
  pinRoot: string;
  /** The unit whose stop powers the guests off at host shutdown; VM scopes stop after it. */
  guestsUnit?: string;
  /** Test hook: the daemon SIGKILLs itself on reaching this refresh step (VMKEEP_TEST_CRASH_AT). */
  crashAt?: string;
  /** Probes the installation (cached by binary identity). */
  probe: (installation: Installation) => Promise<InstallationInfo>;
  runtimeDir: string;
  /** Each VM's serial console and QEMU logs go in LOG_DIR/NAME/. */
  logDir: string;
  /** --storage-root folders, absolute (ARCHITECTURE.md, invariant 11). */
  storageRoots?: readonly string[];
  /** --operator-bridge names: the bridges operators' NICs may join. */
  operatorBridges?: readonly string[];
  /** --operator-user-net: what operators' user-mode NICs reach. */
  operatorUserNet?: OperatorUserNet;
  /** The user every QEMU runs as (ARCHITECTURE.md, invariant 11); absent: vmkeepd's own. */
  qemuUser?: QemuUser;
  logger: Logger;
  info: Omit<DaemonInfo, 'orphanScopes' | 'orphanTaps' | 'damagedRecords'>;
  /** How long a reattach waits for a QMP greeting before calling the VM unreachable. */
  greetingTimeoutMs?: number;
  /** How often an unreachable VM's monitor is tried again, and an unwritten record written. */
  retryIntervalMs?: number;
  /** How often each idle monitor is asked whether it still answers (0: never). */
  healthIntervalMs?: number;
  /** Bounds of each VM's serial and QEMU logs (default 2 MiB, 3 rotated files kept). */
  logLimits?: LogLimits;
  /** Put running VMs' TAPs back on their bridges (default); false: only report (--no-tap-repair). */
  tapRepair?: boolean;
}

/** A failure as the API reports it: ours keep their code, anything else (the file system) is a start failure. */
function asDaemonError(error: unknown): DaemonError {
  const disk = asDaemonDiskError(error);
  if (disk instanceof DaemonError) return disk;
  const code = !(error instanceof LaunchError) ? 'START_FAILED'
    : error.code === 'UNSAFE_PATH' ? 'UNSAFE_PATH' : error.code === 'OUTSIDE_STORAGE_ROOTS' ? 'FORBIDDEN' : 'START_FAILED';
  return new DaemonError(code, (error as Error).message, { cause: error });
}

/** The scope's limits as transient-unit properties (ARCHITECTURE.md, invariant 11). */
function limitProperties(limits: ScopeLimits): Record<string, { signature: string; value: unknown }> {
  return {
    MemoryMax: { signature: 't', value: BigInt(limits.memoryMaxBytes) },
    TasksMax: { signature: 't', value: BigInt(limits.tasksMax) },
    ...(limits.cpuWeight === undefined ? {} : { CPUWeight: { signature: 't', value: BigInt(limits.cpuWeight) } }),
  };
}

/** Codes a failed start keeps: the operator's fix differs from a plain start failure's. */
const KEPT_START_CODES = new Set(['BACKING_CHAIN_CHANGED', 'DISK_REFUSED', 'UNSAFE_PATH', 'FORBIDDEN']);

function checkAutostart(value: unknown): void {
  if (!(AUTOSTART_MODES as readonly unknown[]).includes(value)) {
    throw new DaemonError('INVALID_REQUEST', `autostart must be one of ${AUTOSTART_MODES.join(', ')}, got ${JSON.stringify(value)}`);
  }
}

/** The lock's view of the API operation a VM operation runs as: its id, and when it begins. */
function operationOf(runAs: RunAs | undefined): { operation?: string; onRunning?: () => void } {
  if (runAs === undefined) return {};
  return runAs.onRunning === undefined ? { operation: runAs.id } : { operation: runAs.id, onRunning: runAs.onRunning };
}

/** How often a granted cancel asks QEMU to cancel the migration, until the refresh has settled. */
const MIGRATE_CANCEL_RETRY_MS = 200;

/**
 * A cancel of a refresh (granted only while it migrates, operation-state.ts decideCancel):
 * QEMU's migrate_cancel on the source, asked again until the refresh settles, since the
 * migration may not have begun yet (destination still starting). The refresh's own failure
 * path then rolls back; a migration that completed first goes forward and the refresh succeeds.
 */
function cancelMigrationOnAbort(entry: VmEntry, signal: AbortSignal, refreshing: Promise<unknown>, logger: Logger): void {
  let timer: NodeJS.Timeout | undefined;
  let settled = false;
  const ask = (): void => {
    if (settled) return;
    if (entry.lock.current?.step === 'migrating') {
      entry.qmp?.migrateCancel().catch((error: unknown) => logger.warn({ vm: entry.record.name, err: error }, 'migrate_cancel failed'));
    }
    timer = setTimeout(ask, MIGRATE_CANCEL_RETRY_MS);
  };
  signal.addEventListener('abort', ask, { once: true });
  void refreshing.catch(() => undefined).finally(() => {
    settled = true;
    signal.removeEventListener('abort', ask);
    if (timer !== undefined) clearTimeout(timer);
  });
}

/** The unit whose stop powers every guest off at host shutdown (snap/vmkeep-guests.service). */
const DEFAULT_GUESTS_UNIT = 'vmkeep-guests.service';

/**
 * The daemon's VM bookkeeping: reattach at start, create/start/stop/delete, refresh. Never
 * signals a QEMU except `quit` over QMP on an explicit stop or a finished guest shutdown
 * (ARCHITECTURE.md, invariants 2 and 3).
 */
export class VmManager implements DaemonOps, VmCore {
  readonly options: CoreOptions;
  private readonly vms = new Map<string, VmEntry>();
  private readonly damaged = new Map<string, { file: string; problem: string }>();
  private readonly listeners = new Set<(event: DaemonEvent) => void>();
  private readonly jobs: RefreshJobs;
  private readonly pins: ModulePins;
  readonly metrics = new DaemonMetrics();
  private orphanScopes: string[] = [];
  private readonly machines: MachineSync | null;
  private orphanTaps: string[] = [];
  private readonly nicRepair: NicRepair;
  private closed = false;
  /** Settles once every VM's reattach has (after a bounded reattachAll, possibly later). */
  reattachDone: Promise<void> = Promise.resolve();
  private stopHealthChecks: () => void = () => undefined;
  private stopLogRotation: () => void = () => undefined;
  private flushTimer: NodeJS.Timeout | undefined;

  constructor(private readonly managerOptions: VmManagerOptions) {
    const o = managerOptions;
    this.options = {
      store: o.store, scopes: o.scopes, qemu: o.qemu ?? realQemu, slice: o.slice, installations: o.installations,
      defaultPolicy: o.defaultPolicy, pinRoot: o.pinRoot, guestsUnit: o.guestsUnit ?? DEFAULT_GUESTS_UNIT,
      ...(o.crashAt === undefined ? {} : { crashAt: o.crashAt }),
      probe: o.probe, runtimeDir: o.runtimeDir, logger: o.logger, storageRoots: o.storageRoots ?? [],
      ...(o.qemuUser === undefined ? {} : { qemuUser: o.qemuUser }),
      greetingTimeoutMs: o.greetingTimeoutMs ?? MONITOR_GREETING_TIMEOUT_MS,
      retryIntervalMs: o.retryIntervalMs ?? 5_000,
      healthIntervalMs: o.healthIntervalMs ?? 5_000,
      net: o.net ?? realNet,
      taps: new TapKeeper(o.net ?? realNet, o.logger, o.qemuUser),
    };
    this.nicRepair = new NicRepair({
      entries: () => this.entries(), net: this.options.net, taps: this.options.taps, logger: o.logger,
      emit: (event) => this.emit(event), isClosed: () => this.closed,
    }, o.tapRepair !== false);
    this.pins = new ModulePins(o.pinRoot, o.logger);
    this.machines = o.machines === undefined ? null : new MachineSync(o.machines, o.logger);
    this.jobs = new RefreshJobs({
      names: () => [...this.vms.keys()].sort(),
      requireVm: (name) => void this.entry(name),
      upgradeStatus: () => this.upgradeStatus(),
      refresh: (vm, options, runAs) => this.refresh(vm, options, runAs),
      emit: (event) => this.emit(event),
      onJobDone: () => this.collectPins(),
      logError: (fields, message) => o.logger.error(fields as Record<string, unknown>, message),
    });
  }

  private get logLimits(): LogLimits {
    return this.managerOptions.logLimits ?? { maxBytes: DEFAULT_LOG_MAX_BYTES, keep: DEFAULT_LOG_KEEP };
  }

  get isClosed(): boolean {
    return this.closed;
  }

  entries(): VmEntry[] {
    return [...this.vms.values()];
  }

  // ---- start-up ----------------------------------------------------------------------------

  /**
   * Reads every record and reattaches all VMs concurrently. Resolves when all are settled or
   * after `waitMs`, whichever is first: a VM whose QEMU is slow to answer goes on reattaching in
   * its own lock (its view says so) and cannot hold the daemon's readiness back.
   */
  async reattachAll(waitMs = Number.POSITIVE_INFINITY): Promise<void> {
    const { records, damaged } = await this.options.store.list();
    for (const bad of damaged) {
      // The name stays taken: a new VM must not overwrite the file of one that may still run.
      this.damaged.set(bad.name, { file: bad.file, problem: bad.error.message });
      this.options.logger.error({ vm: bad.name, file: bad.file, code: bad.error.code }, bad.error.message);
    }
    for (const record of records) this.vms.set(record.name, newEntry(record));
    const began = performance.now();
    const all = Promise.all(records.map((record) => {
      const entry = this.entry(record.name);
      // machined may have lost its list while vmkeepd was away (its own restart, a cleared /run).
      return entry.lock.run('reattach', () => reattachIsolated(this, entry)).finally(() => this.machines?.sync(entry.record));
    })).then(() => {
      this.metrics.startReattachSeconds = (performance.now() - began) / 1000;
      return this.findOrphanScopes();
    }).then(() => this.findOrphanTaps())
      // A network restart while vmkeepd was away left TAPs off their bridges (ARCHITECTURE.md, "Networking").
      .then(() => this.nicRepair.check('reattach'));
    this.reattachDone = all.catch(() => undefined);
    this.stopHealthChecks = startHealthChecks(this);
    this.stopLogRotation = startLogRotation(
      () => this.entries().filter((e) => e.record.process !== undefined).flatMap((e) => [e.record.paths.serialLog, e.record.paths.stderrLog]),
      this.logLimits,
      (path, error) => this.options.logger.warn({ path, err: error }, `could not rotate ${path}`),
    );
    if (!Number.isFinite(waitMs)) return all;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([all, new Promise<void>((resolve) => { timer = setTimeout(resolve, waitMs); })]);
    clearTimeout(timer);
    all.catch((error: unknown) => this.options.logger.error({ err: error }, 'reattach failed'));
  }

  private async findOrphanScopes(): Promise<void> {
    if (this.options.scopes === null) return;
    try {
      const claimed = new Set(this.entries()
        .flatMap((e) => [e.record.process?.scope, e.record.refresh?.destination?.scope, e.record.retired?.scope])
        .filter(Boolean));
      const scopes = await this.options.scopes.listScopes();
      this.orphanScopes = scopes.map((s) => s.name).filter((n) => !claimed.has(n));
      for (const scope of this.orphanScopes) {
        this.options.logger.warn({ scope }, `scope ${scope} has vmkeep's prefix but no record claims it; left alone`);
      }
    } catch (error) {
      this.options.logger.warn({ err: error }, 'could not list scopes to look for orphans');
    }
  }

  /** TAPs with vmkeep's name pattern that no record names: reported, never removed (like orphan scopes). */
  private async findOrphanTaps(): Promise<void> {
    const claimed = new Set(this.entries().flatMap((e) => tapsClaimed(e.record)));
    const links = await this.options.net.links().catch((error: unknown) => {
      this.options.logger.warn({ err: error }, 'could not list the network links to look for orphan TAPs');
      return [];
    });
    this.orphanTaps = orphanTaps(links.map((l) => l.name), claimed);
    for (const tap of this.orphanTaps) {
      this.options.logger.warn({ tap }, `TAP ${tap} has vmkeep's name pattern but no record claims it; left alone (remove it with \`ip link del ${tap}\` once you know no QEMU uses it)`);
    }
  }

  scheduleRetry(entry: VmEntry): void {
    if (this.closed || entry.retryTimer) return;
    entry.retryTimer = setTimeout(() => {
      entry.retryTimer = undefined;
      void entry.lock.run('reattach', async () => {
        if (entry.record.state === 'unreachable' && !this.closed) await reattachIsolated(this, entry);
      }).catch((error: unknown) => this.options.logger.warn({ vm: entry.record.name, err: error }, 'reattach retry failed'));
    }, this.options.retryIntervalMs);
    entry.retryTimer.unref();
  }

  /**
   * At the first start of a host boot, starts the VMs whose autostart asks for it, on the
   * current installation (autostart.ts decides). A daemon restart within a boot starts nothing.
   */
  async autostartAtBoot(options: AutostartOptions): Promise<AutostartPlan> {
    await this.reattachDone;
    return autostartAtBoot({
      vms: () => this.entries().map((e) => e.record),
      start: (name) => this.autostart(name),
      emit: (event) => this.emit(event),
      logger: this.options.logger,
      isClosed: () => this.closed,
    }, options);
  }

  // ---- supervision ---------------------------------------------------------------------------

  connect(socketPath: string): Promise<QmpClient> {
    return this.options.qemu.connect(socketPath, { greetingTimeoutMs: this.options.greetingTimeoutMs });
  }

  watch(entry: VmEntry, qmp: QmpClient): void {
    const name = entry.record.name;
    qmp.observeCommands((_command, seconds, error) => this.metrics.qmpCommand(name, seconds, error?.code === 'COMMAND_TIMEOUT'));
    superviseMonitor(this, entry, qmp);
  }

  /**
   * With -no-shutdown a powered-off guest leaves QEMU waiting: end it and record why. A VM
   * with a reboot refresh pending, or stale under the on-guest-shutdown policy, starts again
   * on the current installation.
   */
  async finishGuestShutdown(entry: VmEntry, reason = ''): Promise<void> {
    // A power-off the operator asked for (a stop that timed out, then the guest obeyed late)
    // is not the guest's own: it stays off.
    const asked = entry.stopAsked === true;
    // guest-reset: a reboot that set-action turned into a shutdown (only armed VMs do that).
    const restart = reason === 'guest-reset' || (!asked && (entry.record.refresh?.strategy === 'reboot'
      || (this.policyOf(entry.record) === 'on-guest-shutdown' && (await stalenessOf(this, entry).catch(() => undefined))?.stale === true)));
    await this.endQemu(entry, 'guest shutdown');
    if (!restart) {
      // The guest chose to be off (or the operator did): last-state leaves it off at the next boot.
      if (!entry.hostShutdownStop) await this.observe(entry, { ...entry.record, wanted: 'stopped' });
      return;
    }
    this.options.logger.info({ vm: entry.record.name }, `${entry.record.name} powered off while stale: starting it on the current installation`);
    await this.startNow(entry);
  }

  /** quit over QMP, wait for the process to go, record the reason. The only way we end a QEMU. */
  async endQemu(entry: VmEntry, reason: string): Promise<void> {
    const process = entry.record.process;
    entry.stopping = reason;
    try {
      if (entry.qmp) await entry.qmp.quit();
      if (process) await this.options.qemu.waitForExit(process.pid, process.startTime, QUIT_EXIT_TIMEOUT_MS);
      const next: VmRecord = { ...entry.record, state: 'stopped', lastExit: { reason, at: new Date().toISOString() } };
      delete next.process;
      delete next.problem;
      // An operator's stop ends a pending reboot refresh too: the VM stays off.
      if (entry.stopAsked) delete next.refresh;
      await this.observe(entry, next);
    } finally {
      this.detach(entry);
      entry.stopping = undefined;
    }
  }

  // ---- operations ----------------------------------------------------------------------------

  info(): DaemonInfo {
    return {
      ...this.managerOptions.info,
      orphanScopes: [...this.orphanScopes],
      orphanTaps: [...this.orphanTaps],
      damagedRecords: [...this.damaged].map(([name, d]) => ({ name, ...d })),
    };
  }

  async list(): Promise<VmView[]> {
    return this.entries().map(toView).sort((a, b) => a.name.localeCompare(b.name));
  }

  async get(name: string): Promise<VmView> {
    return toView(this.entry(name));
  }

  async create(input: unknown, options: CreateOptions = {}): Promise<VmView> {
    // Every problem at once: the files a spec names are checked even when other fields are wrong.
    let spec = options.caller?.level === 'operator' ? await this.admitOperatorSpec(input) : await validateSpecAndFiles(input, this.options.qemuUser);
    this.refuseExisting(spec.name);
    // Read once and recorded: from now on the record, not the image headers, names the files.
    const disks = await this.readChains(spec);
    if (options.caller?.level === 'operator') await this.refuseLayersOutsideRoots(disks);
    refuseSharedImages({ name: spec.name, spec, disks }, this.diskHolders());
    const channel = options.channel ?? DEFAULT_CHANNEL;
    const installation = currentInstallation(this.options.installations, channel);
    const policy = options.policy === undefined ? undefined : parseStrategy(options.policy, 'policy');
    if (options.autostart !== undefined) checkAutostart(options.autostart);
    const info = await this.options.probe(installation);
    // Decided now and recorded: memfd-shared where this installation can do cpr-transfer.
    spec = withMemoryDefault(spec, info);
    if (spec.nics !== undefined) spec = await this.withCheckedNics(spec, installation);
    // Resolving now pins the versioned machine type for the VM's whole life (migrations need it).
    const machineType = resolveMachineType(spec.machine, info.machines);
    const now = new Date().toISOString();
    const record: VmRecord = {
      schema: RECORD_SCHEMA,
      name: spec.name,
      uuid: spec.uuid ?? randomUUID(),
      spec,
      ...(spec.disks.length === 0 ? {} : { disks }),
      machineType,
      installation,
      channel,
      ...(policy === undefined ? {} : { policy }),
      ...(options.autostart === undefined ? {} : { autostart: options.autostart }),
      paths: this.vmPaths(spec.name),
      state: 'stopped',
      createdAt: now,
      updatedAt: now,
    };
    // Checked again after the awaits above: two creates of one name (or of one image) may have raced.
    this.refuseExisting(spec.name);
    refuseSharedImages({ name: spec.name, spec, disks }, this.diskHolders());
    const entry = newEntry(record);
    this.vms.set(spec.name, entry);
    // The record is written, and the VM started, inside the VM's own lock: a delete (or a
    // second request) that comes meanwhile waits for it or is refused, never runs in between.
    return entry.lock.run('create', async () => {
      try {
        this.refuseWhenClosed(spec.name);
        await this.options.store.put(record);
      } catch (error) {
        this.vms.delete(spec.name);
        throw error;
      }
      this.emit({ type: 'vm-created', vm: spec.name, state: 'stopped' });
      if (options.start === false) return;
      try {
        await this.startNow(entry);
      } catch (error) {
        const kept = !(await this.forgetFailedCreate(entry));
        const { code, message } = asDaemonError(error);
        throw new DaemonError(code, kept
          ? `${message}. Its QEMU runs, so ${spec.name} stays recorded (state ${entry.record.state}); see vmkeep status ${spec.name}`
          : `${message}. Nothing was kept: fix the cause and create ${spec.name} again`, { cause: error });
      }
    }).then(() => toView(entry));
  }

  /**
   * An operator's spec: valid, no kernel or initrd path, every disk named inside a storage root
   * and resolving inside one (a link out of the root is outside), user-mode NICs restricted
   * unless --operator-user-net open (access.ts decides; the record keeps it). Checked before the
   * files are looked at, so an operator learns nothing of paths outside the roots.
   */
  private async admitOperatorSpec(input: unknown): Promise<VmSpec> {
    const roots = this.options.storageRoots ?? [];
    const spec = checkOperatorSpec(validateSpec(input), {
      storageRoots: roots, bridges: this.managerOptions.operatorBridges ?? [], userNet: this.managerOptions.operatorUserNet ?? DEFAULT_OPERATOR_USER_NET,
    });
    const real = await realRoots(roots);
    for (const [i, disk] of spec.disks.entries()) {
      if (!withinRoots(disk.path, roots) || (await resolveWithinRoots(disk.path, real)) === undefined) {
        throw forbidden('storage-root', `disks[${i}].path ${disk.path} is not inside a storage root (${roots.join(', ')}) once its links are resolved`);
      }
    }
    await checkSpecFiles(spec);
    return spec;
  }

  /** An operator's backing files, as read from the image headers, must be in the roots too. */
  private async refuseLayersOutsideRoots(chains: readonly DiskChain[]): Promise<void> {
    const real = await realRoots(this.options.storageRoots ?? []);
    for (const [i, chain] of chains.entries()) {
      for (const layer of chain) {
        if ((await resolveWithinRoots(layer.path, real)) === undefined) {
          throw forbidden('storage-root', `disks[${i}] has the backing file ${layer.path}, outside the storage roots (${(this.options.storageRoots ?? []).join(', ')})`);
        }
      }
    }
  }

  /**
   * The real storage roots every file of this VM must be in, when one of its disks is named
   * inside a root (an operator's VM always is): backing files and the opened descriptors are
   * then held to the roots at each launch, whoever starts it. Undefined: no such rule.
   */
  private async confinementOf(spec: VmSpec): Promise<readonly string[] | undefined> {
    const roots = this.options.storageRoots ?? [];
    if (!spec.disks.some((disk) => withinRoots(disk.path, roots))) return undefined;
    return realRoots(roots);
  }

  /**
   * A new VM's NICs checked against the host and the other VMs (bridge exists, MAC and host
   * ports free, user mode built in), then given their MACs for good: generated once, recorded.
   */
  private async withCheckedNics(spec: VmSpec, installation: Installation): Promise<VmSpec> {
    const nics = spec.nics ?? [];
    const others = this.entries().map((e) => e.record.spec).filter((o) => o.name !== spec.name);
    const netdevs = nics.some((n) => n.mode === 'user') ? await probeNetdevs(installation) : [];
    const bridges = nics.some((n) => n.mode === 'bridge') ? await bridgesOf(this.options.net) : new Set<string>();
    refuseNicHostProblems(nicHostProblems(nics, others, { bridges, netdevs }));
    const taken = new Set(others.flatMap((o) => (o.nics ?? []).flatMap((n) => (n.mac === undefined ? [] : [n.mac]))));
    return { ...spec, nics: withMacs(nics, taken) };
  }

  /** A create whose start failed leaves nothing behind, unless a QEMU of it runs after all. */
  private async forgetFailedCreate(entry: VmEntry): Promise<boolean> {
    // A closing daemon leaves the record to the next one, which sees what runs.
    if (entry.record.process !== undefined || this.closed) return false;
    const name = entry.record.name;
    try {
      await this.options.store.remove(name);
      this.refuseWhenClosed(name);
      await removeVmFolder(this.vmDir(name));
      await removeVmFolder(this.logDirOf(name));
      this.vms.delete(name);
      this.emit({ type: 'vm-deleted', vm: name });
      return true;
    } catch (error) {
      this.options.logger.error({ vm: name, err: error }, `the failed create of ${name} could not be undone; it stays recorded`);
      return false;
    }
  }

  admit(kind: 'start' | 'stop' | 'refresh', name: string): void {
    const entry = this.entry(name);
    // A stop waits its turn (ARCHITECTURE.md, "Operations"); a start or refresh would be refused.
    if (kind !== 'stop' && entry.lock.busyWithUser) throw entry.lock.busyError();
  }

  async start(name: string, runAs?: RunAs): Promise<VmView> {
    const entry = this.entry(name);
    return entry.lock.run('start', async () => {
      this.requireLive(entry);
      if (entry.record.process) {
        throw new DaemonError('CONFLICT', `${name} is already ${entry.record.state} (pid ${entry.record.process.pid}); stop it first (vmkeep stop ${name})`);
      }
      this.refuseWhileMigrating(entry);
      try {
        await this.startNow(entry);
      } catch (error) {
        const { code, message } = asDaemonError(error);
        throw new DaemonError(code, `${message}. ${name} stays recorded (state ${entry.record.state}): fix the cause and run vmkeep start ${name}, or vmkeep delete ${name}`, { cause: error });
      }
    }, { refuseIfBusy: true, ...operationOf(runAs) }).then(() => toView(entry));
  }

  /** Starts the VM's QEMU on the installation now current for it. Runs inside the VM's lock. */
  async startNow(entry: VmEntry): Promise<void> {
    const name = entry.record.name;
    const installation = this.current(entry.record);
    const info = await this.options.probe(installation);
    // Derived, not read from the record: the files removed here are always ours.
    const paths = this.vmPaths(name);
    // Nothing planted in the VM's folder is followed (ARCHITECTURE.md, invariant 11).
    await this.qemuVmFolder(name);
    // Leftovers of the previous QEMU: its socket would be taken for the new one's.
    await removeStaleSocket(paths.qmpSocket);
    // Guest output can be secret: the VM's log folder is root's only, made as its runtime folder.
    // QEMU writes its logs through descriptors vmkeepd opened, so its user needs no access.
    await secureFolder(dirname(this.logDirOf(name)), { mode: 0o700 });
    await ownVmFolder(this.logDirOf(name), { mode: 0o700 });
    // The last run's logs become NAME.1 (the live files start empty): kept across restarts and reboots.
    for (const log of [paths.serialLog, paths.stderrLog]) await rotateIfLarge(log, { ...this.logLimits, maxBytes: 0 });
    closeSync(openOwnFile(paths.serialLog, 'truncate'));
    await this.record(entry, { ...entry.record, paths, installation, state: 'starting', wanted: 'running' });

    entry.hostShutdown = undefined;
    entry.stopAsked = false;
    entry.hostShutdownStop = false;
    const scope = this.options.scopes === null ? null : scopeUnitName(name);
    try {
      checkRefreshTarget({ vm: name, runningVersion: undefined, machineType: entry.record.machineType, target: { name: installation.name, info } });
      const { vm } = await this.launchQemu(entry, {
        installation, info, paths, scope, incoming: false, taps: tapsForNewQemu(entry.record), withForwards: true,
        // Recorded before the scope exists: a crash from here on leaves a record that names
        // this QEMU, so the next daemon finds it instead of an orphan.
        onSpawned: (proc, moduleDir) => this.record(entry, {
          ...entry.record,
          state: 'starting',
          binary: binaryOf(info, moduleDir),
          process: proc,
        }),
      });
      this.watch(entry, vm.qmp);
      // Armed before the guest runs, so a QEMU replaced on disk while vmkeepd keeps running
      // still moves at the guest's next reboot.
      if (this.policyOf(entry.record) === 'on-guest-shutdown') await this.armGuestReboots(entry);
      await vm.qmp.cont();
      const next: VmRecord = { ...entry.record, state: 'running' };
      delete next.refresh;
      delete next.problem;
      await this.observe(entry, next);
    } catch (cause) {
      const started = entry.record.process;
      const next: VmRecord = { ...entry.record, problem: truncate((cause as Error).message) };
      delete next.refresh;
      if (started !== undefined && this.options.qemu.isSame(started.pid, started.startTime)) {
        // The QEMU runs (e.g. a record write failed after it started): keep naming it, never orphan it.
        next.state = 'unreachable';
        this.scheduleRetry(entry);
      } else {
        this.detach(entry);
        next.state = 'exited';
        next.lastExit = { reason: 'start failed', at: new Date().toISOString() };
        delete next.process;
      }
      await this.observe(entry, next);
      // QEMU refusing what the spec asks (not a kernel, more memory than it can have) is the
      // caller's to fix; anything else (systemd, the state folder) is ours.
      const userError = cause instanceof LaunchError && cause.code === 'QEMU_EXITED';
      const kept = asDaemonError(cause).code;
      throw new DaemonError(
        KEPT_START_CODES.has(kept) ? kept : userError ? 'SPEC_REJECTED' : 'START_FAILED',
        `starting ${name} failed: ${(cause as Error).message}`,
        { cause },
      );
    }
  }

  /**
   * Spawns a QEMU of the VM, paused (or waiting for an incoming migration), its modules pinned,
   * recorded through `onSpawned` and placed in `scope` before any guest code runs.
   */
  async launchQemu(entry: VmEntry, args: LaunchArgs): Promise<{ vm: LaunchedVm; moduleDir: string | undefined }>;
  async launchQemu<T extends { pid: number }>(entry: VmEntry, args: LaunchArgs, launch: Launch<T>): Promise<{ vm: T; moduleDir: string | undefined }>;
  async launchQemu<T extends { pid: number }>(entry: VmEntry, args: LaunchArgs, launch?: Launch<T>): Promise<{ vm: T | LaunchedVm; moduleDir: string | undefined }> {
    const { record } = entry;
    const { qemu, scopes } = this.options;
    const start: Launch<T | LaunchedVm> = launch ?? ((options) => qemu.launch(options));
    const storageRoots = await this.confinementOf(record.spec);
    // Again for a migration's destination: the VM may have been started by a vmkeepd that ran
    // QEMU as root, in a folder only root could enter.
    await this.qemuVmFolder(record.name);
    if (args.info.sandbox === false) {
      this.options.logger.warn({ vm: record.name, installation: args.installation.name },
        `${args.installation.binary} has no seccomp sandbox (-sandbox refused): ${record.name} runs without it; install a QEMU built with seccomp (Debian's is)`);
    }
    // Before every QEMU start of the VM: a QEMU that ran the guest may have rewritten a header.
    const diskChains = chainsForStart(record.name, record.spec, record.disks, await this.readChains(record.spec));
    const nics = record.spec.nics ?? [];
    const taps = tapList(args.taps);
    // Made before QEMU opens them by name; once recorded (onSpawned) the record's change releases
    // them, before that this start does.
    await this.options.taps.make(record.name, nics, args.taps);
    let recorded = false;
    return this.pins.whileLaunching(args.installation, args.info, async (pinned) => {
      const vm = await start({
        ...(storageRoots === undefined ? {} : { storageRoots }),
        ...(this.options.qemuUser === undefined ? {} : { runAs: this.options.qemuUser }),
        spec: record.spec,
        diskChains,
        uuid: record.uuid,
        installation: pinned,
        info: args.info,
        machineType: record.machineType,
        paths: args.paths,
        // Paused until it is recorded and watched: nothing the guest does can go unseen.
        stayPaused: true,
        ...(args.incoming ? { incoming: 'defer' as const } : {}),
        taps: args.taps,
        withForwards: args.withForwards,
        placeInScope: async (pid) => {
          const identity = qemu.identity(pid);
          if (identity === null) throw new DaemonError('START_FAILED', `QEMU (pid ${pid}) exited right after it was spawned; see ${args.paths.stderrLog}`);
          await args.onSpawned({ pid, startTime: identity.startTime, scope: args.scope, ...(taps.length === 0 ? {} : { taps }) }, pinned.moduleDir);
          recorded = true;
          if (scopes !== null && args.scope !== null) {
            await scopes.createScope({
              name: args.scope,
              pids: [pid],
              slice: this.options.slice,
              description: `vmkeep VM ${record.name}`,
              // At host shutdown units stop in reverse order: the guests unit powers every guest
              // off (ACPI) before any VM scope is stopped, which would SIGTERM its QEMU.
              properties: { Before: { signature: 'as', value: [this.options.guestsUnit] }, ...limitProperties(scopeLimits(record.spec)) },
            });
          }
        },
      });
      return { vm, moduleDir: pinned.moduleDir };
    }).catch(async (error: unknown) => {
      if (!recorded) await this.options.taps.release(record.name, taps);
      throw error;
    });
  }

  /** Every disk's chain as it is now; a refused chain (no stated backing format, ...) is DISK_REFUSED. */
  private async readChains(spec: VmSpec): Promise<DiskChain[]> {
    if (spec.disks.length === 0) return [];
    try {
      return await this.options.qemu.readDiskChains(spec.disks);
    } catch (error) {
      throw asDaemonDiskError(error);
    }
  }

  private diskHolders(): Array<{ name: string; spec: VmSpec; disks: readonly DiskChain[] | undefined }> {
    return this.entries().map((e) => ({ name: e.record.name, spec: e.record.spec, disks: e.record.disks }));
  }

  /**
   * Records each disk's chain as it is now, after an operator checked it (BACKING_CHAIN_CHANGED
   * names this). Refused while a refresh runs; the image-sharing rule applies as at create.
   */
  async acceptDisks(name: string): Promise<DiskAcceptResult> {
    const entry = this.entry(name);
    return entry.lock.run('disk-accept', async () => {
      this.requireLive(entry);
      this.refuseWhileMigrating(entry);
      const { spec } = entry.record;
      if (spec.disks.length === 0) throw new DaemonError('INVALID_REQUEST', `${name} has no disks; nothing to accept`);
      const now = await this.readChains(spec);
      refuseSharedImages({ name, spec, disks: now }, this.diskHolders());
      const previous = entry.record.disks;
      await this.record(entry, { ...entry.record, disks: now });
      this.options.logger.warn({ vm: name, previous, now }, `the backing chains of ${name}'s disks were accepted by the operator`);
      return { vm: name, previous: previous ?? null, disks: now };
    }, { refuseIfBusy: true });
  }

  async stop(name: string, options: StopOptions = {}, runAs?: RunAs): Promise<VmView> {
    const entry = this.entry(name);
    // Queued, never refused: a stop (host shutdown included) must happen once the VM is free.
    return entry.lock.run('stop', async () => {
      this.requireLive(entry);
      // An operator's stop is a choice last-state keeps at the next boot; a host shutdown's is not:
      // a VM it finds running was running (a record from before `wanted` existed included).
      // Kept in memory and written with the stop's own record (a full disk must not block a stop).
      const wanted = options.hostShutdown ? (entry.record.process ? 'running' : entry.record.wanted) : 'stopped';
      if (wanted !== undefined && entry.record.wanted !== wanted) {
        const next: VmRecord = { ...entry.record, wanted };
        if (entry.record.process) entry.record = next;
        else await this.observe(entry, next);
      }
      if (!entry.record.process) return;
      if (!entry.qmp) {
        throw new DaemonError('UNREACHABLE', `${name}'s monitor does not answer (${entry.record.problem ?? 'not connected'}); vmkeep will not signal a QEMU it cannot talk to. Check pid ${entry.record.process.pid} by hand`);
      }
      if (options.force) {
        await this.endQemu(entry, 'stopped by request (forced)');
        return;
      }
      entry.stopAsked = true;
      entry.hostShutdownStop = options.hostShutdown === true;
      await this.powerOff(entry, options.timeoutSec ?? DEFAULT_STOP_TIMEOUT_SEC, options.hostShutdown ? 'host shutdown' : 'stopped by request');
    }, operationOf(runAs)).then(() => toView(entry));
  }

  /**
   * ACPI power-off (pressed again while the guest has not acted), wait for its SHUTDOWN, then
   * quit QEMU. A guest that does not power off in time is left running (STOP_TIMEOUT): never
   * killed here (ARCHITECTURE.md, invariant 3).
   */
  private async powerOff(entry: VmEntry, timeoutSec: number, reason: string, afterRequest?: () => void): Promise<void> {
    const qmp = entry.qmp;
    const name = entry.record.name;
    if (!qmp) throw new DaemonError('UNREACHABLE', `${name} has no connected monitor (state ${entry.record.state})`);
    if (entry.record.state !== 'shutdown') {
      entry.stopping = reason;
      try {
        await powerDownGuest(qmp, {
          timeoutMs: timeoutSec * 1000,
          onPress: (press) => {
            if (press === 1) afterRequest?.();
            else this.emit({ type: 'vm-power', vm: name, message: `ACPI power button pressed again (${press}): the guest has not acted yet (still booting?)` });
          },
        });
      } catch (cause) {
        entry.stopping = undefined;
        if (isQmpError(cause, 'COMMAND_TIMEOUT')) {
          throw new DaemonError('UNREACHABLE', `${name}: ${cause.message}; it is left as it is, never killed`, { cause });
        }
        throw new DaemonError(
          'STOP_TIMEOUT',
          `${name} did not power off within ${timeoutSec} s of the ACPI request (${(cause as Error).message}) and is still running; give it longer (--timeout) or quit QEMU with --force (the guest loses unwritten data)`,
          { cause },
        );
      }
    }
    await this.endQemu(entry, reason);
  }

  async set(name: string, settings: VmSettings): Promise<VmView> {
    const entry = this.entry(name);
    if (settings.autostart !== undefined) checkAutostart(settings.autostart);
    return entry.lock.run('set', async () => {
      this.requireLive(entry);
      const next: VmRecord = { ...entry.record };
      if (settings.autostart !== undefined) next.autostart = settings.autostart;
      await this.record(entry, next);
    }).then(() => toView(entry));
  }

  /**
   * A start at host boot: queued behind the reattach (never refused as busy), and nothing done
   * for a VM that has a QEMU by then. The failure stays in the VM's view (its problem).
   */
  async autostart(name: string): Promise<'started' | 'running'> {
    const entry = this.entry(name);
    return entry.lock.run('autostart', async () => {
      this.requireLive(entry);
      if (entry.record.process) return 'running' as const;
      this.refuseWhileMigrating(entry);
      await this.startNow(entry);
      return 'started' as const;
    });
  }

  async delete(name: string): Promise<void> {
    const entry = this.entry(name);
    return entry.lock.run('delete', async () => {
      this.requireLive(entry);
      if (entry.record.process) {
        throw new DaemonError('CONFLICT', `${name} has a QEMU (pid ${entry.record.process.pid}, ${entry.record.state}); stop it first (vmkeep stop ${name})`);
      }
      this.refuseWhenClosed(name);
      await this.options.store.remove(name);
      // The folder goes before the name is free: a quick re-create must not lose its new socket.
      this.refuseWhenClosed(name);
      await removeVmFolder(this.vmDir(name));
      await removeVmFolder(this.logDirOf(name));
      this.vms.delete(name);
      this.emit({ type: 'vm-deleted', vm: name });
    }, { refuseIfBusy: true });
  }

  async qmp(name: string, command: string, args?: Record<string, unknown>): Promise<unknown> {
    const entry = this.entry(name);
    if (!entry.qmp) throw new DaemonError('UNREACHABLE', `${name} has no connected monitor (state ${entry.record.state})`);
    try {
      return await entry.qmp.execute(command, args);
    } catch (cause) {
      throw new DaemonError('QMP_FAILED', `${command} on ${name}: ${(cause as Error).message}`, { cause });
    }
  }

  async consolePath(name: string): Promise<string> {
    return this.entry(name).record.paths.serialLog;
  }

  // ---- refresh -------------------------------------------------------------------------------

  async refresh(name: string, options: RefreshOptions = {}, runAs?: RunAs): Promise<RefreshOutcome> {
    const entry = this.entry(name);
    // A refresh of its own (not one VM of a job, which reports its VMs itself) shows its steps
    // and its end on the event stream too, under its operation's id.
    const tag = { type: 'refresh' as const, vm: name, ...(runAs === undefined ? {} : { operation: runAs.id }) };
    const own = options.onStep === undefined && runAs !== undefined;
    const steps: RefreshOptions = own ? { ...options, onStep: (step, message) => this.emit({ ...tag, step, message }) } : options;
    const strategy = options.strategy ?? this.policyOf(entry.record);
    const refreshing = entry.lock.run('refresh', () => {
      this.requireLive(entry);
      return this.refreshNow(entry, steps, runAs?.signal);
    }, { refuseIfBusy: true, ...operationOf(runAs) });
    if (runAs?.signal !== undefined) cancelMigrationOnAbort(entry, runAs.signal, refreshing, this.options.logger);
    refreshing.then((outcome) => {
      this.metrics.refreshes.inc({ strategy, outcome: outcome.result });
      if (outcome.result === 'migrated' && outcome.downtimeMs !== undefined && outcome.migrationMs !== undefined) {
        const mode = { mode: outcome.strategy };
        this.metrics.migrationDowntime.observe(mode, outcome.downtimeMs / 1000);
        this.metrics.migrationDuration.observe(mode, outcome.migrationMs / 1000);
      }
      if (own) this.emit({ ...tag, step: 'done', message: outcome.message, outcome });
    }, (error: unknown) => {
      const refused = error instanceof DaemonError && ['REFRESH_REFUSED', 'BUSY', 'CONFLICT', 'UNREACHABLE', 'INVALID_REQUEST'].includes(error.code);
      this.metrics.refreshes.inc({ strategy, outcome: refused ? 'refused' : 'failed' });
      if (own) this.emit({ ...tag, step: 'failed', message: (error as Error).message });
    });
    return refreshing;
  }

  /** The Prometheus text of GET /1.0/metrics: the counters so far, the VM gauges as of now. */
  async metricsText(): Promise<string> {
    const vmsByState: Record<string, number> = {};
    for (const entry of this.entries()) vmsByState[entry.record.state] = (vmsByState[entry.record.state] ?? 0) + 1;
    if (this.damaged.size > 0) vmsByState.damaged = this.damaged.size;
    const staleByInstallation: Record<string, number> = {};
    for (const vm of (await this.upgradeStatus()).vms.filter((v) => v.stale)) staleByInstallation[vm.installation] = (staleByInstallation[vm.installation] ?? 0) + 1;
    return formatExposition(this.metrics.families({ vmsByState, staleByInstallation }));
  }

  /** `cancel`: the operation's; once aborted, a failed migration falls back to nothing. */
  private async refreshNow(entry: VmEntry, options: RefreshOptions, cancel?: AbortSignal): Promise<RefreshOutcome> {
    const began = performance.now();
    const { record } = entry;
    const name = record.name;
    const strategy = options.strategy === undefined ? this.policyOf(record) : parseStrategy(options.strategy);
    const target = this.current(record);
    const info = await this.options.probe(target);
    const outcome = (result: RefreshOutcome['result'], message: string, extra: Partial<RefreshOutcome> = {}): RefreshOutcome =>
      ({ vm: name, strategy, result, totalMs: Math.round(performance.now() - began), message, ...extra });
    this.refuseWhileMigrating(entry);
    const status = record.process ? await stalenessOf(this, entry, target, info, true) : undefined;
    let targetRefusal: string | undefined;
    try {
      checkRefreshTarget({ vm: name, runningVersion: status?.runningVersion, machineType: record.machineType, target: { name: target.name, info } });
    } catch (cause) {
      targetRefusal = (cause as Error).message;
    }
    const plan = planRefresh({
      vm: name, strategy, state: record.state, hasProcess: record.process !== undefined,
      stale: status?.stale === true, reasons: status?.reasons ?? [],
      monitorAnswers: entry.qmp !== undefined && entry.hung !== true,
      ...(record.problem === undefined ? {} : { problem: record.problem }),
      target: { installation: target.name, version: info.version },
      ...(targetRefusal === undefined ? {} : { targetRefusal }),
    });
    const from = record.process
      ? { installation: record.installation.name, pid: record.process.pid, ...(status?.runningVersion === undefined ? {} : { version: status.runningVersion }) }
      : undefined;
    const fromField = from === undefined ? {} : { from };
    const to = { installation: target.name, version: info.version };
    switch (plan.action) {
      case 'nothing':
        return outcome(plan.result, plan.message, fromField);
      case 'refuse':
        throw new DaemonError(plan.code, plan.message);
      case 'arm':
        await this.record(entry, { ...entry.record, policy: 'on-guest-shutdown' });
        await this.armGuestReboots(entry);
        return outcome('armed', plan.message, fromField);
      case 'migrate': {
        // auto and cpr hand the guest's RAM over where both QEMUs can, else copy it (auto only).
        let mode: 'migrate' | 'cpr' = 'migrate';
        let why = plan.fallback === 'reboot' ? 'the live migration worked, no reboot needed' : '';
        if (strategy === 'auto' || strategy === 'cpr') {
          try {
            ({ strategy: mode, why } = chooseLiveStrategy(strategy, { vm: name, memoryBackend: memoryBackendOf(record.spec), runningVersion: status?.runningVersion, targetVersion: info.version }));
          } catch (cause) {
            throw new DaemonError('REFRESH_REFUSED', (cause as Error).message, { cause });
          }
        }
        // cpr copies no RAM (and needs 10.0 on both sides): only a copy may have to stop the guest.
        const pausedCopy = mode === 'migrate' ? pausedCopyReason({ accel: record.spec.accel, runningVersion: status?.runningVersion }) : undefined;
        let moved: Awaited<ReturnType<typeof migrateNow>>;
        try {
          moved = await migrateNow(this, entry, target, info, options, mode, pausedCopy);
        } catch (cause) {
          if (plan.fallback !== 'reboot') throw cause;
          const after = entry.record;
          const fallback = planFallback({
            error: (cause as Error).message,
            onOldQemu: cause instanceof MigrationRolledBack && after.state === 'running' && after.process?.pid === from?.pid
              && after.refresh === undefined && after.retired === undefined,
            destinationStarted: cause instanceof MigrationRolledBack && cause.destinationStarted,
            cancelled: cancel?.aborted === true,
          });
          if (fallback.action === 'fail') {
            throw fallback.why === undefined ? cause : new DaemonError(asDaemonError(cause).code, `${(cause as Error).message}. ${fallback.why}`, { cause });
          }
          options.onStep?.('powering-off', `${name}: ${fallback.reason}; rebooting it instead`);
          try {
            await this.rebootNow(entry, target, options);
          } catch (failed) {
            const code = failed instanceof DaemonError ? failed.code : 'REFRESH_FAILED';
            throw new DaemonError(code, `${fallback.reason}, and the reboot failed too: ${(failed as Error).message}`, { cause: failed });
          }
          return outcome('rebooted', `${name} powered off and started on "${target.name}" (QEMU ${info.version}, pid ${entry.record.process?.pid}) because ${fallback.reason}`,
            { ...fromField, strategy: 'reboot', to: { ...to, ...(entry.record.process ? { pid: entry.record.process.pid } : {}) }, reason: fallback.reason });
        }
        const { downtimeMs, migrationMs, pid } = moved;
        const how = mode === 'cpr' ? 'handed over live (cpr-transfer: RAM not copied)' : pausedCopy === undefined ? 'moved live' : 'moved (paused for the whole copy)';
        const reason = [why, pausedCopy].filter((r) => r !== undefined && r !== '').join('; ');
        return outcome('migrated', `${name} ${how} onto "${target.name}" (QEMU ${info.version}, pid ${pid}); guest paused ${downtimeMs} ms${reason === '' ? '' : ` (${mode}: ${reason})`}`,
          { ...fromField, strategy: mode, to: { ...to, pid }, downtimeMs, migrationMs, ...(reason === '' ? {} : { reason }) });
      }
      case 'reboot':
        await this.rebootNow(entry, target, options);
        return outcome('rebooted', `${name} powered off and started on "${target.name}" (QEMU ${info.version}, pid ${entry.record.process?.pid})`,
          { ...fromField, to: { ...to, ...(entry.record.process ? { pid: entry.record.process.pid } : {}) } });
    }
  }

  private async rebootNow(entry: VmEntry, target: Installation, options: RefreshOptions): Promise<void> {
    const name = entry.record.name;
    const timeoutSec = options.timeoutSec ?? DEFAULT_REBOOT_TIMEOUT_SEC;
    await this.record(entry, { ...entry.record, refresh: { strategy: 'reboot', target, startedAt: new Date().toISOString() } });
    entry.lock.setStep('powering off');
    options.onStep?.('powering-off', `asking ${name}'s guest to power off (ACPI, ${timeoutSec} s)`);
    try {
      await this.powerOff(entry, timeoutSec, 'refresh (reboot)', () => this.crashPoint('reboot:powering-off'));
    } catch (cause) {
      if (!options.force) {
        const next: VmRecord = { ...entry.record, problem: truncate(`refresh by reboot: the guest ignored the ACPI power-off for ${timeoutSec} s`) };
        delete next.refresh;
        await this.observe(entry, next);
        throw new DaemonError('REFRESH_FAILED',
          `${name} did not power off within ${timeoutSec} s of the ACPI request; it is left running on its old QEMU (vmkeep never kills a guest unless told). Power it off from inside, retry with a longer --timeout, use --strategy migrate, or --force (the guest loses unwritten data)`,
          { cause });
      }
      await this.endQemu(entry, 'refresh (reboot, forced)');
    }
    entry.lock.setStep('starting');
    options.onStep?.('starting', `starting ${name} on "${target.name}"`);
    await this.startNow(entry);
  }

  /** A migration's other QEMU is still recorded: nothing may start or move until it is settled. */
  private refuseWhileMigrating(entry: VmEntry): void {
    const other = entry.record.retired ?? entry.record.refresh?.destination;
    if (other === undefined) return;
    throw new DaemonError('CONFLICT',
      `${entry.record.name} still has the other QEMU of a migration recorded (pid ${other.pid}); vmkeepd settles it at its next start (systemctl restart vmkeepd), or check that process by hand`);
  }

  /**
   * For a VM whose policy waits for the guest: its reboots become shutdowns we see (reason
   * guest-reset), and each starts it again on the installation current then. Armed whether or
   * not it is stale now: its binary may be replaced while vmkeepd runs on.
   */
  async armGuestReboots(entry: VmEntry): Promise<void> {
    try {
      await entry.qmp?.setAction({ reboot: 'shutdown' });
    } catch (error) {
      this.options.logger.warn({ vm: entry.record.name, err: error }, 'could not turn guest reboots into shutdowns; only a power-off will refresh it');
    }
  }

  planRefreshJob(request: RefreshJobRequest): Promise<RefreshJobPlan> {
    return this.jobs.plan(request);
  }

  runRefreshJob(plan: RefreshJobPlan, context: OperationContext): Promise<RefreshJob> {
    return this.jobs.run(plan, context);
  }

  upgradeStatus(): Promise<UpgradeStatus> {
    return upgradeStatus(this);
  }

  policyOf(record: VmRecord): RefreshStrategy {
    return record.policy ?? this.options.defaultPolicy;
  }

  current(record: VmRecord): Installation {
    return currentInstallation(this.options.installations, record.channel);
  }

  /** Test hook for the crash-at-every-step tests: dies the hardest way, mid-operation. */
  crashPoint(step: string): void {
    if (this.options.crashAt !== step) return;
    this.options.logger.warn({ step }, `crash point ${step} reached: SIGKILL to self (VMKEEP_TEST_CRASH_AT)`);
    process.kill(process.pid, 'SIGKILL');
  }

  /** Work that can wait until vmkeepd reports ready (it slows no VM's reattach). */
  afterReady(): Promise<void> {
    return this.collectPins();
  }

  /** From now until close(), every change of the host's links is followed by a check of the running VMs' TAPs. */
  watchLinks(): void {
    this.nicRepair.start();
  }

  private collectPins(): Promise<void> {
    return this.pins.collect(() => ({ records: this.entries().map((e) => e.record), damagedRecords: this.damaged.size }));
  }

  subscribe(listener: (event: DaemonEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Lets go of every monitor; never touches a QEMU (ARCHITECTURE.md, invariant 2). */
  async close(): Promise<void> {
    this.closed = true;
    this.stopHealthChecks();
    this.stopLogRotation();
    this.machines?.close();
    clearTimeout(this.flushTimer);
    for (const entry of this.vms.values()) {
      if (entry.retryTimer) clearTimeout(entry.retryTimer);
      this.detach(entry);
    }
    await this.nicRepair.close();
  }

  // ---- helpers -------------------------------------------------------------------------------

  vmDir(name: string): string {
    return join(this.options.runtimeDir, 'vms', name);
  }

  /**
   * The VM's folder, where QEMU's user makes its QMP and migration sockets, and the VMs' folder
   * it passes through, as qemuFolderModes says (ARCHITECTURE.md, invariant 11).
   */
  private async qemuVmFolder(name: string): Promise<void> {
    const modes = qemuFolderModes(this.options.qemuUser);
    const changed = await secureFolder(dirname(this.vmDir(name)), modes.pass);
    if (changed !== undefined) this.options.logger.warn({ vm: name }, `set ${changed}`);
    await ownVmFolder(this.vmDir(name), modes.own);
  }

  /** Where the VM's logs go from its next start on (a running QEMU keeps writing where its record says). */
  private logDirOf(name: string): string {
    return join(this.managerOptions.logDir, name);
  }

  private vmPaths(name: string): VmRecord['paths'] {
    const logs = this.logDirOf(name);
    return { qmpSocket: join(this.vmDir(name), 'qmp.sock'), serialLog: join(logs, 'serial.log'), stderrLog: join(logs, 'qemu.log') };
  }

  /** Lets go of the VM's monitor without treating the close as news about QEMU. */
  detach(entry: VmEntry): void {
    const qmp = entry.qmp;
    entry.qmp = undefined;
    qmp?.close();
  }

  private refuseExisting(name: string): void {
    const damaged = this.damaged.get(name);
    if (damaged) {
      throw new DaemonError('EXISTS', `the record of ${name} is damaged (${damaged.problem}) and is kept as it is; repair or move the file ${damaged.file} and restart vmkeepd, or pick another name`);
    }
    if (this.vms.has(name)) {
      throw new DaemonError('EXISTS', `a VM named ${name} exists already; pick another name or delete it first (vmkeep delete ${name})`);
    }
  }

  private entry(name: string): VmEntry {
    const entry = isValidVmName(name) ? this.vms.get(name) : undefined;
    if (entry) return entry;
    const damaged = isValidVmName(name) ? this.damaged.get(name) : undefined;
    if (damaged) {
      throw new DaemonError('RECORD_CORRUPT', `${damaged.problem} (vmkeep shows ${name} only once its record file ${damaged.file} is repaired or moved away and vmkeepd restarted)`);
    }
    throw new DaemonError('NOT_FOUND', `no VM named ${JSON.stringify(name)}; see vmkeep list`);
  }

  /** An operation that waited in the lock may find its VM deleted meanwhile. */
  private requireLive(entry: VmEntry): void {
    if (this.vms.get(entry.record.name) !== entry) {
      throw new DaemonError('NOT_FOUND', `${entry.record.name} was deleted while this request waited; see vmkeep list`);
    }
  }

  /**
   * Once closed, the lock may already belong to the next vmkeepd: an operation still under way
   * here must not change what that daemon reads and writes. It fails, the record stays as it
   * was, and the next daemon finishes or rolls back from there.
   */
  private refuseWhenClosed(name: string): void {
    if (this.closed) throw new DaemonError('DAEMON_DOWN', `vmkeepd is stopping; ${name}'s record is left as it was for the next vmkeepd`);
  }

  /** An intent: written durably first, then memory and subscribers. Throws; memory unchanged then. */
  async record(entry: VmEntry, next: VmRecord): Promise<void> {
    this.refuseWhenClosed(next.name);
    const record = { ...next, updatedAt: new Date().toISOString() };
    await this.options.store.put(record);
    entry.unsaved = undefined;
    this.remember(entry, record);
  }

  /**
   * A fact (the guest powered off, QEMU exited): memory and subscribers first, since that is
   * what is true now, then the disk. A failed write (disk full) is logged, shown in the VM's
   * view and retried; the next write of the record carries it too.
   */
  async observe(entry: VmEntry, next: VmRecord): Promise<void> {
    if (this.closed) return;
    const record = { ...next, updatedAt: new Date().toISOString() };
    this.remember(entry, record);
    await this.flush(entry);
  }

  private async flush(entry: VmEntry): Promise<void> {
    if (this.closed || this.vms.get(entry.record.name) !== entry) return;
    try {
      await this.options.store.put(entry.record);
      entry.unsaved = undefined;
    } catch (error) {
      const first = entry.unsaved === undefined;
      entry.unsaved = truncate((error as Error).message);
      if (first) this.options.logger.error({ vm: entry.record.name, err: error }, `${entry.record.name}'s record could not be written; kept in memory and retried`);
      this.flushTimer ??= setTimeout(() => {
        this.flushTimer = undefined;
        for (const e of this.entries().filter((x) => x.unsaved !== undefined)) {
          void e.lock.run('supervise', () => this.flush(e)).catch(() => undefined);
        }
      }, this.options.retryIntervalMs);
      this.flushTimer.unref();
    }
  }

  private remember(entry: VmEntry, record: VmRecord): void {
    const previous = entry.record.state;
    // A TAP no record names any more belongs to a QEMU that is gone (ARCHITECTURE.md, "Networking").
    const released = tapsReleased(entry.record, record);
    entry.record = record;
    this.machines?.sync(record);
    void this.options.taps.release(record.name, released);
    if (record.state !== previous) {
      this.options.logger.info({ vm: record.name, state: record.state, previous }, `${record.name}: ${previous} -> ${record.state}`);
      this.emit({ type: 'vm-state', vm: record.name, state: record.state, previous });
    }
  }

  emit(event: Omit<DaemonEvent, 'time'>): void {
    // Every deletion says so here: its per-VM series go with it.
    if (event.type === 'vm-deleted' && event.vm !== undefined) this.metrics.forgetVm(event.vm);
    // What an operation does to its VM happens under the VM's lock: the lock names the operation.
    const operation = event.operation ?? (event.vm === undefined ? undefined : this.vms.get(event.vm)?.lock.current?.operation);
    const full: DaemonEvent = { ...event, ...(operation === undefined ? {} : { operation }), time: new Date().toISOString() };
    for (const listener of this.listeners) {
      try {
        listener(full);
      } catch (error) {
        this.options.logger.warn({ err: error }, 'an event listener failed');
      }
    }
  }
}
