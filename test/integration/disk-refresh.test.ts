// Disks through the upgrade paths, for real (vmkeepd in a private systemd, QEMU 7.2 "a" and
// 10.0 "b"): a guest that writes fsynced records is migrated, rebooted and has its daemon
// SIGKILLed mid-migration; every record the console acknowledged is on the disk afterwards
// (test/support/records-check.ts, shown to detect loss in disks.test.ts). A backing chain
// changed behind vmkeep's back stops the start until an operator accepts it.
// Under TCG on a loaded host, a live copy from QEMU 7.2 can itself corrupt the guest's kernel
// (bare QEMU too); vmkeep stops such a guest for the whole copy (ARCHITECTURE.md, "Paused copy"),
// so a guest kernel crash after any of these migrations fails the test with the kernel's lines.
import { constants, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonError, type VmView } from '../../daemon/index.js';
import { readExe } from '../../launcher/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { makeExt4Raw, makeOverlayOnRaw, O_ACCMODE, openFilesUnder, qemuImg, requireDiskTools } from '../support/disk-images.js';
import { ensureGuestImage, kernelCrashed, kernelTrouble, waitForSerial, type GuestImage } from '../support/guest.js';
import { backportsInstallation, copiedInstallation, systemInstallation, writeInstallations, type TestInstallation } from '../support/installations.js';
import { describePids, qemuPidsOf } from '../support/qemu-procs.js';
import { checkImage, lastWrote, waitForWrote, wroteSequence } from '../support/records-check.js';
import { waitForVm } from '../support/vm-wait.js';

const VMS = ['mover', 'rebooter', 'crashy'] as const;

let guest: GuestImage;
let dir: string;
let host: DaemonHost;
let installationsFile: string;
let all: TestInstallation[];
const overlays = new Map<string, string>();

