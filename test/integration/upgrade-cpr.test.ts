// Refresh by cpr-transfer, for real: vmkeepd in a private systemd, guests on QEMU 10.0 ("b",
// from bookworm-backports) with their RAM in a shared memfd, moved onto "b2" (a copy of that
// QEMU at another path: a same-version rebuild) by handing the RAM over instead of copying it.
// The host's memory during the refresh is measured against a plain migration of a twin VM;
// `auto` falls back to migrate for a VM on 7.2 ("a"); each failure (the destination does not
// start, the cpr channel breaks, the source refuses) leaves the guest on its old QEMU; vmkeepd
// killed at each new step settles the refresh at its next start.
import { readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonError, type VmView } from '../../daemon/index.js';
import { isSameProcess, readExe, readProcessIdentity, waitForProcessExit } from '../../launcher/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { describePids, peakMemoryGrowth, qemuPidsOf } from '../support/qemu-procs.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import {
  backportsInstallation, brokenChannelInstallation, copiedInstallation, fakeInstallation, systemInstallation, writeInstallations,
  type TestInstallation,
} from '../support/installations.js';

const FILL_MIB = 96;
const RAM_MIB = 256;
// Created on b (10.0); "old" on a (7.2); "refuser" on b9 (10.0 that claims 9.2 at probe, so its
// RAM is shared but its other RAM is not: QEMU itself refuses a cpr-transfer of it).
const ON_B = ['cpr1', 'twin', 'crashc1', 'crashc2', 'crashc3', 'failc'];

let guest: GuestImage;
let dir: string;
let host: DaemonHost;
let installationsFile: string;
let all: TestInstallation[];
let b: TestInstallation;
let b2: TestInstallation;

