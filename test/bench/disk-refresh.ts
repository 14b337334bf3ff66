// Benchmark 10: refresh by live migration of a VM whose guest writes to a 1 GiB qcow2 disk, side
// by side with the same VM without a disk, in the same run (vmkeepd in a private systemd, two
// installations a <-> b as in benchmark 6). The disk's image is passed as descriptors; the guest
// appends fsynced records (test/guest/build-guest.sh), so its write rate is read off its console.
import { readFileSync } from 'node:fs';
import { makeOverlayOnRaw, requireDiskTools } from '../support/disk-images.js';
import { waitForSerial, type GuestImage } from '../support/guest.js';
import { copiedInstallation, systemInstallation } from '../support/installations.js';
import { checkImage, lastWrote, waitForWrote } from '../support/records-check.js';
import { log, met, type Cleanup, type Row, type Section } from './common.js';
import { formatMs, median, percentile } from './stats.js';
import { bootUpgradeHost } from './upgrade-host.js';

const TITLE = '10. Refresh by live migration with a writing guest\'s disk';
const ROUNDS = 5;
const MEMORY_MIB = 128;
const DISK_MIB = 1024;
/** How long the write rate is sampled before and after each migration. */
const RATE_WINDOW_MS = 3_000;
const TARGET_DOWNTIME_MS = 50;
const TARGET_TOTAL_MS = 1500;

interface Sample {
  downtimeMs: number;
  totalMs: number;
  wallMs: number;
}

/** Records acknowledged per second over `ms`, counted on the console. */
async function writeRate(serialLog: string, ms: number): Promise<number> {
  const n0 = lastWrote(serialLog);
  const t0 = performance.now();
  await new Promise((resolve) => setTimeout(resolve, ms));
  return (lastWrote(serialLog) - n0) / ((performance.now() - t0) / 1000);
}

