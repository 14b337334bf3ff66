import { setTimeout as delay } from 'node:timers/promises';

/** One VM's outcome in a rolling refresh. */
export interface RollingItemResult<R> {
  vm: string;
  ok: boolean;
  result?: R;
  error?: Error;
  /** Not attempted: the job stopped after maxFailures failures, or the signal aborted. */
  skipped?: boolean;
}

export interface RollingOptions<R> {
  vms: readonly string[];
  /** At most this many VMs are refreshed at once (>= 1). */
  parallel: number;
  /** No new VM is begun once this many failed (those in flight finish); undefined: never stop. */
  maxFailures?: number;
  /**
   * A pause between batches: the VMs then go `parallel` at a time, each batch ends before the
   * pause and the next begins after it. Without it, a new VM begins as soon as one ends.
   */
  batchIntervalMs?: number;
  /** Once aborted (a cancel), no new VM is begun (those in flight finish); the rest are reported skipped. */
  signal?: AbortSignal;
  refresh: (vm: string) => Promise<R>;
  /** Called as each VM starts and ends, in that order per VM. */
  onStart?: (vm: string) => void;
  onEnd?: (item: RollingItemResult<R>, done: number, total: number) => void;
  /** Called before each pause, with the VMs still to go. */
  onPause?: (ms: number, remaining: number) => void;
  /** How a pause waits (ended early once the signal aborts); tests pass their own clock. */
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
}

/**
 * Refreshes VMs `parallel` at a time, in the given order, in batches when there is an interval.
 * After maxFailures failures, or once the signal aborted, no new VM is begun and the rest are
 * reported skipped. Resolves with
 * one result per VM, in the given order; never rejects.
 */
export async function runRolling<R>(options: RollingOptions<R>): Promise<RollingItemResult<R>[]> {
  const { vms } = options;
  const parallel = Number.isFinite(options.parallel) ? Math.max(1, Math.floor(options.parallel)) : 1;
  const maxFailures = options.maxFailures ?? Infinity;
  const results = new Array<RollingItemResult<R> | undefined>(vms.length);
  let done = 0;
  let failed = 0;
  const halted = (): boolean => failed >= maxFailures || options.signal?.aborted === true;
  const one = async (index: number): Promise<void> => {
    const vm = vms[index] as string;
    options.onStart?.(vm);
    let item: RollingItemResult<R>;
    try {
      item = { vm, ok: true, result: await options.refresh(vm) };
    } catch (error) {
      item = { vm, ok: false, error: error instanceof Error ? error : new Error(String(error)) };
      failed++;
    }
    results[index] = item;
    done++;
    options.onEnd?.(item, done, vms.length);
  };
  const interval = options.batchIntervalMs ?? 0;
  if (interval > 0) {
    // A cancel ends the pause too: the job then ends at once, not after the interval (up to a day).
    const sleep = options.sleep ?? ((ms: number, signal?: AbortSignal) => delay(ms, undefined, signal === undefined ? {} : { signal }).catch((error: unknown) => {
      if ((error as Error).name !== 'AbortError') throw error;
    }));
    for (let first = 0; first < vms.length && !halted(); first += parallel) {
      if (first > 0) {
        options.onPause?.(interval, vms.length - first);
        await sleep(interval, options.signal);
        if (halted()) break;
      }
      await Promise.all(vms.slice(first, first + parallel).map((_, i) => one(first + i)));
    }
  } else {
    let next = 0;
    const worker = async (): Promise<void> => {
      while (!halted() && next < vms.length) await one(next++);
    };
    await Promise.all(Array.from({ length: Math.min(parallel, vms.length) }, worker));
  }
  return vms.map((vm, i) => results[i] ?? { vm, ok: false, skipped: true });
}
