// vmkeepd's STATUS= as the real systemd keeps it (the unit's StatusText, what `systemctl status
// vmkeepd` prints): sent at READY and updated as VMs change.
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { DAEMON_UNIT, DaemonHost } from '../support/daemon-host.js';
import { ensureGuestImage, type GuestImage } from '../support/guest.js';
import { waitFor } from '../support/systemd-host.js';

let guest: GuestImage;
const hosts: DaemonHost[] = [];

beforeAll(async () => {
  guest = await ensureGuestImage();
});

afterEach(async () => {
  for (const host of hosts.splice(0)) await host.shutdown();
});

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
    const spec = (name: string): Record<string, unknown> => ({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 });
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
});
