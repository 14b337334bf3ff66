// Disks on the real QEMU: every image is opened by vmkeep and passed as a descriptor (QEMU's
// block nodes name /dev/fdset/N, never a path), backing layers read-only, cache "none" with
// O_DIRECT and a clear error where the filesystem refuses it (ARCHITECTURE.md, "Disks and
// passed descriptors"). A filesystem refusing O_DIRECT: test/unit/launcher/inherited-fds.test.ts.
import { randomUUID } from 'node:crypto';
import { constants } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  isSameProcess, launchVm, probeInstallation, readDiskChains, validateSpec,
  type Installation, type InstallationInfo, type LaunchedVm, type VmSpec,
} from '../../launcher/index.js';
import { makeOverlayOnRaw, O_ACCMODE, openFilesUnder, requireDiskTools } from '../support/disk-images.js';
import { ensureGuestImage, requireQemu, waitForSerial, type GuestImage } from '../support/guest.js';
import { checkImage, lastWrote, RECORD_BYTES, waitForWrote } from '../support/records-check.js';
import { powerDownGuest } from '../../qmp/index.js';
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';

let guest: GuestImage;
let installation: Installation;
let info: InstallationInfo;
let dir: string;
const started: LaunchedVm[] = [];

beforeAll(async () => {
  requireDiskTools();
  installation = { name: 'system', binary: requireQemu(), firmwareDirs: [] };
  guest = await ensureGuestImage();
});

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmkeep-disks-'));
  info = await probeInstallation(installation, { cacheDir: join(dir, 'cache') });
});

afterEach(async () => {
  for (const vm of started.splice(0)) {
    vm.qmp.close();
    if (isSameProcess(vm.pid, vm.startTime)) process.kill(vm.pid, 'SIGKILL');
  }
  await rm(dir, { recursive: true, force: true });
});

function spec(disks: unknown[], append = ''): VmSpec {
  return validateSpec({ name: 'disks', kernel: guest.kernel, initrd: guest.initrd, append: `${guest.append}${append}`, memoryMiB: 256, disks });
}

async function waitForWrites(n: number): Promise<void> {
  await waitForWrote(join(dir, 'serial.log'), n);
}

