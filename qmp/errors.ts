/** Every way a QMP operation can fail; callers branch on `code`, humans read `message`. */
export type QmpErrorCode =
  /** The socket could not be opened (no such socket, refused, permission). */
  | 'CONNECT_FAILED'
  /** connect() on the socket did not complete in time. */
  | 'CONNECT_TIMEOUT'
  /** Connected, but no greeting came: the monitor is most likely serving another client. */
  | 'GREETING_TIMEOUT'
  /** QEMU refused `qmp_capabilities`. */
  | 'NEGOTIATION_FAILED'
  /** A command got no reply within its timeout. */
  | 'COMMAND_TIMEOUT'
  /** QEMU answered a command with an error; see `qmpClass`. */
  | 'COMMAND_FAILED'
  /** waitForEvent() saw no matching event in time. */
  | 'EVENT_TIMEOUT'
  /** waitForEvent() was cancelled through its AbortSignal. */
  | 'ABORTED'
  /** The connection ended (EOF, socket error, or close() by us). */
  | 'CLOSED'
  /** The peer sent a line longer than the limit: hostile or not QMP. */
  | 'LINE_TOO_LONG'
  /** The peer sent a line that is not JSON. */
  | 'INVALID_JSON'
  /** The peer sent JSON that is not a QMP message, or a reply of the wrong shape. */
  | 'PROTOCOL'
  /** The caller passed something that cannot be sent (bad name, unserialisable arguments). */
  | 'INVALID_ARGUMENT';

export interface QmpErrorOptions {
  cause?: unknown;
  /** QMP error class (e.g. 'GenericError', 'CommandNotFound'), for COMMAND_FAILED. */
  qmpClass?: string;
  /** The QMP command this error is about, when there is one. */
  command?: string;
}

export class QmpError extends Error {
  readonly code: QmpErrorCode;
  readonly qmpClass: string | undefined;
  readonly command: string | undefined;

  constructor(code: QmpErrorCode, message: string, options: QmpErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'QmpError';
    this.code = code;
    this.qmpClass = options.qmpClass;
    this.command = options.command;
  }
}

export function isQmpError(err: unknown, code?: QmpErrorCode): err is QmpError {
  return err instanceof QmpError && (code === undefined || err.code === code);
}
