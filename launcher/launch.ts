import { connectQmp, type QmpClient } from '../qmp/index.js';
import { buildQemuCommand, type CprChannels, type QemuCommand } from './argv.js';
import { readDiskChains, type DiskChain } from './disks.js';
import { LaunchError } from './errors.js';
import { resolveMachineType, type Installation, type InstallationInfo } from './installation.js';
import { isSameProcess } from './process.js';
import { spawnQemu, type QemuUser } from './spawn.js';
import type { VmSpec } from './spec.js';

export interface LaunchVmOptions {
  spec: VmSpec;
  uuid: string;
  installation: Installation;
  /** The installation's probe result (probeInstallation). */
  info: InstallationInfo;
  paths: { qmpSocket: string; serialLog: string; stderrLog: string };
  /** Moves the paused QEMU into its scope before any guest code runs (ARCHITECTURE.md, invariant 1). */
  placeInScope?: (pid: number) => Promise<void>;
  /** Leave the guest paused after start (default false: `cont` once everything is in place). */
  stayPaused?: boolean;
  /** Start as a migration destination (`-incoming defer`): it runs the guest once the stream completes. */
  incoming?: 'defer';
  /** A machine type already resolved and recorded (a refresh keeps the VM's pinned type). */
  machineType?: string;
  /**
   * Each disk's backing chain as recorded (the daemon compared it with the files just before).
   * Absent: read now (a foreground `vmkeep run` has no record).
   */
  diskChains?: readonly DiskChain[];
  /**
   * Real paths of the storage roots every passed file must be in, checked on the open
   * descriptors (a VM of the roots, ARCHITECTURE.md invariant 11). Absent: no such rule.
   */
  storageRoots?: readonly string[];
  /** The user QEMU runs as (absent: vmkeepd's own). */
  runAs?: QemuUser;
  qmpTimeoutMs?: number;
  /** The TAP device of each bridge NIC, made (and later removed) by the caller. */
  taps?: ReadonlyArray<string | undefined>;
  /** false: user-mode NICs start without host forwards (added at a migration's hand-over). */
  withForwards?: boolean;
}

async function chainsOf(options: Pick<LaunchVmOptions, 'spec' | 'diskChains'>): Promise<readonly DiskChain[]> {
  return options.diskChains ?? (options.spec.disks.length === 0 ? [] : readDiskChains(options.spec.disks));
}

export interface LaunchedVm {
  spec: VmSpec;
  pid: number;
  startTime: string;
  machineType: string;
  command: QemuCommand;
  qmp: QmpClient;
}

const EXIT_POLL_MS = 20;

/** How long a QEMU gets to exit after `quit` (or after its guest powered off) before it is reported. */
export const QUIT_EXIT_TIMEOUT_MS = 15_000;

/**
 * Starts a VM the safe way: QEMU is spawned paused (-S), placed in its scope, its QMP
 * monitor connected, and only then told to run guest code. If any step fails, the QEMU we
 * just started is ended: it never ran guest code, so nothing of the guest is lost.
 */