export async function benchDiskRefresh(ctx: { guest: GuestImage; cleanup: Cleanup }): Promise<Section> {
  requireDiskTools();
  const host = await bootUpgradeHost(ctx.cleanup, 'disk', async (dir) => [systemInstallation('a'), await copiedInstallation('b', dir)]);
  const { daemon, api } = host;

  const { overlay } = makeOverlayOnRaw(host.dir, DISK_MIB, 'bench');
  const base = { kernel: ctx.guest.kernel, initrd: ctx.guest.initrd, append: ctx.guest.append, memoryMiB: MEMORY_MIB };
  await api.create({ name: 'disk', ...base, disks: [{ path: overlay, format: 'qcow2' }] });
  await api.create({ name: 'nodisk', ...base });
  await waitForSerial(daemon.serialLog('nodisk'), 'GUEST READY', 180_000);
  const diskLog = daemon.serialLog('disk');
  await waitForWrote(diskLog, 20, 180_000);

  const samples = new Map<string, Sample[]>([['disk', []], ['nodisk', []]]);
  const rates = { before: [] as number[], during: [] as number[], after: [] as number[] };
  for (let round = 0; round < ROUNDS; round++) {
    await host.makeCurrent(host.current === 'a' ? 'b' : 'a');
    // The two VMs alternate which goes first, so neither always follows the daemon's restart.
    const order = round % 2 === 0 ? ['disk', 'nodisk'] : ['nodisk', 'disk'];
    for (const name of order) {
      if (name === 'disk') rates.before.push(await writeRate(diskLog, RATE_WINDOW_MS));
      const n0 = lastWrote(diskLog);
      const t0 = performance.now();
      const outcome = await api.refresh(name, { strategy: 'migrate' });
      const wallMs = performance.now() - t0;
      if (outcome.result !== 'migrated' || typeof outcome.downtimeMs !== 'number') {
        throw new Error(`refresh of ${name} in round ${round + 1} did not migrate: ${JSON.stringify(outcome)}`);
      }
      samples.get(name)?.push({ downtimeMs: outcome.downtimeMs, totalMs: outcome.totalMs, wallMs });
      if (name === 'disk') {
        rates.during.push((lastWrote(diskLog) - n0) / (wallMs / 1000));
        rates.after.push(await writeRate(diskLog, RATE_WINDOW_MS));
      }
    }
    log(`disk refresh: round ${round + 1}: downtime disk ${samples.get('disk')?.at(-1)?.downtimeMs} ms, no disk ${samples.get('nodisk')?.at(-1)?.downtimeMs} ms; ` +
      `writes/s before ${rates.before.at(-1)?.toFixed(0)}, during ${rates.during.at(-1)?.toFixed(0)}, after ${rates.after.at(-1)?.toFixed(0)}`);
  }

  // Nothing the guest acknowledged was lost on the way.
  await api.stop('disk').catch((error: unknown) => {
    const tail = readFileSync(diskLog, 'utf8').split('\n').filter((line) => !line.includes('GUEST WROTE')).slice(-10).join('\n');
    throw new Error(`${(error as Error).message}; last console lines other than GUEST WROTE (last ${lastWrote(diskLog)}):\n${tail}`, { cause: error });
  });
  const printed = lastWrote(diskLog);
  const verdict = checkImage(overlay, 'qcow2', printed);
  if (!verdict.ok) throw new Error(`the disk VM lost records across the migrations: ${verdict.problems.join('; ')}`);
  await host.end();

  const of = (name: string, key: keyof Sample): number[] => (samples.get(name) ?? []).map((s) => s[key]).filter((ms) => key !== 'downtimeMs' || ms > 0);
  const rows: Row[] = [];
  for (const [name, label] of [['disk', `with a ${DISK_MIB / 1024} GiB qcow2 disk, guest writing`], ['nodisk', 'the same VM without a disk']] as const) {
    const down = of(name, 'downtimeMs');
    const total = of(name, 'totalMs');
    rows.push(
      {
        what: `guest downtime per migration, ${label}`, n: down.length, median: formatMs(median(down)), p99: formatMs(percentile(down, 0.99)),
        target: `median < ${TARGET_DOWNTIME_MS} ms`, met: met(median(down) < TARGET_DOWNTIME_MS),
      },
      {
        what: `refresh total (outcome.totalMs), ${label}`, n: total.length, median: formatMs(median(total)), p99: formatMs(percentile(total, 0.99)),
        target: `< ${TARGET_TOTAL_MS / 1000} s`, met: met(median(total) < TARGET_TOTAL_MS),
      },
    );
  }
  const perSecond = (xs: number[]): string => `${median(xs).toFixed(1)}/s`;
  rows.push(
    { what: `guest's fsynced writes per second, ${RATE_WINDOW_MS / 1000} s before the migration`, n: rates.before.length, median: perSecond(rates.before), p99: '—', target: '', met: '—' },
    { what: 'guest\'s fsynced writes per second during the refresh call', n: rates.during.length, median: perSecond(rates.during), p99: '—', target: '', met: '—' },
    { what: `guest's fsynced writes per second, ${RATE_WINDOW_MS / 1000} s after the migration`, n: rates.after.length, median: perSecond(rates.after), p99: '—', target: '', met: '—' },
  );
  const list = (xs: number[]): string => xs.map((x) => Math.round(x)).join(', ');
  const notes = [
    `vmkeepd as a service in a private systemd with installations "a" (the system QEMU 7.2) and "b" (a copy at another path); ${ROUNDS} rounds, ` +
      'each switching the current installation and restarting the service (not timed), then migrating both VMs, in alternating order. ' +
      `Both guests: ${MEMORY_MIB} MiB, TCG. The disk is a ${DISK_MIB} MiB qcow2 overlay over a raw ext4 base, passed to QEMU as descriptors ` +
      '(fdsets); its guest appends a 64-byte record, fsyncs it and prints GUEST WROTE n, as fast as it can, throughout.',
    `Per migration (ms), with disk: downtime ${list(of('disk', 'downtimeMs'))}, total ${list(of('disk', 'totalMs'))}; ` +
      `without: downtime ${list(of('nodisk', 'downtimeMs'))}, total ${list(of('nodisk', 'totalMs'))}. Downtimes of 0 ms (QEMU 7.2 asked too early) are left out.`,
    `Write rates are counted on the guest's console from the host (acknowledged records per second); "during" spans the refresh API call. ` +
      `Per round before/during/after: ${rates.before.map((r, i) => `${r.toFixed(0)}/${(rates.during[i] ?? 0).toFixed(0)}/${(rates.after[i] ?? 0).toFixed(0)}`).join(', ')}. ` +
      `Afterwards the VM was stopped and the checker found all ${printed} acknowledged records on the disk, e2fsck clean.` +
      (rates.after.some((r) => r === 0) ? ' A window of 0/s after a migration means the guest\'s writes stalled for at least that long.' : ''),
  ];
  return { title: TITLE, rows, notes };
}
