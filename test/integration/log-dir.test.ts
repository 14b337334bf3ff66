// The VMs' serial console and QEMU logs live in the persistent log folder (--log-dir/NAME/), not
// on the runtime tmpfs: written on across daemon restarts, the last run's log kept as
// serial.log.1 when the VM starts again, and `vmkeep logs` reading across both. A VM whose
// record names a log in the old place (a vmkeepd from before the log folder) keeps it until its
// next start, which moves it into the log folder.
import { existsSync } from 'node:fs';
import { readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DaemonHost } from '../support/daemon-host.js';
import { daemonHostsOfFile } from '../support/host-hooks.js';
import { countTicks, waitForSerial } from '../support/guest.js';

const { hosts, spec } = daemonHostsOfFile();

async function nextTick(path: string): Promise<void> {
  await waitForSerial(path, new RegExp(`GUEST TICK ${countTicks(path) + 1}\\b`), 30_000);
}

describe('persistent log folder', () => {
  it('logs in LOG_DIR/NAME across restarts; a new start keeps the last run as .1; vmkeep logs reads both; old record paths keep working', async () => {
    const host = await DaemonHost.boot({ name: `logd-${process.pid}` });
    hosts.push(host);
    await host.api.create(spec('keep'));
    const serial = host.serialLog('keep');
    expect(serial).toBe(join(host.dir, 'log', 'keep', 'serial.log'));
    await waitForSerial(serial, 'GUEST READY', 120_000);
    expect(existsSync(join(host.dir, 'log', 'keep', 'qemu.log'))).toBe(true);
    expect(existsSync(join(host.dir, 'run', 'vms', 'keep', 'serial.log')), 'nothing of the logs on the runtime folder').toBe(false);
    expect((await stat(join(host.dir, 'log', 'keep'))).mode & 0o777).toBe(0o700);
    expect((await host.record('keep')).paths.serialLog).toBe(serial);

    // A daemon restart: QEMU writes on into the same file.
    await host.restart();
    await nextTick(serial);

    // The VM starts again: the first run's log is kept as serial.log.1, the live one starts empty.
    await host.api.stop('keep', { timeoutSec: 30 });
    await host.api.start('keep');
    await waitForSerial(serial, 'GUEST READY', 120_000);
    const first = await readFile(`${serial}.1`, 'utf8');
    expect(first).toMatch(/GUEST READY[\s\S]*GUEST TICK/);
    // vmkeep logs: the last run, then this one.
    const both = (await host.api.console('keep')).toString('utf8');
    expect(both.match(/GUEST READY/g)).toHaveLength(2);
    expect(both.startsWith(first)).toBe(true);

    // A record from before the log folder: its paths name the runtime folder, where its QEMU
    // writes (the file moved there by rename: QEMU's open file goes with it).
    await host.stop();
    const oldSerial = join(host.dir, 'run', 'vms', 'keep', 'serial.log');
    const oldQemu = join(host.dir, 'run', 'vms', 'keep', 'qemu.log');
    await rename(serial, oldSerial);
    await rename(host.qemuLog('keep'), oldQemu);
    const record = await host.record('keep');
    await writeFile(host.recordFile('keep'), JSON.stringify({ ...record, paths: { ...record.paths, serialLog: oldSerial, stderrLog: oldQemu } }));
    await host.start();
    expect((await host.api.get('keep')).state).toBe('running');
    await nextTick(oldSerial);
    expect((await host.api.console('keep')).toString('utf8')).toMatch(/GUEST TICK/);
    expect(existsSync(serial)).toBe(false);
    // Its next start moves it into the log folder.
    await host.api.stop('keep', { timeoutSec: 30 });
    await host.api.start('keep');
    await waitForSerial(serial, 'GUEST READY', 120_000);
    expect((await host.record('keep')).paths.serialLog).toBe(serial);
  }, 600_000);
});
