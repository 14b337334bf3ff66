// The snap, built by `npm run package:snap` and refreshed by a real snapd (Debian's, offline, in a
// private systemd: test/support/snapd-host.ts). One sequence: install x1 with 3 VMs; a real
// refresh to x2 (a changed QEMU: bookworm-backports' 10.0) under running guests; a second refresh
// to x3 with every VM still on x1, which snapd then discards (refresh.retain); `vmkeep refresh
// --stale` onto the current QEMU; `snap revert`; `snap remove` powering every guest off by ACPI.
// Then `snap set vmkeep refresh.strategy=migrate` and a refresh: the new vmkeepd moves the VM by
// itself (started by the configure hook: snapd starts only its socket). snapd's socket unit: no
// refused connection across `snap restart` and a SIGKILL (the refusals at a refresh, when snapd
// stops the socket, are the client's negative control); then a host reboot, after which the
// guests service starts vmkeepd and it starts the VMs again. The negative control of survival
// is a refresh with a snap whose vmkeepd keeps its QEMUs in the service's own cgroup (--no-scope).
// Least privilege: snapd creates snap_daemon for the snap (system-usernames, classic as it is) and
// every process of every VM scope runs as it, read from /proc/PID/status, after the install, each
// refresh (x1's QEMUs, then the live migration off the discarded x1), the revert, restarts, a
// SIGKILL of vmkeepd and a host reboot. Attacks: such a QEMU cannot open /etc/shadow (raw QMP),
// and a kernel in a folder only root can pass is refused at create, naming the fix.
import { createHash, randomUUID } from 'node:crypto';
import { copyFile, mkdtemp, open, readdir, readFile, rm, writeFile, type FileHandle } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ApiClient } from '../../daemon/index.js';
import { isSameProcess, readProcessIdentity } from '../../launcher/index.js';
import { countTicks, ensureGuestImage, requireQemu, waitForSerial, type GuestImage } from '../support/guest.js';
import { backportsQemuRoot } from '../support/installations.js';
import { projectRoot } from '../support/paths.js';
import { scopeProcesses } from '../support/qemu-procs.js';
import { requireSnapd, SNAP_DAEMON, SnapdHost } from '../support/snapd-host.js';
import { runClient } from '../support/socket-client.js';
import { requireSystemdHostPrereqs, waitFor } from '../support/systemd-host.js';
import { waitForVm } from '../support/vm-wait.js';

const DAEMON_UNIT = 'snap.vmkeep.vmkeepd.service';
const GUESTS_UNIT = 'snap.vmkeep.guests.service';
const SOCKET_UNIT = 'snap.vmkeep.vmkeepd.control.socket';
// Host paths snapd would write without the scratch binds; none may change.
const WATCHED = ['/etc/systemd/system', '/etc/udev/rules.d', '/etc/modules-load.d', '/usr/share/bash-completion/completions', '/snap', '/var/snap', '/var/lib/snapd', '/var/cache/snapd'];
// What useradd, groupadd and usermod write for snap_daemon, compared by content.
const WATCHED_FILES = ['/etc/passwd', '/etc/group', '/etc/shadow', '/etc/gshadow', '/var/log/lastlog', '/var/log/faillog'];

let guest: GuestImage;
let work: string;
const snaps: Record<'x1' | 'x2' | 'x3' | 'x1NoScope' | 'x2NoScope', string> = { x1: '', x2: '', x3: '', x1NoScope: '', x2NoScope: '' };
let watchedBefore: string;

async function listing(): Promise<string> {
  const parts: string[] = [];
  for (const dir of WATCHED) {
    parts.push(`${dir}: ${existsSync(dir) ? (await readdir(dir, { recursive: true })).sort().join(' ') : '(absent)'}`);
  }
  for (const file of WATCHED_FILES) {
    parts.push(`${file}: ${existsSync(file) ? createHash('sha256').update(await readFile(file)).digest('hex') : '(absent)'}`);
  }
  return parts.join('\n');
}

