import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from './log.js';
import {
  isSameProcess,
  isValidVmName,
  launchVm,
  readProcessIdentity,
  resolveMachineType,
  validateSpec,
  checkSpecFiles,
  waitForProcessExit,
  readExe,
  type ExeInfo,
  type Installation,
  type InstallationInfo,
  type LaunchedVm,
} from '../launcher/index.js';
import { connectQmp, type QmpClient, type QmpEvent } from '../qmp/index.js';
import { scopeUnitName, type CreateScopeOptions } from '../scope-manager/index.js';
import {
  assessStaleness, checkRefreshTarget, collectPinnedModules, currentInstallation, decideMigration, DEFAULT_CHANNEL, migrateLive,
  parseStrategy, pinModuleDir, policyOutcome, runRolling, UpgradeError,
  type InstallationsConfig, type RefreshStrategy, type Staleness,
} from '../upgrade/index.js';
import { DaemonError } from './errors.js';
import { DEFAULT_STOP_TIMEOUT_SEC } from './model.js';
import type {
  CreateOptions, DaemonEvent, DaemonInfo, DaemonOps, RefreshJob, RefreshJobRequest, RefreshOptions, RefreshOutcome,
  StopOptions, UpgradeStatus, VmState, VmUpgradeStatus, VmView,
} from './model.js';
import { classifyReattach, type ReattachObservation } from './reattach.js';
import type { OtherQemu, RecordStore, VmRecord } from './records.js';

/** The part of the scope manager the daemon uses (null: --no-scope, VMs die with our cgroup). */
export interface ScopePort {
  createScope(options: CreateScopeOptions): Promise<unknown>;
  scopeOfPid(pid: number): Promise<string | null>;
  listScopes(prefix?: string): Promise<Array<{ name: string }>>;
}

export interface VmManagerOptions {
  store: RecordStore;
  scopes: ScopePort | null;
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
  logger: Logger;
  info: Omit<DaemonInfo, 'orphanScopes'>;
  /** How long a reattach waits for a QMP greeting before calling the VM unreachable. */
  greetingTimeoutMs?: number;
  /** How often an unreachable VM's monitor is tried again. */
  retryIntervalMs?: number;
}

/** The unit whose stop powers every guest off at host shutdown (snap/vmkeep-guests.service). */
export const DEFAULT_GUESTS_UNIT = 'vmkeep-guests.service';

const DEFAULT_MIGRATE_TIMEOUT_SEC = 60;
const DEFAULT_REBOOT_TIMEOUT_SEC = 120;
const MAX_JOBS_KEPT = 100;
const QUIT_EXIT_TIMEOUT_MS = 15_000;

/** One VM in memory: its record (the truth on disk), its monitor, and a queue of operations. */
interface VmEntry {
  record: VmRecord;
  qmp?: QmpClient;
  /** Operations on one VM run one after another; different VMs never wait for each other. */
  queue: Promise<unknown>;
  /** Set while the daemon itself ends this QEMU, so its exit is not taken for a crash. */
  stopping?: string;
  retryTimer?: NodeJS.Timeout;
  /** Reason of a host-side SHUTDOWN event (e.g. host-signal) seen before the monitor closed. */
  hostShutdown?: string;
  /** An operator's stop asked this QEMU's guest to power off (kept after a stop timeout). */
  stopAsked?: boolean;
}

/**
 * The daemon's VM bookkeeping: reattach at start, start/stop/delete, supervision through QMP
 * events. Never signals a QEMU except `quit` over QMP on an explicit stop or a finished guest
 * shutdown (contract points 2 and 3).
 */
export class VmManager implements DaemonOps {
  private readonly vms = new Map<string, VmEntry>();
  private readonly damagedNames = new Set<string>();
  private readonly listeners = new Set<(event: DaemonEvent) => void>();
  private readonly jobs = new Map<string, RefreshJob>();
  private orphanScopes: string[] = [];
  private closed = false;
  /** Starts and refreshes under way: pinned module folders are collected only when none are. */
  private launching = 0;
  private pinLock: Promise<void> = Promise.resolve();

  constructor(private readonly options: VmManagerOptions) {}

  // ---- start-up ----------------------------------------------------------------------------

  /** Reads every record and reattaches all VMs concurrently; reports scopes no record claims. */
  async reattachAll(): Promise<void> {
    const { records, damaged } = await this.options.store.list();
    for (const bad of damaged) {
      // The name stays taken: a new VM must not overwrite the file of one that may still run.
      this.damagedNames.add(bad.name);
      this.options.logger.error({ vm: bad.name, file: bad.file, code: bad.error.code }, bad.error.message);
    }
    for (const record of records) this.vms.set(record.name, { record, queue: Promise.resolve() });
    await Promise.all(records.map((record) => this.serially(record.name, () => this.reattachIsolated(record.name))));
    // Before READY: `vmkeep info` right after a restart names them.
    await this.findOrphanScopes();
  }

  /** What can wait until the daemon serves (READY=1 sent): unused pinned module folders go. */
  afterReady(): Promise<void> {
    return this.collectPins();
  }

