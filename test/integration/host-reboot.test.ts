// VMs come back after a host reboot: a real private systemd shuts down in order (the shipped
// vmkeep-guests.service powers the guests off by ACPI), a new one boots (a new boot ID) on the
// same state folder and starts vmkeepd, which starts the VMs whose autostart asks for it.
// Negative controls in the same run: autostart=never and operator-stopped VMs stay off, and
// daemon restarts (same boot) start nothing.
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { DaemonHost, GUESTS_UNIT } from '../support/daemon-host.js';
import { ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { projectRoot } from '../support/paths.js';
import { waitFor } from '../support/systemd-host.js';

const VMKEEP_CLI = join(projectRoot(), 'dist', 'cli', 'main.js');

let guest: GuestImage;
const hosts: DaemonHost[] = [];

beforeAll(async () => {
  guest = await ensureGuestImage();
});

afterEach(async () => {
  for (const host of hosts.splice(0)) await host.shutdown();
});

async function states(host: DaemonHost): Promise<Record<string, string>> {
  return Object.fromEntries((await host.api.list()).map((vm) => [vm.name, vm.state]));
}

describe('host reboot', () => {
  it('last-state and always VMs run again after the reboot; never and operator-stopped ones do not; restarts start nothing', async () => {
    const host = await DaemonHost.boot({ name: `hrb-${process.pid}`, guestsUnit: true, guestsTimeoutSec: 20 });
    hosts.push(host);
    const spec = (name: string): Record<string, unknown> => ({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 });
    const vms = ['web', 'al', 'nv', 'op'];
    await Promise.all(vms.map((vm) => host.api.create(spec(vm))));
    await Promise.all(vms.map((vm) => waitForSerial(host.serialLog(vm), 'GUEST READY', 90_000)));
    // The operator's command line: `vmkeep set NAME autostart=...`.
    for (const [vm, mode] of [['al', 'always'], ['nv', 'never']]) {
      const { stdout } = await promisify(execFile)(process.execPath, [VMKEEP_CLI, 'set', vm!, `autostart=${mode}`, '--socket', host.socket]);
      expect(stdout.trim()).toBe(`${vm}: autostart=${mode}`);
    }
    await host.systemctl('start', GUESTS_UNIT);
    // The operator stops two VMs: al (autostart=always: back at boot anyway) and op (last-state: stays off).
    await host.api.stop('al', { timeoutSec: 30 });
    await host.api.stop('op', { timeoutSec: 30 });

    // A daemon restart within the boot starts nothing.
    await host.restart();
    expect(await states(host)).toEqual({ web: 'running', al: 'stopped', nv: 'running', op: 'stopped' });

    let log: string;
    try {
      log = await host.reboot(90_000);
    } catch (error) {
      throw new Error(`${(error as Error).message}\n--- console ---\n${await host.consoleTail(80)}`, { cause: error });
    }
    // The guests unit powered web and nv off by ACPI at the shutdown, as a host shutdown does.
    expect(log).toMatch(/^web: stopped\r?$/m);
    expect(log).toMatch(/^nv: stopped\r?$/m);

    // The new boot: web (last-state, running at shutdown) and al (always) start again, on
    // fresh QEMUs that boot their guests; nv (never) and op (stopped by the operator) do not.
    // Running first: each start empties the serial log, which still holds the last boot's lines.
    await waitFor('web and al running after the boot', 120_000, async () => {
      const now = await states(host);
      return now.web === 'running' && now.al === 'running' ? true : undefined;
    });
    await Promise.all(['web', 'al'].map((vm) => waitForSerial(host.serialLog(vm), 'GUEST READY', 120_000)));
    const afterBoot = await host.api.list();
    expect(Object.fromEntries(afterBoot.map((vm) => [vm.name, vm.state]))).toEqual({ web: 'running', al: 'running', nv: 'stopped', op: 'stopped' });
    expect(afterBoot.find((vm) => vm.name === 'nv')?.autostart).toBe('never');
    expect(await host.consoleTail(200)).toMatch(/host boot: starting 2 VM\(s\)/);

    // A restart after the boot: nothing starts, not even a VM the operator stopped meanwhile.
    await host.api.stop('web', { timeoutSec: 30 });
    await host.restart();
    expect(await states(host)).toEqual({ web: 'stopped', al: 'running', nv: 'stopped', op: 'stopped' });
  });
});