async function buildSnap(version: string, prime: string, extra: string[] = []): Promise<string> {
  const r = await execa('bash', [join(projectRoot(), 'packaging', 'snap', 'build.sh'), '--no-build', '--compression', 'lzo',
    '--version', version, '--out', work, '--prime', prime, ...extra], { reject: false, stdin: 'ignore' });
  if (r.exitCode !== 0) throw new Error(`npm run package:snap -- --version ${version} failed (exit ${r.exitCode}):\n${r.stderr}`);
  return r.stdout.trim().split('\n').at(-1) as string;
}

/** A variant of a built snap: its prime folder (hard links), another version, vmkeepd run by `command`. */
async function variant(prime: string, version: string, command = 'bin/vmkeepd-launch'): Promise<string> {
  const dir = `${prime}-${version}`;
  await execa('cp', ['-al', prime, dir]);
  const yamlPath = join(dir, 'meta', 'snap.yaml');
  const yaml = (await readFile(yamlPath, 'utf8')).replace(/^version: .*$/m, `version: ${version}`).replace('command: bin/vmkeepd-launch', `command: ${command}`);
  // A new file, not a write through the hard link into the original prime folder.
  await rm(yamlPath);
  await writeFile(yamlPath, yaml);
  await execa('snap', ['pack', '--compression=lzo', `--filename=vmkeep_${version}.snap`, dir, work]);
  return join(work, `vmkeep_${version}.snap`);
}

beforeAll(async () => {
  requireQemu();
  requireSystemdHostPrereqs();
  requireSnapd();
  guest = await ensureGuestImage();
  watchedBefore = await listing();
  work = await mkdtemp(join(tmpdir(), 'vk-snapd-build-'));
  const qemu10 = await backportsQemuRoot();
  snaps.x1 = await buildSnap('0.1.0', join(work, 'prime1'));
  snaps.x2 = await buildSnap('0.1.0+qemu10', join(work, 'prime2'), ['--qemu-root', qemu10]);
  // x3: the same build as x2 under another version (a refresh that changes no QEMU byte).
  snaps.x3 = await variant(join(work, 'prime2'), '0.1.0+x3');
  snaps.x1NoScope = await variant(join(work, 'prime1'), '0.1.0+noscope', 'bin/vmkeepd-launch --no-scope');
  snaps.x2NoScope = await variant(join(work, 'prime2'), '0.1.0+qemu10noscope', 'bin/vmkeepd-launch --no-scope');
}, 600_000);

afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

interface Booted {
  snapd: SnapdHost;
  api: ApiClient;
  serialLog(vm: string): string;
  vmkeep(args: string[], timeoutMs?: number): Promise<string>;
  mainPid(unit: string): Promise<number>;
  /** Host PID and start time of each VM's QEMU. */
  qemus(names: string[]): Promise<Map<string, { pid: number; startTime: string }>>;
}

/** The snap's $SNAP_COMMON (/var/snap/vmkeep/common inside), as seen from outside: a scratch folder. */
function snapCommon(snapd: SnapdHost, ...parts: string[]): string {
  return join(snapd.scratch, 'fs', 'var_snap', 'vmkeep', 'common', ...parts);
}

/** The control socket snapd's socket unit holds, $SNAP_COMMON/vmkeep.sock. */
function controlSocket(snapd: SnapdHost): string {
  return snapCommon(snapd, 'vmkeep.sock');
}

/**
 * vmkeepd started by the snap itself (bin/vmkeepd-wake, from the configure hook or the guests
 * service), with no client connecting: only systemd is asked. Its MainPID once it is up.
 */
async function daemonStarted(b: Booted, why: string): Promise<number> {
  await waitFor(`${DAEMON_UNIT} to be active (${why}), with no client connecting`, 120_000, async () =>
    (await b.snapd.host.exec('systemctl', ['is-active', DAEMON_UNIT])).stdout.trim() === 'active' ? true : undefined);
  return b.mainPid(DAEMON_UNIT);
}

