// Refresh by live migration: moving the guest into a new QEMU on the same host, rolling back
// when the old QEMU still holds it, and settling what a crash left mid-way (ARCHITECTURE.md,
// "Refresh by migration"). Which QEMU holds the guest always decides, never the error.
import { randomBytes } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { existsSync } from 'node:fs';
import { hostfwdRule, netdevId, QUIT_EXIT_TIMEOUT_MS, type Installation, type InstallationInfo, type LaunchedVm } from '../launcher/index.js';
import type { QmpClient } from '../qmp/index.js';
import { scopeUnitName } from '../scope-manager/index.js';
import { cprTransfer, decideMigration, migrateLive, pausedCopyReason, pinModuleDir, type MigrationResult } from '../upgrade/index.js';
import { DaemonError } from './errors.js';
import { DEFAULT_MIGRATE_TIMEOUT_SEC, type RefreshOptions } from './model.js';
import type { QemuPort } from './ports.js';
import type { OtherQemu, VmRecord } from './records.js';
import { tapsForNewQemu } from './taps.js';
import type { VmCore } from './vm-core.js';
import { binaryOf, retiredOf, truncate, type VmEntry } from './vm-entry.js';

/** A migration that failed and was rolled back: the guest runs on its old QEMU. */
export class MigrationRolledBack extends DaemonError {
  /** The new QEMU started and answered its monitor: it can run this VM, only the move failed. */
  readonly destinationStarted: boolean;

  constructor(message: string, destinationStarted: boolean, cause: unknown) {
    super('REFRESH_FAILED', message, { cause });
    this.destinationStarted = destinationStarted;
  }
}

/**
 * Live migration (mode migrate: RAM copied; cpr: RAM handed over in a shared memfd) into a new
 * QEMU of the target installation, in its own new scope. Until the stream completes the source
 * holds the guest and any failure rolls back to it; once it completed the refresh only goes forward.
 * `pausedCopy` (pausedCopyReason): why the guest is stopped for the whole copy instead of only
 * its last part; it is resumed on whichever QEMU keeps it.
 */
