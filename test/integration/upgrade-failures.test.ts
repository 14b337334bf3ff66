// The failure paths of a refresh, for real: a new QEMU that cannot start, targets that cannot
// take the VM (with the real pair QEMU 7.2 "a" and 10.0 "b": a machine type 10.0 dropped, a
// move from 10.0 back to 7.2), a guest that ignores ACPI, and vmkeepd SIGKILLed at every step
// of a 7.2 -> 10.0 migration and of a reboot. Each ends with exactly one QEMU per VM, named by
// its record, guest running.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonError, type VmView } from '../../daemon/index.js';
import { isSameProcess, readExe, readProcessIdentity } from '../../launcher/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { describePids, qemuPidsOf } from '../support/qemu-procs.js';
import { waitForVm } from '../support/vm-wait.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import {
  backportsInstallation, fakeInstallation, systemInstallation, writeInstallations, type TestInstallation,
} from '../support/installations.js';

const VMS = ['victim', 'deaf', 'crash1', 'crash2', 'crash3', 'oldtype'];
// A machine type QEMU 7.2 has and 10.0 no longer offers.
const DROPPED_MACHINE = 'pc-i440fx-2.3';

let guest: GuestImage;
let dir: string;
let host: DaemonHost;
let installationsFile: string;
let all: TestInstallation[];
let a: TestInstallation;
let b: TestInstallation;

