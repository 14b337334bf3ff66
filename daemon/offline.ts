import { isSameProcess, QUIT_EXIT_TIMEOUT_MS, waitForProcessExit } from '../launcher/index.js';
import { connectQmp, powerDownGuest } from '../qmp/index.js';
import { DaemonError } from './errors.js';
import { acquireDaemonLock, type DaemonLock } from './lock.js';
import { MONITOR_GREETING_TIMEOUT_MS, type VmState } from './model.js';
import { recordsDir, RecordStore, type VmRecord } from './records.js';

/** The part of the API `vmkeep stop --all` needs, served straight from the records. */
export interface OfflineGuests {
  list(): Promise<Array<{ name: string; state: VmState; pid?: number }>>;
  /** Always a host shutdown's stop: the record's `wanted` is left as it was. */
  stop(name: string, options: { timeoutSec: number; hostShutdown?: boolean }): Promise<{ name: string; state: VmState }>;
  /** Releases vmkeepd's lock. */
  close(): Promise<void>;
}


/**
 * Powering guests off while vmkeepd is down (a host shutdown after it crashed or before it was
 * ready): vmkeepd's own lock is taken, so this never races a daemon (LOCKED names the one that
 * runs), and each recorded QEMU that is still the same process gets an ACPI power-off, its
 * guest the timeout, then `quit` once it powered off; the record says so. A guest that ignores
 * ACPI is left running (STOP_TIMEOUT), never killed (ARCHITECTURE.md, invariant 3).
 */
export async function openOfflineGuests(stateDir: string): Promise<OfflineGuests> {
  const lock: DaemonLock = await acquireDaemonLock(stateDir);
  let records: VmRecord[];
  const store = new RecordStore(recordsDir(stateDir));
  try {
    await store.init();
    ({ records } = await store.list());
  } catch (error) {
    await lock.release();
    throw error;
  }
  const alive = (record: VmRecord): boolean => record.process !== undefined && isSameProcess(record.process.pid, record.process.startTime);
  return {
    async list() {
      return records.map((r) => ({ name: r.name, state: r.state, ...(alive(r) && r.process ? { pid: r.process.pid } : {}) }));
    },
    async stop(name, { timeoutSec }) {
      const record = records.find((r) => r.name === name);
      if (record === undefined) throw new DaemonError('NOT_FOUND', `no record of a VM named ${JSON.stringify(name)}`);
      const proc = record.process;
      if (proc === undefined || !alive(record)) return { name, state: record.state };
      const qmp = await connectQmp(record.paths.qmpSocket, { greetingTimeoutMs: MONITOR_GREETING_TIMEOUT_MS });
      try {
        if ((await qmp.queryStatus()).status !== 'shutdown') {
          try {
            await powerDownGuest(qmp, { timeoutMs: timeoutSec * 1000 });
          } catch (cause) {
            throw new DaemonError('STOP_TIMEOUT', `${name} did not power off within ${timeoutSec} s of the ACPI request and is still running (${(cause as Error).message})`, { cause });
          }
        }
        await qmp.quit();
        await waitForProcessExit(proc.pid, proc.startTime, QUIT_EXIT_TIMEOUT_MS);
      } finally {
        qmp.close();
      }
      const now = new Date().toISOString();
      // It was running at the host's shutdown: autostart=last-state starts it at the next boot.
      const next: VmRecord = { ...record, state: 'stopped', wanted: record.wanted ?? 'running', lastExit: { reason: 'powered off while vmkeepd was down (host shutdown)', at: now }, updatedAt: now };
      delete next.process;
      await store.put(next);
      return { name, state: 'stopped' };
    },
    close: () => lock.release(),
  };
}
