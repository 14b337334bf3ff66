// The door of vmkeepd: the daemon itself, its control API (server and client) and its model.
import type { Logger } from './log.js';
import type { DaemonHandle, DaemonOptions } from './daemon.js';

/**
 * Starts vmkeepd. The daemon's runtime (D-Bus, QEMU launching, logging) is loaded only here,
 * so commands that merely talk to the API start fast.
 */
export async function startDaemon(options: DaemonOptions, logger: Logger): Promise<DaemonHandle> {
  const daemon = await import('./daemon.js');
  return daemon.startDaemon(options, logger);
}
export type { DaemonOptions, DaemonHandle } from './daemon.js';
export { createLogger, isLogLevel, LOG_LEVELS, type Logger, type LogLevel } from './log.js';
export type { OfflineGuests } from './offline.js';

/** Powering guests off straight from the records while vmkeepd is down (loaded on demand). */
export async function openOfflineGuests(stateDir: string): Promise<import('./offline.js').OfflineGuests> {
  const offline = await import('./offline.js');
  return offline.openOfflineGuests(stateDir);
}
export type { ScopePort, VmManagerOptions } from './manager.js';
export { classifyReattach, type ReattachObservation, type ReattachDecision, type ReattachAction } from './reattach.js';
export { DaemonError, HTTP_STATUS, type DaemonErrorCode } from './errors.js';
export { OPERATOR_SOCKET_NAME, OPERATOR_QMP_COMMANDS, OPERATOR_USER_NETS, DEFAULT_OPERATOR_USER_NET, type AccessLevel, type Caller, type OperatorUserNet } from './access.js';
export { DEFAULT_MIGRATE_TIMEOUT_SEC, DEFAULT_REBOOT_TIMEOUT_SEC, DEFAULT_STOP_TIMEOUT_SEC } from './model.js';
export type {
  CreateOptions, DaemonEvent, DaemonEventType, DaemonInfo, DaemonOps, DiskAcceptResult, ExitInfo, RefreshJob, RefreshJobPlan, RefreshJobRequest, RefreshOptions, RefreshOutcome,
  RefreshStep, StopOptions, UpgradeStatus, VmSettings, VmState, VmUpgradeStatus, VmView, AutostartMode,
} from './model.js';
export { AUTOSTART_MODES, DEFAULT_AUTOSTART, EVENT_TYPES } from './model.js';
export type { OperationContext } from './operations.js';
export { OPERATION_KINDS, OPERATION_STATUSES, type ApiOperationKind, type Operation, type OperationError, type OperationProgress, type OperationStatus } from './operation-state.js';
export { ApiClient, DEFAULT_SOCKET_PATH, type ApiClientOptions, type EventFilter } from './api-client.js';
export { REFRESH_STRATEGIES, type RefreshStrategy } from '../upgrade/index.js';