beforeAll(async () => {
  guest = await ensureGuestImage();
  dir = await mkdtemp(join(tmpdir(), 'vk-cpr-'));
  b = await backportsInstallation('b');
  b2 = await copiedInstallation('b2', dir, b);
  all = [
    systemInstallation('a'),
    b,
    b2,
    await fakeInstallation('b9', dir, { base: b, version: '9.2.0' }),
    await fakeInstallation('broken10', dir, { base: b, failStart: true }),
    await brokenChannelInstallation('nochannel', dir, b),
  ];
  installationsFile = join(dir, 'installations.json');
  await writeInstallations(installationsFile, all, 'a');
  host = await DaemonHost.boot({ name: `cpr-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installationsFile] });
  await host.api.create(spec('old'));
  await makeCurrent('b9');
  await host.api.create({ ...spec('refuser'), memory: { backend: 'memfd-shared' } });
  await makeCurrent('b');
  await Promise.all(ON_B.map((name) => host.api.create(spec(name))));
  for (const name of ['old', 'refuser', ...ON_B]) await waitForSerial(host.serialLog(name), 'GUEST READY', 180_000);
});

afterAll(async () => {
  await host?.shutdown();
  if (dir) await rm(dir, { recursive: true, force: true });
});

function spec(name: string): Record<string, unknown> {
  const fill = name === 'cpr1' || name === 'twin' ? ` vmkeep.fill_mib=${FILL_MIB}` : '';
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: `${guest.append}${fill}`, memoryMiB: RAM_MIB };
}

async function makeCurrent(name: string): Promise<void> {
  await writeInstallations(installationsFile, all, name);
  await host.restart();
}

/** Exactly one QEMU of the VM runs, it is the one the record names, and the guest ticks on, booted once. */
async function expectOneRunning(name: string): Promise<VmView> {
  const vm = await host.api.get(name);
  expect(vm.state, `${name}: ${vm.problem ?? ''}`).toBe('running');
  const pids = qemuPidsOf(name, host.dir);
  if (pids.length !== 1) expect(pids, `${describePids(pids)}\n--- daemon ---\n${await host.consoleTail(60)}`).toEqual([host.hostPid(vm)]);
  expect(pids).toEqual([host.hostPid(vm)]);
  const record = await host.record(name);
  expect(record.refresh).toBeUndefined();
  expect(record.retired).toBeUndefined();
  const ticks = countTicks(host.serialLog(name));
  await waitForSerial(host.serialLog(name), new RegExp(`GUEST TICK ${ticks + 1}\\b`), 20_000);
  expect((await readFile(host.serialLog(name), 'utf8')).match(/GUEST READY/g)).toHaveLength(1);
  return vm;
}

async function refreshFails(name: string, options: Parameters<DaemonHost['api']['refresh']>[1], code: string, message: RegExp): Promise<DaemonError> {
  const error = await host.api.refresh(name, options).then(() => undefined, (e: unknown) => e);
  expect(error).toBeInstanceOf(DaemonError);
  expect((error as DaemonError).code, (error as Error).message).toBe(code);
  expect((error as DaemonError).message).toMatch(message);
  return error as DaemonError;
}

/** A failed refresh changed nothing: same QEMU (pid + start time), record as before but for its problem. */
async function expectUnchanged(name: string, before: { pid: number; startTime: string; record: Record<string, any> }): Promise<void> {
  expect(isSameProcess(before.pid, before.startTime), `${name}'s old QEMU keeps running`).toBe(true);
  const vm = await expectOneRunning(name);
  expect(host.hostPid(vm)).toBe(before.pid);
  const { problem: _p, updatedAt: _u, ...after } = await host.record(name);
  const { problem: _bp, updatedAt: _bu, ...was } = before.record;
  expect(after).toEqual(was);
  // No leftover QEMU, scope or socket of the destination.
  const files = readdirSync(join(host.dir, 'run', 'vms', name));
  expect(files.filter((f) => /^(cpr|migrate)-.*\.sock$/.test(f))).toEqual([]);
}

async function snapshot(name: string): Promise<{ pid: number; startTime: string; record: Record<string, any> }> {
  const vm = await host.api.get(name);
  const pid = host.hostPid(vm);
  return { pid, startTime: readProcessIdentity(pid)?.startTime as string, record: await host.record(name) };
}

describe('memory backend', () => {
  it('a VM created on 10.0 gets its RAM in a shared memfd (recorded), one created on 7.2 does not', async () => {
    const vm = await host.api.get('cpr1');
    expect(vm.spec.memory).toEqual({ backend: 'memfd-shared' });
    const args = readFileSync(`/proc/${host.hostPid(vm)}/cmdline`, 'utf8').split('\0');
    expect(args).toContain(`memory-backend-memfd,id=ram0,size=${RAM_MIB}M,share=on`);
    expect(args.find((a) => a.startsWith('pc-q35-'))).toMatch(/,memory-backend=ram0,aux-ram-share=on$/);
    expect((await host.api.get('old')).spec.memory).toEqual({ backend: 'anonymous' });
    const oldArgs = readFileSync(`/proc/${host.hostPid(await host.api.get('old'))}/cmdline`, 'utf8');
    expect(oldArgs).not.toContain('memory-backend');
  });
});

describe('refresh by cpr-transfer', () => {
  it('hands the RAM over: the guest keeps ticking, booted once; the host does not hold its RAM twice, unlike a migration', async () => {
    await makeCurrent('b2');
    await waitForSerial(host.serialLog('cpr1'), `GUEST FILLED ${FILL_MIB} MiB`, 1_000);
    await waitForSerial(host.serialLog('twin'), `GUEST FILLED ${FILL_MIB} MiB`, 1_000);
    const old = await snapshot('cpr1');

    const cpr = await peakMemoryGrowth('cpr1', host.dir, () => host.api.refresh('cpr1', { strategy: 'cpr' }));
    expect(cpr.result).toMatchObject({ vm: 'cpr1', strategy: 'cpr', result: 'migrated', from: { installation: 'b' }, to: { installation: 'b2' } });
    expect(cpr.result.message).toMatch(/cpr-transfer: RAM not copied/);
    await waitForProcessExit(old.pid, old.startTime, 15_000);
    const vm = await expectOneRunning('cpr1');
    expect(vm).toMatchObject({ installation: 'b2', machineType: 'pc-q35-10.0' });
    expect(vm.scope).toMatch(/^vmkeep-cpr1:[0-9a-f]+\.scope$/);
    expect(readExe(host.hostPid(vm))?.path).toBe(b2.binary);

    // Negative control: the same guest, RAM filled the same way, moved by a plain migration.
    const mig = await peakMemoryGrowth('twin', host.dir, () => host.api.refresh('twin', { strategy: 'migrate' }));
    expect(mig.result).toMatchObject({ strategy: 'migrate', result: 'migrated' });
    await expectOneRunning('twin');
    const report = `cpr: +${cpr.growthMiB.toFixed(1)} MiB over ${cpr.baseMiB.toFixed(1)} MiB, ${cpr.result.totalMs} ms (downtime ${cpr.result.downtimeMs} ms); ` +
      `migrate: +${mig.growthMiB.toFixed(1)} MiB over ${mig.baseMiB.toFixed(1)} MiB, ${mig.result.totalMs} ms (downtime ${mig.result.downtimeMs} ms)`;
    console.log(report);
    expect(mig.growthMiB, report).toBeGreaterThan(FILL_MIB * 0.9);
    // Both destinations are new QEMUs with the same overhead of their own (TCG's code buffer,
    // libraries: about 40-50 MiB here, more on a loaded host); what the migration holds on top
    // of the cpr is the guest's RAM a second time.
    expect(mig.growthMiB - cpr.growthMiB, report).toBeGreaterThan(FILL_MIB * 0.9);
    expect(cpr.growthMiB, report).toBeLessThan(FILL_MIB);
  });

  it('auto picks cpr where both QEMUs and the RAM allow it, and says why', async () => {
    await makeCurrent('b');
    const outcome = await host.api.refresh('cpr1', { strategy: 'auto' });
    expect(outcome).toMatchObject({ strategy: 'cpr', result: 'migrated', to: { installation: 'b' } });
    expect(outcome.message).toMatch(/cpr: both QEMUs support cpr-transfer/);
    await expectOneRunning('cpr1');
  });

  it('on 7.2: cpr is refused before anything is touched; auto falls back to migrate and says why', async () => {
    const before = await snapshot('old');
    await refreshFails('old', { strategy: 'cpr' }, 'REFRESH_REFUSED', /cannot be refreshed by cpr: its RAM is not a shared memfd/);
    await expectUnchanged('old', before);
    const outcome = await host.api.refresh('old', { strategy: 'auto' });
    expect(outcome).toMatchObject({ strategy: 'migrate', result: 'migrated', from: { version: expect.stringMatching(/^7\.2\./) }, to: { installation: 'b' } });
    expect(outcome.message).toMatch(/migrate: cpr is not possible: its RAM is not a shared memfd/);
    await expectOneRunning('old');
  });
});

describe('a cpr refresh that fails changes nothing', () => {
  it('the destination fails to start', async () => {
    await makeCurrent('broken10');
    const before = await snapshot('failc');
    await refreshFails('failc', { strategy: 'cpr' }, 'REFRESH_FAILED', /cpr-transfer of failc .* failed: .*keeps running on its old QEMU/s);
    await expectUnchanged('failc', before);
  });

  it('the cpr channel breaks (the destination hangs up on it)', async () => {
    await makeCurrent('nochannel');
    const before = await snapshot('failc');
    await refreshFails('failc', { strategy: 'cpr', timeoutSec: 20 }, 'REFRESH_FAILED', /cpr-transfer of failc .* failed: .*keeps running on its old QEMU/s);
    await expectUnchanged('failc', before);
  });

  it('the source refuses (its other RAM is not shared)', async () => {
    await makeCurrent('b2');
    const before = await snapshot('refuser');
    await refreshFails('refuser', { strategy: 'cpr' }, 'REFRESH_FAILED', /cpr-transfer of refuser .* failed: .*(CPR|cpr)/);
    await expectUnchanged('refuser', before);
    // The refusal left the source's migration mode normal: a plain migration still works.
    const outcome = await host.api.refresh('refuser', { strategy: 'migrate' });
    expect(outcome).toMatchObject({ strategy: 'migrate', result: 'migrated', to: { installation: 'b2' } });
    await expectOneRunning('refuser');
  });
});

describe('vmkeepd killed at each step of a cpr refresh', () => {
  async function crashDuring(vm: string, step: string): Promise<void> {
    await host.setDaemonEnv('VMKEEP_TEST_CRASH_AT', step);
    try {
      await host.restart();
      const error = await host.api.refresh(vm, { strategy: 'cpr' }).then(() => undefined, (e: unknown) => e);
      expect(error, `the daemon should have died at ${step}`).toBeInstanceOf(DaemonError);
      expect(['DAEMON_DOWN', 'BAD_RESPONSE', 'DAEMON_RESTARTED']).toContain((error as DaemonError).code);
    } finally {
      await host.setDaemonEnv('VMKEEP_TEST_CRASH_AT', undefined);
    }
    await host.restart();
  }

  const on = (inst: () => TestInstallation) => (vm: VmView): void => expect(readExe(host.hostPid(vm))?.path).toBe(inst().binary);

  it.each([
    ['cpr:begun', 'crashc1', on(() => b)],
    ['cpr:destination-recorded', 'crashc1', on(() => b)],
    ['cpr:destination-ready', 'crashc1', on(() => b)],
    ['cpr:completed', 'crashc2', on(() => b2)],
    ['cpr:switched', 'crashc3', on(() => b2)],
  ] as const)('at %s: rolled back or finished, one QEMU, the record names it', async (step, vm, where) => {
    if (step === 'cpr:begun') await makeCurrent('b2');
    await crashDuring(vm, step);
    where(await expectOneRunning(vm));
  });

  it('at cpr:migrating (the transfer goes on without the daemon): one QEMU, on either side', async () => {
    // crashc1 is still on b after the roll-backs above; b2 is current.
    await crashDuring('crashc1', 'cpr:migrating');
    const vm = await expectOneRunning('crashc1');
    expect([b.binary, b2.binary]).toContain(readExe(host.hostPid(vm))?.path);
  });
});