beforeAll(async () => {
  requireDiskTools();
  guest = await ensureGuestImage();
  dir = await mkdtemp(join(tmpdir(), 'vk-disks-'));
  const a = systemInstallation('a');
  // a2: the same QEMU 7.2 as another build, so a VM on one is stale on the other (repeated moves).
  all = [a, await copiedInstallation('a2', dir, a), await backportsInstallation('b')];
  installationsFile = join(dir, 'installations.json');
  await writeInstallations(installationsFile, all, 'a');
  host = await DaemonHost.boot({ name: `disks-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installationsFile] });
  for (const name of VMS) overlays.set(name, makeOverlayOnRaw(dir, 64, name).overlay);
  await Promise.all(VMS.map((name) => host.api.create(spec(name))));
  for (const name of VMS) await waitForSerial(host.serialLog(name), 'GUEST DISK MOUNTED', 120_000);
}, 600_000);

afterAll(async () => {
  await host?.shutdown();
  if (dir) await rm(dir, { recursive: true, force: true });
});

function spec(name: string, disk = overlays.get(name) as string): Record<string, unknown> {
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128, disks: [{ path: disk, format: 'qcow2' }] };
}

async function makeCurrent(name: string): Promise<void> {
  await writeInstallations(installationsFile, all, name);
  await host.restart();
}

/**
 * Waits until the console shows at least `n` more acknowledged records than now. 60 s, well
 * inside the test's own timeout, so a guest whose writes stalled fails with this message.
 */
function moreWrites(name: string, n: number): Promise<number> {
  const log = host.serialLog(name);
  return waitForWrote(log, lastWrote(log) + n, 60_000).catch((error: unknown) => {
    throw new Error(`${(error as Error).message}; ${trouble(name)}`, { cause: error });
  });
}

/** Exactly one QEMU of the VM has its image open read-write, the one its record names. */
function oneWriter(name: string, vm: VmView): void {
  const pids = qemuPidsOf(name, host.dir);
  const overlay = overlays.get(name) as string;
  const writers = pids.filter((pid) => openFilesUnder(pid, dir).some((f) => f.path === overlay && (f.flags & O_ACCMODE) === constants.O_RDWR));
  expect(writers, describePids(pids)).toEqual([host.hostPid(vm)]);
}

/** Stops the VM (ACPI: the guest unmounts), then checks everything the console acknowledged. */
async function stopAndCheck(name: string): Promise<void> {
  await host.api.stop(name);
  const printed = lastWrote(host.serialLog(name));
  const verdict = checkImage(overlays.get(name) as string, 'qcow2', printed);
  expect(verdict.problems, `${name}: last printed ${printed}`).toEqual([]);
  expect(verdict.last).toBeGreaterThanOrEqual(printed);
}

function boots(name: string): number {
  return (readFileSync(host.serialLog(name), 'utf8').match(/GUEST READY/g) ?? []).length;
}

/** What the guest's kernel printed of a crash, for the message of a failed expectation. */
function trouble(name: string): string {
  return kernelTrouble(readFileSync(host.serialLog(name), 'utf8'));
}

/** The guest's writer went on through the migration: no kernel crash, no gap, no second boot. */
function expectWriterWentOn(name: string, before = 0): void {
  expect(kernelCrashed(readFileSync(host.serialLog(name), 'utf8')), trouble(name)).toBe(false);
  const sequence = wroteSequence(host.serialLog(name));
  expect(sequence.every((n, i) => n === i + 1), `GUEST WROTE 1, 2, 3, ... without a gap or restart; ${trouble(name)}`).toBe(true);
  expect(sequence.at(-1)).toBeGreaterThan(before);
  expect(boots(name), trouble(name)).toBe(1);
}

describe('a writing guest through refreshes', () => {
  it('refresh by migration (7.2 -> 10.0) while the guest writes: no kernel crash, no gap, no second boot (7.2 under TCG: the guest paused for the copy), the destination has the image through an fdset', async () => {
    const before = await moreWrites('mover', 20);
    await makeCurrent('b');
    const outcome = await host.api.refresh('mover', { strategy: 'migrate' });
    expect(outcome).toMatchObject({ result: 'migrated', to: { installation: 'b' } });
    expect(outcome.message).toMatch(/moved \(paused for the whole copy\).*it runs QEMU 7\.2[.\d]* under TCG/);
    const vm = await host.api.get('mover');
    expect(readExe(host.hostPid(vm))?.path).toBe(all[2]?.binary);
    oneWriter('mover', vm);

    const nodes = await host.api.qmp('mover', 'query-named-block-nodes', { flat: true }) as Array<{ 'node-name': string; file: string }>;
    expect(nodes.find((n) => n['node-name'] === 'disk0-file')?.file).toMatch(/^\/dev\/fdset\/\d+$/);
    expect(nodes.find((n) => n['node-name'] === 'disk0-layer1-file')?.file).toMatch(/^\/dev\/fdset\/\d+$/);

    await moreWrites('mover', 20);
    expectWriterWentOn('mover', before);
    await stopAndCheck('mover');
  });

  it('refresh by reboot while the guest writes: ACPI power-off, the new QEMU boots from the same disk, the writer goes on', async () => {
    await moreWrites('rebooter', 20);
    await makeCurrent('b');
    // The new QEMU's start empties the console log: the first boot's last acknowledgement is
    // read while it is still there (the guest prints GUEST POWEROFF after its last record).
    const log = host.serialLog('rebooter');
    let firstBoot = { last: 0, poweredOff: false };
    const watch = setInterval(() => {
      const text = readFileSync(log, 'utf8');
      if (firstBoot.poweredOff || !/GUEST WRITER FROM 1\r?\n/.test(text)) return;
      firstBoot = { last: Math.max(firstBoot.last, lastWrote(log)), poweredOff: text.includes('GUEST POWEROFF') };
    }, 10);
    let outcome;
    try {
      outcome = await host.api.refresh('rebooter', { strategy: 'reboot' });
    } finally {
      clearInterval(watch);
    }
    expect(outcome).toMatchObject({ result: 'rebooted', to: { installation: 'b' } });
    expect(firstBoot.poweredOff, 'the first boot powered off by ACPI').toBe(true);
    const resumed = Number(/GUEST WRITER FROM (\d+)/.exec(await waitForSerial(log, /GUEST WRITER FROM \d+/, 120_000))?.[1]);
    // Everything acknowledged before the power-off was on the disk the new QEMU booted from.
    expect(resumed).toBeGreaterThan(firstBoot.last);
    await moreWrites('rebooter', 10);
    oneWriter('rebooter', await host.api.get('rebooter'));
    await stopAndCheck('rebooter');
  });
});

describe('vmkeepd SIGKILLed at each step of a migration of a writing guest', () => {
  async function crashDuring(step: string, target: string): Promise<void> {
    await writeInstallations(installationsFile, all, target);
    await host.setDaemonEnv('VMKEEP_TEST_CRASH_AT', step);
    try {
      await host.restart();
      const error = await host.api.refresh('crashy', { strategy: 'migrate' }).then(() => undefined, (e: unknown) => e);
      expect(error, `the daemon should have died at ${step}`).toBeInstanceOf(DaemonError);
    } finally {
      await host.setDaemonEnv('VMKEEP_TEST_CRASH_AT', undefined);
    }
    await host.restart();
  }

  // Between a and a2 (both 7.2), each time onto the one it is not on: every step can be
  // crashed again on the same VM, whether the last one rolled back or went forward.
  it.each([
    'migrate:begun', 'migrate:destination-recorded', 'migrate:destination-ready', 'migrate:migrating', 'migrate:completed', 'migrate:switched',
  ])('at %s: one QEMU writes the image, the guest goes on writing', async (step) => {
    const current = (await host.api.get('crashy')).installation;
    await crashDuring(step, current === 'a' ? 'a2' : 'a');
    const vm = await waitForVm(host.api, 'crashy', (v) => v.state !== 'unreachable' && v.operation === undefined, 'settled', 60_000);
    expect(vm.state, vm.problem ?? '').toBe('running');
    oneWriter('crashy', vm);
    await moreWrites('crashy', 10);
    expectWriterWentOn('crashy');
  });

  it('afterwards every acknowledged record is on the disk', async () => {
    await stopAndCheck('crashy');
  });
});

describe('the backing chain', () => {
  it('a second VM naming an image another VM writes is refused at create, with both names', async () => {
    const error = await host.api.create(spec('thief', overlays.get('mover'))).then(() => undefined, (e: unknown) => e);
    expect(error).toBeInstanceOf(DaemonError);
    expect((error as DaemonError).code).toBe('IMAGE_IN_USE');
    expect((error as DaemonError).message).toMatch(/^thief would use .*mover\.qcow2 read-write, but VM mover uses the same file read-write/);
    expect(await host.recordNames()).not.toContain('thief');
  });

  it('changed while the VM was stopped: start refused with BACKING_CHAIN_CHANGED, nothing started; accepted after disk accept', async () => {
    // mover was stopped above; its overlay now points at another base.
    const overlay = overlays.get('mover') as string;
    const other = join(dir, 'other-base.raw');
    makeExt4Raw(other);
    qemuImg('rebase', '-u', '-b', other, '-F', 'raw', overlay);

    const error = await host.api.start('mover').then(() => undefined, (e: unknown) => e);
    expect(error).toBeInstanceOf(DaemonError);
    expect((error as DaemonError).code).toBe('BACKING_CHAIN_CHANGED');
    expect((error as DaemonError).message).toMatch(/disks\[0\] of mover: layer 1 changed since it was recorded: recorded .*mover-base\.raw \(raw, .*\), now .*other-base\.raw \(raw, .*\).*vmkeep disk accept mover/s);
    expect(qemuPidsOf('mover', host.dir)).toEqual([]);

    // (a2, the copied build, has no firmware folders of its own: fresh starts are on a.)
    await makeCurrent('a');
    const accepted = await host.api.acceptDisks('mover');
    expect(accepted.disks[0]?.map((l) => l.path)).toEqual([overlay, other]);
    const vm = await host.api.start('mover').catch(async (e: unknown) => {
      throw new Error(`${(e as Error).message}\n--- QEMU log ---\n${readFileSync(host.qemuLog('mover'), 'utf8').slice(-2000)}`);
    });
    expect(vm.state).toBe('running');
    await waitForSerial(host.serialLog('mover'), 'GUEST DISK MOUNTED', 120_000);
  });
});
