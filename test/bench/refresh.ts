// Benchmark 6: refresh by live migration after a package upgrade. vmkeepd runs as a service in a
// private systemd with two installations, "a" (the system QEMU) and "b" (a copy at another path
// with its own modules), as in test/integration/upgrade-e2e.test.ts. Each "upgrade" switches the
// current installation a <-> b and restarts the service (not timed): every VM is then stale.
import type { ApiClient, DaemonEvent, RefreshJob } from '../../daemon/index.js';
import { waitForSerial, type GuestImage } from '../support/guest.js';
import { copiedInstallation, systemInstallation } from '../support/installations.js';
import { log, met, type Cleanup, type Row, type Section } from './common.js';
import { formatMs, median, percentile } from './stats.js';
import { bootUpgradeHost } from './upgrade-host.js';

const TITLE = '6. Refresh by live migration';
const VMS = 10;
const MEMORY_MIB = 128;
/** Rounds of single refreshes; each migrates every VM once, so VMS samples per round. */
const SINGLE_ROUNDS = 3;
/** Rolling runs per variant, alternating parallel 1 and 2. */
const ROLLING_REPEATS = 3;
const BOOT_TIMEOUT_MS = 180_000;
const JOB_TIMEOUT_MS = 180_000;
const TARGET_DOWNTIME_MS = 50;
const TARGET_TOTAL_MS = 1500;
const TARGET_ROLLING_P2_MS = 10_000;

