// The adapters the VM manager acts through, passed in so unit tests run it against a fake
// QEMU and a fake systemd (ARCHITECTURE.md, "Side effects at the edges").
import {
  isSameProcess, launchCprDestination, launchVm, readDiskChains, readProcessIdentity, readRunningExe, waitForProcessExit,
  type CprChannels, type DiskChain, type DiskSpec, type ExeInfo, type LaunchedVm, type LaunchVmOptions, type PendingVm, type ProcessIdentity,
} from '../launcher/index.js';
import { connectQmp, type QmpClient } from '../qmp/index.js';
import type { CreateScopeOptions } from '../scope-manager/index.js';

/** The part of the scope manager the daemon uses (null: --no-scope, VMs die with our cgroup). */
export interface ScopePort {
  createScope(options: CreateScopeOptions): Promise<unknown>;
  scopeOfPid(pid: number): Promise<string | null>;
  listScopes(prefix?: string): Promise<Array<{ name: string }>>;
}

/** QEMU processes and their monitors, as the manager sees them. */
export interface QemuPort {
  /** Spawns a QEMU paused, placed in its scope, its monitor connected (launcher's launchVm). */
  launch(options: LaunchVmOptions): Promise<LaunchedVm>;
  /** Spawns a cpr-transfer destination: it has no monitor until the source hands over. */
  launchCpr(options: Omit<LaunchVmOptions, 'incoming' | 'stayPaused'> & { channels: CprChannels }): Promise<PendingVm>;
  connect(socketPath: string, options: { greetingTimeoutMs: number }): Promise<QmpClient>;
  /** PID + start time + run state from /proc, or null when no such process. */
  identity(pid: number): ProcessIdentity | null;
  isSame(pid: number, startTime: string): boolean;
  waitForExit(pid: number, startTime: string, timeoutMs: number): Promise<void>;
  /**
   * The binary a QEMU (PID + start time) runs, or null when it is not that process any more;
   * hashed by content unless it is `current`'s very file (same device and inode).
   */
  exe(pid: number, startTime: string, current?: { dev: number; ino: number }): Promise<ExeInfo | null>;
  /** Only for a QEMU that holds no guest (a destination before hand-over), after an identity check. */
  kill(pid: number): void;
  /** Each disk's backing chain as it is on disk now (qemu-img + stat). */
  readDiskChains(disks: readonly DiskSpec[]): Promise<DiskChain[]>;
}

export const realQemu: QemuPort = {
  launch: launchVm,
  launchCpr: launchCprDestination,
  connect: (socketPath, options) => connectQmp(socketPath, options),
  identity: readProcessIdentity,
  isSame: isSameProcess,
  waitForExit: waitForProcessExit,
  exe: readRunningExe,
  kill: (pid) => process.kill(pid, 'SIGKILL'),
  readDiskChains: (disks) => readDiskChains(disks),
};
