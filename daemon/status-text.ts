// The one-line status vmkeepd sends to systemd (STATUS=, shown by `systemctl status vmkeepd`):
// how many VMs in which states, how many stale, which refresh jobs run. Recomputed after the
// events that change it, at most once per interval.
import type { DaemonEvent, UpgradeStatus, VmView } from './model.js';

export interface StatusFacts {
  states: string[];
  /** Stale VMs; undefined when not known (yet). */
  stale?: number;
  /** Refresh jobs still running, by id. */
  jobs: string[];
}

/** E.g. "12 VMs (10 running, 2 stopped), 2 stale, refresh job refresh-1a2b3c4d running" (pure). */
export function statusText(facts: StatusFacts): string {
  const counts = new Map<string, number>();
  for (const state of facts.states) counts.set(state, (counts.get(state) ?? 0) + 1);
  const n = facts.states.length;
  // By name of state: the same counts always read the same.
  const byState = [...counts].sort(([a], [b]) => (a < b ? -1 : 1)).map(([state, c]) => `${c} ${state}`);
  const parts = [n === 0 ? 'no VMs' : `${n} VM${n === 1 ? '' : 's'} (${byState.join(', ')})`];
  if (facts.stale !== undefined && facts.stale > 0) parts.push(`${facts.stale} stale`);
  if (facts.jobs.length > 0) parts.push(`refresh job${facts.jobs.length === 1 ? '' : 's'} ${facts.jobs.join(', ')} running`);
  return parts.join(', ');
}

export interface StatusSource {
  list(): Promise<VmView[]>;
  upgradeStatus(): Promise<UpgradeStatus>;
  subscribe(listener: (event: DaemonEvent) => void): () => void;
}

/**
 * Sends the status now and again after each event that may change it, at most once per
 * `intervalMs` (a refresh job's burst of events is one update), and only when the text changed.
 */
export function startStatusUpdates(source: StatusSource, send: (text: string) => void, intervalMs = 500): () => void {
  const jobs = new Set<string>();
  let last = '';
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const update = async (): Promise<void> => {
    const views = await source.list();
    // Staleness reads /proc (and may hash a binary): it fails alone, the rest is still told.
    const stale = await source.upgradeStatus().then((s) => s.vms.filter((v) => v.stale).length, () => undefined);
    const text = statusText({ states: views.map((v) => v.state), ...(stale === undefined ? {} : { stale }), jobs: [...jobs] });
    if (stopped || text === last) return;
    last = text;
    send(text);
  };
  const schedule = (): void => {
    if (stopped || timer !== undefined) return;
    timer = setTimeout(() => {
      timer = undefined;
      void update().catch(() => undefined);
    }, intervalMs);
    timer.unref();
  };
  const unsubscribe = source.subscribe((event) => {
    if (event.type === 'refresh' && event.job !== undefined) {
      if (event.step === 'job-done') jobs.delete(event.job);
      else jobs.add(event.job);
    }
    schedule();
  });
  void update().catch(() => undefined);
  return () => {
    stopped = true;
    clearTimeout(timer);
    unsubscribe();
  };
}
