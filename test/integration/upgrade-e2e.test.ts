// A package upgrade, end to end, for real: vmkeepd as a service in a private systemd, guests
// running on installation "a" (Debian's QEMU 7.2), then the "upgrade": installation "b" (QEMU
// 10.0 from bookworm-backports) becomes current and the service restarts. Every guest
// survives and is reported stale; each strategy then moves one onto "b". A same-version
// rebuild ("c", a copy of 7.2 at another path with its own modules) is moved onto too.
import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RefreshJob, VmView } from '../../daemon/index.js';
import { isSameProcess, launchVm, probeInstallation, readExe, readProcessIdentity, waitForProcessExit } from '../../launcher/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import {
  backportsInstallation, copiedInstallation, replaceModules, restoreModules, systemInstallation, writeInstallations, type TestInstallation,
} from '../support/installations.js';
import { projectRoot } from '../support/paths.js';
import { waitForVm } from '../support/vm-wait.js';

const CLI = join(projectRoot(), 'dist', 'cli', 'main.js');
const FIRST = ['mig', 'reb', 'ogs', 'away', 'rebuild', 'roll1', 'roll2', 'roll3'];

let guest: GuestImage;
let dir: string;
let host: DaemonHost;
let a: TestInstallation;
let b: TestInstallation;
let c: TestInstallation;
let installationsFile: string;
/** pid + start time of each VM's QEMU before the upgrade (host pid namespace). */
const before = new Map<string, { pid: number; startTime: string }>();

