// ARCHITECTURE.md invariant 3 at host shutdown: with vmkeep-guests.service (the shipped unit) active, the
// private systemd's own shutdown (`systemctl exit`) powers every guest off through ACPI before
// any VM scope is stopped; a guest that ignores ACPI is named in the log after the timeout.
// Negative control: without that unit the shutdown stops the scopes at once (SIGTERM to QEMU)
// and no guest gets to power off.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { DaemonHost, GUESTS_UNIT } from '../support/daemon-host.js';
import { makeOverlayOnRaw, requireDiskTools } from '../support/disk-images.js';
import { ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { checkImage, lastWrote, waitForWrote } from '../support/records-check.js';

const MARKER = 'GUEST POWEROFF';
// Short, so the deaf guest costs the test little; set by a drop-in as an administrator would.
const TIMEOUT_SEC = 8;

let guest: GuestImage;
const hosts: DaemonHost[] = [];

beforeAll(async () => {
  guest = await ensureGuestImage();
});

afterEach(async () => {
  for (const host of hosts.splice(0)) await host.shutdown();
});

function spec(name: string): Record<string, unknown> {
  const append = name === 'deaf' ? `${guest.append} vmkeep.ignore_acpi` : guest.append;
  return { name, kernel: guest.kernel, initrd: guest.initrd, append, memoryMiB: 128 };
}

async function bootWithGuests(name: string, vms: string[], socketUnit = false): Promise<DaemonHost> {
  const host = await DaemonHost.boot({ name, guestsUnit: true, guestsTimeoutSec: TIMEOUT_SEC, socketUnit });
  hosts.push(host);
  await Promise.all(vms.map((vm) => host.api.create(spec(vm))));
  await Promise.all(vms.map((vm) => waitForSerial(host.serialLog(vm), 'GUEST READY', 90_000)));
  const listed = await host.api.list();
  expect(listed.map((vm) => [vm.name, vm.state, vm.scope]).sort()).toEqual(vms.map((vm) => [vm, 'running', `vmkeep-${vm}.scope`]).sort());
  return host;
}

/** The host's shutdown; resolves with its console (systemd, vmkeepd and the guests unit's output). */
async function shutDown(host: DaemonHost): Promise<{ log: string; ms: number }> {
  const began = Date.now();
  try {
    const log = await host.exitHost(60_000);
    return { log, ms: Date.now() - began };
  } catch (error) {
    throw new Error(`${(error as Error).message}\n--- console ---\n${await host.consoleTail(80)}`, { cause: error });
  }
}

/**
 * The serial log's lines from the last line the guest's own /init or acpid handler wrote
 * ("GUEST ...") on: when the guest powered off, that is the marker followed at most by the
 * kernel's own power-down messages.
 */
async function tailFromLastGuestLine(host: DaemonHost, vm: string): Promise<string[]> {
  const lines = (await readFile(host.serialLog(vm), 'utf8')).split(/\r?\n/).map((line) => line.trimEnd()).filter((line) => line !== '');
  let last = -1;
  lines.forEach((line, i) => (line.includes('GUEST ') ? (last = i) : undefined));
  return last < 0 ? lines.slice(-5) : lines.slice(last);
}

/** The serial log ends with the clean power-off: the marker, then nothing but the kernel powering down. */
async function expectPoweredOff(host: DaemonHost, vm: string, log: string): Promise<void> {
  const tail = await tailFromLastGuestLine(host, vm);
  // On failure, the order in which systemd stopped the scopes and the guests unit tells why.
  const order = log.split(/\r*\n/).filter((line) => /^(vmkeep|web|db|deaf)\b/.test(line)).join('\n');
  expect(tail[0], `${vm}'s last guest line (serial log tail: ${JSON.stringify(tail)}); shutdown log:\n${order}\n`).toBe(MARKER);
  for (const line of tail.slice(1)) expect(line, `${vm}: what follows the marker`).toMatch(/reboot: Power down|ACPI: PM:|^\[\s*[\d.]+\]/);
}

describe('host shutdown', () => {
  it('with vmkeep-guests.service active, `systemctl exit` powers the guests off by ACPI first and names the one that ignores it', async () => {
    const host = await bootWithGuests(`hsd-${process.pid}`, ['web', 'db', 'deaf']);
    await host.systemctl('start', GUESTS_UNIT);
    // The drop-in's timeout reaches the shipped ExecStop line.
    expect(await host.systemctl('show', '--property=Environment', '--value', GUESTS_UNIT)).toContain(`VMKEEP_SHUTDOWN_TIMEOUT=${TIMEOUT_SEC}`);
    // What a package upgrade does to the daemon leaves the guests unit (and every guest) alone.
    await host.restart();
    await host.stop();
    expect((await host.host.exec('systemctl', ['is-active', GUESTS_UNIT])).stdout.trim(), 'after vmkeepd restart + stop').toBe('active');
    await host.start();
    expect((await host.api.list()).map((vm) => vm.state)).toEqual(['running', 'running', 'running']);

    const { log, ms } = await shutDown(host);

    await expectPoweredOff(host, 'web', log);
    await expectPoweredOff(host, 'db', log);
    // The deaf guest ticked on until the timeout, then was named in the log (stderr of ExecStop).
    expect(await readFile(host.serialLog('deaf'), 'utf8')).not.toContain(MARKER);
    // The console is a tty: lines end in \r\n.
    expect(log).toMatch(new RegExp(`^vmkeep: still running after ${TIMEOUT_SEC} s: deaf\\r?$`, 'm'));
    expect(log).toMatch(/^web: stopped\r?$/m);
    expect(log).toMatch(/^db: stopped\r?$/m);
    expect(log).toMatch(new RegExp(`^deaf: did not power off within ${TIMEOUT_SEC} s; left running\\r?$`, 'm'));
    // The shutdown waited for the deaf guest's timeout, and not much longer.
    expect(ms).toBeGreaterThanOrEqual(TIMEOUT_SEC * 1000);
  });

  it('with vmkeepd down at shutdown, the guests unit powers the guests off from the records, without a start through vmkeepd.socket', async () => {
    // With the socket unit, as the deb installs it: a connection to the control socket would ask
    // systemd to start vmkeepd in the middle of the shutdown.
    const host = await bootWithGuests(`hsddown-${process.pid}`, ['web', 'db'], true);
    await host.systemctl('start', GUESTS_UNIT);
    // vmkeepd is gone (crashed, or stopped mid-upgrade) when the host shuts down.
    await host.stop();

    const { log } = await shutDown(host);

    expect(log).toMatch(/no vmkeepd runs on \S+; powering the guests off straight from its records/);
    await expectPoweredOff(host, 'web', log);
    await expectPoweredOff(host, 'db', log);
    // The records say what happened, for the next vmkeepd.
    for (const vm of ['web', 'db']) {
      expect(await host.record(vm)).toMatchObject({ state: 'stopped', lastExit: { reason: expect.stringMatching(/vmkeepd was down/) } });
    }
  });

  it('a guest writing to its disk: every record it acknowledged before the power-off is on the disk', async () => {
    requireDiskTools();
    const images = await mkdtemp(join(tmpdir(), 'vk-hsd-disk-'));
    try {
      const { overlay } = makeOverlayOnRaw(images, 64, 'writer');
      const host = await DaemonHost.boot({ name: `hsdw-${process.pid}`, guestsUnit: true, guestsTimeoutSec: TIMEOUT_SEC });
      hosts.push(host);
      await host.api.create({ ...spec('writer'), disks: [{ path: overlay, format: 'qcow2' }] });
      await host.systemctl('start', GUESTS_UNIT);
      await waitForWrote(host.serialLog('writer'), 30);

      const { log } = await shutDown(host);

      await expectPoweredOff(host, 'writer', log);
      const printed = lastWrote(host.serialLog('writer'));
      const verdict = checkImage(overlay, 'qcow2', printed);
      expect(verdict.problems, `last printed ${printed}`).toEqual([]);
      expect(verdict.last).toBeGreaterThanOrEqual(printed);
    } finally {
      await rm(images, { recursive: true, force: true });
    }
  });

  it('negative control: without vmkeep-guests.service started, the shutdown SIGTERMs the QEMUs and no guest powers off', async () => {
    const host = await bootWithGuests(`hsdneg-${process.pid}`, ['web', 'db']);
    expect((await host.host.exec('systemctl', ['is-active', GUESTS_UNIT])).stdout.trim()).toBe('inactive');

    const { log } = await shutDown(host);

    for (const vm of ['web', 'db']) {
      const tail = await tailFromLastGuestLine(host, vm);
      expect(tail[0], `${vm}'s last guest line`).toMatch(/^GUEST TICK \d+$/);
      expect(await readFile(host.serialLog(vm), 'utf8')).not.toContain(MARKER);
      // It was the scope's stop that ended QEMU.
      expect(await readFile(host.qemuLog(vm), 'utf8')).toMatch(/terminating on signal 15/);
    }
    expect(log).not.toContain('still running after');
  });
});
