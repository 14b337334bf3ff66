import { existsSync } from 'node:fs';
import { cprChannel, type CprChannels } from '../launcher/index.js';
import { connectQmp, isQmpError, migrationStatus, QMP_EVENT, type MigrationInfo, type QmpClient } from '../qmp/index.js';
import { UpgradeError } from './errors.js';

export interface LiveMigrationOptions {
  source: QmpClient;
  /** Started with `-incoming defer`, already in its own scope. */
  destination: QmpClient;
  /** Unix socket path the destination listens on for the stream. */
  socketPath: string;
  timeoutMs: number;
  /** Bytes per second; QEMU's default cap (128 MiB/s) makes a same-host move needlessly slow. */
  maxBandwidth?: number;
  /** The longest pause QEMU may plan for the final copy (ms); default 20. */
  downtimeLimitMs?: number;
  /** Told each MIGRATION status the source reports (setup, active, completed, ...). */
  onStatus?: (status: string) => void;
  /**
   * Stop a running guest before the copy and resume it on the destination after (the pause is
   * the whole copy): a live copy from some QEMUs is not sound (pausedCopyReason).
   */
  pauseGuest?: boolean;
  /** Told when the guest was stopped for the copy: if the source keeps it, the caller resumes it. */
  onGuestStopped?: () => void;
}

export interface MigrationResult {
  /** QEMU's own figures (ms): the guest was paused for `downtimeMs`. */
  downtimeMs: number;
  totalMs: number;
  setupMs?: number;
  transferredBytes?: number;
}

const DEFAULT_MAX_BANDWIDTH = 4 * 1024 * 1024 * 1024;
const DEFAULT_DOWNTIME_LIMIT_MS = 20;
// QEMU 7.2 may answer query-migrate with zero figures right after its `completed` event.
const FIGURES_POLL_MS = 20;
const FIGURES_WAIT_MS = 2_000;
const END_STATES = new Set(['completed', 'failed', 'cancelled']);

/**
 * Moves a running guest from `source` to `destination` over a unix socket and waits for the
 * end. On failure or timeout the migration is cancelled and the source keeps running (QEMU
 * resumes it); the destination is the caller's to clean up. Completion is taken from the
 * source's MIGRATION events, with query-migrate as the authority on the outcome.
 */
export async function migrateLive(options: LiveMigrationOptions): Promise<MigrationResult> {
  const { source, destination, socketPath, timeoutMs } = options;
  const uri = `unix:${socketPath}`;
  // A cpr-transfer that a crashed daemon left set up must not turn this into one; QEMUs before
  // 8.2 have no migration mode at all (and refuse the parameter).
  await source.migrateSetParameters({ mode: 'normal' }).catch(() => undefined);
  try {
    await source.migrateSetCapabilities([{ capability: 'events', state: true }]);
    await source.migrateSetParameters({
      'max-bandwidth': options.maxBandwidth ?? DEFAULT_MAX_BANDWIDTH,
      // QEMU's default (300 ms) lets it stop the guest early with much left to copy; a tighter
      // bound makes it iterate a little longer while the guest runs, for a shorter pause.
      'downtime-limit': options.downtimeLimitMs ?? DEFAULT_DOWNTIME_LIMIT_MS,
    });
    // A paused copy resumes the guest on the destination once the destination says it has
    // loaded the stream (its own `completed`), which it reports only with events on.
    if (options.pauseGuest === true) await destination.migrateSetCapabilities([{ capability: 'events', state: true }]);
    await destination.migrateIncoming(uri);
  } catch (cause) {
    throw new UpgradeError('MIGRATION_FAILED', `the migration could not be set up: ${(cause as Error).message}; nothing was sent, the VM keeps running on its old QEMU`, { cause });
  }

  let stoppedAt: number | undefined;
  // Waited on before the destination's `cont`: one that arrives while the destination still
  // loads the stream is lost (QEMU then takes the run state the source sent, paused), and its
  // `completed` comes only after it has set that state.
  const abortLoaded = new AbortController();
  const loaded = options.pauseGuest === true
    ? destination.waitForEvent(QMP_EVENT.MIGRATION, { timeoutMs, signal: abortLoaded.signal, predicate: (event) => migrationStatus(event) === 'completed' })
    : undefined;
  loaded?.catch(() => undefined);
  const start = async (): Promise<void> => {
    if (options.pauseGuest === true && (await source.queryStatus()).status === 'running') {
      // Told before the stop is asked: a stop whose answer is lost may still have paused the guest.
      options.onGuestStopped?.();
      stoppedAt = performance.now();
      await source.stop();
    }
    await source.migrate(uri);
  };
  try {
    const result = await awaitMigration(source, start, options);
    if (stoppedAt === undefined) return result;
    // A stopped guest stays paused on the destination until told: the pause ends here.
    await loaded?.catch((cause: unknown) => {
      throw new UpgradeError('MIGRATION_FAILED', `the new QEMU did not report the guest's state loaded after the copy: ${(cause as Error).message}`, { cause });
    });
    await destination.cont();
    return { ...result, downtimeMs: Math.round(performance.now() - stoppedAt) };
  } finally {
    abortLoaded.abort();
  }
}