beforeAll(async () => {
  guest = await ensureGuestImage();
  dir = await mkdtemp(join(tmpdir(), 'vk-upg-'));
  a = systemInstallation('a');
  b = await backportsInstallation('b');
  c = await copiedInstallation('c', dir);
  installationsFile = join(dir, 'installations.json');
  await writeInstallations(installationsFile, [a, b, c], 'a');
  host = await DaemonHost.boot({ name: `upg-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installationsFile] });
});

afterAll(async () => {
  await host?.shutdown();
  if (dir) await rm(dir, { recursive: true, force: true });
});

function spec(name: string): Record<string, unknown> {
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 };
}

function exeOf(vm: VmView): { path: string; deleted: boolean } {
  const exe = readExe(host.hostPid(vm));
  if (exe === null) throw new Error(`${vm.name}: no /proc exe for pid ${vm.pid}`);
  return exe;
}

/** The guest keeps running: its console shows a tick later than `after`. */
async function tickAfter(vm: string, after: number): Promise<number> {
  await waitForSerial(host.serialLog(vm), new RegExp(`GUEST TICK ${after + 1}\\b`), 20_000);
  return countTicks(host.serialLog(vm));
}

describe('a package upgrade with running guests', () => {
  it('guests started on installation a survive the switch to b and the restart, and are reported stale', async () => {
    await Promise.all(FIRST.map((name) => host.api.create(spec(name), name === 'ogs' || name === 'away' ? { policy: 'on-guest-shutdown' } : {})));
    for (const name of FIRST) await waitForSerial(host.serialLog(name), 'GUEST READY', 120_000);
    for (const vm of await host.api.list()) {
      const hostPid = host.hostPid(vm);
      before.set(vm.name, { pid: hostPid, startTime: readProcessIdentity(hostPid)?.startTime ?? '' });
      expect(exeOf(vm).path).toBe(a.binary);
    }

    // The upgrade: "b" becomes current, and the package's maintainer script restarts the service.
    await writeInstallations(installationsFile, [a, b, c], 'b');
    await host.restart();

    const status = await host.api.upgradeStatus();
    expect(status.channels).toEqual([expect.objectContaining({ channel: 'default', installation: 'b', binary: b.binary })]);
    for (const name of FIRST) {
      const old = before.get(name) as { pid: number; startTime: string };
      expect(isSameProcess(old.pid, old.startTime), `${name}'s QEMU survived the restart`).toBe(true);
      const row = status.vms.find((v) => v.name === name);
      expect(row).toMatchObject({ state: 'running', installation: 'a', currentInstallation: 'b', stale: true });
      expect(row?.reasons.join(' ')).toContain(a.binary);
      expect(row?.runningVersion).toMatch(/^\d+\.\d+\.\d+$/);
    }
    expect(status.vms.find((v) => v.name === 'mig')?.outcome).toMatch(/refresh it by hand/);
    expect(status.vms.find((v) => v.name === 'ogs')?.outcome).toMatch(/powers off or reboots/);

    // The CLI says the same, for a person and for a program.
    const human = await execa(process.execPath, [CLI, 'upgrade-status', '--socket', host.socket]);
    expect(human.stdout).toMatch(/channel default: installation b/);
    expect(human.stdout).toMatch(/^mig\s+running\s+a \S+\s+b \S+\s+yes\s+manual/m);
    const json = await execa(process.execPath, [CLI, 'upgrade-status', '--json', '--socket', host.socket]);
    expect((JSON.parse(json.stdout) as { vms: unknown[] }).vms).toHaveLength(FIRST.length);
  });

  it('migrate: the guest moves live onto b without a reboot, in a new scope, and the old QEMU ends', async () => {
    const old = before.get('mig') as { pid: number; startTime: string };
    const ticks = await tickAfter('mig', countTicks(host.serialLog('mig')));
    const outcome = await host.api.refresh('mig', { strategy: 'migrate' });
    // A real version change: 7.2 -> 10.0, the machine type 7.2's alias resolved to kept.
    expect(outcome).toMatchObject({ vm: 'mig', result: 'migrated', from: { installation: 'a', version: expect.stringMatching(/^7\.2\./) }, to: { installation: 'b', version: expect.stringMatching(/^10\.0\./) } });
    expect(outcome.downtimeMs).toEqual(expect.any(Number));
    expect(outcome.downtimeMs).toBeLessThan(5_000);

    await waitForProcessExit(old.pid, old.startTime, 15_000);
    const vm = await host.api.get('mig');
    expect(vm).toMatchObject({ state: 'running', installation: 'b' });
    expect(vm.scope).toMatch(/^vmkeep-mig:[0-9a-f]+\.scope$/);
    expect(exeOf(vm)).toEqual(expect.objectContaining({ path: b.binary, deleted: false }));
    expect(vm.machineType).toBe('pc-q35-7.2');
    expect(vm.qemuVersion).toMatch(/^10\.0\./);
    expect(readFileSync(`/proc/${host.hostPid(vm)}/cmdline`, 'utf8').split('\0')).toContain('pc-q35-7.2,accel=tcg');
    // Same guest, still ticking: no second boot on its console.
    await tickAfter('mig', ticks + 1);
    const console = await readFile(host.serialLog('mig'), 'utf8');
    expect(console.match(/GUEST READY/g)).toHaveLength(1);
    const record = await host.record('mig');
    expect(record.refresh).toBeUndefined();
    expect(record.retired).toBeUndefined();
    expect((await host.api.upgradeStatus()).vms.find((v) => v.name === 'mig')?.stale).toBe(false);
  });

  it("a same-version rebuild (a copy of 7.2 elsewhere): the VM moves onto it and keeps loading its own modules after the files are replaced", async () => {
    await writeInstallations(installationsFile, [a, b, c], 'c');
    await host.restart();
    try {
      const outcome = await host.api.refresh('rebuild', { strategy: 'migrate' });
      expect(outcome).toMatchObject({ result: 'migrated', to: { installation: 'c' } });
      expect(outcome.from?.version).toBe(outcome.to?.version);
      // Negative control, started first: a QEMU of c that loads from c's module folder itself.
      const control = join(dir, 'control');
      await mkdir(control, { recursive: true });
      const vm = await launchVm({
        spec: { ...(await host.api.get('rebuild')).spec, name: 'control' },
        uuid: '0b6c9a3e-2f1d-4c8e-9a7b-5d4e3f2a1b0c',
        installation: c,
        info: await probeInstallation(c, { cacheDir: join(dir, 'probe-cache') }),
        paths: { qmpSocket: join(control, 'qmp.sock'), serialLog: join(control, 'serial.log'), stderrLog: join(control, 'qemu.log') },
        stayPaused: true,
      });
      try {
        // The "package" replaces c's module files; rebuild runs c with c's modules pinned at launch.
        await replaceModules(c.moduleDir as string);
        const props = await host.api.qmp('rebuild', 'device-list-properties', { typename: 'qxl-vga' });
        expect(Array.isArray(props) && props.length > 0).toBe(true);
        await expect(vm.qmp.execute('device-list-properties', { typename: 'qxl-vga' })).rejects.toThrow(/qxl-vga/);
      } finally {
        await restoreModules(c.moduleDir as string);
        await vm.qmp.quit().catch(() => undefined);
        vm.qmp.close();
        await waitForProcessExit(vm.pid, vm.startTime, 15_000);
      }
    } finally {
      await writeInstallations(installationsFile, [a, b, c], 'b');
      await host.restart();
    }
  });

  it('reboot: the guest powers off through ACPI and boots again on b', async () => {
    const old = before.get('reb') as { pid: number; startTime: string };
    const outcome = await host.api.refresh('reb', { strategy: 'reboot' });
    expect(outcome).toMatchObject({ result: 'rebooted', to: { installation: 'b' } });
    expect(isSameProcess(old.pid, old.startTime)).toBe(false);
    await waitForSerial(host.serialLog('reb'), 'GUEST READY', 60_000);
    const vm = await host.api.get('reb');
    const why = `${JSON.stringify(vm)}\n--- qemu.log ---\n${await readFile(host.qemuLog('reb'), 'utf8').catch(() => '')}\n--- daemon ---\n${await host.consoleTail(40)}`;
    expect(vm, why).toMatchObject({ state: 'running', installation: 'b' });
    expect(exeOf(vm).path).toBe(b.binary);
  });

  it('on-guest-shutdown: when the guest powers itself off, it comes back on b', async () => {
    const old = before.get('ogs') as { pid: number; startTime: string };
    // The power button: the guest's acpid runs poweroff itself (a guest-side SHUTDOWN).
    await host.api.qmp('ogs', 'system_powerdown');
    const vm = await waitForVm(host.api, 'ogs', (v) => v.state === 'running' && v.installation === 'b', 'running again on installation b');
    expect(isSameProcess(old.pid, old.startTime)).toBe(false);
    expect(exeOf(vm).path).toBe(b.binary);
    await waitForSerial(host.serialLog('ogs'), 'GUEST READY', 60_000);
  });

  it('on-guest-shutdown works when the guest powers off while the daemon is down', async () => {
    const old = before.get('away') as { pid: number; startTime: string };
    const socket = (await host.record('away')).paths.qmpSocket as string;
    await host.stop();
    const { connectQmp } = await import('../../qmp/index.js');
    const qmp = await connectQmp(socket);
    try {
      const shutdown = qmp.waitForEvent('SHUTDOWN', { timeoutMs: 30_000 });
      await qmp.systemPowerdown();
      expect((await shutdown).data).toMatchObject({ guest: true });
    } finally {
      qmp.close();
    }
    await host.start();
    const vm = await waitForVm(host.api, 'away', (v) => v.state === 'running' && v.installation === 'b', 'running again on installation b');
    expect(isSameProcess(old.pid, old.startTime)).toBe(false);
    expect(exeOf(vm).path).toBe(b.binary);
  });

  it('refresh --all --parallel 2 through the CLI migrates the stale VMs and leaves the current ones', async () => {
    const run = await execa(process.execPath, [CLI, 'refresh', '--all', '--parallel', '2', '--strategy', 'migrate', '--json', '--socket', host.socket], { reject: false });
    expect(run.exitCode, run.stderr).toBe(0);
    const lines = run.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, any>);
    const job = lines.at(-1)?.job as RefreshJob;
    expect(lines.at(-1)?.type).toBe('result');
    expect(job.vms).toEqual([...FIRST].sort());
    const results = new Map(job.results.map((r) => [r.vm, r]));
    for (const name of ['rebuild', 'roll1', 'roll2', 'roll3']) expect(results.get(name)?.outcome?.result).toBe('migrated');
    for (const name of ['mig', 'reb', 'ogs', 'away']) expect(results.get(name)?.outcome?.result).toBe('current');
    const done = lines.filter((l) => l.step === 'done');
    expect(done.map((l) => l.progress.done)).toEqual(FIRST.map((_, i) => i + 1));
    const status = await host.api.upgradeStatus();
    expect(status.vms.filter((v) => v.stale)).toEqual([]);
    for (const name of ['roll1', 'roll2', 'roll3']) await tickAfter(name, countTicks(host.serialLog(name)));
  });
});
