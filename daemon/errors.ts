export type DaemonErrorCode =
  | 'INVALID_REQUEST'
  | 'INVALID_SPEC'
  | 'NOT_FOUND'
  | 'EXISTS'
  | 'CONFLICT'
  /** Another operation on the same VM runs now; the message names it and since when. */
  | 'BUSY'
  /** QEMU itself refused the spec at start (not a kernel, too much memory, ...): a user error. */
  | 'SPEC_REJECTED'
  | 'UNREACHABLE'
  | 'RECORD_CORRUPT'
  | 'RECORD_TOO_NEW'
  /** A file in the state folder could not be read or written (disk full, permissions, I/O error). */
  | 'STATE_IO'
  | 'LOCKED'
  | 'START_FAILED'
  | 'STOP_TIMEOUT'
  | 'QMP_FAILED'
  /** A refresh was not begun: its target cannot take the VM (older QEMU, machine type missing). */
  | 'REFRESH_REFUSED'
  /** A refresh was begun and failed; the VM runs as before on its old QEMU. */
  | 'REFRESH_FAILED'
  /** A disk's backing chain (or an image's file) is not the recorded one: `vmkeep disk accept NAME` after checking. */
  | 'BACKING_CHAIN_CHANGED'
  /** A disk image vmkeep will not use (a backing file without a stated format, a non-file backing). */
  | 'DISK_REFUSED'
  /** An image another VM uses read-write (or a read-write image another VM uses at all). */
  | 'IMAGE_IN_USE'
  | 'INTERNAL'
  /** An operation was cancelled (DELETE /1.0/operations/ID) before it finished. */
  | 'CANCELLED'
  /** An operation was under way when vmkeepd ended; the message says where its VMs stand now. */
  | 'DAEMON_RESTARTED'
  // Requests the API cannot take: each has its own HTTP status so `status = HTTP_STATUS[code]` always.
  | 'METHOD_NOT_ALLOWED'
  | 'BODY_TOO_LARGE'
  | 'UNSUPPORTED_MEDIA_TYPE'
  // Client side (ApiClient) and socket set-up: the daemon never answers with these.
  | 'DAEMON_DOWN'
  | 'DAEMON_TIMEOUT'
  | 'PERMISSION_DENIED'
  | 'BAD_RESPONSE'
  | 'SOCKET_IN_USE';

/** HTTP status of each code: the API's contract with curl users and cloud agents. */
export const HTTP_STATUS: Record<DaemonErrorCode, number> = {
  INVALID_REQUEST: 400,
  INVALID_SPEC: 400,
  NOT_FOUND: 404,
  EXISTS: 409,
  CONFLICT: 409,
  BUSY: 409,
  SPEC_REJECTED: 422,
  UNREACHABLE: 503,
  RECORD_CORRUPT: 500,
  RECORD_TOO_NEW: 500,
  STATE_IO: 500,
  LOCKED: 409,
  START_FAILED: 500,
  STOP_TIMEOUT: 504,
  QMP_FAILED: 502,
  REFRESH_REFUSED: 409,
  REFRESH_FAILED: 500,
  BACKING_CHAIN_CHANGED: 409,
  DISK_REFUSED: 422,
  IMAGE_IN_USE: 409,
  INTERNAL: 500,
  CANCELLED: 409,
  DAEMON_RESTARTED: 500,
  METHOD_NOT_ALLOWED: 405,
  BODY_TOO_LARGE: 413,
  UNSUPPORTED_MEDIA_TYPE: 415,
  DAEMON_DOWN: 503,
  DAEMON_TIMEOUT: 504,
  PERMISSION_DENIED: 403,
  BAD_RESPONSE: 502,
  SOCKET_IN_USE: 409,
};

export class DaemonError extends Error {
  readonly code: DaemonErrorCode;

  constructor(code: DaemonErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'DaemonError';
    this.code = code;
  }
}