  private async findOrphanScopes(): Promise<void> {
    if (this.options.scopes === null) return;
    try {
      const claimed = new Set([...this.vms.values()]
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

  /** A VM whose reattach fails is reported unreachable and retried; the others go on. */
  private async reattachIsolated(name: string): Promise<void> {
    try {
      await this.reattach(name);
    } catch (error) {
      const entry = this.entry(name);
      this.options.logger.error({ vm: name, err: error }, `reattach of ${name} failed; retrying later`);
      entry.record = { ...entry.record, state: 'unreachable', problem: truncate(`reattach failed: ${(error as Error).message}`) };
      this.scheduleRetry(entry);
    }
  }

  private async reattach(name: string): Promise<void> {
    const entry = this.entry(name);
    // A refresh the last daemon left mid-way is finished or rolled back first, so what follows
    // sees exactly one QEMU of this VM.
    await this.recoverMigration(entry);
    await this.settleRetiredSafely(entry);
    const record = entry.record;
    const obs: ReattachObservation = { recordedState: record.state, hasProcess: record.process !== undefined };
    let qmp: QmpClient | undefined;
    if (record.process) {
      const identity = readProcessIdentity(record.process.pid);
      obs.process =
        identity === null || identity.state === 'Z' ? 'gone' : identity.startTime === record.process.startTime ? 'same' : 'recycled';
      if (obs.process === 'same' && this.options.scopes !== null && record.process.scope !== null) {
        obs.recordedScope = record.process.scope;
        try {
          obs.actualScope = await this.options.scopes.scopeOfPid(record.process.pid);
          obs.scopeMatches = obs.actualScope === record.process.scope;
        } catch (error) {
          // Unverified is not verified: retried later rather than resumed or finished.
          obs.actualScope = `unknown (${(error as Error).message})`;
          obs.scopeMatches = false;
        }
      }
      if (obs.process === 'same' && obs.scopeMatches !== false) {
        try {
          qmp = await this.connect(record);
          // Listening before asking: an event after the answer is queued behind this reattach.
          this.watch(entry, qmp);
          obs.monitor = { status: (await qmp.queryStatus()).status };
        } catch (error) {
          this.detach(entry);
          qmp = undefined;
          obs.monitor = { error: (error as Error).message };
        }
      }
    }
    const decision = classifyReattach(obs);
    this.options.logger.info({ vm: name, observed: obs, decision }, `reattach ${name}: ${decision.state}`);
    const next: VmRecord = { ...record, state: decision.state };
    if (decision.dropProcess) delete next.process;
    if (decision.lastExit) next.lastExit = { ...decision.lastExit, at: new Date().toISOString() };
    if (decision.problem === undefined) delete next.problem;
    else next.problem = decision.problem;
    // A record the reattach leaves as it was is not written again (an fsync'd write per VM at
    // every daemon start otherwise).
    if (JSON.stringify(next) !== JSON.stringify(record)) await this.save(entry, next);

    switch (decision.action) {
      case 'finish-shutdown':
        await this.finishGuestShutdown(entry);
        break;
      case 'finish-start':
        await entry.qmp?.cont();
        await this.save(entry, { ...entry.record, state: 'running' });
        break;
      case 'retry':
        this.scheduleRetry(entry);
        break;
      default:
        break;
    }
    if (entry.record.refresh?.strategy === 'reboot' && entry.record.process === undefined) {
      // The guest powered off for a reboot refresh while we were away: finish it.
      await this.startNow(entry);
    } else if (entry.qmp && this.policyOf(entry.record) === 'on-guest-shutdown') {
      await this.armGuestReboots(entry);
    }
  }

  private scheduleRetry(entry: VmEntry): void {
    if (this.closed || entry.retryTimer) return;
    entry.retryTimer = setTimeout(() => {
      entry.retryTimer = undefined;
      void this.serially(entry.record.name, async () => {
        if (entry.record.state === 'unreachable' && !this.closed) await this.reattachIsolated(entry.record.name);
      }).catch((error: unknown) => this.options.logger.warn({ vm: entry.record.name, err: error }, 'reattach retry failed'));
    }, this.options.retryIntervalMs ?? 5_000);
    entry.retryTimer.unref();
  }

  // ---- supervision ---------------------------------------------------------------------------

  private connect(record: VmRecord): Promise<QmpClient> {
    return connectQmp(record.paths.qmpSocket, { greetingTimeoutMs: this.options.greetingTimeoutMs ?? 3_000 });
  }

  private watch(entry: VmEntry, qmp: QmpClient): void {
    entry.qmp = qmp;
    const name = entry.record.name;
    qmp.on('event', (event) => {
      void this.serially(name, () => this.onEvent(entry, qmp, event)).catch((error: unknown) =>
        this.options.logger.error({ vm: name, err: error }, `handling ${event.event} failed`),
      );
    });
    qmp.on('close', (reason) => {
      // Only the current monitor matters: one we let go of on purpose says nothing about QEMU.
      if (entry.qmp !== qmp) return;
      entry.qmp = undefined;
      if (this.closed) return;
      // The handler runs later, in the VM's queue: by then the record may name another QEMU
      // (or none, when the daemon itself quit this one), and then the close is no news.
      const process = entry.record.process;
      void this.serially(name, () => this.onMonitorClosed(entry, process, reason.message)).catch((error: unknown) =>
        this.options.logger.error({ vm: name, err: error }, 'handling a closed monitor failed'),
      );
    });
  }

  private async onEvent(entry: VmEntry, qmp: QmpClient, event: QmpEvent): Promise<void> {
    if (entry.qmp !== qmp) return;
    const log = this.options.logger.child({ vm: entry.record.name });
    switch (event.event) {
      case 'SHUTDOWN': {
        if (event.data.guest !== true) {
          // QEMU itself is ending (a signal, a quit from elsewhere): it exits on its own, and
          // the closed monitor tells the rest. Not a guest power-off to finish.
          log.warn({ data: event.data }, 'QEMU is shutting down on the host side');
          entry.hostShutdown = String(event.data.reason ?? 'unknown');
          return;
        }
        log.info({ data: event.data }, 'guest shut down');
        if (entry.stopping) return;
        await this.save(entry, { ...entry.record, state: 'shutdown' });
        await this.finishGuestShutdown(entry, String(event.data.reason ?? ''));
        return;
      }
      case 'STOP':
        if (entry.record.state === 'running') await this.save(entry, { ...entry.record, state: 'paused' });
        return;
      case 'RESUME':
        if (entry.record.state === 'paused') await this.save(entry, { ...entry.record, state: 'running' });
        return;
      case 'RESET':
        log.info({ data: event.data }, 'guest reset');
        return;
      case 'GUEST_PANICKED':
        log.error({ data: event.data }, 'guest panicked');
        await this.save(entry, { ...entry.record, problem: truncate(`guest panicked (${JSON.stringify(event.data)})`) });
        return;
      default:
        return;
    }
  }

  /** A closed monitor is a question, not an answer: look at the process. */
  private async onMonitorClosed(entry: VmEntry, process: VmRecord['process'], why: string): Promise<void> {
    const now = entry.record.process;
    if (!process || !now || now.pid !== process.pid || now.startTime !== process.startTime) return;
    if (isSameProcess(process.pid, process.startTime)) {
      await this.save(entry, { ...entry.record, state: 'unreachable', problem: `monitor closed (${why}); QEMU still alive` });
      this.scheduleRetry(entry);
      return;
    }
    const next: VmRecord = {
      ...entry.record,
      state: 'exited',
      lastExit: {
        reason: entry.hostShutdown === undefined ? 'QEMU exited unexpectedly' : `QEMU exited (${entry.hostShutdown})`,
        at: new Date().toISOString(),
      },
    };
    delete next.process;
    await this.save(entry, next);
  }

  /**
   * With -no-shutdown a powered-off guest leaves QEMU waiting: end it and record why. A VM
   * with a reboot refresh pending, or stale under the on-guest-shutdown policy, starts again
   * on the current installation.
   */
  private async finishGuestShutdown(entry: VmEntry, reason = ''): Promise<void> {
    // A power-off the operator asked for (a stop that timed out, then the guest obeyed late)
    // is not the guest's own: it stays off.
    const asked = entry.stopAsked === true;
    // guest-reset: a reboot that set-action turned into a shutdown (only armed VMs do that).
    const restart = reason === 'guest-reset' || (!asked && (entry.record.refresh?.strategy === 'reboot'
      || (this.policyOf(entry.record) === 'on-guest-shutdown' && (await this.stalenessOf(entry).catch(() => undefined))?.stale === true)));
    await this.endQemu(entry, 'guest shutdown');
    if (!restart) return;
    this.options.logger.info({ vm: entry.record.name }, `${entry.record.name} powered off while stale: starting it on the current installation`);
    await this.startNow(entry);
  }

  /** quit over QMP, wait for the process to go, record the reason. The only way we end a QEMU. */
  private async endQemu(entry: VmEntry, reason: string): Promise<void> {
    const process = entry.record.process;
    entry.stopping = reason;
    try {
      if (entry.qmp) await entry.qmp.quit();
      if (process) await waitForProcessExit(process.pid, process.startTime, QUIT_EXIT_TIMEOUT_MS);
      const next: VmRecord = { ...entry.record, state: 'stopped', lastExit: { reason, at: new Date().toISOString() } };
      delete next.process;
      delete next.problem;
      // An operator's stop ends a pending reboot refresh too: the VM stays off.
      if (entry.stopAsked) delete next.refresh;
      await this.save(entry, next);
    } finally {
      this.detach(entry);
      entry.stopping = undefined;
    }
  }

  // ---- operations ----------------------------------------------------------------------------

  info(): DaemonInfo {
    return { ...this.options.info, orphanScopes: [...this.orphanScopes] };
  }

  async list(): Promise<VmView[]> {
    return [...this.vms.values()].map((e) => toView(e.record)).sort((a, b) => a.name.localeCompare(b.name));
  }

  async get(name: string): Promise<VmView> {
    return toView(this.entry(name).record);
  }

  async create(input: unknown, options: CreateOptions = {}): Promise<VmView> {
    const spec = validateSpec(input);
    await checkSpecFiles(spec);
    this.refuseExisting(spec.name);
    const channel = options.channel ?? DEFAULT_CHANNEL;
    const installation = currentInstallation(this.options.installations, channel);
    const policy = options.policy === undefined ? undefined : parseStrategy(options.policy, 'policy');
    const info = await this.options.probe(installation);
    // Resolving now pins the versioned machine type for the VM's whole life (migrations need it).
    const machineType = resolveMachineType(spec.machine, info.machines);
    const now = new Date().toISOString();
    const record: VmRecord = {
      schema: 2,
      name: spec.name,
      uuid: spec.uuid ?? randomUUID(),
      spec,
      machineType,
      installation,
      channel,
      ...(policy === undefined ? {} : { policy }),
      paths: this.vmPaths(spec.name),
      state: 'stopped',
      createdAt: now,
      updatedAt: now,
    };
    // Checked again after the awaits above: two creates of one name may have raced.
    this.refuseExisting(spec.name);
    const entry: VmEntry = { record, queue: Promise.resolve() };
    this.vms.set(spec.name, entry);
    try {
      await this.options.store.put(record);
    } catch (error) {
      this.vms.delete(spec.name);
      throw error;
    }
    this.emit({ type: 'vm-created', vm: spec.name, state: 'stopped' });
    if (options.start === false) return toView(record);
    return this.start(spec.name);
  }

  start(name: string): Promise<VmView> {
    return this.serially(name, async () => {
      const entry = this.entry(name);
      if (entry.record.process) {
        throw new DaemonError('CONFLICT', `${name} is already ${entry.record.state} (pid ${entry.record.process.pid}); stop it first (vmkeep stop ${name})`);
      }
      this.refuseWhileMigrating(entry);
      await this.startNow(entry);
      return toView(entry.record);
    });
  }

  /** Starts the VM's QEMU on the installation now current for it. Runs inside the VM's queue. */
  private async startNow(entry: VmEntry): Promise<void> {
    const name = entry.record.name;
    const installation = this.current(entry.record);
    const info = await this.options.probe(installation);
    // Derived, not read from the record: the files removed and truncated here are always ours.
    const paths = this.vmPaths(name);
    await mkdir(this.vmDir(name), { recursive: true, mode: 0o700 });
    // Leftovers of the previous QEMU: its socket would be taken for the new one's.
    await rm(paths.qmpSocket, { force: true });
    await writeFile(paths.serialLog, '', { mode: 0o600 });
    await this.save(entry, { ...entry.record, paths, installation, state: 'starting' });

    entry.hostShutdown = undefined;
    entry.stopAsked = false;
    const scope = this.options.scopes === null ? null : scopeUnitName(name);
    try {
      checkRefreshTarget({ vm: name, runningVersion: undefined, machineType: entry.record.machineType, target: { name: installation.name, info } });
      const { vm } = await this.launchQemu(entry, {
        installation, info, paths, scope, incoming: false,
        // Recorded before the scope exists: a crash from here on leaves a record that names
        // this QEMU, so the next daemon finds it instead of an orphan.
        onSpawned: (proc, moduleDir) => this.save(entry, {
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
      await this.save(entry, next);
    } catch (cause) {
      const started = entry.record.process;
      const next: VmRecord = { ...entry.record, problem: truncate((cause as Error).message) };
      delete next.refresh;
      if (started !== undefined && isSameProcess(started.pid, started.startTime)) {
        // The QEMU runs (e.g. a record write failed after it started): keep naming it, never orphan it.
        next.state = 'unreachable';
        this.scheduleRetry(entry);
      } else {
        this.detach(entry);
        next.state = 'exited';
        next.lastExit = { reason: 'start failed', at: new Date().toISOString() };
        delete next.process;
      }
      await this.save(entry, next).catch((error: unknown) =>
        this.options.logger.error({ vm: name, err: error }, 'could not record the failed start'),
      );
      throw new DaemonError(
        'START_FAILED',
        `starting ${name} failed: ${(cause as Error).message}. The VM stays recorded (state ${next.state}); fix the cause and run vmkeep start ${name}, or vmkeep delete ${name}`,
        { cause },
      );
    }
  }

  /**
   * Spawns a QEMU of the VM, paused (or waiting for an incoming migration), its modules pinned,
   * recorded through `onSpawned` and placed in `scope` before any guest code runs.
   */
  private async launchQemu(entry: VmEntry, args: {
    installation: Installation;
    info: InstallationInfo;
    paths: VmRecord['paths'];
    scope: string | null;
    incoming: boolean;
    onSpawned: (proc: NonNullable<VmRecord['process']>, moduleDir: string | undefined) => Promise<void>;
  }): Promise<{ vm: LaunchedVm; moduleDir: string | undefined }> {
    const { record } = entry;
    this.launching++;
    try {
      await this.pinLock;
      const pinned = await pinModuleDir(args.installation, args.info, this.options.pinRoot);
      const vm = await launchVm({
        spec: record.spec,
        uuid: record.uuid,
        installation: pinned,
        info: args.info,
        machineType: record.machineType,
        paths: args.paths,
        // Paused until it is recorded and watched: nothing the guest does can go unseen.
        stayPaused: true,
        ...(args.incoming ? { incoming: 'defer' as const } : {}),
        placeInScope: async (pid) => {
          const identity = readProcessIdentity(pid);
          if (identity === null) throw new DaemonError('START_FAILED', `QEMU (pid ${pid}) exited right after it was spawned; see ${args.paths.stderrLog}`);
          await args.onSpawned({ pid, startTime: identity.startTime, scope: args.scope }, pinned.moduleDir);
          if (this.options.scopes !== null && args.scope !== null) {
            await this.options.scopes.createScope({
              name: args.scope,
              pids: [pid],
              slice: this.options.slice,
              description: `vmkeep VM ${record.name}`,
              // At host shutdown units stop in reverse order: the guests unit powers every guest
              // off (ACPI) before any VM scope is stopped, which would SIGTERM its QEMU.
              properties: { Before: { signature: 'as', value: [this.options.guestsUnit ?? DEFAULT_GUESTS_UNIT] } },
            });
          }
        },
      });
      return { vm, moduleDir: pinned.moduleDir };
    } finally {
      this.launching--;
    }
  }

  stop(name: string, options: StopOptions = {}): Promise<VmView> {
    return this.serially(name, async () => {
      const entry = this.entry(name);
      if (!entry.record.process) return toView(entry.record);
      if (!entry.qmp) {
        throw new DaemonError('UNREACHABLE', `${name}'s monitor does not answer (${entry.record.problem ?? 'not connected'}); vmkeep will not signal a QEMU it cannot talk to. Check pid ${entry.record.process.pid} by hand`);
      }
      if (options.force) {
        await this.endQemu(entry, 'stopped by request (forced)');
        return toView(entry.record);
      }
      entry.stopAsked = true;
      await this.powerOff(entry, options.timeoutSec ?? DEFAULT_STOP_TIMEOUT_SEC, 'stopped by request');
      return toView(entry.record);
    });
  }

  /**
   * ACPI power-off, wait for the guest's SHUTDOWN, then quit QEMU. A guest that does not power
   * off in time is left running (STOP_TIMEOUT): never killed here (contract point 3).
   */
  private async powerOff(entry: VmEntry, timeoutSec: number, reason: string, afterRequest?: () => void): Promise<void> {
    const qmp = entry.qmp;
    if (!qmp) throw new DaemonError('UNREACHABLE', `${entry.record.name} has no connected monitor (state ${entry.record.state})`);
    if (entry.record.state !== 'shutdown') {
      const shutdown = qmp.waitForEvent('SHUTDOWN', { timeoutMs: timeoutSec * 1000 });
      // Handled from the start: if powerdown fails, this wait's rejection must not go unhandled.
      shutdown.catch(() => undefined);
      entry.stopping = reason;
      try {
        await qmp.systemPowerdown();
        afterRequest?.();
        await shutdown;
      } catch (cause) {
        entry.stopping = undefined;
        throw new DaemonError(
          'STOP_TIMEOUT',
          `${entry.record.name} did not power off within ${timeoutSec} s of the ACPI request and is still running; give it longer (--timeout) or quit QEMU with --force (the guest loses unwritten data)`,
          { cause },
        );
      }
    }
    await this.endQemu(entry, reason);
  }

  delete(name: string): Promise<void> {
    return this.serially(name, async () => {
      const entry = this.entry(name);
      if (entry.record.process) {
        throw new DaemonError('CONFLICT', `${name} has a QEMU (pid ${entry.record.process.pid}, ${entry.record.state}); stop it first (vmkeep stop ${name})`);
      }
      await this.options.store.remove(name);
      // The folder goes before the name is free: a quick re-create must not lose its new socket.
      await rm(this.vmDir(name), { recursive: true, force: true });
      this.vms.delete(name);
      this.emit({ type: 'vm-deleted', vm: name });
    });
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

  refresh(name: string, options: RefreshOptions = {}): Promise<RefreshOutcome> {
    return this.serially(name, () => this.refreshNow(this.entry(name), options));
  }

  private async refreshNow(entry: VmEntry, options: RefreshOptions): Promise<RefreshOutcome> {
    const began = performance.now();
    const { record } = entry;
    const name = record.name;
    const strategy = options.strategy === undefined ? this.policyOf(record) : parseStrategy(options.strategy);
    const target = this.current(record);
    const info = await this.options.probe(target);
    const outcome = (result: RefreshOutcome['result'], message: string, extra: Partial<RefreshOutcome> = {}): RefreshOutcome =>
      ({ vm: name, strategy, result, totalMs: Math.round(performance.now() - began), message, ...extra });
    this.refuseWhileMigrating(entry);
    if (!record.process) {
      return outcome('current', `${name} has no running QEMU (${record.state}); its next start uses installation "${target.name}" (QEMU ${info.version})`);
    }
    const status = await this.stalenessOf(entry, target, info);
    const from = { installation: record.installation.name, pid: record.process.pid, ...(status.runningVersion === undefined ? {} : { version: status.runningVersion }) };
    if (!status.stale) {
      return outcome('current', `${name} already runs the current installation "${target.name}" (QEMU ${info.version})`, { from });
    }
    if (strategy === 'manual') {
      return outcome('reported', `${name} is stale (${status.reasons.join('; ')}); its policy is manual, so nothing was done: vmkeep refresh ${name} --strategy migrate|reboot`, { from });
    }
    if (strategy === 'on-guest-shutdown') {
      await this.save(entry, { ...entry.record, policy: 'on-guest-shutdown' });
      await this.armGuestReboots(entry);
      return outcome('armed', `${name} starts on installation "${target.name}" (QEMU ${info.version}) when its guest next powers off or reboots`, { from });
    }
    if (!entry.qmp) {
      throw new DaemonError('UNREACHABLE', `${name}'s monitor does not answer (${record.problem ?? 'not connected'}); it cannot be refreshed until it does`);
    }
    if (record.state !== 'running' && record.state !== 'paused') {
      throw new DaemonError('CONFLICT', `${name} is ${record.state}; only a running or paused VM can be refreshed`);
    }
    try {
      checkRefreshTarget({ vm: name, runningVersion: status.runningVersion, machineType: record.machineType, target: { name: target.name, info } });
    } catch (cause) {
      throw new DaemonError('REFRESH_REFUSED', (cause as Error).message, { cause });
    }
    const to = { installation: target.name, version: info.version };
    if (strategy === 'migrate') {
      const { downtimeMs, pid } = await this.migrateNow(entry, target, info, options);
      return outcome('migrated', `${name} moved live onto "${target.name}" (QEMU ${info.version}, pid ${pid}); guest paused ${downtimeMs} ms`,
        { from, to: { ...to, pid }, downtimeMs });
    }
    await this.rebootNow(entry, target, options);
    return outcome('rebooted', `${name} powered off and started on "${target.name}" (QEMU ${info.version}, pid ${entry.record.process?.pid})`,
      { from, to: { ...to, ...(entry.record.process ? { pid: entry.record.process.pid } : {}) } });
  }

  /**
   * Live migration into a new QEMU of the target installation, in its own new scope. Until
   * the stream completes the source holds the guest and any failure rolls back to it; once it
   * completed the refresh only goes forward.
   */
  private async migrateNow(entry: VmEntry, target: Installation, info: InstallationInfo, options: RefreshOptions): Promise<{ downtimeMs: number; pid: number }> {
    const name = entry.record.name;
    const source = entry.record.process as NonNullable<VmRecord['process']>;
    const sourceQmp = entry.qmp as QmpClient;
    const generation = randomBytes(4).toString('hex');
    const destSocket = join(this.vmDir(name), `qmp-${generation}.sock`);
    const streamSocket = join(this.vmDir(name), `migrate-${generation}.sock`);
    // ":" cannot occur in a VM name, so this scope never collides with another VM's.
    const scope = this.options.scopes === null ? null : scopeUnitName(`${name}:${generation}`);
    await this.save(entry, { ...entry.record, refresh: { strategy: 'migrate', target, startedAt: new Date().toISOString() } });
    this.crashPoint('migrate:begun');

    let dest: LaunchedVm | undefined;
    let moduleDir: string | undefined;
    let downtimeMs = 0;
    try {
      const launched = await this.launchQemu(entry, {
        installation: target, info, scope, incoming: true,
        paths: { ...entry.record.paths, qmpSocket: destSocket },
        onSpawned: async (proc, pinnedDir) => {
          const refresh = entry.record.refresh as NonNullable<VmRecord['refresh']>;
          const destination = { ...proc, qmpSocket: destSocket, ...(pinnedDir === undefined ? {} : { moduleDir: pinnedDir }) };
          await this.save(entry, { ...entry.record, refresh: { ...refresh, destination } });
          this.crashPoint('migrate:destination-recorded');
        },
      });
      dest = launched.vm;
      moduleDir = launched.moduleDir;
      this.crashPoint('migrate:destination-ready');
      options.onStep?.('migrating', `migrating ${name} to pid ${dest.pid}`);
      const result = await migrateLive({
        source: sourceQmp,
        destination: dest.qmp,
        socketPath: streamSocket,
        timeoutMs: (options.timeoutSec ?? DEFAULT_MIGRATE_TIMEOUT_SEC) * 1000,
        onStatus: (status) => {
          if (status === 'active') this.crashPoint('migrate:migrating');
        },
      });
      downtimeMs = result.downtimeMs;
    } catch (cause) {
      // Which QEMU holds the guest decides, never the error: a destination that already runs it
      // must not be ended, whatever failed around it.
      const way = dest === undefined ? 'back' : await decideMigration(sourceQmp, dest.qmp);
      if (way === 'back') {
        await this.rollBackMigration(entry, dest, cause);
        throw new DaemonError('REFRESH_FAILED',
          `live migration of ${name} onto "${target.name}" failed: ${(cause as Error).message}. ${name} keeps running on its old QEMU (pid ${source.pid}); the new QEMU was removed (its log: ${entry.record.paths.stderrLog})`,
          { cause });
      }
      if (way === 'unknown') {
        // Both stay, the record names both: the retry's reattach finishes or rolls back.
        dest?.qmp.close();
        this.detach(entry);
        entry.record = { ...entry.record, state: 'unreachable', problem: truncate(`migration outcome unknown: ${(cause as Error).message}`) };
        this.scheduleRetry(entry);
        throw new DaemonError('REFRESH_FAILED',
          `live migration of ${name} failed and it cannot be told yet which QEMU holds the guest (${(cause as Error).message}); both are kept and vmkeepd settles it when their monitors answer`,
          { cause });
      }
      this.options.logger.warn({ vm: name, err: cause }, 'the migration reported an error after the guest was handed over; going forward');
    }
    this.crashPoint('migrate:completed');
    const destination = dest as LaunchedVm;
    const next: VmRecord = {
      ...entry.record,
      process: { pid: destination.pid, startTime: destination.startTime, scope },
      paths: { ...entry.record.paths, qmpSocket: destSocket },
      installation: target,
      binary: binaryOf(info, moduleDir),
      retired: retiredOf(entry.record),
      state: 'running',
    };
    delete next.refresh;
    delete next.problem;
    this.detach(entry);
    try {
      await this.save(entry, next);
    } catch (error) {
      // The guest runs in the destination, the record still names the source with the
      // destination in `refresh`: the retry's reattach rolls forward.
      destination.qmp.close();
      entry.record = { ...entry.record, state: 'unreachable', problem: truncate(`migration done, record switch failed: ${(error as Error).message}`) };
      this.scheduleRetry(entry);
      throw error;
    }
    this.watch(entry, destination.qmp);
    this.crashPoint('migrate:switched');
    // Events of the destination before it was watched are lost: its status says what they were.
    const { status } = await destination.qmp.queryStatus();
    if (status === 'shutdown') {
      await this.save(entry, { ...entry.record, state: 'shutdown' });
      await this.finishGuestShutdown(entry);
    } else if (status === 'paused') {
      await this.save(entry, { ...entry.record, state: 'paused' });
    }
    await this.settleRetiredSafely(entry);
    await rm(streamSocket, { force: true });
    return { downtimeMs, pid: destination.pid };
  }

  /** The destination never ran the guest: quit it (or end it if its monitor is gone), forget it. */
  private async rollBackMigration(entry: VmEntry, dest: LaunchedVm | undefined, cause: unknown): Promise<void> {
    const recorded = entry.record.refresh?.destination;
    this.options.logger.warn({ vm: entry.record.name, err: cause }, 'migration failed; removing the destination, the source keeps the guest');
    await endIdleQemu(dest?.qmp, recorded);
    if (recorded) await rm(recorded.qmpSocket, { force: true });
    const next: VmRecord = { ...entry.record, problem: truncate(`last refresh (migrate) failed: ${(cause as Error).message}`) };
    delete next.refresh;
    await this.save(entry, next);
  }

  /** Finishes or rolls back a migration the last daemon left mid-way. */
  private async recoverMigration(entry: VmEntry): Promise<void> {
    const refresh = entry.record.refresh;
    if (refresh?.strategy !== 'migrate') return;
    const log = this.options.logger.child({ vm: entry.record.name });
    const dest = refresh.destination;
    const rollBack = async (why: string): Promise<void> => {
      log.warn(why);
      const next: VmRecord = { ...entry.record, problem: truncate(why) };
      delete next.refresh;
      await this.save(entry, next);
    };
    if (dest === undefined || !isSameProcess(dest.pid, dest.startTime)) {
      if (dest) await rm(dest.qmpSocket, { force: true });
      await rollBack('a refresh by migration was interrupted before its new QEMU ran the guest; rolled back, the VM stays on its old QEMU');
      return;
    }
    const destQmp = await connectQmp(dest.qmpSocket, { greetingTimeoutMs: this.options.greetingTimeoutMs ?? 3_000 });
    try {
      const source = entry.record.process;
      const sourceAlive = source !== undefined && isSameProcess(source.pid, source.startTime);
      const sourceQmp = sourceAlive ? await connectQmp(entry.record.paths.qmpSocket, { greetingTimeoutMs: this.options.greetingTimeoutMs ?? 3_000 }) : undefined;
      let way: 'forward' | 'back' | 'unknown';
      try {
        way = await decideMigration(sourceQmp, destQmp);
      } finally {
        sourceQmp?.close();
      }
      if (way === 'unknown') {
        // Retried: reattachIsolated marks the VM unreachable; neither QEMU is touched.
        throw new DaemonError('UNREACHABLE', 'an interrupted migration cannot be settled yet: which QEMU holds the guest is not known');
      }
      if (way === 'back') {
        await endIdleQemu(destQmp, dest);
        await rm(dest.qmpSocket, { force: true });
        await rollBack('a refresh by migration was interrupted before the guest was handed over; the new QEMU was removed, the VM stays on its old QEMU');
        return;
      }
      log.info('a refresh by migration was interrupted after the guest was handed over; finishing it');
      const info = await this.options.probe(refresh.target);
      // The folder the destination was launched with; re-pinned only for an older record.
      const moduleDir = dest.moduleDir ?? (await pinModuleDir(refresh.target, info, this.options.pinRoot)).moduleDir;
      const next: VmRecord = {
        ...entry.record,
        process: { pid: dest.pid, startTime: dest.startTime, scope: dest.scope },
        paths: { ...entry.record.paths, qmpSocket: dest.qmpSocket },
        installation: refresh.target,
        binary: binaryOf(info, moduleDir),
        state: 'running',
      };
      if (sourceAlive) next.retired = retiredOf(entry.record);
      delete next.refresh;
      await this.save(entry, next);
    } finally {
      destQmp.close();
    }
  }

  /** Quits the source of a finished migration (it waits guest-less in postmigrate). */
  private async settleRetired(entry: VmEntry): Promise<void> {
    const retired = entry.record.retired;
    if (retired === undefined) return;
    if (isSameProcess(retired.pid, retired.startTime)) {
      const qmp = await connectQmp(retired.qmpSocket, { greetingTimeoutMs: this.options.greetingTimeoutMs ?? 3_000 });
      try {
        const status = (await qmp.queryStatus()).status;
        if (status !== 'postmigrate') {
          throw new DaemonError('CONFLICT', `the old QEMU of ${entry.record.name} (pid ${retired.pid}) is ${status}, not postmigrate; left alone, check it by hand`);
        }
        await qmp.quit();
        await waitForProcessExit(retired.pid, retired.startTime, QUIT_EXIT_TIMEOUT_MS);
      } finally {
        qmp.close();
      }
    }
    await rm(retired.qmpSocket, { force: true });
    const next: VmRecord = { ...entry.record };
    delete next.retired;
    await this.save(entry, next);
  }

  /** settleRetired, its failure recorded as the VM's problem: the guest runs fine meanwhile. */
  private async settleRetiredSafely(entry: VmEntry): Promise<void> {
    try {
      await this.settleRetired(entry);
    } catch (error) {
      const retired = entry.record.retired;
      this.options.logger.warn({ vm: entry.record.name, err: error }, 'could not end the old QEMU of a finished migration; kept recorded, tried again at the next start of vmkeepd');
      await this.save(entry, { ...entry.record, problem: truncate(`old QEMU (pid ${retired?.pid}) of the last migration not ended yet: ${(error as Error).message}`) })
        .catch(() => undefined);
    }
  }

  private async rebootNow(entry: VmEntry, target: Installation, options: RefreshOptions): Promise<void> {
    const name = entry.record.name;
    const timeoutSec = options.timeoutSec ?? DEFAULT_REBOOT_TIMEOUT_SEC;
    await this.save(entry, { ...entry.record, refresh: { strategy: 'reboot', target, startedAt: new Date().toISOString() } });
    options.onStep?.('powering-off', `asking ${name}'s guest to power off (ACPI, ${timeoutSec} s)`);
    try {
      await this.powerOff(entry, timeoutSec, 'refresh (reboot)', () => this.crashPoint('reboot:powering-off'));
    } catch (cause) {
      if (!options.force) {
        const next: VmRecord = { ...entry.record, problem: truncate(`refresh by reboot: the guest ignored the ACPI power-off for ${timeoutSec} s`) };
        delete next.refresh;
        await this.save(entry, next);
        throw new DaemonError('REFRESH_FAILED',
          `${name} did not power off within ${timeoutSec} s of the ACPI request; it is left running on its old QEMU (vmkeep never kills a guest unless told). Power it off from inside, retry with a longer --timeout, use --strategy migrate, or --force (the guest loses unwritten data)`,
          { cause });
      }
      await this.endQemu(entry, 'refresh (reboot, forced)');
    }
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
  private async armGuestReboots(entry: VmEntry): Promise<void> {
    const qmp = entry.qmp;
    try {
      if (!qmp) return;
      await qmp.execute('set-action', { reboot: 'shutdown' });
    } catch (error) {
      this.options.logger.warn({ vm: entry.record.name, err: error }, 'could not turn guest reboots into shutdowns; only a power-off will refresh it');
    }
  }

  async startRefreshJob(request: RefreshJobRequest): Promise<RefreshJob> {
    const modes = [request.vms !== undefined, request.all === true, request.stale === true].filter(Boolean).length;
    if (modes !== 1) throw new DaemonError('INVALID_REQUEST', 'name the VMs to refresh: exactly one of "vms" (a list), "all": true or "stale": true');
    const parallel = request.parallel ?? 1;
    if (!Number.isSafeInteger(parallel) || parallel < 1 || parallel > 64) {
      throw new DaemonError('INVALID_REQUEST', `parallel must be a whole number from 1 to 64, got ${JSON.stringify(request.parallel)}`);
    }
    const strategy = request.strategy === undefined ? undefined : parseStrategy(request.strategy);
    let vms: string[];
    if (request.vms !== undefined) {
      vms = [...new Set(request.vms)];
      for (const vm of vms) this.entry(vm);
    } else if (request.all) {
      vms = [...this.vms.keys()].sort();
    } else {
      const status = await this.upgradeStatus();
      vms = status.vms.filter((v) => v.stale && (strategy ?? v.policy) !== 'manual').map((v) => v.name);
    }
    const job: RefreshJob = { id: `refresh-${randomBytes(4).toString('hex')}`, vms, state: 'running', parallel, startedAt: new Date().toISOString(), results: [] };
    this.jobs.set(job.id, job);
    const finished = [...this.jobs.values()].filter((j) => j.state === 'done');
    for (const old of finished.slice(0, Math.max(0, this.jobs.size - MAX_JOBS_KEPT))) this.jobs.delete(old.id);
    let failed = 0;
    const options: RefreshOptions = {
      ...(strategy === undefined ? {} : { strategy }),
      ...(request.timeoutSec === undefined ? {} : { timeoutSec: request.timeoutSec }),
      ...(request.force === undefined ? {} : { force: request.force }),
    };
    void runRolling({
      vms,
      parallel,
      stopOnError: request.stopOnError === true,
      refresh: (vm) => this.refresh(vm, { ...options, onStep: (step, message) => this.emit({ type: 'refresh', job: job.id, vm, step, message }) }),
      onStart: (vm) => this.emit({ type: 'refresh', job: job.id, vm, step: 'started', message: `refreshing ${vm}` }),
      onEnd: (item, done, total) => {
        if (!item.ok) failed++;
        this.emit({
          type: 'refresh', job: job.id, vm: item.vm, step: item.ok ? 'done' : 'failed',
          message: item.ok ? (item.result as RefreshOutcome).message : (item.error as Error).message,
          progress: { done, total, failed },
          ...(item.ok ? { outcome: item.result as RefreshOutcome } : {}),
        });
      },
    }).then(async (results) => {
      job.results = results.map((r) => ({
        vm: r.vm, ok: r.ok,
        ...(r.skipped ? { skipped: true } : {}),
        ...(r.result ? { outcome: r.result } : {}),
        ...(r.error ? { error: { code: (r.error as { code?: string }).code ?? 'INTERNAL', message: r.error.message } } : {}),
      }));
      for (const r of results.filter((x) => x.skipped)) {
        this.emit({ type: 'refresh', job: job.id, vm: r.vm, step: 'skipped', message: `${r.vm} skipped: an earlier VM failed (--stop-on-error)` });
      }
      const ok = results.filter((r) => r.ok).length;
      job.state = 'done';
      job.endedAt = new Date().toISOString();
      this.emit({ type: 'refresh', job: job.id, step: 'job-done', progress: { done: results.length, total: vms.length, failed: results.length - ok }, message: `${ok} of ${vms.length} VM(s) refreshed` });
      await this.collectPins();
    }).catch((error: unknown) => {
      this.options.logger.error({ job: job.id, err: error }, 'a refresh job failed unexpectedly');
    }).finally(() => {
      job.state = 'done';
      job.endedAt ??= new Date().toISOString();
    });
    return job;
  }

  refreshJob(id: string): RefreshJob {
    const job = this.jobs.get(id);
    if (!job) throw new DaemonError('NOT_FOUND', `no refresh job ${JSON.stringify(id)} (jobs are kept until vmkeepd restarts, the last ${MAX_JOBS_KEPT})`);
    return job;
  }

  async upgradeStatus(): Promise<UpgradeStatus> {
    const { installations, defaultPolicy } = this.options;
    const channels = await Promise.all(Object.entries(installations.current).map(async ([channel, name]) => {
      const inst = currentInstallation(installations, channel);
      return { channel, installation: name, binary: inst.binary, version: (await this.options.probe(inst)).version };
    }));
    const vms = await Promise.all([...this.vms.values()].map((entry) => this.vmUpgradeStatus(entry).catch((error: unknown): VmUpgradeStatus => ({
      name: entry.record.name, state: entry.record.state, channel: entry.record.channel, installation: entry.record.installation.name,
      currentInstallation: '?', currentVersion: '?', stale: false, reasons: [], policy: this.policyOf(entry.record),
      outcome: 'unknown', warnings: [`cannot be assessed: ${(error as Error).message}`],
    }))));
    return { defaultPolicy, channels, vms: vms.sort((a, b) => a.name.localeCompare(b.name)) };
  }

  private async vmUpgradeStatus(entry: VmEntry): Promise<VmUpgradeStatus> {
    {
      const { record } = entry;
      const target = this.current(record);
      const info = await this.options.probe(target);
      const status: Staleness = record.process ? await this.stalenessOf(entry, target, info) : { stale: false, reasons: [], currentVersion: info.version };
      const policy = this.policyOf(record);
      const row: VmUpgradeStatus = {
        name: record.name, state: record.state, channel: record.channel, installation: record.installation.name,
        currentInstallation: target.name, currentVersion: info.version, stale: status.stale, reasons: status.reasons,
        policy, outcome: policyOutcome(status.stale, policy),
      };
      const runningVersion = status.runningVersion ?? (record.process ? record.binary?.version : undefined);
      if (runningVersion !== undefined) row.runningVersion = runningVersion;
      if (record.refresh) row.refreshing = record.refresh.strategy;
      if (record.process) {
        row.pid = record.process.pid;
        const exe = exeOf(record);
        if (exe) row.exe = exe.deleted ? `${exe.path} (deleted)` : exe.path;
        if (exe && (exe.deleted || !existsSync(exe.path))) {
          // A package manager (snapd dropping an old revision, dpkg replacing the file) took the
          // binary away: this QEMU runs from memory and nothing can start that build again.
          row.warnings = [`its QEMU binary ${exe.path} is gone from disk (removed or replaced by a package upgrade, e.g. a snap revision snapd no longer keeps); it keeps running, but refresh it soon: vmkeep refresh ${record.name} --strategy migrate`];
        }
      }
      return row;
    }
  }

  private async stalenessOf(entry: VmEntry, target?: Installation, info?: InstallationInfo): Promise<Staleness> {
    const { record } = entry;
    const installation = target ?? this.current(record);
    const current = { installation, info: info ?? (await this.options.probe(installation)) };
    const input: Parameters<typeof assessStaleness>[0] = {
      launched: { installation: record.installation.name, ...(record.binary ? { binary: record.binary } : {}) },
      exe: exeOf(record),
      current,
    };
    if (entry.qmp) {
      try {
        const { qemu } = await entry.qmp.queryVersion();
        input.runningVersion = `${qemu.major}.${qemu.minor}.${qemu.micro}`;
      } catch {
        // The recorded version stands in.
      }
    }
    return assessStaleness(input);
  }

  private policyOf(record: VmRecord): RefreshStrategy {
    return record.policy ?? this.options.defaultPolicy;
  }

  private current(record: VmRecord): Installation {
    return currentInstallation(this.options.installations, record.channel);
  }

  /** Test hook for the crash-at-every-step tests: dies the hardest way, mid-operation. */
  private crashPoint(step: string): void {
    if (this.options.crashAt !== step) return;
    this.options.logger.warn({ step }, `crash point ${step} reached: SIGKILL to self (VMKEEP_TEST_CRASH_AT)`);
    process.kill(process.pid, 'SIGKILL');
  }

  /** Removes pinned module folders no VM uses; skipped while a start or refresh is under way. */
  private collectPins(): Promise<void> {
    // Serialised with the pinning in launchQemu: a launch counts itself, then waits for this.
    this.pinLock = this.pinLock.then(async () => {
      const records = [...this.vms.values()].map((e) => e.record);
      // A damaged record may name a running QEMU whose folder we cannot see: keep everything.
      if (this.launching > 0 || this.damagedNames.size > 0 || records.some((r) => r.refresh?.strategy === 'migrate')) return;
      const inUse = new Set(records
        .flatMap((r) => [r.process ? r.binary?.moduleDir : undefined, r.retired?.moduleDir])
        .filter((d): d is string => d !== undefined));
      const removed = await collectPinnedModules(this.options.pinRoot, inUse);
      if (removed.length > 0) this.options.logger.info({ removed }, `removed ${removed.length} pinned module folder(s) no VM uses`);
    }).catch((error: unknown) => {
      this.options.logger.warn({ err: error }, 'could not collect pinned module folders');
    });
    return this.pinLock;
  }

  subscribe(listener: (event: DaemonEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Lets go of every monitor; never touches a QEMU (contract point 2). */
  async close(): Promise<void> {
    this.closed = true;
    for (const entry of this.vms.values()) {
      if (entry.retryTimer) clearTimeout(entry.retryTimer);
      this.detach(entry);
    }
  }

  // ---- helpers -------------------------------------------------------------------------------

  private vmDir(name: string): string {
    return join(this.options.runtimeDir, 'vms', name);
  }

  private vmPaths(name: string): VmRecord['paths'] {
    const dir = this.vmDir(name);
    return { qmpSocket: join(dir, 'qmp.sock'), serialLog: join(dir, 'serial.log'), stderrLog: join(dir, 'qemu.log') };
  }

  /** Lets go of the VM's monitor without treating the close as news about QEMU. */
  private detach(entry: VmEntry): void {
    const qmp = entry.qmp;
    entry.qmp = undefined;
    qmp?.close();
  }

  private refuseExisting(name: string): void {
    if (this.damagedNames.has(name)) {
      throw new DaemonError('EXISTS', `the record of ${name} is damaged (see the daemon's log) and is kept as it is; repair or move the file ${this.options.store.fileOf(name)} and restart vmkeepd, or pick another name`);
    }
    if (this.vms.has(name)) {
      throw new DaemonError('EXISTS', `a VM named ${name} exists already; pick another name or delete it first (vmkeep delete ${name})`);
    }
  }

  private entry(name: string): VmEntry {
    const entry = isValidVmName(name) ? this.vms.get(name) : undefined;
    if (!entry) throw new DaemonError('NOT_FOUND', `no VM named ${JSON.stringify(name)}; see vmkeep list`);
    return entry;
  }

  private serially<T>(name: string, operation: () => Promise<T>): Promise<T> {
    const entry = this.entry(name);
    const run = entry.queue.then(operation, operation);
    entry.queue = run.catch(() => undefined);
    return run;
  }

  /** Writes the record durably, then updates memory and tells subscribers. */
  private async save(entry: VmEntry, next: VmRecord): Promise<void> {
    // Once closed, the lock may already belong to the next vmkeepd: an operation still under way
    // here must not overwrite what that daemon reads and writes. It fails, the record stays as
    // it was, and the next daemon finishes or rolls back from there.
    if (this.closed) {
      throw new DaemonError('DAEMON_DOWN', `vmkeepd is stopping; ${next.name}'s record is left as it was for the next vmkeepd`);
    }
    const previous = entry.record.state;
    const record = { ...next, updatedAt: new Date().toISOString() };
    await this.options.store.put(record);
    entry.record = record;
    if (record.state !== previous) {
      this.options.logger.info({ vm: record.name, state: record.state, previous }, `${record.name}: ${previous} -> ${record.state}`);
      this.emit({ type: 'vm-state', vm: record.name, state: record.state, previous });
    }
  }

  private emit(event: Omit<DaemonEvent, 'time'>): void {
    const full: DaemonEvent = { ...event, time: new Date().toISOString() };
    for (const listener of this.listeners) {
      try {
        listener(full);
      } catch (error) {
        this.options.logger.warn({ err: error }, 'an event listener failed');
      }
    }
  }
}

const PROBLEM_MAX_CHARS = 500;

/** Problems come from QEMU and from peers: bounded before they go into a record. */
function truncate(text: string): string {
  return text.length > PROBLEM_MAX_CHARS ? `${text.slice(0, PROBLEM_MAX_CHARS)}…` : text;
}

/** The binary of the VM's recorded QEMU, only while that PID is still that process (contract 7). */
function exeOf(record: VmRecord): ExeInfo | null {
  const proc = record.process;
  return proc !== undefined && isSameProcess(proc.pid, proc.startTime) ? readExe(proc.pid) : null;
}

function binaryOf(info: InstallationInfo, moduleDir: string | undefined): NonNullable<VmRecord['binary']> {
  return { ...info.identity, version: info.version, ...(moduleDir === undefined ? {} : { moduleDir }) };
}

/** The VM's current QEMU as the retired source of a finished migration. */
function retiredOf(record: VmRecord): OtherQemu {
  const proc = record.process as NonNullable<VmRecord['process']>;
  return { ...proc, qmpSocket: record.paths.qmpSocket, ...(record.binary?.moduleDir ? { moduleDir: record.binary.moduleDir } : {}) };
}

/**
 * Ends a QEMU that never ran the guest (a migration destination before hand-over): `quit` over
 * its monitor, and if it does not go, SIGKILL, which loses nothing since it holds no guest.
 */
async function endIdleQemu(qmp: QmpClient | undefined, proc: OtherQemu | undefined): Promise<void> {
  if (qmp) {
    await qmp.quit().catch(() => undefined);
    qmp.close();
  }
  if (!proc || !isSameProcess(proc.pid, proc.startTime)) return;
  try {
    await waitForProcessExit(proc.pid, proc.startTime, QUIT_EXIT_TIMEOUT_MS);
  } catch {
    if (isSameProcess(proc.pid, proc.startTime)) process.kill(proc.pid, 'SIGKILL');
  }
}

function toView(record: VmRecord): VmView {
  const view: VmView = {
    name: record.name,
    state: record.state as VmState,
    spec: record.spec,
    uuid: record.uuid,
    machineType: record.machineType,
    installation: record.installation.name,
    channel: record.channel,
    createdAt: record.createdAt,
    updatedAt: record.updatedAt,
  };
  if (record.binary) view.qemuVersion = record.binary.version;
  if (record.policy) view.policy = record.policy;
  if (record.refresh) view.refreshing = record.refresh.strategy;
  if (record.process) {
    view.pid = record.process.pid;
    if (record.process.scope) view.scope = record.process.scope;
  }
  if (record.problem) view.problem = record.problem;
  if (record.lastExit) view.lastExit = record.lastExit;
  return view;
}