export async function launchVm(options: LaunchVmOptions): Promise<LaunchedVm> {
  const machineType = options.machineType ?? resolveMachineType(options.spec.machine, options.info.machines);
  const command = buildQemuCommand({
    spec: options.spec,
    uuid: options.uuid,
    installation: options.installation,
    machineType,
    paths: options.paths,
    // A migration destination runs no guest code before the incoming stream completes (and the
    // stream starts only once it is in its scope), so it may start the guest by itself then:
    // that keeps the daemon's reaction time out of the guest's downtime.
    startPaused: options.incoming === undefined,
    ...(options.incoming === undefined ? {} : { incoming: options.incoming }),
    version: options.info.version,
    ...(options.info.sandbox === undefined ? {} : { sandbox: options.info.sandbox }),
    ...(options.taps === undefined ? {} : { taps: options.taps }),
    ...(options.withForwards === undefined ? {} : { withForwards: options.withForwards }),
    diskChains: await chainsOf(options),
  });
  const spawned = await spawnQemu(command, {
    stderrLog: options.paths.stderrLog,
    readyPath: options.paths.qmpSocket,
    ...(options.placeInScope === undefined ? {} : { placeInScope: options.placeInScope }),
    ...(options.storageRoots === undefined ? {} : { storageRoots: options.storageRoots }),
    ...(options.runAs === undefined ? {} : { runAs: options.runAs }),
  });

  let qmp: QmpClient;
  try {
    qmp = await connectQmp(options.paths.qmpSocket, {
      ...(options.qmpTimeoutMs === undefined ? {} : { commandTimeoutMs: options.qmpTimeoutMs }),
    });
  } catch (cause) {
    endUnstartedQemu(spawned.pid, spawned.startTime);
    throw new LaunchError(
      'SPAWN_FAILED',
      `QEMU for ${options.spec.name} started (pid ${spawned.pid}) but its monitor ${options.paths.qmpSocket} did not answer: ${(cause as Error).message}; QEMU was ended before running guest code. See ${options.paths.stderrLog}`,
      { cause },
    );
  }
  if (!options.stayPaused && options.incoming === undefined) {
    try {
      await qmp.cont();
    } catch (cause) {
      // `cont` may have taken effect (a timeout says nothing): the guest may be running, so it
      // is left alone and reported, never killed.
      qmp.close();
      throw new LaunchError(
        'SPAWN_FAILED',
        `QEMU for ${options.spec.name} (pid ${spawned.pid}) did not confirm cont: ${(cause as Error).message}; it was left running. Check it with its monitor ${options.paths.qmpSocket}`,
        { cause },
      );
    }
  }
  return { spec: options.spec, pid: spawned.pid, startTime: spawned.startTime, machineType, command, qmp };
}

/** A cpr-transfer destination, spawned and placed, whose monitor comes up only once its source connects. */
export interface PendingVm {
  spec: VmSpec;
  pid: number;
  startTime: string;
  machineType: string;
  command: QemuCommand;
  channels: CprChannels;
}

/**
 * Starts the destination of a cpr-transfer: the VM's devices, the installation's binary, and
 * both -incoming channels. QEMU waits for the cpr state before it even creates its monitor, so
 * the start counts as done once it listens on the cpr socket; it is placed in its scope then,
 * before any stream can arrive (it runs guest code only once the stream completed). Connecting
 * its monitor is the transfer's business (after the source's migrate).
 */
export async function launchCprDestination(options: Omit<LaunchVmOptions, 'incoming' | 'stayPaused'> & { channels: CprChannels }): Promise<PendingVm> {
  const machineType = options.machineType ?? resolveMachineType(options.spec.machine, options.info.machines);
  const command = buildQemuCommand({
    spec: options.spec,
    uuid: options.uuid,
    installation: options.installation,
    machineType,
    paths: options.paths,
    startPaused: false,
    incoming: options.channels,
    version: options.info.version,
    ...(options.info.sandbox === undefined ? {} : { sandbox: options.info.sandbox }),
    ...(options.taps === undefined ? {} : { taps: options.taps }),
    ...(options.withForwards === undefined ? {} : { withForwards: options.withForwards }),
    diskChains: await chainsOf(options),
  });
  const spawned = await spawnQemu(command, {
    stderrLog: options.paths.stderrLog,
    readyPath: options.channels.cprSocket,
    readyWhen: 'listening',
    ...(options.placeInScope === undefined ? {} : { placeInScope: options.placeInScope }),
    ...(options.storageRoots === undefined ? {} : { storageRoots: options.storageRoots }),
    ...(options.runAs === undefined ? {} : { runAs: options.runAs }),
  });
  return { spec: options.spec, pid: spawned.pid, startTime: spawned.startTime, machineType, command, channels: options.channels };
}

/** Only for a QEMU that is still paused before its first `cont`: no guest state to lose. */
function endUnstartedQemu(pid: number, startTime: string): void {
  if (!isSameProcess(pid, startTime)) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

/**
 * Resolves once the process (PID + start time) is gone or a zombie; rejects after timeoutMs.
 * Polls /proc, because the QEMU may not be our child (a restarted daemon adopted it).
 */
export function waitForProcessExit(pid: number, startTime: string, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + timeoutMs;
    const check = (): void => {
      if (!isSameProcess(pid, startTime)) return resolve();
      if (Date.now() >= deadline) {
        return reject(new LaunchError('TIMEOUT', `process ${pid} still running after ${timeoutMs} ms`));
      }
      setTimeout(check, EXIT_POLL_MS);
    };
    check();
  });
}