/** Runs one rolling refresh of all VMs; the wall time is from the request to its job-done event. */
async function timedRollingRefresh(api: ApiClient, parallel: number): Promise<{ ms: number; job: RefreshJob }> {
  const abort = new AbortController();
  let jobId: string | undefined;
  const finished = new Set<string>();
  let onDone: (() => void) | undefined;
  let onFail: ((error: Error) => void) | undefined;
  const done = new Promise<void>((resolve, reject) => {
    onDone = resolve;
    onFail = reject;
  });
  done.catch(() => undefined);
  let opened: (() => void) | undefined;
  const open = new Promise<void>((resolve) => {
    opened = resolve;
  });
  const stream = api.events(
    (event: DaemonEvent) => {
      if (event.type !== 'refresh' || event.step !== 'job-done' || event.job === undefined) return;
      // job-done may arrive before startRefreshJob's answer: kept until the id is known.
      finished.add(event.job);
      if (event.job === jobId) onDone?.();
    },
    { signal: abort.signal, onOpen: () => opened?.() },
  );
  stream.then(
    () => onFail?.(new Error('the event stream ended before job-done')),
    (error: unknown) => onFail?.(new Error(`the event stream failed before job-done: ${(error as Error).message}`)),
  );
  let timer: NodeJS.Timeout | undefined;
  try {
    // Subscribed before the job begins, so its job-done cannot be missed.
    await Promise.race([open, done]);
    const t0 = performance.now();
    const started = await api.startRefreshJob({ all: true, strategy: 'migrate', parallel });
    jobId = started.id;
    if (finished.has(jobId)) onDone?.();
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${JOB_TIMEOUT_MS} ms waiting for job-done of refresh job ${started.id} (parallel ${parallel})`)), JOB_TIMEOUT_MS);
    });
    await Promise.race([done, timeout]);
    const ms = performance.now() - t0;
    return { ms, job: (await api.finished(started)).result as RefreshJob };
  } finally {
    clearTimeout(timer);
    abort.abort();
    await stream.catch(() => undefined);
  }
}

/** Every VM runs on `installation` and is running (the guest was not lost on the way). */
async function expectAllOn(api: ApiClient, installation: string, after: string): Promise<void> {
  const vms = await api.list();
  const wrong = vms.filter((v) => v.state !== 'running' || v.installation !== installation);
  if (vms.length !== VMS || wrong.length > 0) {
    throw new Error(`after ${after} expected ${VMS} VMs running on "${installation}", got ${JSON.stringify(vms.map((v) => [v.name, v.state, v.installation]))}`);
  }
}

function fmtList(samples: readonly number[]): string {
  return samples.map((ms) => Math.round(ms)).join(', ');
}

export async function benchRefresh(ctx: { guest: GuestImage; cleanup: Cleanup }): Promise<Section> {
  const upgrader = await bootUpgradeHost(ctx.cleanup, 'refresh', async (dir) => [systemInstallation('a'), await copiedInstallation('b', dir)]);
  const { daemon, api } = upgrader;
  /** The package upgrade: the other installation becomes current, which every VM runs after a complete refresh. */
  const flip = (): Promise<void> => upgrader.makeCurrent(upgrader.current === 'a' ? 'b' : 'a');

  // All guests boot at once, once, and are reused by every measurement.
  const names = Array.from({ length: VMS }, (_, i) => `m${i}`);
  const bootStart = performance.now();
  await Promise.all(names.map((name) => api.create({ name, kernel: ctx.guest.kernel, initrd: ctx.guest.initrd, append: ctx.guest.append, memoryMiB: MEMORY_MIB })));
  await Promise.all(names.map((name) => waitForSerial(daemon.serialLog(name), 'GUEST READY', BOOT_TIMEOUT_MS)));
  const bootMs = performance.now() - bootStart;
  log(`refresh: ${VMS} guests booted in ${formatMs(bootMs)}`);

  // 1. One VM at a time through POST /1.0/vms/NAME/refresh.
  const wallMs: number[] = [];
  const totalMs: number[] = [];
  const downtimeMs: number[] = [];
  let zeroDowntimes = 0;
  for (let round = 0; round < SINGLE_ROUNDS; round++) {
    await flip();
    for (const name of names) {
      const t0 = performance.now();
      const outcome = await api.refresh(name, { strategy: 'migrate' });
      const wall = performance.now() - t0;
      if (outcome.result !== 'migrated' || outcome.to?.installation !== upgrader.current || typeof outcome.downtimeMs !== 'number') {
        throw new Error(`refresh of ${name} in round ${round + 1} did not migrate onto "${upgrader.current}": ${JSON.stringify(outcome)}`);
      }
      wallMs.push(wall);
      totalMs.push(outcome.totalMs);
      // 0 is not a measurement: QEMU 7.2 answers query-migrate with downtime 0 (and total-time
      // 0) when asked between its "completed" event and its own bookkeeping of the times.
      if (outcome.downtimeMs > 0) downtimeMs.push(outcome.downtimeMs);
      else zeroDowntimes++;
    }
    await expectAllOn(api, upgrader.current, `single-refresh round ${round + 1}`);
    log(`refresh: single round ${round + 1}: median wall ${formatMs(median(wallMs))}, downtime ${formatMs(median(downtimeMs))}`);
  }

  // 2. Rolling refresh of all VMs, the variants alternating.
  const rolling = new Map<number, number[]>([[1, []], [2, []]]);
  const order: number[] = [];
  for (let r = 0; r < ROLLING_REPEATS; r++) order.push(1, 2);
  const perRun: string[] = [];
  for (const parallel of order) {
    await flip();
    const { ms, job } = await timedRollingRefresh(api, parallel);
    const bad = job.results.filter((x) => !x.ok || x.outcome?.result !== 'migrated');
    // Not job.state: the results are filled in before job-done, the state may follow later.
    if (job.results.length !== VMS || bad.length > 0) {
      throw new Error(`rolling refresh at parallel ${parallel} did not migrate all ${VMS} VMs: ${JSON.stringify(job.results.map((x) => [x.vm, x.outcome?.result ?? x.error?.message]))}`);
    }
    await expectAllOn(api, upgrader.current, `the rolling refresh at parallel ${parallel}`);
    rolling.get(parallel)?.push(ms);
    perRun.push(`p${parallel} ${(ms / 1000).toFixed(2)} s`);
    log(`refresh: rolling ${VMS} VMs at parallel ${parallel}: ${formatMs(ms)}`);
  }
  // Done: the guests stop taking CPU from what runs next (on failure, the registry ends them).
  await upgrader.end();
  const p1 = rolling.get(1) ?? [];
  const p2 = rolling.get(2) ?? [];
  const ratio = median(p1) / median(p2);

  const tail = (samples: number[]): string => formatMs(percentile(samples, 0.99));
  const rows: Row[] = [
    {
      what: 'guest downtime per migration (QEMU\'s `downtime` from query-migrate)',
      n: downtimeMs.length, median: formatMs(median(downtimeMs)), p99: tail(downtimeMs),
      target: `median < ${TARGET_DOWNTIME_MS} ms`, met: met(median(downtimeMs) < TARGET_DOWNTIME_MS),
    },
    {
      what: 'refresh of one VM, wall time of the API call (`api.refresh(name, {strategy: "migrate"})`)',
      n: wallMs.length, median: formatMs(median(wallMs)), p99: tail(wallMs),
      target: `< ${TARGET_TOTAL_MS / 1000} s per VM`, met: met(median(wallMs) < TARGET_TOTAL_MS),
    },
    {
      what: 'the same, as the daemon measures it (outcome.totalMs)',
      n: totalMs.length, median: formatMs(median(totalMs)), p99: tail(totalMs), target: '', met: '—',
    },
    {
      what: `rolling refresh of ${VMS} VMs, --parallel 1 (request to job-done event)`,
      n: p1.length, median: formatMs(median(p1)), p99: '—', target: '', met: '—',
    },
    {
      what: `rolling refresh of ${VMS} VMs, --parallel 2 (request to job-done event)`,
      n: p2.length, median: formatMs(median(p2)), p99: '—',
      target: `< ${TARGET_ROLLING_P2_MS / 1000} s`, met: met(median(p2) < TARGET_ROLLING_P2_MS),
    },
    {
      what: 'ratio parallel 1 / parallel 2 (medians, same run)',
      n: Math.min(p1.length, p2.length), median: `${ratio.toFixed(2)}×`, p99: '—', target: '', met: '—',
    },
  ];
  const notes = [
    `vmkeepd as a service in a private systemd (test/support/daemon-host.ts) with two installations, as in test/integration/upgrade-e2e.test.ts: ` +
      `"a" the system QEMU, "b" a copy at another path with its own module folder. ${VMS} tiny guests (${MEMORY_MIB} MiB, TCG) booted at once ` +
      `(${(bootMs / 1000).toFixed(1)} s to GUEST READY on every serial console) and reused throughout. Before each round or run the "package upgrade" ` +
      'switches the current installation a <-> b and restarts the service (not timed), so every VM is stale; each result is checked ' +
      '(outcome `migrated` onto the new current installation, every VM running there afterwards).',
    `Single refreshes: ${SINGLE_ROUNDS} rounds, each migrating the ${VMS} VMs one after another while the other guests keep running. ` +
      'The wall time includes the HTTP round trip, the installation probe (cached), the destination QEMU and its scope, the migration, ' +
      'the record switch and the old QEMU\'s exit. The p99 column is the nearest-rank p99, i.e. the maximum at this n. ' +
      `Per migration (ms): wall ${fmtList(wallMs)}; downtime ${fmtList(downtimeMs)}.` +
      (zeroDowntimes === 0 ? '' : ` ${zeroDowntimes} of ${wallMs.length} migration(s) reported a downtime of 0 ms, left out of the downtime row: ` +
        'QEMU 7.2 answers query-migrate with downtime and total-time 0 when asked right after its `completed` event, before it has computed them.'),
    `Rolling refresh: \`startRefreshJob({all: true, strategy: "migrate", parallel})\`, timed from the request until its \`job-done\` event ` +
      `on the event stream (subscribed before the request). Variants alternating, in this order: ${perRun.join(', ')}. ` +
      'On 2 CPUs with TCG guests, two migrations at once compete with each other and with the running guests for the cores.',
  ];
  return { title: TITLE, rows, notes };
}