beforeAll(async () => {
  guest = await ensureGuestImage();
  dir = await mkdtemp(join(tmpdir(), 'vk-upgf-'));
  a = systemInstallation('a');
  b = await backportsInstallation('b');
  all = [a, b, await fakeInstallation('broken', dir, { failStart: true })];
  installationsFile = join(dir, 'installations.json');
  await writeInstallations(installationsFile, all, 'a');
  host = await DaemonHost.boot({ name: `upgf-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installationsFile] });
  await Promise.all(VMS.map((name) => host.api.create(spec(name))));
  for (const name of VMS) await waitForSerial(host.serialLog(name), 'GUEST READY', 120_000);
});

afterAll(async () => {
  await host?.shutdown();
  if (dir) await rm(dir, { recursive: true, force: true });
});

function spec(name: string): Record<string, unknown> {
  const append = name === 'deaf' ? `${guest.append} vmkeep.ignore_acpi` : guest.append;
  return { name, kernel: guest.kernel, initrd: guest.initrd, append, memoryMiB: 128, ...(name === 'oldtype' ? { machine: DROPPED_MACHINE } : {}) };
}

/** "Upgrade the package": another installation becomes current, the service restarts. */
async function makeCurrent(name: string): Promise<void> {
  await writeInstallations(installationsFile, all, name);
  await host.restart();
}

/** Exactly one QEMU of the VM runs, it is the one the record names, and the guest ticks on. */
async function expectOneRunning(name: string): Promise<VmView> {
  // A migration whose outcome could not be read yet at the restart is settled by a retry.
  const vm = await waitForVm(host.api, name, (v) => v.state !== 'unreachable' && v.operation === undefined, 'settled (not unreachable)', 30_000);
  expect(vm.state, `${name}: ${vm.problem ?? ''}`).toBe('running');
  const pids = qemuPidsOf(name, host.dir);
  if (pids.length !== 1) expect(pids, `${describePids(pids)}\n--- daemon ---\n${await host.consoleTail(60)}`).toEqual([host.hostPid(vm)]);
  expect(pids).toEqual([host.hostPid(vm)]);
  const record = await host.record(name);
  expect(record.refresh).toBeUndefined();
  expect(record.retired).toBeUndefined();
  const ticks = countTicks(host.serialLog(name));
  await waitForSerial(host.serialLog(name), new RegExp(`GUEST TICK ${ticks + 1}\\b`), 20_000);
  return vm;
}

async function refreshFails(name: string, options: Parameters<DaemonHost['api']['refresh']>[1], code: string, message: RegExp): Promise<void> {
  const error = await host.api.refresh(name, options).then(() => undefined, (e: unknown) => e);
  expect(error).toBeInstanceOf(DaemonError);
  expect((error as DaemonError).code).toBe(code);
  expect((error as DaemonError).message).toMatch(message);
}

describe('a refresh that cannot be done changes nothing', () => {
  it('a destination QEMU that fails to start: the source keeps running, the record unchanged', async () => {
    const vm = await host.api.get('victim');
    const hostPid = host.hostPid(vm);
    const startTime = readProcessIdentity(hostPid)?.startTime as string;
    await makeCurrent('broken');
    await refreshFails('victim', { strategy: 'migrate' }, 'REFRESH_FAILED', /keeps running on its old QEMU/);
    expect(isSameProcess(hostPid, startTime)).toBe(true);
    const after = await expectOneRunning('victim');
    expect(after).toMatchObject({ installation: 'a', pid: vm.pid });
    expect(after.problem).toMatch(/this build is broken|exited/);
  });

  it('a QEMU without the pinned machine type (10.0 dropped pc-i440fx-2.3) is refused before anything starts', async () => {
    await makeCurrent('b');
    for (const strategy of ['migrate', 'reboot'] as const) {
      await refreshFails('oldtype', { strategy }, 'REFRESH_REFUSED', /pinned to machine type pc-i440fx-2\.3, which the current installation "b" \(QEMU 10\.0\.\d+\) does not have/);
    }
    expect(await expectOneRunning('oldtype')).toMatchObject({ installation: 'a', machineType: DROPPED_MACHINE });
  });

  it('a guest that ignores ACPI is left running and reported; only --force quits it', async () => {
    await makeCurrent('b');
    const vm = await host.api.get('deaf');
    const hostPid = host.hostPid(vm);
    const startTime = readProcessIdentity(hostPid)?.startTime as string;
    await refreshFails('deaf', { strategy: 'reboot', timeoutSec: 3 }, 'REFRESH_FAILED', /did not power off within 3 s.*left running/);
    expect(isSameProcess(hostPid, startTime)).toBe(true);
    expect(await expectOneRunning('deaf')).toMatchObject({ installation: 'a' });

    const forced = await host.api.refresh('deaf', { strategy: 'reboot', timeoutSec: 2, force: true });
    expect(forced).toMatchObject({ result: 'rebooted', to: { installation: 'b' } });
    await waitForSerial(host.serialLog('deaf'), 'GUEST READY', 60_000);
    const after = await expectOneRunning('deaf');
    expect(readExe(host.hostPid(after))?.path).toBe(b.binary);
  });
});

describe('vmkeepd killed at each step of a refresh', () => {
  /** SIGKILLs the daemon at `step` during a refresh of `vm`, then starts a clean one. */
  async function crashDuring(vm: string, step: string, strategy: 'migrate' | 'reboot'): Promise<void> {
    await host.setDaemonEnv('VMKEEP_TEST_CRASH_AT', step);
    try {
      await host.restart();
      const error = await host.api.refresh(vm, { strategy }).then(() => undefined, (e: unknown) => e);
      expect(error, `the daemon should have died at ${step}`).toBeInstanceOf(DaemonError);
      expect(['DAEMON_DOWN', 'BAD_RESPONSE', 'DAEMON_RESTARTED']).toContain((error as DaemonError).code);
    } finally {
      await host.setDaemonEnv('VMKEEP_TEST_CRASH_AT', undefined);
    }
    await host.restart();
  }

  const onOld = (vm: VmView): void => expect(readExe(host.hostPid(vm))?.path).toBe(a.binary);
  const onNew = (vm: VmView): void => expect(readExe(host.hostPid(vm))?.path).toBe(b.binary);

  it.each([
    ['migrate:begun', 'crash1', onOld],
    ['migrate:destination-recorded', 'crash1', onOld],
    ['migrate:destination-ready', 'crash1', onOld],
    ['migrate:completed', 'crash2', onNew],
    ['migrate:switched', 'crash3', onNew],
  ] as const)('at %s: rolled back or finished, one QEMU, the record names it', async (step, vm, where) => {
    await crashDuring(vm, step, 'migrate');
    where(await expectOneRunning(vm));
  });

  it('at migrate:migrating (the stream goes on without the daemon): one QEMU, on either side', async () => {
    await crashDuring('crash1', 'migrate:migrating', 'migrate');
    const vm = await expectOneRunning('crash1');
    expect([a.binary, b.binary]).toContain(readExe(host.hostPid(vm))?.path);
  });

  it('at reboot:powering-off: the guest powers off while the daemon is away and starts on b', async () => {
    await crashDuring('victim', 'reboot:powering-off', 'reboot');
    await waitForVm(host.api, 'victim', (v) => v.state === 'running' && v.installation === 'b', 'running again on installation b');
    await waitForSerial(host.serialLog('victim'), 'GUEST READY', 60_000);
    onNew(await expectOneRunning('victim'));
  });
});

describe('a move onto an older QEMU', () => {
  it('a VM on 10.0 is not moved back to 7.2 by any strategy; it keeps running on 10.0', async () => {
    // deaf was moved onto b (10.0) above; "a" (7.2) becomes current, as a package downgrade would.
    await makeCurrent('a');
    for (const strategy of ['migrate', 'reboot'] as const) {
      await refreshFails('deaf', { strategy }, 'REFRESH_REFUSED', /runs QEMU 10\.0\.\d+, and the current installation "a" is older \(7\.2\.\d+\)/);
    }
    const vm = await expectOneRunning('deaf');
    expect(vm).toMatchObject({ installation: 'b' });
    expect(readExe(host.hostPid(vm))?.path).toBe(b.binary);
  });
});
