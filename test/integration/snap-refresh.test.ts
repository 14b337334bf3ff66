// A snap refresh, simulated for real: the snap's layout (revisions 11 and 12, each with its own
// QEMU copy; `current`; $SNAP_COMMON), its launcher (snap/local/vmkeepd-launch) as the command
// of a unit shaped like snapd's, in a private systemd. snapd's refresh: stop the unit, kill what
// remains in its cgroup, switch `current`, start the unit. The VMs survive, are stale (on rev 11's
// QEMU), and --refresh-at-start moves them by the snap option refresh.strategy. The negative
// control runs the same refresh with a vmkeepd that keeps its QEMUs in its own cgroup.
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ApiClient } from '../../daemon/index.js';
import { isSameProcess, readExe, readProcessIdentity } from '../../launcher/index.js';
import { countTicks, ensureGuestImage, requireQemu, waitForSerial, type GuestImage } from '../support/guest.js';
import {
  currentRevision, installRevision, makeSnapRoot, prepareSnapUnit, snapLayout, snapSet, SNAP_UNIT, switchCurrent, type SnapLayout,
} from '../support/snap-sim.js';
import { scopeProcesses } from '../support/qemu-procs.js';
import { SNAP_DAEMON } from '../support/snapd-host.js';
import { requireSystemdHostPrereqs, SystemdHost } from '../support/systemd-host.js';
import { waitForVm } from '../support/vm-wait.js';

let guest: GuestImage;
const cleanups: Array<() => Promise<void>> = [];

beforeAll(async () => {
  requireQemu();
  requireSystemdHostPrereqs();
  guest = await ensureGuestImage();
});

afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

interface SnapHost {
  layout: SnapLayout;
  host: SystemdHost;
  api: ApiClient;
  serialLog(vm: string): string;
}

/** Revisions 11 and 12 installed, `current` -> 11, the service started in a private systemd. */
async function bootSnapHost(name: string, extraArgs: string[] = []): Promise<SnapHost> {
  const root = await makeSnapRoot('vk-snap-');
  cleanups.push(() => rm(root, { recursive: true, force: true }));
  const layout = snapLayout(root);
  await installRevision(layout, '11');
  await installRevision(layout, '12');
  await switchCurrent(layout, '11');
  const unit = await prepareSnapUnit(layout, extraArgs);
  const host = await SystemdHost.boot({ name, unitFiles: { [SNAP_UNIT]: unit } });
  cleanups.push(() => host.shutdown());
  await host.systemctl('start', SNAP_UNIT);
  // The launcher's control socket, $SNAP_COMMON/vmkeep.sock (vmkeepd binds it: no socket unit here).
  const api = new ApiClient({ socketPath: join(layout.common, 'vmkeep.sock'), timeoutMs: 60_000 });
  return { layout, host, api, serialLog: (vm) => join(layout.common, 'log', vm, 'serial.log') };
}

/** What snapd does on `snap refresh vmkeep`, for the service. */
async function snapdRefresh(snap: SnapHost, to: string): Promise<void> {
  await snap.host.systemctl('stop', SNAP_UNIT);
  // snapd then kills whatever is left in the snap's cgroups; nothing of a VM may be there.
  await snap.host.systemctl('kill', '--signal=SIGKILL', SNAP_UNIT).catch(() => undefined);
  await switchCurrent(snap.layout, to);
  await snap.host.systemctl('start', SNAP_UNIT);
}

async function createVms(snap: SnapHost, names: string[]): Promise<Map<string, { pid: number; startTime: string }>> {
  await Promise.all(names.map((name) => snap.api.create({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 })));
  const pids = new Map<string, { pid: number; startTime: string }>();
  for (const name of names) {
    await waitForSerial(snap.serialLog(name), 'GUEST READY', 120_000);
    const vm = await snap.api.get(name);
    const pid = snap.host.hostPidOf(vm.pid as number) as number;
    pids.set(name, { pid, startTime: readProcessIdentity(pid)?.startTime ?? '' });
  }
  return pids;
}

