import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { SystemdHost, systemdHostLeftovers } from '../support/systemd-host.js';

const hosts: SystemdHost[] = [];

async function boot(options?: Parameters<typeof SystemdHost.boot>[0]): Promise<SystemdHost> {
  const host = await SystemdHost.boot(options);
  hosts.push(host);
  return host;
}

afterEach(async () => {
  await Promise.all(hosts.splice(0).map((h) => h.shutdown()));
});

function busctl(address: string, ...args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('busctl', [`--address=${address}`, '--timeout=5', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, out }));
  });
}

async function waitForText(file: string, text: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await readFile(file, 'utf8')).includes(text)) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for "${text}" in ${file}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('SystemdHost: a private systemd as PID 1 of its own namespaces', () => {
  it('boots, answers on its bus from the host, and runs commands inside where PID 1 is systemd', async () => {
    const host = await boot();
    expect(host.busAddress).toBe(`unix:path=${host.runDir}/dbus/system_bus_socket`);

    const unit = await busctl(host.busAddress, 'call', 'org.freedesktop.systemd1', '/org/freedesktop/systemd1',
      'org.freedesktop.systemd1.Manager', 'GetUnit', 's', 'dbus.service');
    expect(unit).toEqual({ code: 0, out: 'o "/org/freedesktop/systemd1/unit/dbus_2eservice"\n' });

    expect((await host.systemctl('is-system-running')).trim()).toBe('running');
    expect(await host.systemctl('list-units', '--plain', '--no-legend', 'dbus.*')).toMatch(/^dbus\.service +loaded active running/m);

    const inside = await host.exec('sh', ['-c', 'cat /proc/1/comm; echo $PWD; cat /proc/self/cgroup | grep ^0::'], { cwd: '/tmp' });
    expect(inside).toMatchObject({ exitCode: 0, stdout: 'systemd\n/tmp\n0::/vmkeep-exec\n' });
    expect(host.hostPidOf(1)).toBe(host.pid1);

    // Service output lands in the console log.
    await host.writeUnit('hello.service', '[Service]\nType=oneshot\nExecStart=/bin/echo HELLO-FROM-INSIDE\n');
    await host.systemctl('start', 'hello.service');
    await waitForText(host.consoleLog, 'HELLO-FROM-INSIDE', 5_000);
  });

  it('runs two hosts at once, each with its own units and processes', async () => {
    const [a, b] = await Promise.all([boot(), boot()]);
    expect(a.pid1).not.toBe(b.pid1);
    expect(a.busAddress).not.toBe(b.busAddress);

    await a.writeUnit('only-a.service', '[Service]\nExecStart=/bin/sleep infinity\n');
    await a.systemctl('start', 'only-a.service');
    expect((await a.systemctl('is-active', 'only-a.service')).trim()).toBe('active');
    const inB = await b.exec('systemctl', ['is-active', 'only-a.service']);
    expect(inB.stdout.trim()).toBe('inactive');

    const pidInA = Number((await a.systemctl('show', '-P', 'MainPID', 'only-a.service')).trim());
    expect(a.hostPidOf(pidInA)).toBeGreaterThan(0);
    expect(b.hostPidOf(pidInA)).not.toBe(a.hostPidOf(pidInA));
  });

  it('shutdown leaves no process, cgroup, mount or file behind, and is idempotent', async () => {
    const host = await boot();
    await host.writeUnit('busy.service', '[Service]\nExecStart=/bin/sleep infinity\n');
    await host.systemctl('start', 'busy.service');
    const servicePid = Number((await host.systemctl('show', '-P', 'MainPID', 'busy.service')).trim());
    const helper = host.spawnInside('sleep', ['infinity'], { stdio: 'ignore' });
    const helperExit = new Promise((resolve) => helper.once('exit', resolve));
    expect(host.hostPidOf(servicePid)).toBeGreaterThan(0);
    expect(host.leftovers().length).toBeGreaterThan(0);

    await host.shutdown();
    await host.shutdown();

    await helperExit;
    expect(host.leftovers()).toEqual([]);
    expect(systemdHostLeftovers(host.name)).toEqual([]);
    expect(host.hostPidOf(servicePid)).toBeNull();
  });

  it('exits gracefully through exit.target', async () => {
    const host = await boot();
    await host.shutdown({ graceful: true });
    expect(host.leftovers()).toEqual([]);
    expect(await readFile(host.consoleLog, 'utf8').catch(() => 'removed')).toBe('removed');
  });

  it("refuses the distribution's unit folders in its unit path (their sysinit units act on the host)", async () => {
    for (const dir of ['/lib/systemd/system', '/usr/lib/systemd/system/', '/etc/systemd/system']) {
      await expect(SystemdHost.boot({ name: `refuse-${process.pid}`, extraUnitDirs: [dir] })).rejects.toThrow(/refusing unit folder/);
    }
  });

  it('a boot that fails says why and cleans up', async () => {
    const name = `broken-${process.pid}`;
    const failure = SystemdHost.boot({
      name,
      timeoutMs: 8_000,
      unitFiles: {
        'dbus.service': '[Unit]\nDefaultDependencies=no\n[Service]\nExecStart=/bin/sh -c "echo DBUS-BROKEN-ON-PURPOSE; exit 3"\n',
      },
    });
    await expect(failure).rejects.toThrow(/did not come up[\s\S]*DBUS-BROKEN-ON-PURPOSE/);
    expect(systemdHostLeftovers(name)).toEqual([]);
  });
});
