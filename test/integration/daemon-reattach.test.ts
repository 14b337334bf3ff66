// ARCHITECTURE.md invariants 4, 7, 9 with vmkeepd as a real service and real QEMUs: what happens while the
// daemon is away is found when it comes back, and bad input changes nothing.
import { type ChildProcess } from 'node:child_process';
import { connect } from 'node:net';
import { readFile, writeFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isSameProcess, readProcessIdentity } from '../../launcher/index.js';
import { connectQmp } from '../../qmp/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';

let guest: GuestImage;
let host: DaemonHost;
const children: ChildProcess[] = [];

beforeAll(async () => {
  guest = await ensureGuestImage();
  host = await DaemonHost.boot({ name: `reat-${process.pid}` });
});

afterAll(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await host?.shutdown();
});

function spec(name: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128, ...extra };
}

async function createRunning(name: string) {
  const vm = await host.api.create(spec(name));
  await waitForSerial(host.serialLog(name), 'GUEST READY', 90_000);
  return vm;
}

describe('what happens while the daemon is away is found when it comes back', () => {
  it('a guest that powered off while the daemon was down is reported stopped, reason "guest shutdown"', async () => {
    await createRunning('away-off');
    await host.stop();
    const qmp = await connectQmp(host.qmpSocket('away-off'));
    try {
      const shutdown = qmp.waitForEvent('SHUTDOWN', { timeoutMs: 30_000 });
      await qmp.systemPowerdown();
      await shutdown;
    } finally {
      qmp.close();
    }
    await waitForSerial(host.serialLog('away-off'), 'GUEST POWEROFF', 5_000);
    await host.start();
    const vm = await host.api.get('away-off');
    expect(vm).toMatchObject({ state: 'stopped', lastExit: { reason: 'guest shutdown' } });
    expect(vm.pid).toBeUndefined();
  });

  it('a QEMU killed while the daemon was down is reported "exited while away"', async () => {
    const vm = await createRunning('away-kill');
    const hostPid = host.hostPid(vm);
    await host.stop();
    const gone = waitGone(hostPid);
    process.kill(hostPid, 'SIGKILL');
    await gone;
    await host.start();
    expect(await host.api.get('away-kill')).toMatchObject({ state: 'exited', lastExit: { reason: 'exited while away' } });
  });

  it('a record whose PID now belongs to another process is not adopted, and that process is left alone', async () => {
    const vm = await createRunning('recycled');
    const hostPid = host.hostPid(vm);
    await host.stop();
    const gone = waitGone(hostPid);
    process.kill(hostPid, 'SIGKILL');
    await gone;
    // Another process inside the daemon's pid namespace takes over "the PID" in the record.
    const other = host.host.spawnInside('sleep', ['600'], {});
    children.push(other);
    const otherInside = await insidePid(other.pid!);
    const record = JSON.parse(await readFile(host.recordFile('recycled'), 'utf8'));
    record.process.pid = otherInside;
    await writeFile(host.recordFile('recycled'), JSON.stringify(record));

    await host.start();
    const after = await host.api.get('recycled');
    expect(after.state).toBe('exited');
    expect(after.pid).toBeUndefined();
    const otherId = readProcessIdentity(other.pid!);
    expect(otherId, 'the other process is still alive').not.toBeNull();
    expect(otherId!.state).not.toBe('Z');
  });

  it('a monitor held by a stuck client makes only that VM unreachable; the others reattach', async () => {
    await createRunning('stuck');
    await createRunning('free');
    await host.stop();
    // A client that connects and never lets go: QMP serves one client at a time.
    const holder = connect(host.qmpSocket('stuck'));
    await new Promise<void>((resolve, reject) => {
      holder.once('data', () => resolve());
      holder.once('error', reject);
    });
    try {
      await host.start();
      const stuck = await host.api.get('stuck');
      expect(stuck.state).toBe('unreachable');
      expect(stuck.problem).toMatch(/monitor/);
      expect(stuck.pid).toBeDefined();
      expect(isSameProcess(host.hostPid(stuck), readProcessIdentity(host.hostPid(stuck))!.startTime)).toBe(true);
      expect((await host.api.get('free')).state).toBe('running');
    } finally {
      holder.destroy();
    }
    // Once the stuck client is gone, the daemon's retry reattaches it.
    await waitFor(async () => (await host.api.get('stuck')).state === 'running', 'stuck to be reattached as running', 30_000);
  });
});

