// What a refresh of one VM will do, decided from facts alone (like classifyReattach), so every
// branch is unit-tested without a QEMU (ARCHITECTURE.md, "Refresh").
import type { RefreshStrategy } from '../upgrade/index.js';
import type { DaemonErrorCode } from './errors.js';
import type { VmState } from './model.js';

export interface RefreshFacts {
  vm: string;
  strategy: RefreshStrategy;
  state: VmState;
  hasProcess: boolean;
  stale: boolean;
  reasons: readonly string[];
  /** The monitor is connected and answered its last health check. */
  monitorAnswers: boolean;
  problem?: string;
  target: { installation: string; version: string };
  /** Why the target cannot take this VM (older QEMU, machine type missing), if so. */
  targetRefusal?: string;
}

export type RefreshPlan =
  | { action: 'nothing'; result: 'current' | 'reported'; message: string }
  | { action: 'arm'; message: string }
  /**
   * A live move: migrate, or for cpr and auto whatever live way both QEMUs allow. `fallback`:
   * migrate-or-reboot on a running guest, whose failed migration may end in a reboot (planFallback).
   */
  | { action: 'migrate'; fallback?: 'reboot' }
  | { action: 'reboot' }
  | { action: 'refuse'; code: Extract<DaemonErrorCode, 'UNREACHABLE' | 'CONFLICT' | 'REFRESH_REFUSED'>; message: string };

export function planRefresh(f: RefreshFacts): RefreshPlan {
  const on = `installation "${f.target.installation}" (QEMU ${f.target.version})`;
  if (!f.hasProcess) {
    return { action: 'nothing', result: 'current', message: `${f.vm} has no running QEMU (${f.state}); its next start uses ${on}` };
  }
  if (!f.stale) return { action: 'nothing', result: 'current', message: `${f.vm} already runs the current ${on}` };
  if (f.strategy === 'manual') {
    return {
      action: 'nothing', result: 'reported',
      message: `${f.vm} is stale (${f.reasons.join('; ')}); its policy is manual, so nothing was done: vmkeep refresh ${f.vm} --strategy migrate|reboot`,
    };
  }
  if (f.strategy === 'on-guest-shutdown') {
    return { action: 'arm', message: `${f.vm} starts on ${on} when its guest next powers off or reboots` };
  }
  if (!f.monitorAnswers) {
    return { action: 'refuse', code: 'UNREACHABLE', message: `${f.vm}'s monitor does not answer (${f.problem ?? 'not connected'}); it cannot be refreshed until it does` };
  }
  if (f.state !== 'running' && f.state !== 'paused') {
    return { action: 'refuse', code: 'CONFLICT', message: `${f.vm} is ${f.state}; only a running or paused VM can be refreshed` };
  }
  // A refused target refuses the reboot too: its start needs the same machine type, and an
  // older QEMU is no upgrade either way.
  if (f.targetRefusal !== undefined) {
    const also = f.strategy === 'migrate-or-reboot' ? ' (a reboot cannot help: the new QEMU would have to start it)' : '';
    return { action: 'refuse', code: 'REFRESH_REFUSED', message: `${f.targetRefusal}${also}` };
  }
  if (f.strategy === 'reboot') return { action: 'reboot' };
  // A paused guest cannot act on the ACPI button: it gets no reboot behind its back.
  return f.strategy === 'migrate-or-reboot' && f.state === 'running' ? { action: 'migrate', fallback: 'reboot' } : { action: 'migrate' };
}

/** What is seen after a live migration of a migrate-or-reboot refresh failed. */
export interface FallbackFacts {
  /** The migration's error message. */
  error: string;
  /** The migration was rolled back and the record names the old QEMU again, running, with no migration left recorded. */
  onOldQemu: boolean;
  /** The new QEMU started with this VM's configuration and answered its monitor. */
  destinationStarted: boolean;
  /** The operation was cancelled (DELETE /1.0/operations/ID): the migration failed because it was asked to. */
  cancelled?: boolean;
}

/**
 * Whether a failed migration falls back to a reboot. Only when the guest is back on its old QEMU
 * and nothing of the migration is left: one that went forward, or whose outcome is not known
 * yet, is settled first (ARCHITECTURE.md, "Refresh by migration"). And only when the new QEMU
 * did start this VM: one that cannot would leave the powered-off guest down.
 */
export function planFallback(f: FallbackFacts): { action: 'reboot'; reason: string } | { action: 'fail'; why?: string } {
  // A cancel stops the refresh: it never turns into a reboot.
  if (f.cancelled === true || !f.onOldQemu) return { action: 'fail' };
  if (!f.destinationStarted) {
    return { action: 'fail', why: 'No reboot either: the new QEMU did not start with this VM\'s configuration, so the powered-off guest would stay down; fix the installation and refresh again' };
  }
  return { action: 'reboot', reason: `the live migration failed (${f.error})` };
}
