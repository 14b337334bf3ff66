// What an operation (a long request run in the background, followed by its id) is, and the
// pure rules over it: status transitions, how a run ends, what a cancel may do, which finished
// operations are kept, and how one a daemon restart cut off ended (ARCHITECTURE.md, "Operations").
import type { OperationStarter } from './access.js';

export const OPERATION_STATUSES = ['pending', 'running', 'succeeded', 'failed', 'cancelled'] as const;
export type OperationStatus = (typeof OPERATION_STATUSES)[number];

/** What an operation does: one VM's start, stop or refresh, or a rolling refresh of many. */
export const OPERATION_KINDS = ['start', 'stop', 'refresh', 'rolling-refresh'] as const;
export type ApiOperationKind = (typeof OPERATION_KINDS)[number];

/** A failure as an operation reports it: the API's error code and a message with the fix. */
export interface OperationError {
  code: string;
  message: string;
}

export interface OperationProgress {
  done: number;
  total: number;
  failed: number;
}

export interface Operation {
  /** A UUID; also the `operation` of the events it causes and of the VM lock it holds. */
  id: string;
  kind: ApiOperationKind;
  vms: string[];
  status: OperationStatus;
  createdAt: string;
  updatedAt: string;
  progress?: OperationProgress;
  /** Set when it succeeded (and for a cancelled rolling refresh: what was done). */
  result?: unknown;
  /** Set when it failed or was cancelled. */
  error?: OperationError;
  /** A cancel was asked and accepted; the operation stops at its next safe point. */
  cancelRequested?: boolean;
  /** Who began it (an operator may cancel only its own, access.ts); absent: vmkeepd itself, or an older record. */
  startedBy?: OperationStarter;
}

const NEXT: Record<OperationStatus, readonly OperationStatus[]> = {
  pending: ['running', 'failed', 'cancelled'],
  running: ['succeeded', 'failed', 'cancelled'],
  succeeded: [],
  failed: [],
  cancelled: [],
};

export function isFinished(status: OperationStatus): boolean {
  return NEXT[status].length === 0;
}

/** The operation in its next status; a finished one never changes again. */
export function transition(op: Operation, to: OperationStatus, now: string, fields: { result?: unknown; error?: OperationError } = {}): Operation {
  if (!NEXT[op.status].includes(to)) throw new Error(`operation ${op.id}: ${op.status} cannot become ${to}`);
  const next: Operation = { ...op, status: to, updatedAt: now };
  if (fields.result !== undefined) next.result = fields.result;
  if (fields.error !== undefined) next.error = fields.error;
  return next;
}

export type RunEnd = { ok: true; value: unknown } | { ok: false; error: OperationError; result?: unknown };

/**
 * How a run that returned (or threw) ends. A cancel that took effect makes it cancelled; one
 * that came too late (the migration had completed) leaves the success as it is.
 */
export function endOf(op: Operation, end: RunEnd): { status: OperationStatus; result?: unknown; error?: OperationError } {
  const result = end.ok ? end.value : end.result;
  const withResult = result === undefined ? {} : { result };
  if (op.cancelRequested && op.kind === 'rolling-refresh') {
    return { status: 'cancelled', ...withResult, error: { code: 'CANCELLED', message: 'cancelled: the rolling refresh stopped after the VMs in progress; the rest were not begun' } };
  }
  if (end.ok) return { status: 'succeeded', ...withResult };
  if (op.cancelRequested) return { status: 'cancelled', ...withResult, error: { code: 'CANCELLED', message: `cancelled: ${end.error.message}` } };
  return { status: 'failed', ...withResult, error: end.error };
}

/** What holds one of the operation's VMs now, as the VM's view shows it. */
export interface VmHold {
  operation?: string;
  kind: string;
  step?: string;
}

/**
 * Whether DELETE may cancel the operation now, and how: a rolling refresh stops after the VMs
 * in progress; a live migration is cancelled (QEMU's migrate_cancel) and rolled back by the
 * refresh's own failure path. Anything else would leave a guest half powered off or half
 * started, so it is refused with the reason.
 */
export function decideCancel(op: Operation, hold: VmHold | undefined): { ok: true; how: string } | { ok: false; reason: string } {
  if (isFinished(op.status)) return { ok: false, reason: `operation ${op.id} already ${op.status}; there is nothing to cancel` };
  if (op.cancelRequested) return { ok: true, how: 'a cancel was already asked; it stops at its next safe point' };
  switch (op.kind) {
    case 'rolling-refresh':
      return { ok: true, how: 'no further VM is begun; the VMs in progress finish their refresh' };
    case 'refresh': {
      const ours = hold?.operation === op.id;
      if (ours && hold?.step === 'migrating') return { ok: true, how: 'the live migration is cancelled and the VM stays on its old QEMU' };
      const now = !ours ? 'not under way yet' : hold?.step === undefined ? 'being planned' : hold.step;
      return { ok: false, reason: `the refresh of ${op.vms.join(', ')} is ${now}: only a live migration under way can be cancelled safely (a reboot refresh or a cpr hand-over cannot); wait for it (GET /1.0/operations/${op.id}/wait)` };
    }
    case 'stop':
      return { ok: false, reason: `a stop cannot be cancelled: the guest may already be powering off; wait for it (GET /1.0/operations/${op.id}/wait), then start the VM again if you want it running` };
    case 'start':
      return { ok: false, reason: `a start cannot be cancelled: QEMU may already be running the guest; wait for it (GET /1.0/operations/${op.id}/wait), then stop the VM` };
  }
}

export interface Retention {
  /** Finished operations older than this (by their last change) are forgotten. */
  maxAgeMs: number;
  /** At most this many finished operations are kept; the oldest go first. */
  maxCount: number;
}

/** 24 h and 1000 operations: a day of a busy fleet's history, a few hundred KiB on disk. */
export const DEFAULT_RETENTION: Retention = { maxAgeMs: 24 * 60 * 60 * 1000, maxCount: 1000 };

/** The ids of the operations to forget now. Unfinished operations are never forgotten. */
export function pruneOperations(ops: readonly Operation[], nowMs: number, retention: Retention): string[] {
  const finished = ops.filter((op) => isFinished(op.status)).sort((a, b) => Date.parse(b.updatedAt) - Date.parse(a.updatedAt));
  return finished.filter((op, i) => i >= retention.maxCount || nowMs - Date.parse(op.updatedAt) > retention.maxAgeMs).map((op) => op.id);
}

/**
 * An operation a previous vmkeepd recorded as unfinished: that daemon ended (crash, restart,
 * upgrade) while it ran. It failed with DAEMON_RESTARTED; the next daemon adds where its VMs
 * stand once the reattach settled them (a refresh rolled forward or back by its crash recovery).
 */
export function endedByRestart(op: Operation, now: string): Operation {
  if (isFinished(op.status)) return op;
  const what = op.cancelRequested ? 'was being cancelled' : 'was running';
  return transition(op, 'failed', now, {
    error: { code: 'DAEMON_RESTARTED', message: `vmkeepd ended while this ${op.kind} ${what}; nothing of it goes on` },
  });
}