async function bootSnapd(name: string): Promise<Booted> {
  const snapd = await SnapdHost.boot(name);
  await snapd.installStandIns('core24');
  const api = new ApiClient({ socketPath: controlSocket(snapd), timeoutMs: 60_000 });
  const booted: Booted = {
    snapd,
    api,
    // $SNAP_COMMON/log: /var/snap is a scratch folder of the snapd host.
    serialLog: (vm) => snapCommon(snapd, 'log', vm, 'serial.log'),
    vmkeep: async (args, timeoutMs = 120_000) => (await snapd.run('/snap/bin/vmkeep', args, { timeoutMs })).stdout,
    mainPid: async (unit) => Number((await snapd.host.systemctl('show', '--property=MainPID', '--value', unit)).trim()),
    qemus: async (names) => {
      const out = new Map<string, { pid: number; startTime: string }>();
      for (const n of names) {
        const vm = await api.get(n);
        const pid = snapd.host.hostPidOf(vm.pid as number);
        if (pid === null) throw new Error(`no host PID for ${n}'s QEMU (PID ${String(vm.pid)} inside)`);
        out.set(n, { pid, startTime: readProcessIdentity(pid)?.startTime ?? '' });
      }
      return out;
    },
  };
  return booted;
}

/** `vmkeep create` through the snap's own command, for each name; waits for each guest. */
async function createVms(b: Booted, names: string[]): Promise<void> {
  for (const name of names) {
    const spec = join(work, `${name}.json`);
    await writeFile(spec, JSON.stringify({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 }));
    await b.vmkeep(['create', spec]);
  }
  for (const name of names) await waitForSerial(b.serialLog(name), 'GUEST READY', 120_000);
}

/** The id of snapd's latest change and its tasks. */
async function lastChangeTasks(b: Booted): Promise<string> {
  const changes = (await b.snapd.snap(['changes'])).stdout.trim().split('\n');
  const id = changes.at(-1)?.split(/\s+/)[0] ?? '';
  return (await b.snapd.snap(['tasks', id])).stdout;
}

/**
 * Every process of every VM scope runs as snap_daemon (uid and gid: real, effective, saved, fs)
 * and is a QEMU; each of `names` has one there (snap/snapcraft.yaml, system-usernames).
 */
function expectQemusAsSnapDaemon(b: Booted, names: string[], when: string): void {
  const scopes = scopeProcesses(b.snapd.host.cgroupDir);
  for (const name of names) expect(scopes.get(name)?.length ?? 0, `${name}'s scope holds its QEMU ${when}`).toBeGreaterThan(0);
  const { uid, gid } = SNAP_DAEMON;
  let count = 0;
  for (const [vm, procs] of scopes) {
    for (const p of procs) {
      expect({ vm, pid: p.pid, qemu: p.exe?.endsWith('/usr/bin/qemu-system-x86_64'), uids: p.uids, gids: p.gids }, `${vm}'s scope (${p.exe ?? '?'}) ${when}`)
        .toEqual({ vm, pid: p.pid, qemu: true, uids: [uid, uid, uid, uid], gids: [gid, gid, gid, gid] });
      count++;
    }
  }
  process.stdout.write(`QEMU's user ${when}: ${count} process(es) in ${scopes.size} VM scope(s), every one snap_daemon (uid ${uid})\n`);
}

async function ticksGoOn(b: Booted, names: string[]): Promise<void> {
  for (const name of names) {
    const n = countTicks(b.serialLog(name));
    await waitForSerial(b.serialLog(name), new RegExp(`GUEST TICK ${n + 1}\\b`), 20_000);
  }
}

