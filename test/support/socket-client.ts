// A client that sends control-API requests back to back while the daemon behind the socket is
// restarted, killed or upgraded, and counts what it sees: refused connections, cut ones, failed
// requests and the longest wait (ARCHITECTURE.md, invariant 12).
import { request } from 'node:http';

/** The client's bound: it stops at this count even if the restarts take longer. */
const MAX_REQUESTS = 200_000;

export interface ClientTally {
  /** Requests answered 200. */
  ok: number;
  /** Connection attempts refused: no listener on the path (ECONNREFUSED) or no socket file (ENOENT). */
  refused: number;
  /** Attempts cut after the connection was accepted (a SIGKILLed daemon): asked again, as vmkeep does for reads. */
  cut: number;
  /** Requests that got no answer within REQUEST_DEADLINE_MS, or a bad one. */
  failed: number;
  longestWaitMs: number;
  errors: string[];
}

const REQUEST_DEADLINE_MS = 30_000;

/** One GET /1.0/vms attempt, without retries, classified. */
function attempt(socketPath: string): Promise<'ok' | 'refused' | 'cut' | string> {
  return new Promise((resolve) => {
    const req = request({ socketPath, path: '/1.0/vms', agent: false, timeout: REQUEST_DEADLINE_MS }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode === 200 ? 'ok' : `status ${res.statusCode}`));
      res.on('error', () => resolve('cut'));
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'ECONNREFUSED' || error.code === 'ENOENT') resolve('refused');
      else if (error.code === 'ECONNRESET' || error.code === 'EPIPE') resolve('cut');
      else resolve(error.message);
    });
    req.end();
  });
}

/**
 * Sends requests back to back until `stop` says so (at most MAX_REQUESTS) and tallies every
 * attempt: a refused or cut attempt is tried again (after 10 ms) until the request's deadline.
 */
export function runClient(socketPath: string, stop: () => boolean): Promise<ClientTally> {
  const tally: ClientTally = { ok: 0, refused: 0, cut: 0, failed: 0, longestWaitMs: 0, errors: [] };
  return (async () => {
    for (let i = 0; i < MAX_REQUESTS && !stop(); i++) {
      const began = performance.now();
      for (;;) {
        const outcome = await attempt(socketPath);
        if (outcome === 'ok') {
          tally.ok++;
          break;
        }
        if (outcome === 'refused') tally.refused++;
        else if (outcome === 'cut') tally.cut++;
        if ((outcome !== 'refused' && outcome !== 'cut') || performance.now() - began > REQUEST_DEADLINE_MS) {
          tally.failed++;
          if (tally.errors.length < 5) tally.errors.push(outcome);
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      tally.longestWaitMs = Math.max(tally.longestWaitMs, performance.now() - began);
    }
    return tally;
  })();
}
