// ARCHITECTURE.md invariants 1, 2, 4: vmkeepd as a real systemd service; VMs are real QEMUs booting the
// tiny guest. Restarting or SIGKILLing the daemon never touches them; without scopes (the
// negative control) they die with the service.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isSameProcess, readProcessIdentity } from '../../launcher/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';

let guest: GuestImage;
const hosts: DaemonHost[] = [];

beforeAll(async () => {
  guest = await ensureGuestImage();
});

afterAll(async () => {
  for (const host of hosts.splice(0)) await host.shutdown();
});

function spec(name: string): Record<string, unknown> {
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 };
}

async function boot(name: string, scopes = true): Promise<DaemonHost> {
  const host = await DaemonHost.boot({ name, scopes });
  hosts.push(host);
  return host;
}

/** The guest keeps running: its console shows a tick later than `after`. */
async function tickAfter(host: DaemonHost, vm: string, after: number): Promise<number> {
  await waitForSerial(host.serialLog(vm), new RegExp(`GUEST TICK ${after + 1}\\b`), 15_000);
  return countTicks(host.serialLog(vm));
}

describe('vmkeepd restarts and crashes never touch the VMs', () => {
  it('three VMs stay running with the same PIDs across 10 restarts, 5 SIGKILLs and a stop of the service', async () => {
    const host = await boot(`surv-${process.pid}`);
    const names = ['alpha', 'beta', 'gamma'];
    for (const name of names) await host.api.create(spec(name));
    for (const name of names) await waitForSerial(host.serialLog(name), 'GUEST READY', 90_000);

    const before = await host.api.list();
    expect(before.map((v) => [v.name, v.state])).toEqual(names.map((n) => [n, 'running']));
    for (const vm of before) expect(vm.scope).toBe(`vmkeep-${vm.name}.scope`);
    const pids = new Map(before.map((v) => [v.name, v.pid]));
    const identities = new Map(before.map((v) => [v.name, readProcessIdentity(host.hostPid(v))!]));
    const ticks = new Map(names.map((n) => [n, countTicks(host.serialLog(n))]));

    const rounds: Array<'restart' | 'kill' | 'stop'> = [...Array(10).fill('restart'), ...Array(5).fill('kill'), 'stop'];
    for (const [i, round] of rounds.entries()) {
      if (round === 'restart') await host.restart();
      else if (round === 'kill') await host.killAndStart();
      else {
        await host.stop();
        // With the daemon stopped, the guests keep ticking on their own.
        for (const name of names) ticks.set(name, await tickAfter(host, name, ticks.get(name)!));
        await host.start();
      }

      const after = await host.api.list();
      const context = `after ${round} #${i + 1}: ${JSON.stringify(after.map((v) => [v.name, v.state, v.pid, v.problem]))}`;
      expect(after.map((v) => v.state), context).toEqual(['running', 'running', 'running']);
      for (const vm of after) {
        expect(vm.pid, context).toBe(pids.get(vm.name));
        const id = identities.get(vm.name)!;
        expect(isSameProcess(id.pid, id.startTime), `${vm.name}'s QEMU is the same process ${context}`).toBe(true);
      }
      for (const name of names) ticks.set(name, await tickAfter(host, name, ticks.get(name)!));
    }

    // The monitor still answers through the new daemon.
    expect(await host.api.qmp('alpha', 'query-status')).toMatchObject({ status: 'running' });
  });

  it('negative control: with --no-scope the QEMU dies when the service restarts', async () => {
    const host = await boot(`noscope-${process.pid}`, false);
    await host.api.create(spec('fragile'));
    await waitForSerial(host.serialLog('fragile'), 'GUEST READY', 90_000);
    const [vm] = await host.api.list();
    expect(vm?.scope).toBeUndefined();
    const id = readProcessIdentity(host.hostPid(vm!))!;

    await host.restart();
    expect(isSameProcess(id.pid, id.startTime), 'the unscoped QEMU died with the daemon service').toBe(false);
    const [again] = await host.api.list();
    // The old daemon may have seen the exit before it went ("exited unexpectedly"), or not.
    expect(again?.state, JSON.stringify(again)).toBe('exited');
    expect(again?.lastExit?.reason, JSON.stringify(again)).toMatch(/exited/);
  });
});
