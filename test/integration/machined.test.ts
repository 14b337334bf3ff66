// Each running VM is listed by a real systemd-machined (org.freedesktop.machine1) under its own
// scope, in the private systemd: registered at start, again after a daemon restart when
// machined lost its list, moved to the new QEMU by a migration refresh, gone when the VM
// stops; the guest runs on through all of it (unregistering kills nothing). Negative check:
// without machined, VMs start as usual and vmkeepd says so once.
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { DaemonHost } from '../support/daemon-host.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { copiedInstallation, systemInstallation, writeInstallations } from '../support/installations.js';
import { waitFor } from '../support/systemd-host.js';
import { waitForVm } from '../support/vm-wait.js';

const MACHINED_UNIT = 'systemd-machined.service';
/** The distribution's unit file, copied into the private unit folder (never its folder on the unit path). */
const SHIPPED_MACHINED_UNIT = '/lib/systemd/system/systemd-machined.service';

let guest: GuestImage;
const cleanups: Array<() => Promise<void>> = [];

beforeAll(async () => {
  if (!existsSync(SHIPPED_MACHINED_UNIT) || !existsSync('/usr/bin/machinectl')) {
    throw new Error('systemd-machined or machinectl is missing: apt-get install systemd-container');
  }
  guest = await ensureGuestImage();
});

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

function spec(name: string): Record<string, unknown> {
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 };
}

/** machinectl show NAME as a property map, or null when machined lists no such machine. */
async function machine(host: DaemonHost, name: string): Promise<Record<string, string> | null> {
  const r = await host.host.exec('machinectl', ['show', name]);
  if (r.exitCode !== 0) {
    if (/No machine/.test(r.stderr)) return null;
    throw new Error(`machinectl show ${name} failed (exit ${r.exitCode}): ${r.stderr}`);
  }
  return Object.fromEntries(r.stdout.trim().split('\n').map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]));
}

/** Waits until machined lists `name` with that leader (or lists none, for null). */
async function machineWith(host: DaemonHost, name: string, leader: number | null): Promise<Record<string, string> | null> {
  let last: Record<string, string> | null = null;
  try {
    return await waitFor(`machined listing ${name} ${leader === null ? 'no more' : `with leader ${leader}`}`, 30_000, async () => {
      last = await machine(host, name);
      if (leader === null) return last === null ? null : undefined;
      return last !== null && Number(last.Leader) === leader ? last : undefined;
    });
  } catch (error) {
    throw new Error(`${(error as Error).message}; machined lists ${JSON.stringify(last)}\n--- console ---\n${await host.consoleTail(60)}`, { cause: error });
  }
}

async function stillTicking(host: DaemonHost, name: string): Promise<void> {
  const ticks = countTicks(host.serialLog(name));
  await waitForSerial(host.serialLog(name), new RegExp(`GUEST TICK ${ticks + 1}\\b`), 30_000);
}

describe('systemd-machined registration', () => {
  it('lists each VM under its scope; re-registers after a restart that found it lost; follows a migration; forgets a stopped VM', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'vk-machined-'));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const a = systemInstallation('a');
    const b = await copiedInstallation('b', dir);
    const installationsFile = join(dir, 'installations.json');
    await writeInstallations(installationsFile, [a, b], 'a');
    const host = await DaemonHost.boot({
      name: `mcd-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installationsFile],
      unitFiles: { [MACHINED_UNIT]: await readFile(SHIPPED_MACHINED_UNIT, 'utf8') },
    });
    cleanups.push(() => host.shutdown());
    await host.systemctl('start', MACHINED_UNIT);

    await host.api.create(spec('web'));
    await waitForSerial(host.serialLog('web'), 'GUEST READY', 120_000);
    const vm = await host.api.get('web');
    const listed = await machineWith(host, 'web', vm.pid!);
    expect(listed).toMatchObject({ Name: 'web', Class: 'vm', Service: 'vmkeep', Unit: 'vmkeep-web.scope', Id: vm.uuid.replace(/-/g, '') });
    // An empty root directory is not even shown.
    expect(listed?.RootDirectory ?? '').toBe('');
    const status = await host.host.exec('machinectl', ['status', 'web', '--no-pager']);
    expect(status.stdout).toMatch(/Unit: vmkeep-web\.scope/);
    const list = await host.host.exec('machinectl', ['list', '--no-legend']);
    expect(list.stdout).toMatch(/^web\s+vm\s+vmkeep\b/m);

    // machined loses its list (restarted on a cleared /run/systemd/machines) while vmkeepd is down.
    await host.stop();
    await host.systemctl('stop', MACHINED_UNIT);
    await rm(join(host.host.runDir, 'systemd', 'machines'), { recursive: true, force: true });
    await host.systemctl('start', MACHINED_UNIT);
    expect(await machine(host, 'web')).toBeNull();
    // "Upgrade the package" while it is away: b becomes current, vmkeepd starts again.
    await writeInstallations(installationsFile, [a, b], 'b');
    await host.start();
    await machineWith(host, 'web', vm.pid!);
    await stillTicking(host, 'web');

    // A migration refresh: machined names the new QEMU, in its new scope.
    const outcome = await host.api.refresh('web', { strategy: 'migrate' });
    expect(outcome.result, outcome.message).toBe('migrated');
    const moved = await waitForVm(host.api, 'web', (v) => v.state === 'running' && v.pid !== vm.pid && v.operation === undefined, 'running on its new QEMU');
    const after = await machineWith(host, 'web', moved.pid!);
    expect(after?.Unit).toBe(moved.scope);
    expect(after?.Unit).not.toBe('vmkeep-web.scope');
    await stillTicking(host, 'web');

    await host.api.stop('web', { timeoutSec: 30 });
    await machineWith(host, 'web', null);
    expect((await host.consoleTail(400)).match(/registered with systemd-machined/g)?.length).toBe(3);
  }, 600_000);

  it('negative check: without machined, VMs start as usual and vmkeepd says so once', async () => {
    const host = await DaemonHost.boot({ name: `mcn-${process.pid}` });
    cleanups.push(() => host.shutdown());
    await Promise.all(['one', 'two'].map((name) => host.api.create(spec(name))));
    await Promise.all(['one', 'two'].map((name) => waitForSerial(host.serialLog(name), 'GUEST READY', 120_000)));
    expect((await host.api.list()).map((v) => v.state)).toEqual(['running', 'running']);
    await host.restart();
    expect((await host.api.list()).map((v) => v.state)).toEqual(['running', 'running']);
    await host.api.stop('two', { timeoutSec: 30 });
    const log = await host.consoleTail(400);
    expect(log.match(/"msg":"[^"]*systemd-machined is not on the system bus/g)?.length, log).toBe(2); // once per daemon life
    expect(log).not.toMatch(/could not bring .* systemd-machined entry/);
    expect(await machine(host, 'one').catch((e: Error) => e.message)).toMatch(/not found|No machine|machine1/);
  }, 600_000);
});
