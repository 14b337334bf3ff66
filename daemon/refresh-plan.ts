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
  /** A live move: migrate, or for cpr and auto whatever live way both QEMUs allow. */
  | { action: 'migrate' }
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
  if (f.targetRefusal !== undefined) return { action: 'refuse', code: 'REFRESH_REFUSED', message: f.targetRefusal };
  return { action: f.strategy === 'reboot' ? 'reboot' : 'migrate' };
}
