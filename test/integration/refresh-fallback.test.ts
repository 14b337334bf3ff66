// migrate-or-reboot, the rolling job's --batch-interval and --max-failures, and the metrics,
// for real: a QEMU that refuses the incoming migration stream (the source keeps the guest), the
// fallback that reboots the guest onto it instead (a new boot on the console), a new QEMU that
// cannot start at all (no reboot: the guest would stay down), jobs that pause between batches
// and stop after a failure, and GET /1.0/metrics scraped with curl and read by the Prometheus
// project's own parser.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonError, type DaemonEvent, type RefreshJob, type VmView } from '../../daemon/index.js';
import { isSameProcess, readProcessIdentity } from '../../launcher/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { copiedInstallation, fakeInstallation, systemInstallation, writeInstallations, type TestInstallation } from '../support/installations.js';
import { projectRoot } from '../support/paths.js';
import { parsePrometheus, sampleValue, type ParsedFamily } from '../support/prometheus.js';
import { waitForVm } from '../support/vm-wait.js';

const CLI = join(projectRoot(), 'dist', 'cli', 'main.js');
const VMS = ['fb', 'keep'];

let guest: GuestImage;
let dir: string;
let host: DaemonHost;
let installationsFile: string;
let all: TestInstallation[];

beforeAll(async () => {
  guest = await ensureGuestImage();
  dir = await mkdtemp(join(tmpdir(), 'vk-fallback-'));
  const a = systemInstallation('a');
  // Another build of 7.2 (a VM on "a" is stale when it is current), and one that refuses migrations.
  const c = await copiedInstallation('c', dir);
  const nomig = await fakeInstallation('nomig', dir, { base: c, refuseIncoming: true });
  all = [a, c, nomig, await fakeInstallation('broken', dir, { failStart: true })];
  installationsFile = join(dir, 'installations.json');
  await writeInstallations(installationsFile, all, 'a');
  host = await DaemonHost.boot({ name: `fallback-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installationsFile] });
  await Promise.all(VMS.map((name) => host.api.create({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 })));
  for (const name of VMS) await waitForSerial(host.serialLog(name), 'GUEST TICK 3', 120_000);
});

afterAll(async () => {
  await host?.shutdown();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** vmkeepd starts on this state folder so far. */
let starts = 1;

/** "Upgrade the package": another installation becomes current, the service restarts. */
async function makeCurrent(name: string): Promise<void> {
  await writeInstallations(installationsFile, all, name);
  await host.restart();
  starts++;
}

function identity(vm: VmView): { pid: number; startTime: string } {
  const hostPid = host.hostPid(vm);
  return { pid: hostPid, startTime: readProcessIdentity(hostPid)?.startTime as string };
}

/** The refresh fails with REFRESH_FAILED and `message`, and the same QEMU still runs the guest. */
async function refreshFailsKeepingQemu(name: string, options: Parameters<DaemonHost['api']['refresh']>[1], message: RegExp): Promise<{ old: { pid: number; startTime: string } }> {
  const old = identity(await host.api.get(name));
  const error = await host.api.refresh(name, options).then(() => undefined, (e: unknown) => e);
  expect(error).toBeInstanceOf(DaemonError);
  expect((error as DaemonError).code).toBe('REFRESH_FAILED');
  expect((error as DaemonError).message).toMatch(message);
  expect(isSameProcess(old.pid, old.startTime)).toBe(true);
  return { old };
}

describe('migrate-or-reboot', () => {
  it('a QEMU that refuses the migration: plain migrate fails and keeps the guest; migrate-or-reboot reboots it onto that QEMU and says why', async () => {
    await makeCurrent('nomig');
    // Negative control: the new QEMU really refuses the stream, the guest stays where it was.
    const { old } = await refreshFailsKeepingQemu('fb', { strategy: 'migrate' }, /live migration of fb onto "nomig" failed: .*keeps running on its old QEMU/s);
    const ticks = countTicks(host.serialLog('fb'));
    expect(ticks).toBeGreaterThanOrEqual(3);

    const outcome = await host.api.refresh('fb', { strategy: 'migrate-or-reboot' });
    expect(outcome).toMatchObject({ vm: 'fb', result: 'rebooted', strategy: 'reboot', from: { installation: 'a' }, to: { installation: 'nomig' } });
    expect(outcome.reason).toMatch(/^the live migration failed \(live migration of fb onto "nomig" failed: .*keeps running on its old QEMU/s);
    expect(outcome.message).toMatch(/fb powered off and started on "nomig" .* because the live migration failed/s);
    expect(isSameProcess(old.pid, old.startTime)).toBe(false);
    // A new boot: the console starts again from the kernel, its ticks from 1.
    await waitForSerial(host.serialLog('fb'), /GUEST TICK 1\b/, 60_000);
    expect(countTicks(host.serialLog('fb'))).toBeLessThan(ticks);
    const after = await waitForVm(host.api, 'fb', (v) => v.state === 'running' && v.operation === undefined, 'running, no operation');
    expect(after).toMatchObject({ installation: 'nomig' });
    expect(after.problem).toBeUndefined();
  });

  it('a new QEMU that cannot start at all is no reason to power the guest off: it keeps running', async () => {
    await makeCurrent('broken');
    const before = await host.api.get('keep');
    await refreshFailsKeepingQemu('keep', { strategy: 'migrate-or-reboot' }, /keeps running on its old QEMU.*No reboot either: the new QEMU did not start/s);
    const ticks = countTicks(host.serialLog('keep'));
    await waitForSerial(host.serialLog('keep'), new RegExp(`GUEST TICK ${ticks + 1}\\b`), 20_000);
    expect(await host.api.get('keep')).toMatchObject({ state: 'running', installation: 'a', pid: before.pid });
  });
});

describe('rolling refresh options', () => {
  it('--batch-interval: the next batch begins only after the pause', async () => {
    await makeCurrent('a');
    const events: DaemonEvent[] = [];
    const controller = new AbortController();
    let opened!: () => void;
    const open = new Promise<void>((resolve) => {
      opened = resolve;
    });
    const following = host.api.events((e) => events.push(e), { signal: controller.signal, onOpen: () => opened() }).catch(() => undefined);
    await open;
    // keep is current on a (nothing to do), fb moves back from nomig to a.
    const job = await host.api.startRefreshJob({ vms: ['keep', 'fb'], strategy: 'migrate', parallel: 1, batchIntervalSec: 2 });
    expect(job).toMatchObject({ kind: 'rolling-refresh', vms: ['keep', 'fb'] });
    const deadline = Date.now() + 120_000;
    while (!events.some((e) => e.job === job.id && e.step === 'job-done')) {
      if (Date.now() > deadline) throw new Error(`job ${job.id} did not end within 120 s; events: ${JSON.stringify(events)}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    controller.abort();
    await following;
    const mine = events.filter((e) => e.job === job.id);
    const at = (vm: string | undefined, step: string): number => Date.parse(mine.find((e) => e.vm === vm && e.step === step)?.time ?? 'missing');
    expect(mine.map((e) => `${e.vm ?? '-'} ${e.step}`)).toEqual(expect.arrayContaining(['keep done', '- pause', 'fb started', 'fb done']));
    expect(at('fb', 'started') - at('keep', 'done')).toBeGreaterThanOrEqual(1_900);
    const done = (await host.api.finished(job)).result as RefreshJob;
    expect(done).toMatchObject({ batchIntervalSec: 2, parallel: 1 });
    expect(done.results.map((r) => [r.vm, r.outcome?.result])).toEqual([['keep', 'current'], ['fb', 'migrated']]);
  });

  it('--max-failures 1 through the CLI: the job stops after the first failure, the other VM is not attempted and untouched', async () => {
    await makeCurrent('broken');
    const fb = await host.api.get('fb');
    const old = identity(fb);
    const run = await execa(process.execPath, [CLI, 'refresh', '--all', '--strategy', 'migrate', '--max-failures', '1', '--json', '--socket', host.socket], { reject: false });
    expect(run.exitCode, run.stderr).not.toBe(0);
    const lines = run.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, any>);
    const job = lines.at(-1)?.job as RefreshJob;
    expect(job.maxFailures).toBe(1);
    expect(job.results.map((r) => [r.vm, r.ok, r.skipped ?? false])).toEqual([['fb', false, false], ['keep', false, true]]);
    expect(lines.find((l) => l.step === 'skipped')?.message).toBe('keep not attempted: the job stopped after 1 failed VM(s) (max failures)');
    expect(isSameProcess(old.pid, old.startTime)).toBe(true);
    expect(await host.api.get('keep')).toMatchObject({ state: 'running', installation: 'a' });
  });
});