export async function migrateNow(
  core: VmCore, entry: VmEntry, target: Installation, info: InstallationInfo, options: RefreshOptions, mode: 'migrate' | 'cpr' = 'migrate', pausedCopy?: string,
): Promise<{ downtimeMs: number; migrationMs: number; pid: number }> {
  const name = entry.record.name;
  const { qemu } = core.options;
  const source = entry.record.process as NonNullable<VmRecord['process']>;
  const sourceQmp = entry.qmp as QmpClient;
  const generation = randomBytes(4).toString('hex');
  const destSocket = join(core.vmDir(name), `qmp-${generation}.sock`);
  const streamSocket = join(core.vmDir(name), `migrate-${generation}.sock`);
  const cprSocket = join(core.vmDir(name), `cpr-${generation}.sock`);
  // ":" cannot occur in a VM name, so this scope never collides with another VM's.
  const scope = core.options.scopes === null ? null : scopeUnitName(`${name}:${generation}`);
  await core.record(entry, { ...entry.record, refresh: { strategy: mode, target, startedAt: new Date().toISOString() } });
  core.crashPoint(`${mode}:begun`);

  let dest: LaunchedVm | undefined;
  // A cpr destination's monitor answers only once the source has connected: until then its process.
  let pending: { pid: number; startTime: string } | undefined;
  let moduleDir: string | undefined;
  let result: MigrationResult | undefined;
  let guestStopped = false;
  try {
    const args = {
      installation: target, info, scope, incoming: true,
      // Its own TAPs on the same bridges (the guest keeps its MACs); user-mode forwards only at
      // the hand-over: the source holds their host ports until then.
      taps: tapsForNewQemu(entry.record), withForwards: false,
      paths: { ...entry.record.paths, qmpSocket: destSocket },
      onSpawned: async (proc: NonNullable<VmRecord['process']>, pinnedDir: string | undefined) => {
        const refresh = entry.record.refresh as NonNullable<VmRecord['refresh']>;
        const destination = { ...proc, qmpSocket: destSocket, ...(pinnedDir === undefined ? {} : { moduleDir: pinnedDir }) };
        await core.record(entry, { ...entry.record, refresh: { ...refresh, destination } });
        core.crashPoint(`${mode}:destination-recorded`);
      },
    };
    const timeoutMs = (options.timeoutSec ?? DEFAULT_MIGRATE_TIMEOUT_SEC) * 1000;
    const onStatus = (status: string): void => {
      if (status === 'active') core.crashPoint(`${mode}:migrating`);
    };
    entry.lock.setStep(mode === 'cpr' ? 'handing over (cpr-transfer)' : 'migrating');
    if (mode === 'cpr') {
      const channels = { cprSocket, mainSocket: streamSocket };
      const launched = await core.launchQemu(entry, args, (o) => qemu.launchCpr({ ...o, channels }));
      pending = launched.vm;
      moduleDir = launched.moduleDir;
      core.crashPoint('cpr:destination-ready');
      options.onStep?.('migrating', `handing ${name} over (cpr-transfer) to pid ${pending.pid}`);
      result = await cprTransfer({
        source: sourceQmp, channels, destinationQmpSocket: destSocket, timeoutMs, onStatus,
        onDestination: (qmp) => { dest = { ...launched.vm, qmp }; },
      });
    } else {
      const launched = await core.launchQemu(entry, args);
      dest = launched.vm;
      moduleDir = launched.moduleDir;
      core.crashPoint('migrate:destination-ready');
      if (pausedCopy !== undefined) core.options.logger.info({ vm: name, why: pausedCopy }, 'migrating with the guest paused for the whole copy');
      options.onStep?.('migrating', `migrating ${name} to pid ${dest.pid}${pausedCopy === undefined ? '' : `, paused for the whole copy: ${pausedCopy}`}`);
      result = await migrateLive({
        source: sourceQmp, destination: dest.qmp, socketPath: streamSocket, timeoutMs, onStatus,
        pauseGuest: pausedCopy !== undefined, onGuestStopped: () => { guestStopped = true; },
      });
    }
  } catch (cause) {
    // Which QEMU holds the guest decides, never the error. A cpr destination without a monitor
    // never got the guest's state.
    const destination = dest as LaunchedVm | undefined;
    const way = destination !== undefined ? await decideMigration(sourceQmp, destination.qmp)
      : pending !== undefined ? await decideMigration(sourceQmp, 'no-monitor') : 'back';
    if (way === 'back') {
      if (destination === undefined && pending !== undefined) await endIdleQemu(qemu, undefined, entry.record.refresh?.destination, true);
      await rm(cprSocket, { force: true });
      await rollBackMigration(core, entry, destination, cause);
      if (guestStopped) await resumeForCopy(core, entry, sourceQmp, 'its old QEMU');
      throw new MigrationRolledBack(
        `${mode === 'cpr' ? 'cpr-transfer' : 'live migration'} of ${name} onto "${target.name}" failed: ${(cause as Error).message}. ${name} keeps running on its old QEMU (pid ${source.pid}); the new QEMU was removed (its log: ${entry.record.paths.stderrLog})`,
        destination !== undefined, cause);
    }
    if (way === 'unknown') {
      // Both stay, the record names both: the retry's reattach finishes or rolls back.
      (dest as LaunchedVm | undefined)?.qmp.close();
      core.detach(entry);
      entry.record = { ...entry.record, state: 'unreachable', problem: truncate(`migration outcome unknown: ${(cause as Error).message}`) };
      core.scheduleRetry(entry);
      throw new DaemonError('REFRESH_FAILED',
        `live migration of ${name} failed and it cannot be told yet which QEMU holds the guest (${(cause as Error).message}); both are kept and vmkeepd settles it when their monitors answer`,
        { cause });
    }
    core.options.logger.warn({ vm: name, err: cause }, 'the migration reported an error after the guest was handed over; going forward');
    if (guestStopped) await resumeForCopy(core, entry, (dest as unknown as LaunchedVm).qmp, 'its new QEMU');
  }
  core.crashPoint(`${mode}:completed`);
  const destination = dest as unknown as LaunchedVm;
  await handOverNetwork(core, entry, sourceQmp, destination.qmp);
  const destTaps = entry.record.refresh?.destination?.taps;
  const next: VmRecord = {
    ...entry.record,
    process: { pid: destination.pid, startTime: destination.startTime, scope, ...(destTaps === undefined ? {} : { taps: destTaps }) },
    paths: { ...entry.record.paths, qmpSocket: destSocket },
    installation: target,
    binary: binaryOf(info, moduleDir),
    retired: retiredOf(entry.record),
    state: 'running',
  };
  delete next.refresh;
  delete next.problem;
  core.detach(entry);
  try {
    await core.record(entry, next);
  } catch (error) {
    // The guest runs in the destination, the record still names the source with the
    // destination in `refresh`: the retry's reattach rolls forward.
    destination.qmp.close();
    entry.record = { ...entry.record, state: 'unreachable', problem: truncate(`migration done, record switch failed: ${(error as Error).message}`) };
    core.scheduleRetry(entry);
    throw error;
  }
  core.watch(entry, destination.qmp);
  core.crashPoint(`${mode}:switched`);
  // Events of the destination before it was watched are lost: its status says what they were.
  const { status } = await destination.qmp.queryStatus();
  if (status === 'shutdown') {
    await core.observe(entry, { ...entry.record, state: 'shutdown' });
    await core.finishGuestShutdown(entry);
  } else if (status === 'paused') {
    await core.observe(entry, { ...entry.record, state: 'paused' });
  }
  await settleRetiredSafely(core, entry);
  await rm(streamSocket, { force: true });
  await rm(cprSocket, { force: true });
  return { downtimeMs: result?.downtimeMs ?? 0, migrationMs: result?.totalMs ?? 0, pid: destination.pid };
}

