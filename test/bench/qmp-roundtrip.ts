// Benchmark 1: sequential query-status round trips to a real, paused QEMU.
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { launchVm, probeInstallation, validateSpec, waitForProcessExit } from '../../launcher/index.js';
import type { GuestImage } from '../support/guest.js';
import { log, met, systemInstallation, type Cleanup, type Section } from './common.js';
import { formatMs, median, percentile } from './stats.js';

const WARMUP = 50;
const CALLS = 5000;
const TARGET_MEDIAN_MS = 0.3;

export async function benchQmpRoundTrip(ctx: { guest: GuestImage; workDir: string; cleanup: Cleanup }): Promise<Section> {
  const installation = systemInstallation();
  const info = await probeInstallation(installation, { cacheDir: join(ctx.workDir, 'cache') });
  const spec = validateSpec({ name: 'bench-qmp', kernel: ctx.guest.kernel, initrd: ctx.guest.initrd, append: ctx.guest.append });
  const dir = ctx.workDir;
  const vm = await launchVm({
    spec,
    uuid: randomUUID(),
    installation,
    info,
    stayPaused: true,
    paths: { qmpSocket: join(dir, 'qmp-bench.sock'), serialLog: join(dir, 'qmp-bench.serial'), stderrLog: join(dir, 'qmp-bench.log') },
  });
  const forget = ctx.cleanup.trackQemu(vm.pid, vm.startTime);
  const samples: number[] = [];
  try {
    log(`QMP: paused QEMU pid ${vm.pid}; ${WARMUP} warm-up calls, then ${CALLS} timed query-status calls`);
    for (let i = 0; i < WARMUP; i++) await vm.qmp.queryStatus();
    for (let i = 0; i < CALLS; i++) {
      const t0 = performance.now();
      await vm.qmp.queryStatus();
      samples.push(performance.now() - t0);
    }
    await vm.qmp.quit();
    await waitForProcessExit(vm.pid, vm.startTime, 10_000);
  } finally {
    vm.qmp.close();
    await forget();
  }
  const med = median(samples);
  log(`QMP: median ${formatMs(med)}, p99 ${formatMs(percentile(samples, 0.99))}`);
  return {
    title: '1. QMP round trip',
    rows: [{
      what: 'query-status round trip, sequential (QmpClient over the unix socket)',
      n: samples.length,
      median: formatMs(med),
      p99: formatMs(percentile(samples, 0.99)),
      target: `median < ${TARGET_MEDIAN_MS} ms`,
      met: met(med < TARGET_MEDIAN_MS),
    }],
    notes: [
      `A real QEMU ${info.version} started paused (-S) with launchVm; ${WARMUP} untimed warm-up calls first. ` +
        'Each sample is one awaited execute: write, QEMU main loop, reply parsed and matched by id.',
    ],
  };
}
