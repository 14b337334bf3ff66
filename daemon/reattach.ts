import type { QmpClient } from '../qmp/index.js';
import { recoverMigration, settleRetiredSafely } from './migration.js';
import type { ExitInfo, VmState } from './model.js';
import type { VmRecord } from './records.js';
import type { VmCore } from './vm-core.js';
import { truncate, type VmEntry } from './vm-entry.js';

/** What the daemon found about one recorded VM at start (gathered by adapters). */
export interface ReattachObservation {
  recordedState: VmState;
  /** The record names a QEMU (pid + start time). */
  hasProcess: boolean;
  /**
   * same: the PID is alive with the recorded start time; gone: no such process or a zombie;
   * recycled: the PID now belongs to another process (never adopted).
   */
  process?: 'same' | 'gone' | 'recycled';
  /** Scope check: undefined when scopes are off or the record has none. */
  scopeMatches?: boolean;
  actualScope?: string | null;
  recordedScope?: string | null;
  /** The monitor: its status, or why it could not be read. */
  monitor?: { status: string } | { error: string };
}

export type ReattachAction =
  /** Nothing to do but keep watching. */
  | 'watch'
  /** The guest powered off while we were away: quit QEMU, record the guest shutdown. */
  | 'finish-shutdown'
  /** A start was interrupted after QEMU was placed in its scope: finish it with `cont`. */
  | 'finish-start'
  /** Retry the monitor later; never signal the process. */
  | 'retry'
  /** Nothing runs: only the record changes. */
  | 'none';

export interface ReattachDecision {
  state: VmState;
  action: ReattachAction;
  lastExit?: Omit<ExitInfo, 'at'>;
  problem?: string;
  /** The record must forget its process (it is gone or is not ours). */
  dropProcess: boolean;
}

/** Status values of query-status that mean the guest is not executing but can be resumed. */
const PAUSED_STATUSES = new Set([
  'paused', 'debug', 'inmigrate', 'postmigrate', 'finish-migrate', 'restore-vm', 'save-vm',
  'suspended', 'watchdog', 'io-error', 'internal-error', 'guest-panicked', 'colo',
]);

/**
 * Decides, from what was observed, what a recorded VM is after a daemon restart (ARCHITECTURE.md,
 * invariant 4: every record ends reattached, exited while away, or unreachable).
 */
export function classifyReattach(obs: ReattachObservation): ReattachDecision {
  if (!obs.hasProcess) {
    // A start that crashed before QEMU was recorded left nothing running that is ours.
    if (obs.recordedState === 'starting') {
      return { state: 'exited', action: 'none', dropProcess: true, lastExit: { reason: 'start interrupted by a daemon restart' } };
    }
    const settled: VmState = obs.recordedState === 'exited' ? 'exited' : 'stopped';
    return { state: settled, action: 'none', dropProcess: false };
  }
  if (obs.process === 'gone') {
    const reason = obs.recordedState === 'shutdown' ? 'guest shutdown' : 'exited while away';
    return { state: 'exited', action: 'none', dropProcess: true, lastExit: { reason } };
  }
  if (obs.process === 'recycled') {
    return {
      state: 'exited',
      action: 'none',
      dropProcess: true,
      lastExit: { reason: 'exited while away (its PID now belongs to another process, which was left alone)' },
    };
  }
  if (obs.scopeMatches === false) {
    return {
      state: 'unreachable',
      action: 'retry',
      dropProcess: false,
      problem: `QEMU pid is in ${obs.actualScope ?? 'no scope'}, the record says ${obs.recordedScope ?? 'none'}; left alone, check it by hand`,
    };
  }
  const monitor = obs.monitor;
  if (monitor === undefined || 'error' in monitor) {
    return {
      state: 'unreachable',
      action: 'retry',
      dropProcess: false,
      problem: `QEMU is alive but its monitor does not answer: ${monitor?.error ?? 'not tried'}`,
    };
  }
  switch (monitor.status) {
    case 'running':
      return { state: 'running', action: 'watch', dropProcess: false };
    case 'shutdown':
      return { state: 'shutdown', action: 'finish-shutdown', dropProcess: false };
    case 'prelaunch':
      return obs.recordedState === 'starting'
        ? { state: 'starting', action: 'finish-start', dropProcess: false }
        : { state: 'paused', action: 'watch', dropProcess: false };
    default:
      if (PAUSED_STATUSES.has(monitor.status)) return { state: 'paused', action: 'watch', dropProcess: false };
      return { state: 'paused', action: 'watch', dropProcess: false, problem: `unexpected QEMU status ${monitor.status}` };
  }
}

