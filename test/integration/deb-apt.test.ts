// vmkeep's .deb (npm run package:deb) on a REAL fresh Debian bookworm, booted with its own
// systemd (test/support/debian-root.ts), installed and upgraded with apt:
//   1. apt install ./vmkeep_1.deb: vmkeepd active, 3 VMs created and running;
//   2. apt install ./vmkeep_2.deb: maintainer scripts ran (dpkg state, vmkeepd's new PID,
//      vmkeep-guests.service untouched), the 3 QEMUs keep their PIDs, guests keep ticking,
//      the daemon reports version 2;
//   3. a real QEMU package upgrade inside the root (7.2 -> 10.0 from bookworm-backports):
//      VMs stale with both versions, `vmkeep refresh --stale --strategy migrate` moves them onto
//      10.0 live, guests never rebooted;
//   4. apt remove vmkeep: every guest powered off by ACPI first, no QEMU killed; apt purge
//      keeps the VM records unless VMKEEP_PURGE_STATE=yes;
//   5. negative control: the same packages with a unit running vmkeepd --no-scope (VMs in the
//      service's cgroup) lose the VM on the upgrade of step 2.
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ApiClient, type VmView } from '../../daemon/index.js';
import { DebianRoot, ensureDebianRoot } from '../support/debian-root.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { projectRoot } from '../support/paths.js';

const ROOT = projectRoot();
const BUILD = join(ROOT, 'packaging', 'deb', 'build.sh');
const V1 = '0.1.0+t1';
const V2 = '0.1.0+t2';
const VMS = ['deb1', 'deb2', 'deb3'];
const SHARE = '/srv/share';
const GUEST = '/srv/guest';
const APT_ENV = { DEBIAN_FRONTEND: 'noninteractive' };

let guest: GuestImage;
let share: string;
const debs: Record<string, string> = {};

/** Builds the package from this tree with the given version; resolves with its file name. */
async function buildDeb(version: string): Promise<string> {
  const result = await execa('bash', [BUILD, '--version', version, '--out', share, '--compress', 'zstd'], { reject: false, all: true, stdin: 'ignore' });
  if (result.exitCode !== 0) throw new Error(`npm run package:deb -- --version ${version} failed:\n${result.all}`);
  return basename(result.stdout.trim().split('\n').at(-1) ?? '');
}