/**
 * At a migration's hand-over (the destination has the guest): the user-mode NICs' host forwards
 * move from the source (guest-less in postmigrate) to the destination, and the destination
 * announces the guest's MACs so bridges send its traffic to the new TAPs at once. Failures are
 * logged and shown, never undo the refresh: the guest runs in the destination either way.
 */
async function handOverNetwork(core: VmCore, entry: VmEntry, source: QmpClient | undefined, dest: QmpClient): Promise<void> {
  const nics = entry.record.spec.nics ?? [];
  if (nics.length === 0) return;
  const problems: string[] = [];
  // Both commands answer in text: hostfwd_add says nothing when it worked, hostfwd_remove
  // says "removed" or "not found".
  const hmp = async (qmp: QmpClient, line: string, failed: (output: string) => boolean): Promise<void> => {
    const output = await qmp.humanMonitorCommand(line).catch((error: unknown) => `error: ${(error as Error).message}`);
    if (failed(output.trim())) problems.push(`${line}: ${output.trim()}`);
  };
  for (const [i, nic] of nics.entries()) {
    if (nic.mode !== 'user') continue;
    for (const forward of nic.hostForward) {
      if (source !== undefined) await hmp(source, `hostfwd_remove ${netdevId(i)} ${forward.protocol}:${forward.host}`, (o) => !o.endsWith('removed'));
      await hmp(dest, `hostfwd_add ${netdevId(i)} ${hostfwdRule(forward)}`, (o) => o !== '');
    }
  }
  await dest.announceSelf().catch((error: unknown) => problems.push(`announce-self: ${(error as Error).message}`));
  if (problems.length > 0) {
    core.options.logger.warn({ vm: entry.record.name, problems }, 'the network hand-over of a migration was incomplete');
  }
}

/**
 * Resumes a guest that a migration stopped for its whole copy (pausedCopyReason) on the QEMU
 * that keeps it; the record follows its STOP and RESUME events, in order, once the refresh lets
 * go of the VM. A failure is logged and shown as the VM's problem: the guest is whole, only
 * paused (`vmkeep qmp NAME cont` resumes it).
 */
async function resumeForCopy(core: VmCore, entry: VmEntry, qmp: QmpClient, where: string): Promise<void> {
  try {
    // After a failed paused copy QEMU leaves the source in postmigrate, not paused; cont runs it from either.
    const { status } = await qmp.queryStatus();
    if (status === 'paused' || status === 'postmigrate') await qmp.cont();
  } catch (error) {
    core.options.logger.warn({ vm: entry.record.name, err: error }, `a guest paused for a migration's copy could not be resumed on ${where}`);
    await core.observe(entry, { ...entry.record, state: 'paused', problem: truncate(`paused for a migration's copy and not resumed on ${where}: ${(error as Error).message}; fix: vmkeep qmp ${entry.record.name} cont`) });
  }
}

