import { QmpError } from './errors.js';

// Types of the QMP messages and command replies vmkeep uses. Field names are QEMU's own
// (kebab-case where QEMU uses it) so they match the QEMU QMP reference one to one.

export interface QmpVersionTriple {
  major: number;
  minor: number;
  micro: number;
}

/** Reply of `query-version`, also the `version` of the greeting. */
export interface QmpVersionInfo {
  qemu: QmpVersionTriple;
  /** Distribution build string, e.g. "Debian 1:7.2+dfsg-7+deb12u7". */
  package: string;
}

export interface QmpGreeting {
  version: QmpVersionInfo;
  /** Capabilities offered, e.g. ["oob"]. */
  capabilities: string[];
}

export interface QmpEvent {
  event: string;
  /** `{}` when QEMU sent no data. */
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

/** QEMU's RunState; other strings are allowed so a newer QEMU's states pass through. */
export type RunState =
  | 'debug'
  | 'inmigrate'
  | 'internal-error'
  | 'io-error'
  | 'paused'
  | 'postmigrate'
  | 'prelaunch'
  | 'finish-migrate'
  | 'restore-vm'
  | 'running'
  | 'save-vm'
  | 'shutdown'
  | 'suspended'
  | 'watchdog'
  | 'guest-panicked'
  | 'colo'
  | (string & {});

/** Reply of `query-status`. */
export interface StatusInfo {
  status: RunState;
  running: boolean;
  /** Present up to QEMU 8.0 (deprecated afterwards). */
  singlestep?: boolean;
}

export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-active'
  | 'postcopy-paused'
  | 'postcopy-recover'
  | 'completed'
  | 'failed'
  | 'colo'
  | 'pre-switchover'
  | 'device'
  | 'wait-unplug'
  | (string & {});

export interface MigrationStats {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  skipped: number;
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  mbps: number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  'page-size': number;
  'multifd-bytes'?: number;
  'pages-per-second'?: number;
  'precopy-bytes'?: number;
  'downtime-bytes'?: number;
  'postcopy-bytes'?: number;
}

/**
 * Reply of `query-migrate`. QEMU omits what does not apply: before any migration the
 * reply is `{}`; `downtime` and `total-time` appear once completed (times in ms).
 */
export interface MigrationInfo {
  status?: MigrationStatus;
  ram?: MigrationStats;
  'total-time'?: number;
  'expected-downtime'?: number;
  downtime?: number;
  'setup-time'?: number;
  'cpu-throttle-percentage'?: number;
  'error-desc'?: string;
  'blocked-reasons'?: string[];
  [other: string]: unknown;
}

export interface MigrationCapabilityStatus {
  /** e.g. 'events', 'postcopy-ram', 'multifd'. */
  capability: string;
  state: boolean;
}

// Replies that vmkeep bases decisions on are checked at run time: a hostile or broken peer
// must produce a clear error, not a value that merely claims to have the right type.

/** A JSON object (not null, not an array): what every QMP message and most replies must be. */
export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function badReply(command: string, what: string): QmpError {
  return new QmpError(
    'PROTOCOL',
    `QMP reply to '${command}' is malformed: ${what}. The peer does not behave like QEMU.`,
    { command },
  );
}

export function isVersionInfo(value: unknown): value is QmpVersionInfo {
  if (!isRecord(value) || typeof value.package !== 'string' || !isRecord(value.qemu)) return false;
  const { major, minor, micro } = value.qemu;
  return [major, minor, micro].every((n) => Number.isSafeInteger(n) && (n as number) >= 0);
}

export function parseVersionInfo(value: unknown, command = 'query-version'): QmpVersionInfo {
  if (!isVersionInfo(value)) throw badReply(command, 'expected {qemu: {major, minor, micro}, package}');
  const { major, minor, micro } = value.qemu;
  return { qemu: { major, minor, micro }, package: value.package };
}

export function parseStatusInfo(value: unknown): StatusInfo {
  if (!isRecord(value) || typeof value.status !== 'string' || typeof value.running !== 'boolean') {
    throw badReply('query-status', 'expected {status: string, running: boolean}');
  }
  const info: StatusInfo = { status: value.status, running: value.running };
  if (typeof value.singlestep === 'boolean') info.singlestep = value.singlestep;
  return info;
}

export function parseMigrationInfo(value: unknown): MigrationInfo {
  if (!isRecord(value)) throw badReply('query-migrate', 'expected an object');
  if (value.status !== undefined && typeof value.status !== 'string') {
    throw badReply('query-migrate', 'status is not a string');
  }
  for (const key of ['total-time', 'downtime', 'expected-downtime', 'setup-time'] as const) {
    if (value[key] !== undefined && typeof value[key] !== 'number') {
      throw badReply('query-migrate', `${key} is not a number`);
    }
  }
  if (value.ram !== undefined && !isRecord(value.ram)) throw badReply('query-migrate', 'ram is not an object');
  return value as MigrationInfo;
}
