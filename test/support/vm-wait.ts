// Waiting on what vmkeepd reports, by its event stream: no polling, no sleeps.
import type { ApiClient, VmView } from '../../daemon/index.js';

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