/** Every process of the VM scopes runs as snap_daemon (apps.vmkeepd.environment in snapcraft.yaml), each VM has one. */
function expectQemusAsSnapDaemon(snap: SnapHost, names: string[]): void {
  const scopes = scopeProcesses(snap.host.cgroupDir);
  const { uid } = SNAP_DAEMON;
  for (const name of names) {
    const procs = scopes.get(name) ?? [];
    expect(procs.length, `${name}'s scope holds its QEMU`).toBeGreaterThan(0);
    for (const p of procs) expect({ name, uids: p.uids }).toEqual({ name, uids: [uid, uid, uid, uid] });
  }
}

describe('a snap refresh, the way snapd does it', () => {
  it('VMs survive, are stale on the old revision, and the configured strategy moves them', async () => {
    const snap = await bootSnapHost(`snap-${process.pid}`);
    const before = await createVms(snap, ['s1', 's2']);
    const rev11 = join(snap.layout.revision('11'), 'usr', 'bin', 'qemu-system-x86_64');
    const rev12 = join(snap.layout.revision('12'), 'usr', 'bin', 'qemu-system-x86_64');
    for (const { pid } of before.values()) expect(readExe(pid)?.path).toBe(rev11);
    expectQemusAsSnapDaemon(snap, [...before.keys()]);
    // The launcher names the snap's guests service, so at host shutdown each scope stops after it.
    expect(await snap.host.systemctl('show', '--property=Before', '--value', 'vmkeep-s1.scope')).toContain('snap.vmkeep.guests.service');

    // First a refresh with the default strategy (manual): everything survives and is reported.
    await snapdRefresh(snap, '12');
    expect(await currentRevision(snap.layout)).toBe('12');
    const status = await snap.api.upgradeStatus();
    expect(status.channels[0]).toMatchObject({ installation: 'rev-12', binary: rev12 });
    for (const [name, old] of before) {
      expect(isSameProcess(old.pid, old.startTime), `${name} survived the refresh`).toBe(true);
      expect(status.vms.find((v) => v.name === name)).toMatchObject({ state: 'running', installation: 'rev-11', stale: true, policy: 'manual' });
    }
    const installations = JSON.parse(await readFile(join(snap.layout.common, 'installations.json'), 'utf8')) as { installations: Array<{ name: string }> };
    expect(installations.installations.map((i) => i.name)).toEqual(['rev-12', 'rev-11']);

    // `snap set vmkeep refresh.strategy=migrate`, then the next start applies it (a revert to 11
    // and a refresh to 12 again would do the same): both VMs move live onto rev 12's QEMU.
    await snapSet(snap.layout, 'refresh.strategy', 'migrate');
    const ticks = new Map([...before.keys()].map((n) => [n, countTicks(snap.serialLog(n))]));
    await snap.host.systemctl('restart', SNAP_UNIT);
    for (const name of before.keys()) {
      const vm = await waitForVm(snap.api, name, (v) => v.state === 'running' && v.installation === 'rev-12', 'moved onto rev-12 by --refresh-at-start');
      expect(readExe(snap.host.hostPidOf(vm.pid as number) as number)?.path).toBe(rev12);
      await waitForSerial(snap.serialLog(name), new RegExp(`GUEST TICK ${(ticks.get(name) ?? 0) + 1}\\b`), 20_000);
      expect((await readFile(snap.serialLog(name), 'utf8')).match(/GUEST READY/g)).toHaveLength(1);
    }
    expect((await snap.api.upgradeStatus()).vms.filter((v) => v.stale)).toEqual([]);
    expectQemusAsSnapDaemon(snap, [...before.keys()]);
  });

  it('negative control: with the QEMUs in the service cgroup (--no-scope), the same refresh kills them', async () => {
    const snap = await bootSnapHost(`snapnc-${process.pid}`, ['--no-scope']);
    const before = await createVms(snap, ['c1']);
    await snapdRefresh(snap, '12');
    const old = before.get('c1') as { pid: number; startTime: string };
    expect(isSameProcess(old.pid, old.startTime)).toBe(false);
    expect((await snap.api.get('c1')).state).toBe('exited');
  });
});
