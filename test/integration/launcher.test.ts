import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, readFileSync, readlinkSync, realpathSync, writeFileSync } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  buildQemuCommand, checkSpecFiles, isSameProcess, LaunchError, probeInstallation, readExe, readProcessIdentity,
  resolveMachineType, spawnQemu, validateSpec,
  type Installation, type InstallationInfo, type ProcessRunner, type QemuCommand, type SpawnedQemu, type VmSpec,
} from '../../launcher/index.js';
import { countTicks, ensureGuestImage, requireQemu, waitForSerial, type GuestImage } from '../support/guest.js';

let guest: GuestImage;
let installation: Installation;
let info: InstallationInfo;
let dir: string;
const started: SpawnedQemu[] = [];

beforeAll(async () => {
  installation = { name: 'system', binary: requireQemu(), firmwareDirs: [] };
  const t0 = performance.now();
  guest = await ensureGuestImage();
  console.log(`guest image ready in ${Math.round(performance.now() - t0)} ms`);
});

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmkeep-launcher-'));
  info = await probeInstallation(installation, { cacheDir: join(dir, 'cache') });
});

afterEach(async () => {
  // Only the QEMUs this file started, by PID and start time.
  for (const qemu of started.splice(0)) {
    if (isSameProcess(qemu.pid, qemu.startTime)) process.kill(qemu.pid, 'SIGKILL');
    await waitUntil(() => !isSameProcess(qemu.pid, qemu.startTime), `QEMU PID ${qemu.pid} to end`, 5000);
  }
  await rm(dir, { recursive: true, force: true });
});

function guestSpec(patch: Record<string, unknown> = {}): VmSpec {
  return validateSpec({ name: 'itest', kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 256, ...patch });
}

function vmPaths() {
  return { qmpSocket: join(dir, 'qmp.sock'), serialLog: join(dir, 'serial.log'), stderrLog: join(dir, 'qemu.log') };
}

async function start(spec: VmSpec, opts: { startPaused?: boolean; machineType?: string; placeInScope?: (pid: number) => Promise<void> } = {}) {
  const paths = vmPaths();
  const command = buildQemuCommand({
    spec, uuid: randomUUID(), installation, machineType: opts.machineType ?? resolveMachineType(spec.machine, info.machines),
    paths, startPaused: opts.startPaused ?? false,
  });
  const spawnOptions = { stderrLog: paths.stderrLog, readyPath: paths.qmpSocket, ...(opts.placeInScope ? { placeInScope: opts.placeInScope } : {}) };
  const qemu = await spawnQemu(command, spawnOptions);
  started.push(qemu);
  return { qemu, paths };
}

async function startError(spec: VmSpec, opts: Parameters<typeof start>[1] = {}): Promise<LaunchError> {
  const failed = await start(spec, opts).then(() => undefined, (err: unknown) => err);
  if (!(failed instanceof LaunchError)) throw new Error(`expected a LaunchError, got ${String(failed)}`);
  return failed;
}

