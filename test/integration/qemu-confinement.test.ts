// Every QEMU vmkeepd starts runs under QEMU's seccomp sandbox (ARCHITECTURE.md, invariant 11):
// /proc/PID/status says "Seccomp: 2" (filter mode), and a `migrate exec:` sent over the admin's
// raw QMP never runs its shell command: the fork is refused by the filter, which ends that QEMU.
// Negative control: the same QEMU binary started without -sandbox runs the command.
// Each VM's scope carries MemoryMax, TasksMax and CPUWeight from its creation (read back over
// D-Bus). Their enforcement is the kernel's: the test bed's private systemd has no memory or
// pids controller (they are bound to the host's v1 hierarchies), so it is not replayed here.
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QEMU_MEMORY_OVERHEAD_MIB, readProcessIdentity, scopeLimits, TCG_CODE_BUFFER_MIB } from '../../launcher/index.js';
import { connectQmp } from '../../qmp/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { ensureGuestImage, requireQemu, waitForSerial, type GuestImage } from '../support/guest.js';
import { qemuPidsOf } from '../support/qemu-procs.js';
import { waitFor } from '../support/systemd-host.js';

let guest: GuestImage;
let host: DaemonHost;

beforeAll(async () => {
  guest = await ensureGuestImage();
  host = await DaemonHost.boot({ name: `sbx-${process.pid}` });
});

afterAll(async () => {
  await host?.shutdown();
});

async function runningVm(name: string, extra: Record<string, unknown> = {}): Promise<number> {
  await host.api.create({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128, ...extra });
  await waitForSerial(host.serialLog(name), 'GUEST READY', 60_000);
  const pids = qemuPidsOf(name, host.dir);
  expect(pids, `one QEMU of ${name}`).toHaveLength(1);
  return pids[0] as number;
}

describe('QEMU under its seccomp sandbox', () => {
  it('the running QEMU is in seccomp filter mode; its scope has the limits, read back over D-Bus', async () => {
    const pid = await runningVm('sbx1', { cpuWeight: 250, vcpus: 2 });
    expect(readFileSync(`/proc/${pid}/status`, 'utf8')).toMatch(/^Seccomp:\s+2$/m);
    const shown = await host.systemctl('show', 'vmkeep-sbx1.scope', '-p', 'MemoryMax', '-p', 'TasksMax', '-p', 'CPUWeight');
    const limits = scopeLimits({ memoryMiB: 128, vcpus: 2, accel: 'tcg', cpuWeight: 250 });
    expect(shown).toContain(`MemoryMax=${limits.memoryMaxBytes}`);
    expect(shown).toContain(`TasksMax=${limits.tasksMax}`);
    expect(shown).toContain('CPUWeight=250');
    expect(limits.memoryMaxBytes).toBe((128 + QEMU_MEMORY_OVERHEAD_MIB + TCG_CODE_BUFFER_MIB) * 1024 * 1024);
  });

  it('a migrate exec: over the admin\'s raw QMP never runs its command; the filter ends that QEMU', async () => {
    const pid = await runningVm('sbx2');
    const marker = join(host.dir, 'exec-marker');
    await host.api.qmp('sbx2', 'migrate', { uri: `exec:id > ${marker}` }).catch(() => undefined);
    await waitFor(`QEMU ${pid} ended by its seccomp filter`, 30_000, () => {
      // Gone, or a zombie not yet reaped: read once, so a reap between two reads is no error.
      const state = readProcessIdentity(pid)?.state;
      return state === undefined || state === 'Z' || state === 'X' ? true : undefined;
    });
    expect(existsSync(marker), `${marker} was written: the shell command ran`).toBe(false);
  });

  it('negative control: the same binary without -sandbox runs the command', async () => {
    const qemu = requireQemu();
    const socket = join(host.dir, 'control-qmp.sock');
    const marker = join(host.dir, 'exec-marker-control');
    const child = spawn(qemu, ['-nodefaults', '-display', 'none', '-machine', 'pc,accel=tcg', '-m', '32', '-S', '-qmp', `unix:${socket},server=on,wait=off`], { stdio: 'ignore' });
    try {
      await waitFor(`${socket} listening`, 30_000, () => (existsSync(socket) ? true : undefined));
      const qmp = await connectQmp(socket, { greetingTimeoutMs: 10_000 });
      try {
        await qmp.execute('migrate', { uri: `exec:id > ${marker}` });
        await waitFor(`${marker} written by the unsandboxed QEMU`, 30_000, () => (existsSync(marker) && readFileSync(marker, 'utf8').includes('uid=') ? true : undefined));
      } finally {
        qmp.close();
      }
    } finally {
      child.kill('SIGKILL');
    }
  });
});