describe('GET /1.0/metrics', () => {
  /** Scraped as a Prometheus server would (curl over the socket); once this start is counted. */
  async function scrape(): Promise<ParsedFamily[]> {
    const deadline = Date.now() + 30_000;
    for (;;) {
      const run = await execa('curl', ['-sS', '--fail', '--unix-socket', host.socket, '-D', '-', 'http://localhost/1.0/metrics'], { reject: false });
      if (run.exitCode !== 0) throw new Error(`curl failed (${run.exitCode}): ${run.stderr}`);
      const [head = '', body = ''] = run.stdout.split('\r\n\r\n');
      expect(head).toMatch(/^content-type: text\/plain; version=0\.0\.4; charset=utf-8$/im);
      const families = await parsePrometheus(body);
      if (sampleValue(families, 'vmkeep_daemon_starts_total') !== undefined) return families;
      if (Date.now() > deadline) throw new Error(`vmkeep_daemon_starts_total still missing 30 s after the start:\n${body}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  it('VMs by state, stale VMs, restarts seen, reattach time, refreshes, migration histograms and QMP latency', async () => {
    await makeCurrent('c');
    const before = await scrape();
    expect(sampleValue(before, 'vmkeep_vms', { state: 'running' })).toBe(2);
    expect(sampleValue(before, 'vmkeep_stale_vms', { installation: 'a' })).toBe(2);
    expect(sampleValue(before, 'vmkeep_daemon_starts_total')).toBe(starts);
    expect(sampleValue(before, 'vmkeep_start_reattach_seconds')).toBeGreaterThan(0);
    expect(sampleValue(before, 'vmkeep_refreshes_total', { strategy: 'migrate', outcome: 'migrated' })).toBeUndefined();

    await host.api.refresh('keep', { strategy: 'migrate' });
    await host.api.refresh('fb', { strategy: 'migrate-or-reboot' });
    expect(await host.api.refresh('fb', { strategy: 'cpr' })).toMatchObject({ result: 'current' });
    const after = await scrape();
    expect(sampleValue(after, 'vmkeep_stale_vms', { installation: 'a' })).toBeUndefined();
    expect(sampleValue(after, 'vmkeep_refreshes_total', { strategy: 'migrate', outcome: 'migrated' })).toBe(1);
    expect(sampleValue(after, 'vmkeep_refreshes_total', { strategy: 'migrate-or-reboot', outcome: 'migrated' })).toBe(1);
    // fb is current now: a cpr refresh is nothing to do, counted as such.
    expect(sampleValue(after, 'vmkeep_refreshes_total', { strategy: 'cpr', outcome: 'current' })).toBe(1);
    expect(sampleValue(after, 'vmkeep_migration_downtime_seconds_count', { mode: 'migrate' })).toBe(2);
    expect(sampleValue(after, 'vmkeep_migration_duration_seconds_bucket', { mode: 'migrate', le: '+Inf' })).toBe(2);
    expect(sampleValue(after, 'vmkeep_migration_duration_seconds_sum', { mode: 'migrate' })).toBeGreaterThan(0);
    for (const vm of VMS) expect(sampleValue(after, 'vmkeep_qmp_command_duration_seconds_count', { vm })).toBeGreaterThan(0);
    expect(sampleValue(after, 'vmkeep_qmp_timeouts_total', { vm: 'keep' })).toBeUndefined();
  });
});