describe('launcher on the real QEMU', () => {
  it('probes the installation and pins q35 to its versioned type, from cache the second time', async () => {
    expect(info.version).toMatch(/^7\.2\.\d+$/);
    expect(resolveMachineType('q35', info.machines)).toBe('pc-q35-7.2');
    expect(info.identity.path).toBe(installation.binary);
    const refuse: ProcessRunner = async () => {
      throw new Error('the cached probe must not run QEMU');
    };
    expect(await probeInstallation(installation, { cacheDir: join(dir, 'cache'), run: refuse })).toEqual(info);
  });

  it('starts the guest detached; it boots and keeps running', async () => {
    const spec = guestSpec();
    await checkSpecFiles(spec);
    const t0 = performance.now();
    const { qemu, paths } = await start(spec);
    const spawned = performance.now();
    await waitForSerial(paths.serialLog, 'GUEST READY', 60_000);
    const ready = performance.now();
    await waitForSerial(paths.serialLog, /GUEST TICK \d+/, 10_000);
    console.log(`spawnQemu ${Math.round(spawned - t0)} ms, boot to GUEST READY ${Math.round(ready - t0)} ms`);
    expect(countTicks(paths.serialLog)).toBeGreaterThanOrEqual(1);

    const identity = readProcessIdentity(qemu.pid);
    expect(identity).toEqual({ pid: qemu.pid, startTime: qemu.startTime, state: expect.stringMatching(/^[RS]$/) });
    expect(isSameProcess(qemu.pid, qemu.startTime)).toBe(true);
    expect(readExe(qemu.pid)).toEqual(expect.objectContaining({ path: realpathSync(installation.binary), deleted: false }));

    // Its own session, and nothing tying it to this process: stdin is /dev/null, output goes to the log.
    const stat = readFileSync(`/proc/${qemu.pid}/stat`, 'utf8');
    const session = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[3];
    expect(session).toBe(String(qemu.pid));
    expect(readlinkSync(`/proc/${qemu.pid}/fd/0`)).toBe('/dev/null');
    expect(readlinkSync(`/proc/${qemu.pid}/fd/1`)).toBe(paths.stderrLog);
    expect(readlinkSync(`/proc/${qemu.pid}/fd/2`)).toBe(paths.stderrLog);
    const argv = readFileSync(`/proc/${qemu.pid}/cmdline`, 'utf8').split('\0');
    expect(argv).toContain('pc-q35-7.2,accel=tcg');
  });

  it('fails with QEMU_EXITED and QEMU\'s own words for an unknown machine type', async () => {
    const error = await startError(guestSpec(), { machineType: 'pc-q35-99.0' });
    expect(error.code).toBe('QEMU_EXITED');
    expect(error.message).toMatch(/unsupported machine type/i);
    expect(error.message).toContain('exited with code 1');
    expect(started).toEqual([]);
  });

  it('refuses disks whose chains vmkeep has not read and recorded: no QEMU starts', async () => {
    // vmkeep opens every image itself, layer by recorded layer (disks.test.ts); a QEMU never
    // gets a path to open.
    const spec = guestSpec({ disks: [{ path: join(dir, 'missing.img'), format: 'raw' }] });
    const error = await startError(spec);
    expect(error.code).toBe('INVALID_SPEC');
    expect(error.message).toMatch(/recorded chains/);
    expect(started).toEqual([]);
  });

  it('does not count a start as done while QEMU is still initialising behind its bound socket', async () => {
    // QEMU binds the QMP socket before it loads the kernel; a FIFO as kernel holds it there.
    const fifo = join(dir, 'kernel.fifo');
    execFileSync('mkfifo', [fifo]);
    const outcome = start(guestSpec({ kernel: fifo })).then(() => 'started' as const, (err: unknown) => err);
    await waitUntil(() => existsSync(vmPaths().qmpSocket), 'QEMU to bind its QMP socket', 10_000);
    // Opening the FIFO for writing returns once QEMU has opened it: QEMU is past the socket, mid-init.
    const writer = await open(fifo, 'w');
    try {
      // A bounded look for something that must not happen (not a synchronisation).
      const early = await Promise.race([outcome, new Promise((resolve) => setTimeout(() => resolve('pending'), 300))]);
      expect(early).toBe('pending');
      await writer.write('this is not a kernel');
    } finally {
      await writer.close();
    }
    const error = await outcome;
    expect(error).toBeInstanceOf(LaunchError);
    expect((error as LaunchError).code).toBe('QEMU_EXITED');
    // QEMU's own complaint about the kernel it could not load.
    expect((error as LaunchError).message).toMatch(/qemu: .*kernel/);
    // The dead QEMU's socket is removed, so a corrected retry can start at once.
    expect(existsSync(vmPaths().qmpSocket)).toBe(false);
  });

  it('ends the paused QEMU and fails with SCOPE_FAILED when it cannot be placed in its scope', async () => {
    let seenPid: number | undefined;
    let seenStartTime: string | undefined;
    const error = await startError(guestSpec(), {
      startPaused: true,
      placeInScope: async (pid) => {
        seenPid = pid;
        seenStartTime = readProcessIdentity(pid)?.startTime;
        throw new Error('org.freedesktop.systemd1.UnitExists: Unit vmkeep-itest.scope already exists.');
      },
    });
    expect(error.code).toBe('SCOPE_FAILED');
    expect(error.message).toContain('UnitExists');
    expect((error.cause as Error).message).toContain('UnitExists');
    expect(seenPid).toBeDefined();
    expect(isSameProcess(seenPid ?? 0, seenStartTime ?? '')).toBe(false);
    // Reaped too: a zombie would still show the same start time.
    expect(readProcessIdentity(seenPid ?? 0)?.startTime === seenStartTime).toBe(false);
    // Paused with -S, the guest never ran: nothing on its console.
    expect(readFileSync(vmPaths().serialLog, 'utf8')).toBe('');
  });

  it('refuses to place a QEMU into a scope unless it starts paused', async () => {
    const error = await startError(guestSpec(), { startPaused: false, placeInScope: async () => undefined });
    expect(error.code).toBe('SPAWN_FAILED');
    expect(error.message).toContain('-S');
    expect(existsSync(vmPaths().stderrLog)).toBe(false);
  });
});