/** A variant of a built package whose unit runs vmkeepd --no-scope: its VMs live in the service's cgroup. */
async function noScopeVariant(file: string): Promise<string> {
  const dir = await mkdtemp(join(share, 'variant.'));
  try {
    await execa('dpkg-deb', ['-R', join(share, file), dir]);
    const unit = join(dir, 'lib', 'systemd', 'system', 'vmkeepd.service');
    const text = await readFile(unit, 'utf8');
    if (!/^ExecStart=\/usr\/bin\/vmkeepd$/m.test(text)) throw new Error('the packaged vmkeepd.service has no plain ExecStart=/usr/bin/vmkeepd');
    await writeFile(unit, text.replace(/^ExecStart=\/usr\/bin\/vmkeepd$/m, 'ExecStart=/usr/bin/vmkeepd --no-scope'));
    const out = file.replace(/\.deb$/, '-noscope.deb');
    await execa('dpkg-deb', ['--root-owner-group', '-Zzstd', '-b', dir, join(share, out)]);
    return out;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

beforeAll(async () => {
  guest = await ensureGuestImage();
  await ensureDebianRoot();
  // Beside the cached root, where the boot wrapper can always see it.
  await mkdir(join(ROOT, 'test', '.cache'), { recursive: true });
  share = await mkdtemp(join(ROOT, 'test', '.cache', 'deb-apt.'));
  debs.v1 = await buildDeb(V1);
  debs.v2 = await buildDeb(V2);
  debs.v1NoScope = await noScopeVariant(debs.v1);
  debs.v2NoScope = await noScopeVariant(debs.v2);
  for (const name of VMS) {
    await writeFile(join(share, `${name}.json`), JSON.stringify({
      name, memoryMiB: 128, kernel: `${GUEST}/vmlinuz`, initrd: `${GUEST}/initramfs.gz`, append: guest.append,
    }));
  }
}, 900_000);

afterAll(async () => {
  if (share) await rm(share, { recursive: true, force: true });
});

function bootRoot(name: string): Promise<DebianRoot> {
  return DebianRoot.boot({
    name: `${name}-${process.pid}`,
    binds: [{ host: share, inside: SHARE }, { host: dirname(guest.kernel), inside: GUEST, readOnly: true }],
  });
}

/** What the test watches of one VM inside the root. */
class RootVms {
  readonly api: ApiClient;

  constructor(readonly root: DebianRoot) {
    this.api = new ApiClient({ socketPath: root.path('/run/vmkeep/vmkeep.sock'), timeoutMs: 60_000 });
  }

  serial(name: string): string {
    return this.root.path(`/var/log/vmkeep/${name}/serial.log`);
  }

  /** Field 22 of the QEMU's /proc/PID/stat inside the root: the PID is still that process. */
  startTime(pid: number): string | null {
    try {
      const stat = readFileSync(this.root.path(`/proc/${pid}/stat`), 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      return fields[0] === 'Z' ? null : (fields[19] ?? null);
    } catch {
      return null;
    }
  }

  boots(name: string): number {
    return (readFileSync(this.serial(name), 'utf8').match(/GUEST READY/g) ?? []).length;
  }

  async unitProperty(unit: string, property: string): Promise<string> {
    return (await this.root.sh(`systemctl show -p ${property} --value ${unit}`)).trim();
  }

  async snapshot(): Promise<Map<string, { pid: number; start: string | null; ticks: number }>> {
    const out = new Map<string, { pid: number; start: string | null; ticks: number }>();
    for (const vm of await this.api.list()) {
      expect(vm.state, `${vm.name} is running`).toBe('running');
      out.set(vm.name, { pid: vm.pid as number, start: this.startTime(vm.pid as number), ticks: countTicks(this.serial(vm.name)) });
    }
    return out;
  }

  /** Every VM still the same QEMU process, running, and its guest ticking on without a reboot. */
  async expectSurvived(before: Map<string, { pid: number; start: string | null; ticks: number }>): Promise<VmView[]> {
    const views: VmView[] = [];
    for (const [name, old] of before) {
      const vm = await this.api.get(name);
      expect(vm.state, `${name} running`).toBe('running');
      expect(vm.pid, `${name}'s QEMU PID`).toBe(old.pid);
      expect(this.startTime(old.pid), `${name}'s QEMU is the same process`).toBe(old.start);
      await waitForSerial(this.serial(name), new RegExp(`GUEST TICK ${old.ticks + 2}\\b`), 30_000);
      expect(this.boots(name), `${name}'s guest never rebooted`).toBe(1);
      views.push(vm);
    }
    return views;
  }
}

describe('the .deb on a fresh Debian bookworm, installed, upgraded and removed with apt', () => {
  let root: DebianRoot;
  let vms: RootVms;

  beforeAll(async () => {
    root = await bootRoot('apt');
    vms = new RootVms(root);
  }, 120_000);

  afterAll(async () => {
    await root?.shutdown();
    expect(root?.leftovers() ?? []).toEqual([]);
  }, 60_000);

  it('1. apt install ./vmkeep_1.deb: vmkeepd and vmkeep-guests enabled and active; 3 VMs created and running', async () => {
    await root.sh(`apt-get install -y -q ./${debs.v1}`, { cwd: SHARE, env: APT_ENV, timeoutMs: 300_000 });
    for (const unit of ['vmkeepd.socket', 'vmkeepd.service', 'vmkeep-guests.service']) {
      expect((await root.exec(['systemctl', 'is-active', unit])).stdout.trim(), `${unit} active`).toBe('active');
      expect((await root.exec(['systemctl', 'is-enabled', unit])).stdout.trim(), `${unit} enabled`).toBe('enabled');
    }
    expect(await root.sh('vmkeep --version')).toMatch(new RegExp(`^vmkeep ${V1.replace('+', '\\+')} `));
    for (const name of VMS) await root.sh(`vmkeep create ${SHARE}/${name}.json`);
    for (const name of VMS) await waitForSerial(vms.serial(name), 'GUEST READY', 120_000);
    const list = await root.sh('vmkeep list');
    for (const name of VMS) expect(list).toMatch(new RegExp(`^${name}\\s+running\\s`, 'm'));
    expect((await vms.api.info()).version).toBe(V1);
  }, 300_000);

  it('2. apt install ./vmkeep_2.deb: scripts ran, vmkeepd restarted, the QEMUs and guests untouched, version 2 reported', async () => {
    const before = await vms.snapshot();
    expect(before.size).toBe(3);
    const daemonPid = await vms.unitProperty('vmkeepd.service', 'MainPID');
    const guestsInvocation = await vms.unitProperty('vmkeep-guests.service', 'InvocationID');
    const socketInvocation = await vms.unitProperty('vmkeepd.socket', 'InvocationID');

    await root.sh(`apt-get install -y -q ./${debs.v2}`, { cwd: SHARE, env: APT_ENV, timeoutMs: 300_000 });

    expect((await root.sh("dpkg-query -W -f='${Version} ${db:Status-Abbrev}' vmkeep")).trim()).toBe(`${V2} ii`);
    expect(await vms.unitProperty('vmkeepd.service', 'ActiveState')).toBe('active');
    expect(await vms.unitProperty('vmkeepd.service', 'MainPID'), 'postinst try-restarted vmkeepd').not.toBe(daemonPid);
    expect(await vms.unitProperty('vmkeep-guests.service', 'InvocationID'), 'vmkeep-guests.service was neither stopped nor restarted').toBe(guestsInvocation);
    expect(await vms.unitProperty('vmkeepd.socket', 'InvocationID'), 'vmkeepd.socket held the control socket through the upgrade').toBe(socketInvocation);
    await vms.expectSurvived(before);
    expect((await vms.api.info()).version).toBe(V2);
    expect(await root.sh('vmkeep --version')).toMatch(new RegExp(`^vmkeep ${V2.replace('+', '\\+')} `));
  }, 300_000);

  it('3. apt install -t bookworm-backports qemu-system-x86 (7.2 -> 10.0): stale with both versions, refreshed live onto 10.0', async () => {
    const before = await vms.snapshot();
    // Without recommends (GPU drivers, opengl): the root has no network, and QEMU needs none of them.
    await root.sh('apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86', { env: APT_ENV, timeoutMs: 300_000 });
    expect(await root.sh('qemu-system-x86_64 --version')).toMatch(/version 10\.0\./);

    const stale = await vms.api.upgradeStatus();
    for (const name of VMS) {
      const row = stale.vms.find((v) => v.name === name);
      expect(row, `${name} in upgrade-status`).toMatchObject({ stale: true, runningVersion: expect.stringMatching(/^7\.2\./), currentVersion: expect.stringMatching(/^10\.0\./) });
      // dpkg replaced the binary by rename: the running QEMU's exe reads "(deleted)".
      expect(row?.reasons.join(' ')).toMatch(/\(deleted\)/);
    }
    await vms.expectSurvived(before);
    // The package replaced the module files with 10.0's: a stale 7.2 QEMU still loads its own
    // (the copy vmkeepd pinned at its launch); qxl-vga is a loadable module in Debian's QEMU.
    const props = await vms.api.qmp('deb1', 'device-list-properties', { typename: 'qxl-vga' });
    expect(Array.isArray(props) && props.length > 0, 'the stale QEMU loaded its own qxl module').toBe(true);

    await root.sh('vmkeep refresh --stale --strategy migrate', { timeoutMs: 300_000 });
    const after = await vms.api.upgradeStatus();
    for (const name of VMS) {
      expect(after.vms.find((v) => v.name === name), `${name} after the refresh`).toMatchObject({ stale: false, runningVersion: expect.stringMatching(/^10\.0\./) });
      const ticks = countTicks(vms.serial(name));
      await waitForSerial(vms.serial(name), new RegExp(`GUEST TICK ${ticks + 2}\\b`), 30_000);
      expect(vms.boots(name), `${name}'s guest never rebooted`).toBe(1);
    }
  }, 400_000);

  it('4. apt remove vmkeep: every guest powered off by ACPI first, no QEMU killed; apt purge keeps the records', async () => {
    await root.sh('apt-get remove -y -q vmkeep', { env: APT_ENV, timeoutMs: 300_000 });
    expect(existsSync(root.path('/usr/bin/vmkeep')), '/usr/bin/vmkeep removed').toBe(false);
    expect((await root.exec(['systemctl', 'is-active', 'vmkeepd.service'])).stdout.trim()).not.toBe('active');
    for (const name of VMS) {
      const serial = readFileSync(vms.serial(name), 'utf8');
      expect(serial, `${name}'s guest got the ACPI power-off`).toContain('GUEST POWEROFF');
      const qemuLog = readFileSync(root.path(`/var/log/vmkeep/${name}/qemu.log`), 'utf8');
      expect(qemuLog, `${name}'s QEMU was not signalled`).not.toMatch(/terminating on signal/);
    }
    const qemus = await root.exec(['pgrep', '-c', 'qemu-system']);
    expect(qemus.stdout.trim(), 'no QEMU left').toBe('0');

    // A purge keeps the VM records unless asked (the ask is in the negative control below).
    const purged = await root.exec(['apt-get', 'purge', '-y', '-q', 'vmkeep'], { env: APT_ENV });
    expect(purged.exitCode, purged.stderr).toBe(0);
    expect(purged.stdout + purged.stderr).toContain('kept its state in /var/lib/vmkeep');
    expect(existsSync(root.path('/var/lib/vmkeep/vms/deb1.json')), 'the records are kept').toBe(true);
  }, 300_000);
});

describe('5. negative control: a unit that keeps the VMs in the service\'s cgroup (--no-scope)', () => {
  let root: DebianRoot;

  afterAll(async () => {
    await root?.shutdown();
    expect(root?.leftovers() ?? []).toEqual([]);
  }, 60_000);

  it('loses the VM on the same apt upgrade', async () => {
    root = await bootRoot('neg');
    const vms = new RootVms(root);
    await root.sh(`apt-get install -y -q ./${debs.v1NoScope}`, { cwd: SHARE, env: APT_ENV, timeoutMs: 300_000 });
    await root.sh(`vmkeep create ${SHARE}/deb1.json`);
    await waitForSerial(vms.serial('deb1'), 'GUEST READY', 120_000);
    const before = await vms.snapshot();
    const old = before.get('deb1') as { pid: number; start: string | null };
    expect(old.start).not.toBeNull();

    await root.sh(`apt-get install -y -q ./${debs.v2NoScope}`, { cwd: SHARE, env: APT_ENV, timeoutMs: 300_000 });

    expect(vms.startTime(old.pid), 'the QEMU died with the service').toBeNull();
    const vm = await vms.api.get('deb1');
    expect(vm.state).not.toBe('running');

    await root.sh('apt-get purge -y -q vmkeep', { env: { ...APT_ENV, VMKEEP_PURGE_STATE: 'yes' }, timeoutMs: 300_000 });
    expect(existsSync(root.path('/var/lib/vmkeep')), 'VMKEEP_PURGE_STATE=yes: the state is removed').toBe(false);
  }, 400_000);
});