/** ACPI power-off (the guest stops its writer and unmounts), then quit. */
async function powerOff(vm: LaunchedVm): Promise<void> {
  await powerDownGuest(vm.qmp, { timeoutMs: 60_000 });
  await vm.qmp.quit();
  const deadline = Date.now() + 15_000;
  while (isSameProcess(vm.pid, vm.startTime)) {
    if (Date.now() > deadline) throw new Error(`QEMU ${vm.pid} did not exit after quit`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function launch(s: VmSpec, workDir = dir): Promise<LaunchedVm> {
  const vm = await launchVm({
    spec: s, uuid: randomUUID(), installation, info,
    paths: { qmpSocket: join(workDir, 'qmp.sock'), serialLog: join(workDir, 'serial.log'), stderrLog: join(workDir, 'qemu.log') },
    diskChains: await readDiskChains(s.disks),
  });
  started.push(vm);
  return vm;
}

interface BlockNode { 'node-name': string; file: string; ro: boolean }

describe('disks passed as descriptors', () => {
  it('attaches a qcow2 overlay over a raw base through fdsets: QEMU opens no path, the base read-only', async () => {
    const { overlay, base } = makeOverlayOnRaw(dir);
    const vm = await launch(spec([{ path: overlay, format: 'qcow2' }]));
    await waitForSerial(join(dir, 'serial.log'), 'GUEST READY', 60_000);

    const nodes = await vm.qmp.execute<BlockNode[]>('query-named-block-nodes', { flat: true });
    const byName = new Map(nodes.map((n) => [n['node-name'], n]));
    expect([...byName.keys()].sort()).toEqual(['disk0', 'disk0-file', 'disk0-layer1', 'disk0-layer1-file']);
    expect(byName.get('disk0-file')?.file).toMatch(/^\/dev\/fdset\/\d+$/);
    expect(byName.get('disk0-layer1-file')?.file).toMatch(/^\/dev\/fdset\/\d+$/);
    expect(byName.get('disk0')?.ro).toBe(false);
    expect(byName.get('disk0-layer1')?.ro).toBe(true);

    // What QEMU holds open: the overlay read-write, the base only read-only.
    const open = openFilesUnder(vm.pid, dir);
    expect(open.filter((f) => f.path === overlay).map((f) => f.flags & O_ACCMODE)).toContain(constants.O_RDWR);
    expect(open.filter((f) => f.path === base).map((f) => f.flags & O_ACCMODE)).toEqual(expect.arrayContaining([constants.O_RDONLY]));
    expect(open.filter((f) => f.path === base).every((f) => (f.flags & O_ACCMODE) === constants.O_RDONLY)).toBe(true);
  });

  it('opens a cache "none" disk with O_DIRECT', async () => {
    const { overlay } = makeOverlayOnRaw(dir);
    const vm = await launch(spec([{ path: overlay, format: 'qcow2', cache: 'none' }]));
    const open = openFilesUnder(vm.pid, dir).filter((f) => f.path === overlay);
    expect(open.length).toBeGreaterThan(0);
    expect(open.every((f) => (f.flags & constants.O_DIRECT) !== 0)).toBe(true);
  });

  it('the guest writes records through the passed descriptors; after an ACPI power-off the checker passes', async () => {
    const { overlay } = makeOverlayOnRaw(dir);
    const vm = await launch(spec([{ path: overlay, format: 'qcow2' }]));
    await waitForSerial(join(dir, 'serial.log'), 'GUEST DISK MOUNTED', 60_000);
    await waitForWrites(30);
    await powerOff(vm);
    const printed = lastWrote(join(dir, 'serial.log'));
    const verdict = checkImage(overlay, 'qcow2', printed);
    expect(verdict.problems).toEqual([]);
    expect(verdict.last).toBeGreaterThanOrEqual(printed);
    expect(verdict.fsck.code).toBe(0);
  });
});

// Negative controls: the checker is shown to detect loss, so its passes mean something.
describe('the records checker detects loss', () => {
  it('fails for a QEMU SIGKILLed while a writer that does not fsync runs', async () => {
    const { overlay } = makeOverlayOnRaw(dir);
    const vm = await launch(spec([{ path: overlay, format: 'qcow2' }], ' vmkeep.writer=nosync'));
    await waitForWrites(20);
    process.kill(vm.pid, 'SIGKILL');
    const printed = lastWrote(join(dir, 'serial.log'));
    const verdict = checkImage(overlay, 'qcow2', printed);
    expect(verdict.ok).toBe(false);
    expect(verdict.problems.join('\n')).toMatch(/acknowledged records .* are lost/);
  });

  it('fails for an image with one record overwritten, and for a duplicated record', async () => {
    const { overlay } = makeOverlayOnRaw(dir);
    const vm = await launch(spec([{ path: overlay, format: 'qcow2' }]));
    await waitForWrites(10);
    await powerOff(vm);
    const printed = lastWrote(join(dir, 'serial.log'));
    expect(checkImage(overlay, 'qcow2', printed).ok).toBe(true);

    // Record 5 rewritten inside the filesystem (debugfs on a raw copy, then back into a raw image).
    const raw = join(dir, 'edit.raw');
    execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', overlay, raw]);
    const sbin = { PATH: `${process.env.PATH ?? ''}:/usr/sbin:/sbin` };
    const records = join(dir, 'records');
    execFileSync('debugfs', ['-R', `dump /records ${records}`, raw], { env: sbin, stdio: 'ignore' });
    const data = readFileSync(records);
    const overwritten = Buffer.from(data);
    overwritten.write('R 0000000005 000000000000 0000000000', 4 * RECORD_BYTES, 'latin1');
    writeFileSync(records, overwritten);
    execFileSync('debugfs', ['-w', '-R', 'rm /records', raw], { env: sbin, stdio: 'ignore' });
    execFileSync('debugfs', ['-w', '-R', `write ${records} records`, raw], { env: sbin, stdio: 'ignore' });
    const bad = checkImage(raw, 'raw', printed);
    expect(bad.ok).toBe(false);
    expect(bad.problems.join('\n')).toContain('record at byte 256 (seq 5) fails its checksum');

    const duplicated = Buffer.concat([data.subarray(0, 3 * RECORD_BYTES), data.subarray(2 * RECORD_BYTES)]);
    writeFileSync(records, duplicated);
    execFileSync('debugfs', ['-w', '-R', 'rm /records', raw], { env: sbin, stdio: 'ignore' });
    execFileSync('debugfs', ['-w', '-R', `write ${records} records`, raw], { env: sbin, stdio: 'ignore' });
    expect(checkImage(raw, 'raw', printed).problems.join('\n')).toContain('seq 3 is duplicated');
  });
});
