// What every benchmark shares: progress output, the result model, and cleanup of what it started.
import { isSameProcess, readProcessIdentity, waitForProcessExit, type Installation } from '../../launcher/index.js';
import { requireQemu } from '../support/guest.js';

export interface Row {
  what: string;
  n: number | string;
  median: string;
  /** '—' where a tail percentile does not apply (few samples, or a single value). */
  p99: string;
  target: string;
  met: 'yes' | 'no' | '—';
}

export interface Section {
  title: string;
  rows: Row[];
  /** How it was measured and anything a reader must know to interpret the numbers. */
  notes: string[];
}

const benchStart = performance.now();

/** Progress on stderr, stamped with the seconds since the bench started. */
export function log(message: string): void {
  process.stderr.write(`[bench ${((performance.now() - benchStart) / 1000).toFixed(1).padStart(6)} s] ${message}\n`);
}

export function met(ok: boolean): 'yes' | 'no' {
  return ok ? 'yes' : 'no';
}

/** The system QEMU as vmkeep run uses it by default. */
export function systemInstallation(): Installation {
  return { name: 'default', binary: requireQemu(), firmwareDirs: [] };
}

/**
 * Undo actions run last-in first-out, each at most once, whatever happened before. Every
 * QEMU a benchmark starts is registered here by PID and start time (never by name).
 */
export class Cleanup {
  private readonly actions: Array<{ label: string; run: () => Promise<void> | void }> = [];

  add(label: string, run: () => Promise<void> | void): () => Promise<void> {
    const action = { label, run };
    this.actions.push(action);
    // Runs it now (e.g. at the end of one iteration) and forgets it.
    return async () => {
      const i = this.actions.indexOf(action);
      if (i < 0) return;
      this.actions.splice(i, 1);
      await action.run();
    };
  }

  /** Registers a QEMU we started (or a vmkeep run started for us); returns its early "end it now". */
  trackQemu(pid: number, startTime?: string): () => Promise<void> {
    const start = startTime ?? readProcessIdentity(pid)?.startTime;
    return this.add(`QEMU pid ${pid}`, async () => {
      if (start === undefined || !isSameProcess(pid, start)) return;
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        return;
      }
      await waitForProcessExit(pid, start, 5_000).catch(() => log(`QEMU pid ${pid} did not end after SIGKILL`));
    });
  }

  async runAll(): Promise<void> {
    for (const action of this.actions.splice(0).reverse()) {
      try {
        await action.run();
      } catch (error) {
        log(`cleanup of ${action.label} failed: ${(error as Error).message}`);
      }
    }
  }
}

export async function waitUntil<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined> | T | undefined, pollMs = 20): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, pollMs));
  }
}
