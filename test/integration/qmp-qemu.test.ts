// The QMP client and the launcher against a real QEMU booting the tiny guest (TCG).
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  isSameProcess,
  launchVm,
  probeInstallation,
  validateSpec,
  waitForProcessExit,
  type Installation,
  type InstallationInfo,
  type LaunchedVm,
} from '../../launcher/index.js';
import { connectQmp, type QmpEvent } from '../../qmp/index.js';
import { ensureGuestImage, requireQemu, waitForSerial, type GuestImage } from '../support/guest.js';

let guest: GuestImage;
let installation: Installation;
let info: InstallationInfo;
const cleanups: Array<() => Promise<void> | void> = [];

beforeAll(async () => {
  installation = { name: 'system', binary: requireQemu(), firmwareDirs: [] };
  guest = await ensureGuestImage();
  const cacheDir = await mkdtemp(join(tmpdir(), 'vmkeep-probe-'));
  cleanups.push(() => rm(cacheDir, { recursive: true, force: true }));
  info = await probeInstallation(installation, { cacheDir });
});

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function bootGuest(name: string): Promise<{ vm: LaunchedVm; serialLog: string; dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), `vmkeep-qmp-${name}-`));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const spec = validateSpec({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append });
  const paths = { qmpSocket: join(dir, 'qmp.sock'), serialLog: join(dir, 'serial.log'), stderrLog: join(dir, 'qemu.log') };
  const vm = await launchVm({ spec, uuid: randomUUID(), installation, info, paths });
  cleanups.push(() => {
    vm.qmp.close();
    if (isSameProcess(vm.pid, vm.startTime)) process.kill(vm.pid, 'SIGKILL');
  });
  await waitForSerial(paths.serialLog, 'GUEST READY', 60_000);
  return { vm, serialLog: paths.serialLog, dir };
}

/** A separate client process that connects to the monitor and holds it until killed. */
async function holdMonitor(socket: string): Promise<ChildProcess> {
  const script = `
    const s = require('net').connect(${JSON.stringify(socket)});
    s.once('data', () => process.stdout.write('greeted\\n'));`;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  cleanups.push(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`holder process never got a QMP greeting on ${socket}`)), 10_000);
    child.stdout!.once('data', () => {
      clearTimeout(timer);
      resolve();
    });
  });
  return child;
}

describe('real QEMU with the tiny guest', () => {
  it('probes the installation: a 7.x version and q35 resolved to a versioned type', () => {
    expect(info.version).toMatch(/^\d+\.\d+\.\d+$/);
    const q35 = info.machines.find((m) => m.alias === 'q35');
    expect(q35?.name).toMatch(/^pc-q35-\d+\.\d+$/);
  });

  it('boots the guest, which runs, and QMP reports running and the probed version', async () => {
    const { vm, serialLog } = await bootGuest('boot');
    expect(vm.machineType).toMatch(/^pc-q35-/);
    await waitForSerial(serialLog, /GUEST TICK \d+/, 30_000);
    const status = await vm.qmp.queryStatus();
    expect(status).toMatchObject({ status: 'running', running: true });
    const version = await vm.qmp.queryVersion();
    expect(`${version.qemu.major}.${version.qemu.minor}.${version.qemu.micro}`).toBe(info.version);
  });

  it('ACPI power-off: SHUTDOWN from the guest, QEMU stays in status shutdown (-no-shutdown) until quit', async () => {
    const { vm, serialLog } = await bootGuest('poweroff');
    const shutdown: Promise<QmpEvent> = vm.qmp.waitForEvent('SHUTDOWN', { timeoutMs: 30_000 });
    await vm.qmp.systemPowerdown();
    const event = await shutdown;
    expect(event.data).toMatchObject({ guest: true, reason: 'guest-shutdown' });
    await waitForSerial(serialLog, 'GUEST POWEROFF', 5_000);

    expect(isSameProcess(vm.pid, vm.startTime)).toBe(true);
    expect(await vm.qmp.queryStatus()).toMatchObject({ status: 'shutdown', running: false });

    await vm.qmp.quit();
    await waitForProcessExit(vm.pid, vm.startTime, 10_000);
    expect(isSameProcess(vm.pid, vm.startTime)).toBe(false);
  });

  it('one client at a time: a second client gets no greeting while another holds the monitor, then a fresh one after it dies', async () => {
    const { vm, dir } = await bootGuest('reattach');
    const socket = join(dir, 'qmp.sock');
    vm.qmp.close();

    const holder = await holdMonitor(socket);
    await expect(connectQmp(socket, { greetingTimeoutMs: 500 })).rejects.toMatchObject({ code: 'GREETING_TIMEOUT' });

    const exited = new Promise((resolve) => holder.once('exit', resolve));
    holder.kill('SIGKILL');
    await exited;

    const again = await connectQmp(socket);
    try {
      expect(again.greeting.version.qemu.major).toBeGreaterThanOrEqual(7);
      expect(await again.queryStatus()).toMatchObject({ status: 'running' });
    } finally {
      again.close();
    }
  });
});
