export type ScopeErrorCode =
  | 'NO_SYSTEMD'
  | 'BUS_CLOSED'
  | 'CALL_TIMEOUT'
  | 'JOB_FAILED'
  | 'SCOPE_EXISTS'
  | 'PID_NOT_MOVED'
  | 'NO_SUCH_PID'
  | 'NO_SUCH_SCOPE'
  | 'PID_NAMESPACE'
  | 'DBUS_ERROR'
  | 'NO_MACHINED';

export class ScopeError extends Error {
  readonly code: ScopeErrorCode;
  /** The D-Bus error name behind this error, when systemd or the bus answered with one. */
  readonly dbusName: string | undefined;

  constructor(code: ScopeErrorCode, message: string, options?: { cause?: unknown; dbusName?: string }) {
    super(message, { cause: options?.cause });
    this.name = 'ScopeError';
    this.code = code;
    this.dbusName = options?.dbusName;
  }
}