describe('scopes no record claims', () => {
  it('are reported at start and left alone', async () => {
    const stray = host.host.spawnInside('systemd-run', ['--scope', '--unit=vmkeep-stray', '--quiet', 'sleep', '600'], {});
    children.push(stray);
    await waitFor(async () => (await host.host.exec('systemctl', ['is-active', 'vmkeep-stray.scope'])).stdout.trim() === 'active', 'vmkeep-stray.scope to be active', 10_000);
    await host.restart();
    expect((await host.api.info()).orphanScopes).toContain('vmkeep-stray.scope');
    expect((await host.host.exec('systemctl', ['is-active', 'vmkeep-stray.scope'])).stdout.trim()).toBe('active');
  });
});

describe('bad input changes nothing', () => {
  it('invalid specs, duplicates and unknown VMs get clear errors; records and VMs stay as they were', async () => {
    await createRunning('keeper');
    const before = await host.api.list();

    await expect(host.api.create({ name: '../x', memoryMiB: 'lots' })).rejects.toMatchObject({ code: 'INVALID_SPEC' });
    await expect(host.api.create(spec('keeper'))).rejects.toMatchObject({ code: 'EXISTS' });
    await expect(host.api.get('nosuchvm')).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await expect(host.api.stop('nosuchvm')).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await expect(host.api.delete('keeper')).rejects.toMatchObject({ code: 'CONFLICT' });

    // Garbage on the control socket.
    await new Promise<void>((resolve) => {
      const s = connect(host.socket, () => s.end(Buffer.from([0, 1, 2, 255, 10, 13, 10, 71, 69, 84])));
      s.on('close', () => resolve());
      s.on('error', () => resolve());
      s.resume();
    });

    const after = await host.api.list();
    expect(after.map((v) => [v.name, v.state, v.pid])).toEqual(before.map((v) => [v.name, v.state, v.pid]));
  });

  it('a truncated record is reported, left on disk, and the daemon still serves the others', async () => {
    await createRunning('torn');
    await host.stop();
    const text = await readFile(host.recordFile('torn'), 'utf8');
    await writeFile(host.recordFile('torn'), text.slice(0, Math.floor(text.length / 2)));
    await host.start();
    expect((await host.api.get('keeper')).state).toBe('running');
    // Visible, not invisible: the API names the damaged file and how to repair it.
    await expect(host.api.get('torn')).rejects.toMatchObject({ code: 'RECORD_CORRUPT', message: expect.stringContaining(host.recordFile('torn')) });
    expect((await host.api.info()).damagedRecords).toEqual([expect.objectContaining({ name: 'torn', file: host.recordFile('torn') })]);
    // Its name stays taken: a new VM must not overwrite the record of one that still runs.
    await expect(host.api.create(spec('torn'))).rejects.toMatchObject({ code: 'EXISTS' });
    expect(await readFile(host.recordFile('torn'), 'utf8')).toBe(text.slice(0, Math.floor(text.length / 2)));
    expect(await host.consoleTail(200)).toMatch(/torn/);
  });

  it('a second daemon on the same state folder exits non-zero and names the first', async () => {
    const info = await host.api.info();
    const second = await host.host.exec(process.execPath, [
      new URL('../../dist/cli/vmkeepd.js', import.meta.url).pathname,
      '--state-dir', info.stateDir,
      '--runtime-dir', `${info.runtimeDir}-2`,
      '--socket', `${info.runtimeDir}-2/vmkeep.sock`,
    ], { timeoutMs: 30_000 });
    expect(second.exitCode).not.toBe(0);
    expect(second.stderr).toMatch(new RegExp(`pid ${info.pid}`));
    expect((await host.api.list()).length).toBeGreaterThan(0);
  });
});

async function insidePid(hostPid: number): Promise<number> {
  const status = await readFile(`/proc/${hostPid}/status`, 'utf8');
  const nspid = /^NSpid:\s+(.*)$/m.exec(status)?.[1]?.trim().split(/\s+/);
  const inner = nspid?.at(-1);
  if (!inner) throw new Error(`no NSpid for ${hostPid}`);
  return Number(inner);
}

/** Resolves when the (host) PID is gone or a zombie. */
function waitGone(pid: number): Promise<void> {
  const start = readProcessIdentity(pid);
  return waitFor(async () => start === null || !isSameProcess(pid, start.startTime), `pid ${pid} to exit`, 10_000);
}

async function waitFor(check: () => Promise<boolean>, what: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; daemon log:\n${await host.consoleTail()}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

