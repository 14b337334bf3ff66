// vmkeepd's STATUS= as the real systemd keeps it (the unit's StatusText, what `systemctl status
// vmkeepd` prints): sent at READY and updated as VMs change. And --idle-exit under the shipped
// socket unit: an idle vmkeepd exits cleanly and the next request starts it again; a running
// VM keeps it up (the negative control).
import { describe, expect, it } from 'vitest';
import { DAEMON_UNIT, DaemonHost, SOCKET_UNIT } from '../support/daemon-host.js';
import { daemonHostsOfFile } from '../support/host-hooks.js';
import { waitFor } from '../support/systemd-host.js';

const { hosts, spec } = daemonHostsOfFile();

async function statusTextIs(host: DaemonHost, expected: string): Promise<void> {
  let last = '';
  try {
    await waitFor(`vmkeepd's StatusText to read "${expected}"`, 30_000, async () => {
      last = (await host.systemctl('show', '--property=StatusText', '--value', DAEMON_UNIT)).trim();
      return last === expected ? true : undefined;
    });
  } catch (error) {
    throw new Error(`${(error as Error).message}; it reads "${last}"`, { cause: error });
  }
}

describe("vmkeepd's status in systemd", () => {
  it('StatusText counts the VMs by state, at READY and after each change; systemctl status shows it', async () => {
    const host = await DaemonHost.boot({ name: `dst-${process.pid}` });
    hosts.push(host);
    await statusTextIs(host, 'no VMs');
    await host.api.create(spec('one'));
    await host.api.create(spec('two'), { start: false });
    await statusTextIs(host, '2 VMs (1 running, 1 stopped)');
    await host.api.start('two');
    await statusTextIs(host, '2 VMs (2 running)');
    // A restart: the new daemon's READY carries it at once.
    await host.restart();
    await statusTextIs(host, '2 VMs (2 running)');
    await host.api.stop('one', { timeoutSec: 30 });
    await statusTextIs(host, '2 VMs (1 running, 1 stopped)');
    expect(await host.systemctl('status', DAEMON_UNIT)).toMatch(/Status: "2 VMs \(1 running, 1 stopped\)"/);
  }, 300_000);

  it('--idle-exit: idle, vmkeepd exits cleanly and the socket starts it again at the next request; a running VM keeps it up', async () => {
    const IDLE_SEC = 3;
    const host = await DaemonHost.boot({ name: `didl-${process.pid}`, socketUnit: true, args: ['--idle-exit', String(IDLE_SEC)] });
    hosts.push(host);
    const show = async (): Promise<Record<string, string>> => Object.fromEntries(
      (await host.systemctl('show', '--property=ActiveState,Result,NRestarts,MainPID', DAEMON_UNIT)).trim().split('\n').map((l) => l.split('=', 2) as [string, string]));
    const exitedIdle = (): Promise<Record<string, string>> => waitFor('vmkeepd to exit idle', 60_000, async () => {
      const unit = await show();
      return unit.ActiveState === 'inactive' ? unit : undefined;
    });
    const first = await exitedIdle();
    // A clean exit: not a failure, not restarted by Restart=on-failure; the socket still listens.
    expect(first).toMatchObject({ Result: 'success', NRestarts: '0' });
    expect((await host.systemctl('show', '--property=ActiveState', '--value', SOCKET_UNIT)).trim()).toBe('active');
    expect(await host.consoleTail(100)).toMatch(/no VM running and no client for 3 s: exiting/);

    // The next request starts it (the socket holds the connection meanwhile) and is answered.
    expect(await host.api.list()).toEqual([]);
    await host.api.create(spec('busy'));
    const pid = (await show()).MainPID;
    // Negative control: with a VM running it stays up well past the idle time.
    await new Promise((resolve) => setTimeout(resolve, IDLE_SEC * 3 * 1000));
    expect(await show()).toMatchObject({ ActiveState: 'active', MainPID: pid });
    await host.api.stop('busy', { timeoutSec: 30 });
    await exitedIdle();
    // Started again by a request, it finds the VM's record.
    expect((await host.api.list()).map((v) => [v.name, v.state])).toEqual([['busy', 'stopped']]);
  }, 300_000);
});
