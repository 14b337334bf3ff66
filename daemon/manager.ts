import { randomUUID } from 'node:crypto';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import {
  isSameProcess,
  isValidVmName,
  launchVm,
  readProcessIdentity,
  resolveMachineType,
  validateSpec,
  checkSpecFiles,
  waitForProcessExit,
  type Installation,
  type InstallationInfo,
} from '../launcher/index.js';
import { connectQmp, type QmpClient, type QmpEvent } from '../qmp/index.js';
import { DaemonError } from './errors.js';
import type { DaemonEvent, DaemonInfo, DaemonOps, StopOptions, VmState, VmView } from './model.js';
import { classifyReattach, type ReattachObservation } from './reattach.js';
import type { RecordStore, VmRecord } from './records.js';
import { scopeUnitName } from '../scope-manager/index.js';

/** The part of the scope manager the daemon uses (null: --no-scope, VMs die with our cgroup). */
export interface ScopePort {
  createScope(options: { name: string; pids: number[]; slice?: string; description?: string }): Promise<unknown>;
  scopeOfPid(pid: number): Promise<string | null>;
  listScopes(prefix?: string): Promise<Array<{ name: string }>>;
}

export interface VmManagerOptions {
  store: RecordStore;
  scopes: ScopePort | null;
  slice: string;
  installation: Installation;
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

const DEFAULT_STOP_TIMEOUT_SEC = 60;
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
  private orphanScopes: string[] = [];
  private closed = false;

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
    await this.findOrphanScopes();
  }

  private async findOrphanScopes(): Promise<void> {
    if (this.options.scopes === null) return;
    try {
      const claimed = new Set([...this.vms.values()].map((e) => e.record.process?.scope).filter(Boolean));
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
    await this.save(entry, next);

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
      void this.serially(name, () => this.onMonitorClosed(entry, reason.message)).catch((error: unknown) =>
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
        await this.finishGuestShutdown(entry);
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
  private async onMonitorClosed(entry: VmEntry, why: string): Promise<void> {
    const process = entry.record.process;
    if (!process || entry.stopping) return;
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

  /** With -no-shutdown a powered-off guest leaves QEMU waiting: end it and record why. */
  private async finishGuestShutdown(entry: VmEntry): Promise<void> {
    await this.endQemu(entry, 'guest shutdown');
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

  async create(input: unknown, options: { start?: boolean } = {}): Promise<VmView> {
    const spec = validateSpec(input);
    await checkSpecFiles(spec);
    this.refuseExisting(spec.name);
    const info = await this.options.probe(this.options.installation);
    // Resolving now pins the versioned machine type for the VM's whole life (migrations need it).
    const machineType = resolveMachineType(spec.machine, info.machines);
    const now = new Date().toISOString();
    const record: VmRecord = {
      schema: 1,
      name: spec.name,
      uuid: spec.uuid ?? randomUUID(),
      spec,
      machineType,
      installation: this.options.installation,
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
      const { record } = entry;
      if (record.process) {
        throw new DaemonError('CONFLICT', `${name} is already ${record.state} (pid ${record.process.pid}); stop it first (vmkeep stop ${name})`);
      }
      const info = await this.options.probe(record.installation);
      // Derived, not read from the record: the files removed and truncated here are always ours.
      const paths = this.vmPaths(name);
      await mkdir(this.vmDir(name), { recursive: true, mode: 0o700 });
      // Leftovers of the previous QEMU: its socket would be taken for the new one's.
      await rm(paths.qmpSocket, { force: true });
      await writeFile(paths.serialLog, '', { mode: 0o600 });
      await this.save(entry, { ...record, paths, state: 'starting' });

      entry.hostShutdown = undefined;
      const scope = this.options.scopes === null ? null : scopeUnitName(name);
      try {
        const vm = await launchVm({
          spec: record.spec,
          uuid: record.uuid,
          installation: record.installation,
          info,
          machineType: record.machineType,
          paths,
          // Paused until it is recorded and watched: nothing the guest does can go unseen.
          stayPaused: true,
          placeInScope: async (pid) => {
            const identity = readProcessIdentity(pid);
            if (identity === null) throw new DaemonError('START_FAILED', `QEMU (pid ${pid}) exited right after it was spawned; see ${paths.stderrLog}`);
            // Recorded before the scope exists: a crash from here on leaves a record that names
            // this QEMU, so the next daemon finds it instead of an orphan.
            await this.save(entry, {
              ...entry.record,
              state: 'starting',
              binary: { ...info.identity, version: info.version },
              process: { pid, startTime: identity.startTime, scope },
            });
            if (this.options.scopes !== null && scope !== null) {
              await this.options.scopes.createScope({ name: scope, pids: [pid], slice: this.options.slice, description: `vmkeep VM ${name}` });
            }
          },
        });
        this.watch(entry, vm.qmp);
        await vm.qmp.cont();
        await this.save(entry, { ...entry.record, state: 'running' });
      } catch (cause) {
        const started = entry.record.process;
        const next: VmRecord = { ...entry.record, problem: truncate((cause as Error).message) };
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
      return toView(entry.record);
    });
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
      const timeoutSec = options.timeoutSec ?? DEFAULT_STOP_TIMEOUT_SEC;
      if (entry.record.state !== 'shutdown') {
        const shutdown = entry.qmp.waitForEvent('SHUTDOWN', { timeoutMs: timeoutSec * 1000 });
        // Handled from the start: if powerdown fails, this wait's rejection must not go unhandled.
        shutdown.catch(() => undefined);
        entry.stopping = 'stopped by request';
        try {
          await entry.qmp.systemPowerdown();
          await shutdown;
        } catch (cause) {
          entry.stopping = undefined;
          throw new DaemonError(
            'STOP_TIMEOUT',
            `${name} did not power off within ${timeoutSec} s of the ACPI request and is still running; give it longer (--timeout) or quit QEMU with --force (the guest loses unwritten data)`,
            { cause },
          );
        }
      }
      await this.endQemu(entry, 'stopped by request');
      return toView(entry.record);
    });
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

function toView(record: VmRecord): VmView {
  const view: VmView = {
    name: record.name,
    state: record.state as VmState,
    spec: record.spec,
    uuid: record.uuid,
    machineType: record.machineType,
    installation: record.installation.name,
    createdAt: record.createdAt,
    updatedAt: record.updatedAt,
  };
  if (record.binary) view.qemuVersion = record.binary.version;
  if (record.process) {
    view.pid = record.process.pid;
    if (record.process.scope) view.scope = record.process.scope;
  }
  if (record.problem) view.problem = record.problem;
  if (record.lastExit) view.lastExit = record.lastExit;
  return view;
}
