// Benchmark 5: vmkeepd restarted as a service with N paused VMs: time to reattach all, and its RSS.
import { open, readFile, stat } from 'node:fs/promises';
import { DaemonHost, DAEMON_UNIT } from '../support/daemon-host.js';
import type { GuestImage } from '../support/guest.js';
import { log, met, waitUntil, type Cleanup, type Row, type Section } from './common.js';
import { formatMs, median } from './stats.js';

const RESTARTS = 7;
const TARGET_REATTACH_MS = 1000;
const TARGET_RSS_MB = 120;
const CREATE_CONCURRENCY = 2;
const WANTED = [1, 20, 100];
const FALLBACK_TOP = 50;

interface ReattachLine {
  vms: number;
  ms: number;
  states?: Record<string, number>;
}

/** The daemon's "reattached N VM(s)" log line written after byte `from` of the console log. */
async function reattachLineAfter(consoleLog: string, from: number): Promise<ReattachLine | undefined> {
  const handle = await open(consoleLog, 'r');
  let text: string;
  try {
    const { size } = await handle.stat();
    const buffer = Buffer.alloc(Math.max(0, size - from));
    await handle.read(buffer, 0, buffer.length, from);
    text = buffer.toString('utf8');
  } finally {
    await handle.close();
  }
  let found: ReattachLine | undefined;
  for (const line of text.split(/\r?\n/)) {
    const start = line.indexOf('{');
    if (start < 0 || !line.includes('reattached ')) continue;
    try {
      const entry = JSON.parse(line.slice(start)) as { msg?: string } & ReattachLine;
      if (entry.msg?.startsWith('reattached ') && typeof entry.ms === 'number') found = entry;
    } catch {
      // a console line that only looks like it
    }
  }
  return found;
}

/** VmRSS of the service's main process, in MB (10^6 bytes, as the target is stated). */
async function daemonRssMB(daemon: DaemonHost): Promise<number> {
  const mainPid = Number((await daemon.systemctl('show', '-p', 'MainPID', '--value', DAEMON_UNIT)).trim());
  const hostPid = daemon.host.hostPidOf(mainPid);
  if (hostPid === null) throw new Error(`no host PID for vmkeepd's MainPID ${mainPid}`);
  const kib = /^VmRSS:\s+(\d+) kB$/m.exec(await readFile(`/proc/${hostPid}/status`, 'utf8'))?.[1];
  if (kib === undefined) throw new Error(`no VmRSS in /proc/${hostPid}/status`);
  return (Number(kib) * 1024) / 1e6;
}

