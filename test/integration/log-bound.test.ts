// A guest that prints a lot to its console leaves at most the bound on disk: the serial log is
// rotated above --log-max-kib while QEMU keeps writing (NAME.1 ... NAME.KEEP), and `vmkeep logs`
// reads across the rotation. Negative control: with a bound larger than the flood, the whole
// flood stays in the one file.
import { readdir, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { DaemonHost } from '../support/daemon-host.js';
import { ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';

/**
 * What the guest prints (1 KiB lines). The bound does not depend on the volume, and a TCG guest
 * prints 100 MiB in about 5 minutes: CI floods 16 MiB (64 times the bound);
 * VMKEEP_LOG_FLOOD_MIB=100 runs the operator's worst case of the issue.
 */
const FLOOD_KIB = Number(process.env.VMKEEP_LOG_FLOOD_MIB ?? 16) * 1024;
/** The negative control's flood: enough to pass the small bound many times over. */
const SMALL_FLOOD_KIB = 4096;
const MAX_KIB = 256;
const KEEP = 2;

let guest: GuestImage;
const hosts: DaemonHost[] = [];

beforeAll(async () => {
  guest = await ensureGuestImage();
});

afterEach(async () => {
  for (const host of hosts.splice(0)) await host.shutdown();
});

/** The serial log's files (live and rotated) and their sizes. */
async function serialFiles(host: DaemonHost, vm: string): Promise<Record<string, number>> {
  const live = host.serialLog(vm);
  const out: Record<string, number> = {};
  for (const name of await readdir(dirname(live))) {
    if (name === basename(live) || name.startsWith(`${basename(live)}.`)) out[name] = (await stat(join(dirname(live), name))).size;
  }
  return out;
}

async function flood(name: string, maxKib: number, floodKib: number): Promise<{ host: DaemonHost; files: Record<string, number>; console: string }> {
  const host = await DaemonHost.boot({ name, args: ['--log-max-kib', String(maxKib), '--log-keep', String(KEEP)] });
  hosts.push(host);
  await host.api.create({ name: 'loud', kernel: guest.kernel, initrd: guest.initrd, append: `${guest.append} vmkeep.flood_kib=${floodKib}`, memoryMiB: 128 });
  // Ticks come after the flood (one a second, so one lands in the live file).
  await waitForSerial(host.serialLog('loud'), /GUEST TICK \d+/, 400_000);
  const files = await serialFiles(host, 'loud');
  // What `vmkeep logs` shows: the rotated files, then the live one.
  const console = (await host.api.console('loud')).toString('utf8');
  return { host, files, console };
}

describe('bounded console logs', () => {
  it(`a guest printing ${FLOOD_KIB / 1024} MiB leaves at most ${MAX_KIB} KiB x ${KEEP + 1} files (plus one check's worth) on disk`, async () => {
    const { files, console } = await flood(`logb-${process.pid}`, MAX_KIB, FLOOD_KIB);
    const total = Object.values(files).reduce((a, b) => a + b, 0);
    process.stdout.write(`bounded log: files ${JSON.stringify(files)}, total ${total} bytes for a ${FLOOD_KIB} KiB flood\n`);
    expect(Object.keys(files).sort()).toEqual(['serial.log', 'serial.log.1', 'serial.log.2']);
    // Each rotated file is one copy of a live file that had just passed the limit.
    const slack = MAX_KIB * 1024;
    for (const size of Object.values(files)) expect(size).toBeLessThanOrEqual(MAX_KIB * 1024 + slack);
    expect(total).toBeLessThanOrEqual((KEEP + 1) * (MAX_KIB * 1024 + slack));
    // vmkeep logs: the rotated files first, then the live one, in order.
    expect(console).toContain('GUEST FLOOD 000');
    expect(console.lastIndexOf('GUEST FLOOD')).toBeLessThan(console.search(/GUEST TICK \d+/));
  }, 600_000);

  it('negative control: with a bound above the flood, the whole flood stays on disk', async () => {
    const { files } = await flood(`logbneg-${process.pid}`, SMALL_FLOOD_KIB * 2, SMALL_FLOOD_KIB);
    expect(Object.keys(files)).toEqual(['serial.log']);
    expect(files['serial.log']).toBeGreaterThan(SMALL_FLOOD_KIB * 1024);
  }, 600_000);
});