/** The destination never ran the guest: quit it (or end it if its monitor is gone), forget it. */
async function rollBackMigration(core: VmCore, entry: VmEntry, dest: LaunchedVm | undefined, cause: unknown): Promise<void> {
  const recorded = entry.record.refresh?.destination;
  core.options.logger.warn({ vm: entry.record.name, err: cause }, 'migration failed; removing the destination, the source keeps the guest');
  await endIdleQemu(core.options.qemu, dest?.qmp, recorded);
  if (recorded) await rm(recorded.qmpSocket, { force: true });
  const next: VmRecord = { ...entry.record, problem: truncate(`last refresh (${entry.record.refresh?.strategy ?? 'migrate'}) failed: ${(cause as Error).message}`) };
  delete next.refresh;
  await core.observe(entry, next);
}

/** Finishes or rolls back a migration the last daemon left mid-way. */
export async function recoverMigration(core: VmCore, entry: VmEntry): Promise<void> {
  const refresh = entry.record.refresh;
  if (refresh?.strategy !== 'migrate' && refresh?.strategy !== 'cpr') return;
  const { qemu } = core.options;
  const log = core.options.logger.child({ vm: entry.record.name });
  const dest = refresh.destination;
  const rollBack = async (why: string): Promise<void> => {
    log.warn(why);
    const next: VmRecord = { ...entry.record, problem: truncate(why) };
    delete next.refresh;
    await core.observe(entry, next);
  };
  if (dest === undefined || !qemu.isSame(dest.pid, dest.startTime)) {
    if (dest) await rm(dest.qmpSocket, { force: true });
    await rollBack('a refresh by migration was interrupted before its new QEMU ran the guest; rolled back, the VM stays on its old QEMU');
    return;
  }
  if (refresh.strategy === 'cpr' && !existsSync(dest.qmpSocket)) {
    // A cpr destination creates its monitor only once it has the source's cpr state: without
    // one it holds nothing of the guest, once the source has settled holding it.
    const source = entry.record.process;
    const sourceQmp = source !== undefined && qemu.isSame(source.pid, source.startTime) ? await core.connect(entry.record.paths.qmpSocket) : undefined;
    let way: 'forward' | 'back' | 'unknown';
    try {
      way = await decideMigration(sourceQmp, 'no-monitor');
    } finally {
      sourceQmp?.close();
    }
    if (way !== 'back') throw new DaemonError('UNREACHABLE', 'an interrupted cpr refresh cannot be settled yet: which QEMU holds the guest is not known');
    await endIdleQemu(qemu, undefined, dest, true);
    await rollBack('a refresh by cpr-transfer was interrupted before its new QEMU had the guest; the new QEMU was removed, the VM stays on its old QEMU');
    return;
  }
  const destQmp = await core.connect(dest.qmpSocket);
  try {
    const source = entry.record.process;
    const sourceAlive = source !== undefined && qemu.isSame(source.pid, source.startTime);
    const sourceQmp = sourceAlive ? await core.connect(entry.record.paths.qmpSocket) : undefined;
    let way: 'forward' | 'back' | 'unknown';
    try {
      way = await decideMigration(sourceQmp, destQmp);
      if (way === 'forward') await handOverNetwork(core, entry, sourceQmp, destQmp);
      // A copy that stopped the guest (pausedCopyReason of this VM) leaves it paused on the side
      // that keeps it: it is resumed there. (A guest paused by hand before such a refresh is
      // resumed too: the record cannot tell the two apart.)
      if (pausedCopyReason({ accel: entry.record.spec.accel, runningVersion: entry.record.binary?.version }) !== undefined) {
        if (way === 'back' && sourceQmp !== undefined) await resumeForCopy(core, entry, sourceQmp, 'its old QEMU');
        if (way === 'forward') await resumeForCopy(core, entry, destQmp, 'its new QEMU');
      }
    } finally {
      sourceQmp?.close();
    }
    if (way === 'unknown') {
      // Retried: reattachIsolated marks the VM unreachable; neither QEMU is touched.
      throw new DaemonError('UNREACHABLE', 'an interrupted migration cannot be settled yet: which QEMU holds the guest is not known');
    }
    if (way === 'back') {
      await endIdleQemu(qemu, destQmp, dest);
      await rm(dest.qmpSocket, { force: true });
      await rollBack('a refresh by migration was interrupted before the guest was handed over; the new QEMU was removed, the VM stays on its old QEMU');
      return;
    }
    log.info('a refresh by migration was interrupted after the guest was handed over; finishing it');
    const info = await core.options.probe(refresh.target);
    // The folder the destination was launched with; re-pinned only for an older record.
    const moduleDir = dest.moduleDir ?? (await pinModuleDir(refresh.target, info, core.options.pinRoot)).moduleDir;
    const next: VmRecord = {
      ...entry.record,
      process: { pid: dest.pid, startTime: dest.startTime, scope: dest.scope, ...(dest.taps === undefined ? {} : { taps: dest.taps }) },
      paths: { ...entry.record.paths, qmpSocket: dest.qmpSocket },
      installation: refresh.target,
      binary: binaryOf(info, moduleDir),
      state: 'running',
    };
    if (sourceAlive) next.retired = retiredOf(entry.record);
    delete next.refresh;
    await core.observe(entry, next);
  } finally {
    destQmp.close();
  }
}