export async function benchReattach(ctx: { guest: GuestImage; cleanup: Cleanup; budgetMs: number }): Promise<Section> {
  const began = performance.now();
  const daemon = await DaemonHost.boot({ name: `benchd-${process.pid}` });
  // Shutting the private systemd down kills its whole pid namespace: every QEMU created here.
  ctx.cleanup.add(`vmkeepd host ${daemon.host.name}`, () => daemon.shutdown());

  let created = 0;
  const createMs: number[] = [];
  const createUpTo = async (n: number): Promise<void> => {
    const next = async (): Promise<void> => {
      while (created < n) {
        const name = `r${created++}`;
        const t0 = performance.now();
        await daemon.api.create({ name, kernel: ctx.guest.kernel, initrd: ctx.guest.initrd, append: ctx.guest.append, memoryMiB: 32 });
        // Paused at once, so 100 TCG guests do not compete for the 2 cores.
        await daemon.api.qmp(name, 'stop');
        createMs.push(performance.now() - t0);
      }
    };
    await Promise.all(Array.from({ length: CREATE_CONCURRENCY }, next));
    // The daemon records "paused" when QEMU's STOP event reaches it.
    let states: string[] = [];
    await waitUntil(`vmkeepd to list ${n} paused VMs`, 30_000, async () => {
      states = (await daemon.api.list()).map((v) => v.state);
      return states.length === n && states.every((s) => s === 'paused') ? true : undefined;
    }).catch((error: unknown) => {
      throw new Error(`${(error as Error).message}; it lists: ${JSON.stringify(states)}`);
    });
    log(`reattach: ${n} paused VMs (median create+stop ${formatMs(median(createMs))})`);
  };

  const rows: Row[] = [];
  const notes: string[] = [];
  const levels = [...WANTED];
  for (let li = 0; li < levels.length; li++) {
    const n = levels[li] ?? 0;
    if (n > created) {
      // Shrinks the top level if the creates left would not fit the time budget.
      const perVm = createMs.length > 0 ? median(createMs) / CREATE_CONCURRENCY : 0;
      const left = ctx.budgetMs - (performance.now() - began);
      if (li === levels.length - 1 && n > FALLBACK_TOP && perVm * (n - created) > left * 0.6) {
        notes.push(`Creating ${n} VMs would not fit the time budget (≈${Math.round(perVm)} ms per VM): measured up to N=${FALLBACK_TOP} instead.`);
        levels[li] = FALLBACK_TOP;
        li--;
        continue;
      }
      await createUpTo(n);
    }
    const reattachMs: number[] = [];
    const restartMs: number[] = [];
    for (let r = 0; r < RESTARTS; r++) {
      const from = (await stat(daemon.host.consoleLog)).size;
      const t0 = performance.now();
      await daemon.restart();
      restartMs.push(performance.now() - t0);
      const line = await reattachLineAfter(daemon.host.consoleLog, from);
      if (line === undefined) throw new Error(`no "reattached" line in the daemon's log after restart ${r + 1} at N=${n}`);
      if (line.vms !== n || line.states?.['paused'] !== n) {
        throw new Error(`after restart ${r + 1} at N=${n} the daemon reattached ${line.vms} VM(s), states ${JSON.stringify(line.states)}`);
      }
      reattachMs.push(line.ms);
    }
    const top = li === levels.length - 1;
    const rss = await daemonRssMB(daemon);
    log(`reattach: N=${n}: daemon-measured ${formatMs(median(reattachMs))}, systemctl restart ${formatMs(median(restartMs))}`);
    rows.push({
      what: `N=${n}: reattach all (daemon's own "reattached N VM(s)" ms)`,
      n: RESTARTS,
      median: formatMs(median(reattachMs)),
      p99: '—',
      target: top ? `100 VMs < ${TARGET_REATTACH_MS} ms` : '',
      met: top && n >= 100 ? met(median(reattachMs) < TARGET_REATTACH_MS) : '—',
    });
    rows.push({ what: `N=${n}: \`systemctl restart vmkeepd\` wall time (returns at READY)`, n: RESTARTS, median: formatMs(median(restartMs)), p99: '—', target: '', met: '—' });
    rows.push({
      what: `N=${n}: vmkeepd RSS after the last restart`,
      n: 1,
      median: `${rss.toFixed(1)} MB`,
      p99: '—',
      target: top ? `< ${TARGET_RSS_MB} MB at 100 VMs` : '',
      met: top && n >= 100 ? met(rss < TARGET_RSS_MB) : '—',
    });
  }
  notes.unshift(
    `vmkeepd as a Type=notify service in a private systemd (test/support/daemon-host.ts). VMs: the tiny guest with 32 MiB, ` +
      `created through the API ${CREATE_CONCURRENCY} at a time and paused at once with QMP \`stop\` (median create+stop ${formatMs(median(createMs))}). ` +
      `${RESTARTS} restarts per N; each checks that the log line reports N VMs, all paused. ` +
      'The wall time also includes stopping the old daemon, Node start-up and running systemctl through nsenter. ' +
      'RSS is VmRSS of the service\'s MainPID right after the last restart (MB = 10^6 bytes).',
  );
  return { title: '5. Reattach after a daemon restart', rows, notes };
}
