// Benchmark 7: the refresh strategies on a real QEMU upgrade. vmkeepd runs as a service in a
// private systemd with three installations: "a" Debian's QEMU 7.2, "b" QEMU 10.0 from
// bookworm-backports, "b2" a copy of b at another path (a same-version rebuild). Rows, same run,
// same guest size: migrate 7.2 -> 10.0, migrate 10.0 -> 10.0, cpr 10.0 -> 10.0 (and cpr with a
// bigger guest), each with its total time, the guest's downtime and the extra host memory the
// refresh took (peak of the summed Pss of the VM's QEMUs, over the value before it).
import type { ApiClient, RefreshOutcome } from '../../daemon/index.js';
import { waitForSerial, type GuestImage } from '../support/guest.js';
import { backportsInstallation, copiedInstallation, systemInstallation } from '../support/installations.js';
import { peakMemoryGrowth } from '../support/qemu-procs.js';
import { log, met, type Cleanup, type Row, type Section } from './common.js';
import { formatMs, median } from './stats.js';
import { bootUpgradeHost } from './upgrade-host.js';

const TITLE = '7. Refresh strategies on a real upgrade (QEMU 7.2 -> 10.0, cpr-transfer)';
/** Samples per strategy; the machine is shared, so the runs stay short. */
const SAMPLES = 3;
const RAM_MIB = 1024;
const BIG_RAM_MIB = 4096;
/** Guest RAM written with non-zero data before READY: what a migration has to copy. */
const FILL_MIB = 384;
const BOOT_TIMEOUT_MS = 240_000;
const TARGET_CPR_TOTAL_MS = 150;
const TARGET_CPR_EXTRA = 0.1;

interface Sample {
  outcome: RefreshOutcome;
  extraMiB: number;
}

async function refreshMeasured(api: ApiClient, dir: string, name: string, strategy: 'migrate' | 'cpr', to: string): Promise<Sample> {
  const { result, growthMiB } = await peakMemoryGrowth(name, dir, () => api.refresh(name, { strategy }));
  if (result.result !== 'migrated' || result.strategy !== strategy || result.to?.installation !== to || result.downtimeMs === undefined) {
    throw new Error(`refresh of ${name} by ${strategy} did not move it onto "${to}": ${JSON.stringify(result)}`);
  }
  return { outcome: result, extraMiB: growthMiB };
}

function rowsOf(label: string, samples: Sample[], ramMiB: number, targets: { total?: number; extra?: number } = {}): Row[] {
  const qemuTotal = samples.map((s) => s.outcome.migrationMs ?? 0);
  const wall = samples.map((s) => s.outcome.totalMs);
  const down = samples.map((s) => s.outcome.downtimeMs ?? 0);
  const extra = samples.map((s) => s.extraMiB);
  const extraShare = median(extra) / ramMiB;
  return [
    {
      what: `${label}: total (QEMU's total-time)`, n: samples.length, median: formatMs(median(qemuTotal)), p99: '—',
      target: targets.total === undefined ? '' : `< ${targets.total} ms`, met: targets.total === undefined ? '—' : met(median(qemuTotal) < targets.total),
    },
    { what: `${label}: whole refresh as vmkeepd measures it (outcome.totalMs)`, n: samples.length, median: formatMs(median(wall)), p99: '—', target: '', met: '—' },
    { what: `${label}: guest downtime`, n: samples.length, median: formatMs(median(down)), p99: '—', target: '', met: '—' },
    {
      what: `${label}: extra host memory during the refresh`, n: samples.length,
      median: `${median(extra).toFixed(0)} MiB (${(extraShare * 100).toFixed(1)}% of RAM)`, p99: '—',
      target: targets.extra === undefined ? '' : `< ${targets.extra * 100}% of guest RAM`, met: targets.extra === undefined ? '—' : met(extraShare < targets.extra),
    },
  ];
}