/**
 * Starts the migration (`start`) and waits for its end on the source: MIGRATION events for
 * progress, query-migrate as the authority. Cancelled on failure or timeout (the source then
 * resumes the guest).
 */
async function awaitMigration(
  source: QmpClient, start: () => Promise<void>, options: { timeoutMs: number; onStatus?: (status: string) => void; whileWaiting?: (ended: Promise<unknown>) => Promise<void> },
): Promise<MigrationResult> {
  const { timeoutMs } = options;
  const abort = new AbortController();
  const off = source.on('event', (event) => {
    if (event.event === QMP_EVENT.MIGRATION) options.onStatus?.(migrationStatus(event));
  });
  const ended = source.waitForEvent(QMP_EVENT.MIGRATION, {
    timeoutMs,
    signal: abort.signal,
    predicate: (event) => END_STATES.has(migrationStatus(event)),
  });
  ended.catch(() => undefined);
  try {
    try {
      await start();
    } catch (cause) {
      throw new UpgradeError('MIGRATION_FAILED', `QEMU refused the migration: ${(cause as Error).message}; the VM keeps running on its old QEMU`, { cause });
    }
    try {
      await options.whileWaiting?.(ended);
      await ended;
    } catch (cause) {
      await source.migrateCancel().catch(() => undefined);
      if (!isQmpError(cause) || cause.code !== 'EVENT_TIMEOUT') {
        throw new UpgradeError('MIGRATION_FAILED', `the migration broke off: ${(cause as Error).message}`, { cause });
      }
      throw new UpgradeError('MIGRATION_TIMEOUT',
        `the migration did not finish within ${timeoutMs / 1000} s and was cancelled; the VM keeps running on its old QEMU. A busy guest dirties memory faster than it can be copied: retry when it is quieter, or with a longer --timeout`,
        { cause });
    }
    const info = await completedFigures(source);
    if (info.status !== 'completed') {
      throw new UpgradeError('MIGRATION_FAILED',
        `the migration ended ${info.status ?? 'without a status'}${info['error-desc'] ? `: ${info['error-desc']}` : ''}; the VM keeps running on its old QEMU`);
    }
    return resultOf(info);
  } finally {
    abort.abort();
    off();
  }
}

export interface CprTransferOptions {
  source: QmpClient;
  /** Started by launchCprDestination, already in its own scope, listening on both channels. */
  channels: CprChannels;
  /** The destination's QMP socket: it exists only once the source has connected the cpr channel. */
  destinationQmpSocket: string;
  timeoutMs: number;
  onStatus?: (status: string) => void;
  /** Given the destination's monitor as soon as it answers, so a failure can still be settled by asking it. */
  onDestination: (qmp: QmpClient) => void;
  /** Set on the destination's monitor (default: the client's own). */
  qmpTimeoutMs?: number;
}