/** A VM whose reattach fails is reported unreachable and retried; the others go on. */
export async function reattachIsolated(core: VmCore, entry: VmEntry): Promise<void> {
  try {
    await reattachVm(core, entry);
  } catch (error) {
    core.options.logger.error({ vm: entry.record.name, err: error }, `reattach of ${entry.record.name} failed; retrying later`);
    entry.record = { ...entry.record, state: 'unreachable', problem: truncate(`reattach failed: ${(error as Error).message}`) };
    core.scheduleRetry(entry);
  }
}

/** Observes the recorded QEMU (adapters), lets classifyReattach decide, then acts on the decision. */
async function reattachVm(core: VmCore, entry: VmEntry): Promise<void> {
  const { qemu, scopes, logger } = core.options;
  const name = entry.record.name;
  // A refresh the last daemon left mid-way is finished or rolled back first, so what follows
  // sees exactly one QEMU of this VM.
  await recoverMigration(core, entry);
  await settleRetiredSafely(core, entry);
  const record = entry.record;
  const obs: ReattachObservation = { recordedState: record.state, hasProcess: record.process !== undefined };
  if (record.process) {
    const identity = qemu.identity(record.process.pid);
    obs.process =
      identity === null || identity.state === 'Z' ? 'gone' : identity.startTime === record.process.startTime ? 'same' : 'recycled';
    if (obs.process === 'same' && scopes !== null && record.process.scope !== null) {
      obs.recordedScope = record.process.scope;
      try {
        obs.actualScope = await scopes.scopeOfPid(record.process.pid);
        obs.scopeMatches = obs.actualScope === record.process.scope;
      } catch (error) {
        // Unverified is not verified: retried later rather than resumed or finished.
        obs.actualScope = `unknown (${(error as Error).message})`;
        obs.scopeMatches = false;
      }
    }
    if (obs.process === 'same' && identity !== null && STOPPED_STATES.has(identity.state)) {
      // A stopped process never greets: no need to wait for the greeting timeout to know it.
      obs.monitor = { error: `QEMU (pid ${record.process.pid}) is stopped (state ${identity.state}, e.g. SIGSTOP)` };
    } else if (obs.process === 'same' && obs.scopeMatches !== false) {
      let qmp: QmpClient | undefined;
      try {
        qmp = await core.connect(record.paths.qmpSocket);
        // Listening before asking: an event after the answer is queued behind this reattach.
        core.watch(entry, qmp);
        obs.monitor = { status: (await qmp.queryStatus()).status };
      } catch (error) {
        core.detach(entry);
        obs.monitor = { error: (error as Error).message };
      }
    }
  }
  const decision = classifyReattach(obs);
  logger.info({ vm: name, observed: obs, decision }, `reattach ${name}: ${decision.state}`);
  const next: VmRecord = { ...record, state: decision.state };
  if (decision.dropProcess) delete next.process;
  if (decision.lastExit) next.lastExit = { ...decision.lastExit, at: new Date().toISOString() };
  if (decision.problem === undefined) delete next.problem;
  else next.problem = decision.problem;
  // Nothing changed (the common case after a restart): no fsync'd write on the way to READY.
  if (JSON.stringify(next) !== JSON.stringify(record)) await core.observe(entry, next);

  switch (decision.action) {
    case 'finish-shutdown':
      await core.finishGuestShutdown(entry);
      break;
    case 'finish-start':
      await entry.qmp?.cont();
      await core.observe(entry, { ...entry.record, state: 'running' });
      break;
    case 'retry':
      core.scheduleRetry(entry);
      break;
    default:
      break;
  }
  if (entry.record.refresh?.strategy === 'reboot' && entry.record.process === undefined) {
    // The guest powered off for a reboot refresh while we were away: finish it.
    await core.startNow(entry);
  } else if (entry.qmp && core.policyOf(entry.record) === 'on-guest-shutdown') {
    await core.armGuestReboots(entry);
  }
}

/** /proc run states of a process that cannot answer until someone resumes it. */
const STOPPED_STATES = new Set(['T', 't']);
