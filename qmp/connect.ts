import net from 'node:net';
import { checkTimeout, QmpClient, type QmpClientOptions } from './client.js';
import { QmpError } from './errors.js';

export const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;

// Linux sun_path holds 108 bytes including the terminating NUL. Longer paths must be
// refused here: libuv would silently truncate them and could reach a different socket.
const MAX_UNIX_PATH_BYTES = 107;

export interface ConnectQmpOptions extends QmpClientOptions {
  /** How long connect() on the unix socket may take. Default 5 s. */
  connectTimeoutMs?: number;
}

function connectFailure(path: string, err: NodeJS.ErrnoException): QmpError {
  switch (err.code) {
    case 'ENOENT':
      return new QmpError('CONNECT_FAILED', `No QMP socket at ${path} (ENOENT): the VM is not running or the path is wrong.`, {
        cause: err,
      });
    case 'ECONNREFUSED':
      return new QmpError(
        'CONNECT_FAILED',
        `Connection refused at ${path} (ECONNREFUSED): nothing listens there; QEMU has probably exited and left the socket file behind.`,
        { cause: err },
      );
    case 'EACCES':
      return new QmpError('CONNECT_FAILED', `Permission denied on the QMP socket ${path} (EACCES): run as a user that may open it.`, {
        cause: err,
      });
    default:
      return new QmpError('CONNECT_FAILED', `Cannot connect to the QMP socket ${path}: ${err.message}`, { cause: err });
  }
}

/**
 * Connects to a QMP unix socket and negotiates. Rejects with CONNECT_FAILED (naming the
 * path), CONNECT_TIMEOUT, or anything fromStream() rejects with (notably GREETING_TIMEOUT
 * when another client holds the monitor).
 */
export function connectQmp(path: string, options: ConnectQmpOptions = {}): Promise<QmpClient> {
  return new Promise<QmpClient>((resolve, reject) => {
    let connectTimeoutMs: number;
    try {
      connectTimeoutMs = checkTimeout('connectTimeoutMs', options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
    } catch (err) {
      reject(err);
      return;
    }
    const pathBytes = Buffer.byteLength(path);
    if (pathBytes > MAX_UNIX_PATH_BYTES) {
      reject(
        new QmpError(
          'CONNECT_FAILED',
          `QMP socket path ${path} is ${pathBytes} bytes long; unix sockets allow at most ${MAX_UNIX_PATH_BYTES}. Use a shorter state directory.`,
        ),
      );
      return;
    }
    const socket = new net.Socket();
    const cleanup = (): void => {
      clearTimeout(timer);
      socket.off('error', onError);
      socket.off('connect', onConnect);
    };
    const onError = (err: NodeJS.ErrnoException): void => {
      cleanup();
      socket.destroy();
      reject(connectFailure(path, err));
    };
    const onConnect = (): void => {
      cleanup();
      // Synchronously hand over, so the client's 'error' listener is attached with no gap.
      QmpClient.fromStream(socket, { ...options, label: options.label ?? path }).then(resolve, reject);
    };
    const timer = setTimeout(() => {
      cleanup();
      socket.destroy();
      reject(new QmpError('CONNECT_TIMEOUT', `Connecting to the QMP socket ${path} took longer than ${connectTimeoutMs} ms; QEMU may be hung.`));
    }, connectTimeoutMs);
    socket.on('error', onError);
    socket.on('connect', onConnect);
    socket.connect({ path });
  });
}