const DEST_MONITOR_POLL_MS = 10;

/**
 * A refresh that hands the guest's RAM over instead of copying it (QEMU >= 10.0, RAM in a shared
 * memfd): the source sends its cpr state (the memfd included) over the cpr channel, the
 * destination finishes its start with that memory and takes the device state over the main
 * channel. A failure before completion leaves the source running the guest (QEMU resumes it);
 * the destination is the caller's to remove. The source's migration mode is set back to normal
 * on failure, so a later plain migration is one.
 */
export async function cprTransfer(options: CprTransferOptions): Promise<MigrationResult> {
  const { source, channels } = options;
  try {
    await source.migrateSetCapabilities([{ capability: 'events', state: true }]);
    await source.migrateSetParameters({ mode: 'cpr-transfer' });
  } catch (cause) {
    await source.migrateSetParameters({ mode: 'normal' }).catch(() => undefined);
    throw new UpgradeError('MIGRATION_FAILED', `the cpr-transfer could not be set up: ${(cause as Error).message}; nothing was sent, the VM keeps running on its old QEMU`, { cause });
  }
  try {
    return await awaitMigration(source, async () => {
      await source.execute('migrate', { channels: [cprChannel('main', channels.mainSocket), cprChannel('cpr', channels.cprSocket)] });
    }, {
      timeoutMs: options.timeoutMs,
      ...(options.onStatus === undefined ? {} : { onStatus: options.onStatus }),
      // The destination's monitor appears once it has read the cpr state; it is connected while
      // the stream runs, and a stream that ends first (failed) stops the wait.
      whileWaiting: async (ended) => {
        const stop = { done: false };
        ended.then(() => { stop.done = true; }, () => { stop.done = true; });
        const qmp = await connectWhenListening(options.destinationQmpSocket, stop, options.timeoutMs, options.qmpTimeoutMs);
        if (qmp !== undefined) options.onDestination(qmp);
      },
    });
  } catch (error) {
    await source.migrateSetParameters({ mode: 'normal' }).catch(() => undefined);
    throw error;
  }
}

/** Connects to a monitor socket that does not exist yet; undefined when `stop` came first. */
async function connectWhenListening(path: string, stop: { done: boolean }, timeoutMs: number, commandTimeoutMs?: number): Promise<QmpClient | undefined> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (!stop.done && Date.now() < deadline) {
    if (existsSync(path)) {
      try {
        return await connectQmp(path, commandTimeoutMs === undefined ? {} : { commandTimeoutMs });
      } catch (error) {
        last = error;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, DEST_MONITOR_POLL_MS));
  }
  if (stop.done) return undefined;
  throw new UpgradeError('MIGRATION_FAILED', `the cpr-transfer destination's monitor ${path} did not answer within ${timeoutMs / 1000} s${last === undefined ? '' : `: ${(last as Error).message}`}`);
}

/** query-migrate, asked again (briefly) while a completed migration still reports no times. */
function completedFigures(source: QmpClient): Promise<MigrationInfo> {
  return poll(() => source.queryMigrate(), (info) => info.status !== 'completed' || (info['total-time'] ?? 0) > 0, FIGURES_WAIT_MS, FIGURES_POLL_MS);
}

function resultOf(info: MigrationInfo): MigrationResult {
  const result: MigrationResult = { downtimeMs: info.downtime ?? 0, totalMs: info['total-time'] ?? 0 };
  if (info['setup-time'] !== undefined) result.setupMs = info['setup-time'];
  if (info.ram?.transferred !== undefined) result.transferredBytes = info.ram.transferred;
  return result;
}

