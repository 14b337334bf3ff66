import type { ExitInfo, VmState } from './model.js';

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
 * Decides, from what was observed, what a recorded VM is after a daemon restart (contract
 * point 4: every record ends reattached, exited while away, or unreachable).
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