// spawnQemu's failure paths with a shell standing in for QEMU: exact exit codes and output.
describe('spawnQemu failure paths', () => {
  const shell = (script: string): QemuCommand => ({ binary: '/bin/sh', argv: ['-c', script], env: {} });

  it('quotes only this start\'s stderr and the exit code', async () => {
    const stderrLog = join(dir, 'qemu.log');
    writeFileSync(stderrLog, 'an older run: not this one\n');
    const error = await spawnQemu(shell('echo "first complaint" >&2; echo "last complaint" >&2; exit 3'), {
      stderrLog, readyPath: join(dir, 'qmp.sock'),
    }).then(() => undefined, (err: unknown) => err as LaunchError);
    expect(error?.code).toBe('QEMU_EXITED');
    expect(error?.message).toContain('exited with code 3');
    expect(error?.message).toContain('first complaint\nlast complaint');
    expect(error?.message).not.toContain('older run');
    expect(error?.message).toContain(stderrLog);
  });

  it('names the signal that ended QEMU', async () => {
    const error = await spawnQemu(shell('kill -SEGV $$'), { stderrLog: join(dir, 'qemu.log'), readyPath: join(dir, 'qmp.sock') })
      .then(() => undefined, (err: unknown) => err as LaunchError);
    expect(error?.code).toBe('QEMU_EXITED');
    expect(error?.message).toContain('was killed by SIGSEGV');
  });

  it('fails with SPAWN_FAILED for a missing binary', async () => {
    const missing = join(dir, 'no-such-qemu');
    await expect(spawnQemu({ binary: missing, argv: [], env: {} }, { stderrLog: join(dir, 'qemu.log') }))
      .rejects.toMatchObject({ code: 'SPAWN_FAILED', message: expect.stringContaining(missing) });
  });

  it('refuses a socket path that already exists, starting nothing', async () => {
    const readyPath = join(dir, 'qmp.sock');
    writeFileSync(readyPath, '');
    await expect(spawnQemu(shell('exit 0'), { stderrLog: join(dir, 'qemu.log'), readyPath }))
      .rejects.toMatchObject({ code: 'SPAWN_FAILED', message: expect.stringContaining('already exists') });
    expect(existsSync(join(dir, 'qemu.log'))).toBe(false);
  });

  it('ends a QEMU that never answers and reports TIMEOUT', async () => {
    const error = await spawnQemu(shell('echo "stuck here" >&2; exec sleep 60'), {
      stderrLog: join(dir, 'qemu.log'), readyPath: join(dir, 'qmp.sock'), spawnTimeoutMs: 300,
    }).then(() => undefined, (err: unknown) => err as LaunchError);
    expect(error?.code).toBe('TIMEOUT');
    expect(error?.message).toContain('stuck here');
    const pid = Number(/PID (\d+)/.exec(error?.message ?? '')?.[1]);
    expect(readProcessIdentity(pid)).toBeNull();
  });
});

async function waitUntil(condition: () => boolean, what: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
