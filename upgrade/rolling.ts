/** One VM's outcome in a rolling refresh. */
export interface RollingItemResult<R> {
  vm: string;
  ok: boolean;
  result?: R;
  error?: Error;
  /** Not tried: an earlier VM failed and stopOnError was set, or the signal aborted. */
  skipped?: boolean;
}

export interface RollingOptions<R> {
  vms: readonly string[];
  /** At most this many VMs are refreshed at once (>= 1). */
  parallel: number;
  stopOnError: boolean;
  /** Once aborted, no new VM is begun (those in flight finish); the rest are reported skipped. */
  signal?: AbortSignal;
  refresh: (vm: string) => Promise<R>;
  /** Called as each VM starts and ends, in that order per VM. */
  onStart?: (vm: string) => void;
  onEnd?: (item: RollingItemResult<R>, done: number, total: number) => void;
}

/**
 * Refreshes VMs `parallel` at a time, in the given order. A failed VM does not stop the
 * others unless stopOnError: then no new VM is begun (those in flight finish) and the rest are
 * reported skipped. Resolves with one result per VM, in the given order; never rejects.
 */
export async function runRolling<R>(options: RollingOptions<R>): Promise<RollingItemResult<R>[]> {
  const { vms } = options;
  const parallel = Number.isFinite(options.parallel) ? Math.max(1, Math.floor(options.parallel)) : 1;
  const results = new Array<RollingItemResult<R> | undefined>(vms.length);
  let next = 0;
  let done = 0;
  let halted = false;
  const worker = async (): Promise<void> => {
    while (!halted && options.signal?.aborted !== true && next < vms.length) {
      const index = next++;
      const vm = vms[index] as string;
      options.onStart?.(vm);
      let item: RollingItemResult<R>;
      try {
        item = { vm, ok: true, result: await options.refresh(vm) };
      } catch (error) {
        item = { vm, ok: false, error: error instanceof Error ? error : new Error(String(error)) };
        if (options.stopOnError) halted = true;
      }
      results[index] = item;
      done++;
      options.onEnd?.(item, done, vms.length);
    }
  };
  await Promise.all(Array.from({ length: Math.min(parallel, vms.length) }, worker));
  return vms.map((vm, i) => results[i] ?? { vm, ok: false, skipped: true });
}
