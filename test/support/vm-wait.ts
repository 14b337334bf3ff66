// Waiting on what vmkeepd reports, by its event stream: no polling, no sleeps.
import type { ApiClient, DaemonEvent, VmView } from '../../daemon/index.js';

/**
 * Resolves with the VM's view once `predicate` holds: checked now and after every event about
 * the VM. Rejects after `timeoutMs` naming what was awaited and the last view seen.
 */
export async function waitForVm(
  api: ApiClient,
  name: string,
  predicate: (vm: VmView) => boolean,
  what: string,
  timeoutMs = 60_000,
): Promise<VmView> {
  const controller = new AbortController();
  let last: VmView | undefined;
  try {
    return await new Promise<VmView>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${name}: ${what}; last seen: ${JSON.stringify(last)}`));
      }, timeoutMs);
      const check = (): void => {
        api.get(name).then((vm) => {
          last = vm;
          if (predicate(vm)) {
            clearTimeout(timer);
            resolve(vm);
          }
        }, () => undefined);
      };
      api.events((event) => {
        if (event.vm === name) check();
      }, { signal: controller.signal, onOpen: check }).catch((error: unknown) => {
        clearTimeout(timer);
        reject(new Error(`the event stream ended while waiting for ${name}: ${what}`, { cause: error }));
      });
    });
  } finally {
    controller.abort();
  }
}

/** Collects events (filtered by the daemon) from subscription on; `until` resolves on the first matching one. */
export async function subscribeEvents(api: ApiClient, filter: { type?: Array<DaemonEvent['type'] | 'vm'>; vm?: string[] }) {
  const events: DaemonEvent[] = [];
  const waiters: Array<{ test: (e: DaemonEvent) => boolean; resolve: () => void }> = [];
  const abort = new AbortController();
  let opened!: () => void;
  const open = new Promise<void>((resolve) => (opened = resolve));
  const stream = api.events((event) => {
    events.push(event);
    for (const w of waiters.splice(0)) (w.test(event) ? w.resolve() : waiters.push(w));
  }, { signal: abort.signal, onOpen: opened, filter });
  stream.catch(() => undefined);
  await Promise.race([open, stream]);
  return {
    events,
    until(test: (e: DaemonEvent) => boolean, what: string, timeoutMs = 120_000): Promise<void> {
      if (events.some(test)) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no event ${what} within ${timeoutMs} ms; got ${JSON.stringify(events.slice(-5))}`)), timeoutMs);
        waiters.push({ test, resolve: () => { clearTimeout(timer); resolve(); } });
      });
    },
    close: () => abort.abort(),
  };
}