const IN_FLIGHT = new Set(['setup', 'active', 'pre-switchover', 'device', 'cancelling', 'wait-unplug', 'postcopy-active', 'postcopy-paused', 'postcopy-recover']);
const SETTLE_POLL_MS = 50;
const SETTLE_WAIT_MS = 30_000;

/**
 * Which way an unfinished migration goes, from the QEMUs themselves: `back` only when the
 * source still holds the guest (its stream cancelled and settled, the destination still
 * waiting in `inmigrate`); `forward` when the destination has it; `unknown` when either
 * cannot be read (then nothing may be ended). `source` is undefined when its QEMU is gone;
 * `dest` is 'no-monitor' for a cpr-transfer destination that has not created its monitor.
 */
export async function decideMigration(source: QmpClient | undefined, dest: QmpClient | 'no-monitor'): Promise<'forward' | 'back' | 'unknown'> {
  try {
    if (source !== undefined) {
      let info = await source.queryMigrate();
      if (IN_FLIGHT.has(String(info.status))) {
        // A cancel races with completion: only the settled state counts.
        await source.migrateCancel().catch(() => undefined);
        info = await poll(() => source.queryMigrate(), (i) => !IN_FLIGHT.has(String(i.status)), SETTLE_WAIT_MS, SETTLE_POLL_MS);
      }
      if (IN_FLIGHT.has(String(info.status))) return 'unknown';
      // The run state decides, not query-migrate: a QEMU that was itself a migration's
      // destination reports that incoming one as `completed` until it sends one of its own.
      // finish-migrate is the instant between the last copy and postmigrate (or a resume).
      const { status: sourceState } = await poll(() => source.queryStatus(), (s) => s.status !== 'finish-migrate', SETTLE_WAIT_MS, SETTLE_POLL_MS);
      if (sourceState === 'finish-migrate') return 'unknown';
      if (sourceState === 'postmigrate') {
        // QEMU also leaves a source in postmigrate when its own migration failed or was cancelled
        // while the guest was stopped (a paused copy). It still holds the guest then if the
        // destination never took it: still loading, or gone as a failed incoming goes.
        if (info.status === 'failed' || info.status === 'cancelled') {
          if (dest === 'no-monitor') return 'back';
          try {
            return (await dest.queryStatus()).status === 'inmigrate' ? 'back' : 'unknown';
          } catch (error) {
            if (isQmpError(error) && error.code === 'CLOSED') return 'back';
            throw error;
          }
        }
        if (dest === 'no-monitor') return 'unknown';
        const { status } = await poll(() => dest.queryStatus(), (s) => s.status !== 'inmigrate', SETTLE_WAIT_MS, SETTLE_POLL_MS);
        return status === 'inmigrate' ? 'unknown' : 'forward';
      }
    }
    // A cpr destination creates its monitor only once it has read the cpr state: without one it
    // cannot hold the guest (the settled source still runs it, or it is lost with the source).
    if (dest === 'no-monitor') return 'back';
    let destStatus: string;
    try {
      destStatus = (await dest.queryStatus()).status;
    } catch (error) {
      // The source holds the guest (its stream settled, not postmigrate) and the destination's
      // monitor closed: it exited, as a QEMU does when its incoming stream fails (10.0 at once).
      if (source !== undefined && isQmpError(error) && error.code === 'CLOSED') return 'back';
      throw error;
    }
    if (destStatus === 'inmigrate') return 'back';
    // The source kept the guest, yet the destination runs one too: no side may be ended.
    return source === undefined ? 'forward' : 'unknown';
  } catch {
    return 'unknown';
  }
}

/** Asks until `done` holds or `waitMs` pass; returns the last answer either way. */
async function poll<T>(ask: () => Promise<T>, done: (answer: T) => boolean, waitMs: number, everyMs: number): Promise<T> {
  const deadline = Date.now() + waitMs;
  for (;;) {
    const answer = await ask();
    if (done(answer) || Date.now() > deadline) return answer;
    await new Promise((resolve) => setTimeout(resolve, everyMs));
  }
}
