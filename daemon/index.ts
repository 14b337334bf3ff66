// The door of vmkeepd: the daemon itself, its control API (server and client) and its model.
export { startDaemon, type DaemonOptions, type DaemonHandle } from './daemon.js';
export { VmManager, type ScopePort, type VmManagerOptions } from './manager.js';
export { classifyReattach, type ReattachObservation, type ReattachDecision, type ReattachAction } from './reattach.js';
export { DaemonError, HTTP_STATUS, type DaemonErrorCode } from './errors.js';
export type { DaemonEvent, DaemonInfo, DaemonOps, ExitInfo, StopOptions, VmState, VmView } from './model.js';
export { ApiClient, DEFAULT_SOCKET_PATH, type ApiClientOptions } from './api-client.js';
export { startApiServer } from './api-server.js';