/** Quits the source of a finished migration (it waits guest-less in postmigrate). */
async function settleRetired(core: VmCore, entry: VmEntry): Promise<void> {
  const retired = entry.record.retired;
  if (retired === undefined) return;
  const { qemu } = core.options;
  if (qemu.isSame(retired.pid, retired.startTime)) {
    const qmp = await core.connect(retired.qmpSocket);
    try {
      const status = (await qmp.queryStatus()).status;
      if (status !== 'postmigrate') {
        throw new DaemonError('CONFLICT', `the old QEMU of ${entry.record.name} (pid ${retired.pid}) is ${status}, not postmigrate; left alone, check it by hand`);
      }
      await qmp.quit();
      await qemu.waitForExit(retired.pid, retired.startTime, QUIT_EXIT_TIMEOUT_MS);
    } finally {
      qmp.close();
    }
  }
  await rm(retired.qmpSocket, { force: true });
  const next: VmRecord = { ...entry.record };
  delete next.retired;
  await core.observe(entry, next);
}

/** settleRetired, its failure recorded as the VM's problem: the guest runs fine meanwhile. */
export async function settleRetiredSafely(core: VmCore, entry: VmEntry): Promise<void> {
  try {
    await settleRetired(core, entry);
  } catch (error) {
    const retired = entry.record.retired;
    core.options.logger.warn({ vm: entry.record.name, err: error }, 'could not end the old QEMU of a finished migration; kept recorded, tried again at the next start of vmkeepd');
    await core.observe(entry, { ...entry.record, problem: truncate(`old QEMU (pid ${retired?.pid}) of the last migration not ended yet: ${(error as Error).message}`) });
  }
}

/**
 * Ends a QEMU that never ran the guest (a migration destination before hand-over): `quit` over
 * its monitor, and if it does not go, SIGKILL, which loses nothing since it holds no guest. A
 * cpr destination without its monitor (`noMonitor`) waits for the source for ever: SIGKILL at once.
 */
async function endIdleQemu(qemu: QemuPort, qmp: QmpClient | undefined, proc: OtherQemu | undefined, noMonitor = false): Promise<void> {
  if (qmp) {
    await qmp.quit().catch(() => undefined);
    qmp.close();
  }
  if (!proc || !qemu.isSame(proc.pid, proc.startTime)) return;
  if (!noMonitor) {
    try {
      await qemu.waitForExit(proc.pid, proc.startTime, QUIT_EXIT_TIMEOUT_MS);
      return;
    } catch {
      // still there: ended below
    }
  }
  if (qemu.isSame(proc.pid, proc.startTime)) qemu.kill(proc.pid);
  await qemu.waitForExit(proc.pid, proc.startTime, QUIT_EXIT_TIMEOUT_MS).catch(() => undefined);
}
