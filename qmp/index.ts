// Public door of the qmp component: the QMP client, its error type and message types.
export { QmpError, isQmpError, type QmpErrorCode, type QmpErrorOptions } from './errors.js';
export { LineDecoder, DEFAULT_MAX_LINE_BYTES, type LineDecoderOptions } from './framing.js';
export {
  QMP_EVENT, dispatchMonitorEvent, shutdownData, migrationStatus,
  type MonitorCallbacks, type ShutdownData, type ResetData,
} from './events.js';
export { powerDownGuest, ACPI_REPEAT_MS, type PowerDownOptions } from './power.js';
export {
  QmpClient,
  DEFAULT_COMMAND_TIMEOUT_MS,
  DEFAULT_GREETING_TIMEOUT_MS,
  type ExecuteOptions,
  type QmpClientOptions,
  type QmpCloseListener,
  type QmpEventListener,
  type WaitForEventOptions,
} from './client.js';
export { isRecord } from './commands.js';
export { connectQmp, DEFAULT_CONNECT_TIMEOUT_MS, type ConnectQmpOptions } from './connect.js';
export type {
  MigrationCapabilityStatus,
  MigrationInfo,
  MigrationStats,
  MigrationStatus,
  QmpEvent,
  QmpGreeting,
  QmpVersionInfo,
  QmpVersionTriple,
  RunState,
  StatusInfo,
} from './commands.js';
