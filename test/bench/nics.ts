// Benchmark 11: what a live refresh costs a guest's open TCP connection. One VM with a bridge NIC
// (the bridge in a network namespace of the bench's own, as in test/integration/nics.test.ts),
// one connection to its echo service with a numbered line every 10 ms, and repeated migrate
// refreshes (the current installation switched a <-> c before each, with a restart of vmkeepd,
// not timed). Measured per migration: the longest time without an echo, and QEMU's downtime.
import { availableParallelism, loadavg } from 'node:os';
import { waitForSerial, type GuestImage } from '../support/guest.js';
import { copiedInstallation, systemInstallation } from '../support/installations.js';
import { EchoSession, LAB_BRIDGE, NetLab } from '../support/net-lab.js';
import { log, met, type Cleanup, type Section } from './common.js';
import { formatMs, median, percentile } from './stats.js';
import { bootUpgradeHost } from './upgrade-host.js';

const TITLE = '11. Network gap during a live refresh';
const MIGRATIONS = 12;
const TARGET_GAP_MS = 100;
const GUEST_IP = '10.77.0.21';

export async function benchNics(ctx: { guest: GuestImage; cleanup: Cleanup }): Promise<Section> {
  const lab = await NetLab.create(`vk-bench-nics-${process.pid}`);
  const removeLab = ctx.cleanup.add(`network namespace ${lab.name}`, () => lab.destroy());
  const host = await bootUpgradeHost(ctx.cleanup, 'nics', async (dir) => [systemInstallation('a'), await copiedInstallation('c', dir)], { netns: lab.path });
  const { daemon } = host;
  await daemon.api.create({
    name: 'net1', kernel: ctx.guest.kernel, initrd: ctx.guest.initrd, append: `${ctx.guest.append} vmkeep_ip=${GUEST_IP}/24`, memoryMiB: 128,
    nics: [{ mode: 'bridge', bridge: LAB_BRIDGE }],
  });
  await waitForSerial(daemon.serialLog('net1'), 'GUEST READY', 180_000);

  const session = EchoSession.open(lab, GUEST_IP, 7);
  const gaps: number[] = [];
  const downtimes: number[] = [];
  try {
    await session.waitForEchoes(20, 30_000, 'echoes before the first refresh');
    for (let i = 0; i < MIGRATIONS; i++) {
      await host.makeCurrent(host.current === 'a' ? 'c' : 'a');
      await session.waitForEchoes(10, 30_000, `echoes before refresh ${i + 1}`);
      const label = `m${i}`;
      session.mark(label);
      const outcome = await daemon.api.refresh('net1', { strategy: 'migrate' });
      if (outcome.result !== 'migrated') throw new Error(`refresh ${i + 1} did not migrate: ${JSON.stringify(outcome)}`);
      await session.waitForEchoes(30, 30_000, `echoes after refresh ${i + 1}`);
      session.endWindow();
      if (typeof outcome.downtimeMs === 'number' && outcome.downtimeMs > 0) downtimes.push(outcome.downtimeMs);
      log(`nics: migration ${i + 1}: downtime ${String(outcome.downtimeMs)} ms`);
    }
  } finally {
    const report = await session.stop();
    for (let i = 0; i < MIGRATIONS; i++) {
      const gap = report.gaps.get(`m${i}`);
      if (gap !== undefined) gaps.push(gap);
    }
    if (report.closed || report.wrong.length > 0 || report.echoed !== report.sent) {
      throw new Error(`the connection did not survive intact: closed ${report.closed}, ${report.sent} sent, ${report.echoed} echoed, wrong ${JSON.stringify(report.wrong)}`);
    }
    await host.end();
    await removeLab();
  }
  log(`nics: median gap ${formatMs(median(gaps))}, median downtime ${formatMs(median(downtimes))}`);
  return {
    title: TITLE,
    rows: [
      {
        what: 'longest time without an echo during a live refresh (one TCP connection, a line every 10 ms)',
        n: gaps.length, median: formatMs(median(gaps)), p99: formatMs(percentile(gaps, 0.99)),
        target: `median < ${TARGET_GAP_MS} ms`, met: met(median(gaps) < TARGET_GAP_MS),
      },
      {
        what: 'QEMU\'s reported downtime of the same migrations',
        n: downtimes.length, median: formatMs(median(downtimes)), p99: formatMs(percentile(downtimes, 0.99)), target: '', met: '—',
      },
    ],
    notes: [
      'One tiny guest (128 MiB, TCG) with a bridge NIC on a bridge in a network namespace of the bench\'s own; vmkeepd and its QEMUs run in that ' +
        'namespace. One TCP connection (TCP_NODELAY, as interactive protocols set it) to the guest\'s echo service (busybox nc) carries a numbered ' +
        'line every 10 ms; every echo is checked in order ' +
        'and none may be missing at the end. Before each refresh the current installation switches a <-> c (a copy of the system QEMU at another ' +
        'path) and vmkeepd restarts (not timed; the connection lives through it). The gap is the longest time between two echoes from the refresh ' +
        'request until 30 echoes after it. QEMU\'s downtime is the guest\'s pause; the gap is longer when a segment sent while the guest was paused ' +
        'was lost with the old TAP and TCP retransmits it.',
      'The window also holds the start of the new QEMU and the copy of guest RAM, when two TCG QEMUs compete for the CPUs: on a loaded machine ' +
        `the guest answers late then too (1-minute load average at the end of this run: ${loadavg()[0]?.toFixed(1) ?? '?'} on ${String(availableParallelism())} CPUs).`,
      `Per migration (ms): gap ${gaps.map((g) => Math.round(g)).join(', ')}; downtime ${downtimes.map((d) => Math.round(d)).join(', ')}.`,
    ],
  };
}
