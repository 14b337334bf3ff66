// migrate-or-reboot and the rolling job's --batch-interval and --max-failures, for real: a QEMU
// that refuses the incoming migration stream (the source keeps the guest), the fallback that
// reboots the guest onto it instead (a new boot on the console), a new QEMU that cannot start at
// all (no reboot: the guest would stay down), and jobs that pause between batches and stop
// after a failure.
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
  // Another build of 7.2 (so a VM on it is stale when "a" is current) that refuses migrations.
  const nomig = await fakeInstallation('nomig', dir, { base: await copiedInstallation('c', dir), refuseIncoming: true });
  all = [a, nomig, await fakeInstallation('broken', dir, { failStart: true })];
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

/** "Upgrade the package": another installation becomes current, the service restarts. */
async function makeCurrent(name: string): Promise<void> {
  await writeInstallations(installationsFile, all, name);
  await host.restart();
}

async function refreshError(name: string, options: Parameters<DaemonHost['api']['refresh']>[1]): Promise<DaemonError> {
  const error = await host.api.refresh(name, options).then(() => undefined, (e: unknown) => e);
  expect(error).toBeInstanceOf(DaemonError);
  return error as DaemonError;
}

function identity(vm: VmView): { pid: number; startTime: string } {
  const hostPid = host.hostPid(vm);
  return { pid: hostPid, startTime: readProcessIdentity(hostPid)?.startTime as string };
}

describe('migrate-or-reboot', () => {
  it('a QEMU that refuses the migration: plain migrate fails and keeps the guest; migrate-or-reboot reboots it onto that QEMU and says why', async () => {
    await makeCurrent('nomig');
    const before = await host.api.get('fb');
    const old = identity(before);
    // Negative control: the new QEMU really refuses the stream, the guest stays where it was.
    const refused = await refreshError('fb', { strategy: 'migrate' });
    expect(refused.code).toBe('REFRESH_FAILED');
    expect(refused.message).toMatch(/live migration of fb onto "nomig" failed: .*keeps running on its old QEMU/s);
    expect(isSameProcess(old.pid, old.startTime)).toBe(true);
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
    const old = identity(before);
    const error = await refreshError('keep', { strategy: 'migrate-or-reboot' });
    expect(error.code).toBe('REFRESH_FAILED');
    expect(error.message).toMatch(/keeps running on its old QEMU.*No reboot either: the new QEMU did not start/s);
    expect(isSameProcess(old.pid, old.startTime)).toBe(true);
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
    expect(job).toMatchObject({ batchIntervalSec: 2, parallel: 1 });
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
    const done = await host.api.refreshJob(job.id);
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
