import { setTimeout as delay } from 'node:timers/promises';
import type { DaemonApi } from './vm-commands.js';

// Between attempts while vmkeepd is away (an upgrade's restart takes about a second).
const FIRST_RETRY_MS = 100;
const MAX_RETRY_MS = 1000;

export interface ConsoleFollowIo {
  signal: AbortSignal;
  onData(chunk: Buffer): void;
  /** A line for the person watching (stderr): vmkeepd went away, or is back. */
  onNotice(text: string): void;
}

/**
 * `vmkeep logs -f`: follows a VM's console across vmkeepd restarts, as `journalctl -f` does
 * across journald's. When the stream ends because the daemon stopped (DAEMON_DOWN), it waits
 * for the daemon, asks again and skips the bytes it already printed (the daemon serves the
 * console from its start). Ends when `signal` aborts; any other error is thrown.
 */
export async function followConsole(api: Pick<DaemonApi, 'console'>, name: string, io: ConsoleFollowIo): Promise<void> {
  let delivered = 0;
  let retryMs = FIRST_RETRY_MS;
  let away = false;
  for (;;) {
    let skip = delivered;
    try {
      await api.console(name, {
        follow: true,
        signal: io.signal,
        onData: (chunk) => {
          if (away) {
            away = false;
            retryMs = FIRST_RETRY_MS;
            io.onNotice(`vmkeepd is back; following ${name} again`);
          }
          if (skip >= chunk.length) {
            skip -= chunk.length;
            return;
          }
          const fresh = skip > 0 ? chunk.subarray(skip) : chunk;
          skip = 0;
          delivered += fresh.length;
          io.onData(fresh);
        },
      });
      return;
    } catch (error) {
      if (io.signal.aborted) return;
      if ((error as { code?: unknown }).code !== 'DAEMON_DOWN') throw error;
      if (!away) io.onNotice(`vmkeepd went away (restarting?); waiting for it to follow ${name} on (Ctrl-C ends)`);
      away = true;
    }
    try {
      await delay(retryMs, undefined, { signal: io.signal });
    } catch {
      return;
    }
    retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
  }
}