describe('the snap under a real snapd', () => {
  const cleanups: Array<() => Promise<void>> = [];
  afterAll(async () => {
    for (const c of cleanups.reverse()) await c();
    // Nothing of snapd is left on the host: its mounts and loop devices went with the private
    // mount namespace, and the host paths it writes were never touched.
    expect(readFileSync('/proc/self/mountinfo', 'utf8')).not.toMatch(/ \/snap\/| vk-snapd-| vmkeep-snapd-/);
    expect((await execa('losetup', ['--list', '--noheadings', '--output', 'BACK-FILE'])).stdout).not.toMatch(/vmkeep_|core24|snapd_/);
    expect(await listing()).toBe(watchedBefore);
  });

  it('install x1, refresh to x2 and x3 under 3 running VMs (x1 discarded), refresh --stale, revert, remove powers the guests off', async () => {
    const b = await bootSnapd(`snapd-${process.pid}`);
    cleanups.push(() => b.snapd.shutdown());
    try {
    const names = ['a1', 'a2', 'a3'];

    // 1. install x1: both services active, 3 VMs through /snap/bin/vmkeep.
    await b.snapd.snap(['install', '--dangerous', '--classic', snaps.x1]);
    // snapd holds the control socket and starts only it; the configure hook starts vmkeepd.
    expect((await b.snapd.host.systemctl('is-active', SOCKET_UNIT)).trim()).toBe('active');
    const daemonPid = await daemonStarted(b, 'after the install');
    const services = (await b.snapd.snap(['services', 'vmkeep'])).stdout;
    expect(services).toMatch(/^vmkeep\.vmkeepd\s+enabled\s+active\s+socket-activated/m);
    expect(services).toMatch(/^vmkeep\.guests\s+enabled\s+active/m);
    await createVms(b, names);
    expect(await b.vmkeep(['list'])).toMatch(/a1[\s\S]*a2[\s\S]*a3/);
    // snapd made QEMU's user (the scratch /etc began without it), the configure hook put it in
    // the kvm group, and every QEMU runs as it.
    expect((await b.snapd.host.exec('getent', ['passwd', SNAP_DAEMON.name])).stdout.trim()).toBe(`${SNAP_DAEMON.name}:x:${SNAP_DAEMON.uid}:${SNAP_DAEMON.gid}::/nonexistent:/usr/bin/false`);
    expect((await b.snapd.host.exec('id', ['-nG', SNAP_DAEMON.name])).stdout.trim().split(' ')).toContain('kvm');
    expectQemusAsSnapDaemon(b, names, 'after the install');
    // Attacks. QEMU as root could open /etc/shadow (qemu-user.test.ts, its negative control);
    // as snap_daemon it cannot, even told to by the admin's raw QMP.
    await expect(b.api.qmp('a1', 'blockdev-add', { driver: 'file', 'node-name': 'shadow', filename: '/etc/shadow', 'read-only': true })).rejects.toThrow(/Permission denied/);
    // A kernel only root can reach (work is 0700) is refused at create, naming the fix.
    const hiddenKernel = join(work, 'vmlinuz-root-only');
    await copyFile(guest.kernel, hiddenKernel);
    const hiddenSpec = join(work, 'hidden.json');
    await writeFile(hiddenSpec, JSON.stringify({ name: 'hidden', kernel: hiddenKernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 }));
    const refused = await b.vmkeep(['create', hiddenSpec]).then(() => 'created', (error: unknown) => String(error));
    expect(refused).toContain(`${hiddenKernel} cannot be read by QEMU's user snap_daemon: it cannot pass through ${work}`);
    expect(refused).toContain(`chmod o+r ${hiddenKernel}`);
    expect(await b.vmkeep(['list'])).not.toContain('hidden');
    const before = await b.qemus(names);
    const guestsSince = await b.snapd.host.systemctl('show', '--property=ActiveEnterTimestampMonotonic', '--value', GUESTS_UNIT);
    for (const v of (await b.api.upgradeStatus()).vms) expect(v).toMatchObject({ installation: 'rev-x1', stale: false });

    // 2. a real refresh: snapd runs the snap's hooks, restarts vmkeepd from x2, leaves the guests
    // service (endure) and every QEMU alone.
    await b.snapd.snap(['install', '--dangerous', '--classic', snaps.x2]);
    const tasks = await lastChangeTasks(b);
    expect(tasks).toMatch(/Done .*Run post-refresh hook of "vmkeep" snap/);
    expect(tasks).toMatch(/Done .*Run configure hook of "vmkeep" snap/);
    expect(tasks).toMatch(/Done .*Stop snap "vmkeep" services/);
    expect(tasks).toMatch(/Done .*Start snap "vmkeep" .*services/);
    const newDaemonPid = await daemonStarted(b, 'after the refresh');
    expect(await b.vmkeep(['--version'])).toContain('0.1.0+qemu10');
    expect(newDaemonPid).not.toBe(daemonPid);
    expect(newDaemonPid).toBeGreaterThan(0);
    expect(await b.snapd.host.systemctl('show', '--property=ActiveEnterTimestampMonotonic', '--value', GUESTS_UNIT)).toBe(guestsSince);
    expect((await b.snapd.host.systemctl('is-active', GUESTS_UNIT)).trim()).toBe('active');
    for (const [name, q] of before) expect(isSameProcess(q.pid, q.startTime), `${name}'s QEMU survived the refresh`).toBe(true);
    await ticksGoOn(b, names);
    const status = await b.api.upgradeStatus();
    expect(status.channels[0]).toMatchObject({ installation: 'rev-x2', binary: '/snap/vmkeep/x2/usr/bin/qemu-system-x86_64' });
    for (const name of names) {
      expect(status.vms.find((v) => v.name === name)).toMatchObject({ state: 'running', installation: 'rev-x1', stale: true });
    }
    expect(await b.vmkeep(['upgrade-status'])).toMatch(/rev-x1/);
    expectQemusAsSnapDaemon(b, names, "after the refresh to x2 (x1's QEMUs)");

    // 4. a second refresh, x2 -> x3, with every VM still on x1: snapd keeps 2 revisions
    // (refresh.retain) and discards x1 under the running QEMUs. vmkeep holds nothing: each VM
    // keeps running from the binary it opened (the squashfs stays alive, detached, while it is
    // in use) with its modules from vmkeep's pinned copies, and upgrade-status says so.
    await b.snapd.snap(['install', '--dangerous', '--classic', snaps.x3]);
    const revisions = (await b.snapd.snap(['list', '--all', 'vmkeep'])).stdout;
    expect(revisions).toMatch(/\bx2\b.*disabled/);
    expect(revisions).toMatch(/\bx3\b/);
    expect(revisions).not.toMatch(/\bx1\b/);
    expect((await b.snapd.host.exec('test', ['-e', '/snap/vmkeep/x1'])).exitCode, '/snap/vmkeep/x1 is gone').not.toBe(0);
    for (const [name, q] of before) expect(isSameProcess(q.pid, q.startTime), `${name}'s QEMU survived the discard of x1`).toBe(true);
    await ticksGoOn(b, names);
    const discarded = await b.api.upgradeStatus();
    expect(discarded.channels[0]).toMatchObject({ installation: 'rev-x3' });
    for (const name of names) {
      const row = discarded.vms.find((v) => v.name === name);
      expect(row).toMatchObject({ state: 'running', installation: 'rev-x1', stale: true });
      expect(row?.reasons.join(' ')).toContain('it runs /snap/vmkeep/x1/usr/bin/qemu-system-x86_64, which is no longer at that path');
    }
    expect(await b.vmkeep(['upgrade-status'])).toContain('snap revision snapd discarded');

    // 3. every VM moved live onto the current QEMU (x3's: the same build as x2's, QEMU 10.0),
    // from the discarded x1, no guest rebooted.
    await b.vmkeep(['refresh', '--stale', '--strategy', 'migrate'], 300_000);
    for (const name of names) {
      await waitForVm(b.api, name, (v) => v.state === 'running' && v.installation === 'rev-x3', 'on rev-x3 after refresh --stale');
      expect((await readFile(b.serialLog(name), 'utf8')).match(/GUEST READY/g)).toHaveLength(1);
    }
    const after = await b.qemus(names);
    for (const [name, q] of before) {
      expect(isSameProcess(q.pid, q.startTime), `${name}'s x1 QEMU is gone`).toBe(false);
      expect(after.get(name)?.pid).not.toBe(q.pid);
    }
    await ticksGoOn(b, names);
    expect((await b.api.upgradeStatus()).vms.filter((v) => v.stale)).toEqual([]);
    // Both ends of each migration ran as snap_daemon: x1's QEMU with its pinned modules, x3's.
    expectQemusAsSnapDaemon(b, names, 'after the live migration from the discarded x1 onto x3');

    // 5. snap revert: vmkeepd back on x2 (only the configure hook runs), the VMs untouched.
    const x3DaemonPid = await b.mainPid(DAEMON_UNIT);
    await b.snapd.snap(['revert', 'vmkeep']);
    expect(await lastChangeTasks(b)).toMatch(/Done .*Run configure hook of "vmkeep" snap/);
    expect(await b.vmkeep(['--version'])).toContain('0.1.0+qemu10');
    expect(await b.mainPid(DAEMON_UNIT)).not.toBe(x3DaemonPid);
    for (const [name, q] of after) expect(isSameProcess(q.pid, q.startTime), `${name}'s QEMU survived the revert`).toBe(true);
    await ticksGoOn(b, names);
    const reverted = await b.api.upgradeStatus();
    expect(reverted.channels[0]).toMatchObject({ installation: 'rev-x2' });
    // x3's QEMU is x2's build: nothing to move back.
    expect(reverted.vms.filter((v) => v.stale)).toEqual([]);
    expectQemusAsSnapDaemon(b, names, 'after the revert');

    // 6. snap remove: the remove hook powers every guest off by ACPI; nothing is killed.
    // snapd deletes $SNAP_COMMON, the consoles' folder with it: each console is held open
    // beforehand and read through that descriptor afterwards.
    const consoles = new Map<string, FileHandle>();
    try {
      for (const name of after.keys()) consoles.set(name, await open(b.serialLog(name), 'r'));
      await b.snapd.snap(['remove', 'vmkeep'], { timeoutMs: 180_000 });
      for (const [name, q] of after) {
        expect(await consoles.get(name)?.readFile('utf8'), `${name} was powered off by ACPI`).toContain('GUEST POWEROFF');
        await waitFor(`${name}'s QEMU (PID ${q.pid}) to exit after the guest powered off`, 20_000, () => (isSameProcess(q.pid, q.startTime) ? undefined : true));
      }
    } finally {
      for (const handle of consoles.values()) await handle.close();
    }
    expect((await b.snapd.host.exec('systemctl', ['list-units', '--no-legend', 'vmkeep-*.scope'])).stdout.trim()).toBe('');
    } finally {
      await b.snapd.shutdown();
    }
  }, 900_000);

  it('snap set vmkeep refresh.strategy=migrate, then a refresh: the new vmkeepd moves the stale VM by itself', async () => {
    const b = await bootSnapd(`snapdmg-${process.pid}`);
    cleanups.push(() => b.snapd.shutdown());
    try {
      await b.snapd.snap(['install', '--dangerous', '--classic', snaps.x1]);
      await createVms(b, ['m1']);
      const [q] = [...(await b.qemus(['m1'])).values()] as [{ pid: number; startTime: string }];
      // The configure hook restarts vmkeepd for the new strategy; the VM is not touched.
      await b.snapd.snap(['set', 'vmkeep', 'refresh.strategy=migrate']);
      expect(isSameProcess(q.pid, q.startTime)).toBe(true);
      await b.snapd.snap(['install', '--dangerous', '--classic', snaps.x2]);
      // Started by the configure hook: no client connects before it has moved the VM.
      await daemonStarted(b, 'after the refresh');
      const record = snapCommon(b.snapd, 'state', 'vms', 'm1.json');
      await waitFor('m1 moved onto rev-x2 (its record names it), before any client connects', 120_000, async () => {
        const text = await readFile(record, 'utf8').catch(() => '{}');
        return (JSON.parse(text) as { installation?: { name?: string } }).installation?.name === 'rev-x2' ? true : undefined;
      });
      const vm = await waitForVm(b.api, 'm1', (v) => v.state === 'running' && v.installation === 'rev-x2', 'moved onto rev-x2 by the new vmkeepd (--refresh-at-start)');
      expect(vm.pid).not.toBe(undefined);
      // The record names the new QEMU (and the old one as retired) before vmkeepd quits the old one.
      await waitFor(`m1's x1 QEMU (PID ${q.pid}) to be quit after the live migration`, 30_000, () => (isSameProcess(q.pid, q.startTime) ? undefined : true));
      expect((await readFile(b.serialLog('m1'), 'utf8')).match(/GUEST READY/g)).toHaveLength(1);
      await ticksGoOn(b, ['m1']);
      expectQemusAsSnapDaemon(b, ['m1'], 'after the refresh that moved m1 by itself');
    } finally {
      await b.snapd.shutdown();
    }
  }, 600_000);

  it("snapd's socket unit: no refusal across restarts and a SIGKILL of vmkeepd (refusals at a refresh); a host reboot brings the VMs back (the guests service starts vmkeepd)", async () => {
    const b = await bootSnapd(`snapdsk-${process.pid}`);
    cleanups.push(() => b.snapd.shutdown());
    try {
      await b.snapd.snap(['install', '--dangerous', '--classic', snaps.x1]);
      await daemonStarted(b, 'after the install');
      await createVms(b, ['back', 'off']);
      expect(await b.vmkeep(['set', 'off', 'autostart=never'])).toContain('off: autostart=never');

      // 1. Requests back to back while snapd restarts vmkeepd twice and it is SIGKILLed once
      // (restart-condition: on-failure brings it back): the socket unit holds every connection.
      // Four starts in all: snapd's unit keeps systemd's start limit (5 in 10 s), which a fifth
      // quick start would hit, failing the service and its socket.
      let done = false;
      const client = runClient(controlSocket(b.snapd), () => done);
      try {
        for (let i = 0; i < 2; i++) {
          const pid = await b.mainPid(DAEMON_UNIT);
          await b.snapd.snap(['restart', 'vmkeep.vmkeepd']);
          expect(await daemonStarted(b, `after snap restart ${i + 1}`)).not.toBe(pid);
        }
        const pid = await b.mainPid(DAEMON_UNIT);
        await b.snapd.host.systemctl('kill', '--signal=SIGKILL', DAEMON_UNIT);
        await waitFor(`${DAEMON_UNIT} restarted after its SIGKILL`, 60_000, async () => {
          const now = await b.mainPid(DAEMON_UNIT);
          return now !== pid && now > 0 && (await b.snapd.host.exec('systemctl', ['is-active', DAEMON_UNIT])).stdout.trim() === 'active' ? true : undefined;
        }).catch(async (error: unknown) => {
          const status = await b.snapd.host.exec('systemctl', ['status', '--no-pager', '--lines=20', DAEMON_UNIT, SOCKET_UNIT]);
          throw new Error(`${(error as Error).message}\n${status.stdout}`, { cause: error });
        });
      } finally {
        done = true;
      }
      const tally = await client;
      process.stdout.write(`snap socket unit, 2 snap restarts + 1 SIGKILL: ${tally.ok} requests, refused ${tally.refused}, cut ${tally.cut}, failed ${tally.failed}, longest wait ${Math.round(tally.longestWaitMs)} ms\n`);
      expect(tally.errors).toEqual([]);
      expect(tally.refused).toBe(0);
      expect(tally.failed).toBe(0);
      expect(tally.ok).toBeGreaterThan(0);
      expectQemusAsSnapDaemon(b, ['back', 'off'], 'after 2 snap restarts and a SIGKILL of vmkeepd');

      // Negative control, and the one gap: at a refresh snapd stops the socket unit with the
      // service (and starts the new revision's): the same client sees those refusals.
      done = false;
      const refreshing = runClient(controlSocket(b.snapd), () => done);
      try {
        await b.snapd.snap(['install', '--dangerous', '--classic', snaps.x2]);
        await daemonStarted(b, 'after the refresh');
      } finally {
        done = true;
      }
      const atRefresh = await refreshing;
      process.stdout.write(`snap socket unit, a refresh: ${atRefresh.ok} requests, refused ${atRefresh.refused}, cut ${atRefresh.cut}, failed ${atRefresh.failed}, longest wait ${Math.round(atRefresh.longestWaitMs)} ms\n`);
      expect(atRefresh.refused).toBeGreaterThan(0);
      expect(atRefresh.failed).toBe(0);

      // 2. A host reboot: the guests service powers the guests off, vmkeepd stops, a new boot ID.
      await b.snapd.host.systemctl('stop', GUESTS_UNIT);
      await b.snapd.host.systemctl('stop', DAEMON_UNIT);
      for (const name of ['back', 'off']) expect(await readFile(b.serialLog(name), 'utf8')).toContain('GUEST POWEROFF');
      await writeFile(join(b.snapd.host.runDir, 'vmkeep-boot-id'), `${randomUUID()}\n`);
      // At boot systemd starts the socket (enabled) but never vmkeepd itself: its unit is static.
      expect((await b.snapd.host.exec('systemctl', ['is-enabled', DAEMON_UNIT])).stdout.trim()).toBe('static');
      expect((await b.snapd.host.exec('systemctl', ['is-active', DAEMON_UNIT])).stdout.trim()).toBe('inactive');
      // The guests service (enabled: started at every boot) starts it: it starts `back` again
      // (autostart last-state: running when the host went down), not `off` (autostart never).
      await b.snapd.host.systemctl('start', GUESTS_UNIT);
      await daemonStarted(b, 'by the guests service at boot');
      // Running first: by then its console log of the last boot has been moved to serial.log.1.
      await waitForVm(b.api, 'back', (v) => v.state === 'running', 'running again after the reboot');
      await waitForSerial(b.serialLog('back'), 'GUEST READY', 120_000);
      expect((await b.api.get('off')).state).toBe('stopped');
      expectQemusAsSnapDaemon(b, ['back'], 'after the host reboot');
    } finally {
      await b.snapd.shutdown();
    }
  }, 600_000);

  it('negative control: a vmkeepd that keeps its QEMUs in its own cgroup loses them at the refresh', async () => {
    const b = await bootSnapd(`snapdnc-${process.pid}`);
    cleanups.push(() => b.snapd.shutdown());
    try {
    await b.snapd.snap(['install', '--dangerous', '--classic', snaps.x1NoScope]);
    await createVms(b, ['n1']);
    const [q] = [...(await b.qemus(['n1'])).values()] as [{ pid: number; startTime: string }];
    await b.snapd.snap(['install', '--dangerous', '--classic', snaps.x2NoScope]);
    expect(isSameProcess(q.pid, q.startTime)).toBe(false);
    expect(await readFile(b.serialLog('n1'), 'utf8')).not.toContain('GUEST POWEROFF');
    await waitForVm(b.api, 'n1', (v) => v.state === 'exited', 'reported exited after the refresh killed it');
    } finally {
      await b.snapd.shutdown();
    }
  }, 600_000);
});
