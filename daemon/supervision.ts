// Watching a running VM through its monitor: QMP events through a typed callbacks table (as
// libvirt's qemu_monitor does), a closed monitor, and a monitor that stops answering.
import { dispatchMonitorEvent, isQmpError, type QmpClient, type QmpEvent } from '../qmp/index.js';
import type { VmRecord } from './records.js';
import type { VmCore } from './vm-core.js';
import { truncate, type VmEntry } from './vm-entry.js';

/** A health check waits this long for query-status before it calls the monitor hung. */
const HEALTH_TIMEOUT_MS = 2_000;

/** Makes `qmp` the VM's monitor: its events and its close are handled in the VM's lock. */
export function superviseMonitor(core: VmCore, entry: VmEntry, qmp: QmpClient): void {
  entry.qmp = qmp;
  entry.hung = false;
  const name = entry.record.name;
  const log = core.options.logger;
  qmp.on('event', (event) => {
    void entry.lock.run('supervise', () => onEvent(core, entry, qmp, event)).catch((error: unknown) =>
      log.error({ vm: name, err: error }, `handling ${event.event} failed`),
    );
  });
  qmp.on('close', (reason) => {
    // Only the current monitor matters: one we let go of on purpose says nothing about QEMU.
    if (entry.qmp !== qmp) return;
    entry.qmp = undefined;
    if (core.isClosed) return;
    // The handler runs later, in the VM's lock: by then the record may name another QEMU (or
    // none, when the daemon itself quit this one), and then the close is no news.
    const process = entry.record.process;
    void entry.lock.run('supervise', () => onMonitorClosed(core, entry, process, reason.message)).catch((error: unknown) =>
      log.error({ vm: name, err: error }, 'handling a closed monitor failed'),
    );
  });
}

async function onEvent(core: VmCore, entry: VmEntry, qmp: QmpClient, event: QmpEvent): Promise<void> {
  if (entry.qmp !== qmp) return;
  const log = core.options.logger.child({ vm: entry.record.name });
  const work: Array<Promise<void>> = [];
  dispatchMonitorEvent(event, {
    onShutdown: ({ guest, reason }) => {
      if (!guest) {
        // QEMU itself is ending (a signal, a quit from elsewhere): it exits on its own, and the
        // closed monitor tells the rest. Not a guest power-off to finish.
        log.warn({ reason }, 'QEMU is shutting down on the host side');
        entry.hostShutdown = reason;
        return;
      }
      log.info({ reason }, 'guest shut down');
      if (entry.stopping) return;
      work.push(core.observe(entry, { ...entry.record, state: 'shutdown' }).then(() => core.finishGuestShutdown(entry, reason)));
    },
    onStop: () => {
      if (entry.record.state === 'running') work.push(core.observe(entry, { ...entry.record, state: 'paused' }));
    },
    onResume: () => {
      if (entry.record.state === 'paused') work.push(core.observe(entry, { ...entry.record, state: 'running' }));
    },
    onReset: (data) => log.info({ ...data }, 'guest reset'),
    onGuestPanicked: (data) => {
      log.error({ data }, 'guest panicked');
      work.push(core.observe(entry, { ...entry.record, problem: truncate(`guest panicked (${JSON.stringify(data).slice(0, 200)})`) }));
    },
  });
  await Promise.all(work);
}

/** A closed monitor is a question, not an answer: look at the process. */
async function onMonitorClosed(core: VmCore, entry: VmEntry, process: VmRecord['process'], why: string): Promise<void> {
  const now = entry.record.process;
  if (!process || !now || now.pid !== process.pid || now.startTime !== process.startTime) return;
  if (core.options.qemu.isSame(process.pid, process.startTime)) {
    await core.observe(entry, { ...entry.record, state: 'unreachable', problem: truncate(`monitor closed (${why}); QEMU still alive`) });
    core.scheduleRetry(entry);
    return;
  }
  const next: VmRecord = {
    ...entry.record,
    state: 'exited',
    lastExit: {
      reason: entry.hostShutdown === undefined ? 'QEMU exited unexpectedly' : `QEMU exited (${entry.hostShutdown})`,
      at: new Date().toISOString(),
    },
  };
  delete next.process;
  await core.observe(entry, next);
}

/**
 * Asks every idle VM's monitor for its status: one that stops answering (a hung or SIGSTOPped
 * QEMU) is reported unreachable, and running or paused again once it answers. Never signals.
 */
export function startHealthChecks(core: VmCore): () => void {
  const interval = core.options.healthIntervalMs;
  if (interval <= 0) return () => undefined;
  let checking = false;
  const timer = setInterval(() => {
    if (checking || core.isClosed) return;
    checking = true;
    void Promise.all(core.entries().map((entry) => checkHealth(core, entry))).finally(() => {
      checking = false;
    });
  }, interval);
  timer.unref();
  return () => clearInterval(timer);
}

async function checkHealth(core: VmCore, entry: VmEntry): Promise<void> {
  const qmp = entry.qmp;
  if (!qmp || entry.lock.current !== undefined || entry.stopping) return;
  let status: string | undefined;
  try {
    status = (await qmp.queryStatus({ timeoutMs: HEALTH_TIMEOUT_MS })).status;
  } catch (error) {
    if (!isQmpError(error, 'COMMAND_TIMEOUT')) return;
  }
  if (entry.qmp !== qmp || core.isClosed) return;
  await entry.lock.run('supervise', async () => {
    if (entry.qmp !== qmp) return;
    if (status === undefined && !entry.hung) {
      entry.hung = true;
      core.options.logger.warn({ vm: entry.record.name }, `${entry.record.name}'s monitor stopped answering`);
      await core.observe(entry, {
        ...entry.record,
        state: 'unreachable',
        problem: `its monitor stopped answering within ${HEALTH_TIMEOUT_MS} ms: QEMU is hung or stopped (SIGSTOP?); left alone, checked again`,
      });
    } else if (status !== undefined && entry.hung) {
      entry.hung = false;
      const next: VmRecord = { ...entry.record, state: status === 'running' ? 'running' : 'paused' };
      delete next.problem;
      await core.observe(entry, next);
    }
  }).catch((error: unknown) => core.options.logger.warn({ vm: entry.record.name, err: error }, 'health check failed'));
}