export async function benchStrategies(ctx: { guest: GuestImage; cleanup: Cleanup }): Promise<Section> {
  const host = await bootUpgradeHost(ctx.cleanup, 'strategies', async (dir) => {
    const b = await backportsInstallation('b');
    return [systemInstallation('a'), b, await copiedInstallation('b2', dir, b)];
  });
  const { daemon, api } = host;
  const spec = (name: string, ramMiB = RAM_MIB): Record<string, unknown> => ({
    name, kernel: ctx.guest.kernel, initrd: ctx.guest.initrd, append: `${ctx.guest.append} vmkeep.fill_mib=${FILL_MIB}`, memoryMiB: ramMiB,
  });

  // Guests on 7.2 (one per sample: a VM never goes back from 10.0), then on 10.0.
  const old = Array.from({ length: SAMPLES }, (_, i) => `old${i}`);
  const bootStart = performance.now();
  await Promise.all(old.map((name) => api.create(spec(name))));
  await host.makeCurrent('b');
  await Promise.all([api.create(spec('mig')), api.create(spec('cpr')), api.create(spec('big', BIG_RAM_MIB))]);
  const all = [...old, 'mig', 'cpr', 'big'];
  await Promise.all(all.map((name) => waitForSerial(daemon.serialLog(name), 'GUEST READY', BOOT_TIMEOUT_MS)));
  log(`strategies: ${all.length} guests booted with ${FILL_MIB} MiB written in ${formatMs(performance.now() - bootStart)}`);
  for (const name of ['mig', 'cpr', 'big']) {
    const memory = (await api.get(name)).spec.memory?.backend;
    if (memory !== 'memfd-shared') throw new Error(`${name} was created on QEMU 10.0 without memfd-shared RAM (${String(memory)})`);
  }

  const migrate72: Sample[] = [];
  for (const name of old) migrate72.push(await refreshMeasured(api, daemon.dir, name, 'migrate', 'b'));
  log(`strategies: migrate 7.2 -> 10.0 done`);

  // 10.0 -> 10.0: each "upgrade" switches b <-> b2; migrate and cpr alternate within a round.
  const migrate10: Sample[] = [];
  const cpr10: Sample[] = [];
  const cprBig: Sample[] = [];
  for (let round = 0; round < SAMPLES; round++) {
    const current = host.current === 'b' ? 'b2' : 'b';
    await host.makeCurrent(current);
    const order = round % 2 === 0 ? (['mig', 'cpr'] as const) : (['cpr', 'mig'] as const);
    for (const name of order) (name === 'mig' ? migrate10 : cpr10).push(await refreshMeasured(api, daemon.dir, name, name === 'mig' ? 'migrate' : 'cpr', current));
    cprBig.push(await refreshMeasured(api, daemon.dir, 'big', 'cpr', current));
    log(`strategies: round ${round + 1}: migrate ${migrate10.at(-1)?.outcome.migrationMs} ms, cpr ${cpr10.at(-1)?.outcome.migrationMs} ms`);
  }
  const running = (await api.list()).filter((vm) => vm.state === 'running').length;
  if (running !== all.length) throw new Error(`after the refreshes ${running} of ${all.length} VMs run`);
  await host.end();

  const fmt = (samples: Sample[]): string => samples.map((s) => `${s.outcome.migrationMs}/${s.outcome.downtimeMs}/${s.extraMiB.toFixed(0)}`).join(', ');
  const rows: Row[] = [
    ...rowsOf(`migrate 7.2 -> 10.0, ${RAM_MIB} MiB`, migrate72, RAM_MIB),
    ...rowsOf(`migrate 10.0 -> 10.0, ${RAM_MIB} MiB`, migrate10, RAM_MIB),
    ...rowsOf(`cpr 10.0 -> 10.0, ${RAM_MIB} MiB`, cpr10, RAM_MIB, { total: TARGET_CPR_TOTAL_MS, extra: TARGET_CPR_EXTRA }),
    ...rowsOf(`cpr 10.0 -> 10.0, ${BIG_RAM_MIB} MiB`, cprBig, BIG_RAM_MIB, { total: TARGET_CPR_TOTAL_MS, extra: TARGET_CPR_EXTRA }),
  ];
  const notes = [
    `vmkeepd as a service in a private systemd with three installations: "a" Debian's QEMU 7.2, "b" QEMU 10.0 from bookworm-backports ` +
      '(test/support/fetch-qemu-backports.sh), "b2" a copy of b at another path. Tiny guests (TCG, 1 vCPU) that write ' +
      `${FILL_MIB} MiB of non-zero data into their RAM before READY (kernel option vmkeep.fill_mib). ${SAMPLES} VMs created on 7.2 ` +
      '(anonymous RAM) each migrate once onto 10.0; on 10.0 (memfd-shared RAM, the default there) one VM is migrated and one handed ' +
      `over by cpr each round, alternating which goes first, while the installation switches b <-> b2; a ${BIG_RAM_MIB} MiB guest is handed over by cpr in each round too.`,
    'Total is QEMU\'s own total-time (query-migrate on the source); the whole refresh adds the destination\'s start, its scope, the ' +
      'record switch and the old QEMU\'s exit. Extra host memory is the peak, during the refresh, of the summed Pss ' +
      '(/proc/PID/smaps_rollup) of every QEMU of the VM, over that sum just before: Pss counts a page two QEMUs share (the memfd) once.',
    `Per sample (total ms / downtime ms / extra MiB): migrate 7.2 -> 10.0: ${fmt(migrate72)}; migrate 10.0 -> 10.0: ${fmt(migrate10)}; ` +
      `cpr ${RAM_MIB} MiB: ${fmt(cpr10)}; cpr ${BIG_RAM_MIB} MiB: ${fmt(cprBig)}.`,
  ];
  return { title: TITLE, rows, notes };
}
