// `npm run bench`: runs every benchmark on real QEMU and a private systemd, prints progress on
// stderr and writes BENCHMARKS.md at the project root. Everything it starts is ended, even on
// failure or Ctrl-C. BENCH_ONLY=qmp,run,scope,start,reattach,refresh,strategies,faults,disks,nics runs a subset
// and updates only those sections of BENCHMARKS.md.
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureGuestImage, requireQemu } from '../support/guest.js';
import { projectRoot } from '../support/paths.js';
import type { SystemdHost } from '../support/systemd-host.js';
import { Cleanup, log, type Section } from './common.js';
import { benchDiskRefresh } from './disk-refresh.js';
import { benchFaults } from './faults.js';
import { benchNics } from './nics.js';
import { benchQmpRoundTrip } from './qmp-roundtrip.js';
import { benchReattach } from './reattach.js';
import { benchRefresh } from './refresh.js';
import { describeMachine, mergeReport, renderReport } from './report.js';
import { benchStrategies } from './strategies.js';
import { benchRunOverhead } from './run-overhead.js';
import { benchScopeCreation, benchStartWithScope, bootBenchHost } from './scopes.js';

// The whole bench should stay under about 6 minutes on a 2-core machine.
const TOTAL_BUDGET_MS = 6 * 60_000;
const ALL = ['qmp', 'run', 'scope', 'start', 'reattach', 'refresh', 'strategies', 'faults', 'disks', 'nics'] as const;
type Name = (typeof ALL)[number];

async function main(): Promise<number> {
  const started = performance.now();
  const only = process.env['BENCH_ONLY']?.split(',').map((s) => s.trim());
  const wanted = (name: Name): boolean => only === undefined || only.includes(name);
  const cleanup = new Cleanup();
  let interrupted = false;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (interrupted) return;
    interrupted = true;
    log(`${signal}: cleaning up`);
    void cleanup.runAll().finally(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const sections: Section[] = [];
  let failed = 0;
  const attempt = async (title: string, run: () => Promise<Section | Section[]>): Promise<void> => {
    try {
      const result = await run();
      sections.push(...(Array.isArray(result) ? result : [result]));
    } catch (error) {
      failed++;
      log(`${title} FAILED: ${(error as Error).stack ?? String(error)}`);
      sections.push({ title, rows: [], notes: [`**FAILED**: ${(error as Error).message.split('\n')[0] ?? ''}`] });
    }
  };

  const qemu = requireQemu();
  const workDir = await mkdtemp(join(tmpdir(), 'vmkeep-bench-'));
  cleanup.add(`work folder ${workDir}`, () => rm(workDir, { recursive: true, force: true }));
  try {
    log('building or reusing the tiny guest image');
    const guest = await ensureGuestImage();
    const ctx = { guest, workDir, cleanup };
    if (wanted('qmp')) await attempt('1. QMP round trip', () => benchQmpRoundTrip(ctx));
    if (wanted('run')) await attempt('2. `vmkeep run` overhead', () => benchRunOverhead(ctx));
    if (wanted('scope') || wanted('start')) {
      let host: SystemdHost | undefined;
      await attempt('3./4. Private systemd for the scope benchmarks', async () => {
        host = await bootBenchHost(cleanup);
        return [];
      });
      if (host !== undefined) {
        const inside = host;
        if (wanted('scope')) await attempt('3. Scope creation', () => benchScopeCreation(inside));
        if (wanted('start')) await attempt('4. VM start with scope vs without', () => benchStartWithScope(inside, ctx));
        await inside.shutdown();
      }
    }
    if (wanted('reattach')) {
      const budgetMs = Math.max(60_000, TOTAL_BUDGET_MS - (performance.now() - started) - 20_000);
      await attempt('5. Daemon start-up, restart, reattach, CLI and memory', () => benchReattach({ guest, cleanup, budgetMs }));
    }
    if (wanted('refresh')) await attempt('6. Refresh by live migration', () => benchRefresh({ guest, cleanup }));
    if (wanted('strategies')) await attempt('7. Refresh strategies on a real upgrade (QEMU 7.2 -> 10.0, cpr-transfer)', () => benchStrategies({ guest, cleanup }));
    if (wanted('faults')) await attempt('8. Fault harness', () => benchFaults());
    if (wanted('disks')) await attempt('10. Refresh by live migration with a writing guest\'s disk', () => benchDiskRefresh({ guest, cleanup }));
    if (wanted('nics')) await attempt('11. Network gap during a live refresh', () => benchNics({ guest, cleanup }));
  } finally {
    await cleanup.runAll();
  }

  // An interrupted run measured nothing worth keeping: the previous BENCHMARKS.md stays.
  if (interrupted) return 130;
  const totalSeconds = (performance.now() - started) / 1000;
  const path = join(projectRoot(), 'BENCHMARKS.md');
  const rendered = renderReport(describeMachine(qemu), sections, totalSeconds);
  const previous = only === undefined ? undefined : await readFile(path, 'utf8').catch(() => undefined);
  const report = previous === undefined ? rendered : mergeReport(previous, rendered);
  await writeFile(path, report);
  log(`wrote ${path} in ${totalSeconds.toFixed(0)} s${failed > 0 ? `; ${failed} benchmark(s) FAILED` : ''}`);
  return failed > 0 ? 1 : 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    log(`bench failed: ${(error as Error).stack ?? String(error)}`);
    process.exitCode = 1;
  },
);
