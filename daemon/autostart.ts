// VMs back after a host reboot. `planAutostart` (pure) decides from the records and the boot
// identity which VMs start; the adapters below read and record the boot ID and run the starts
// with a bounded parallelism. A daemon restart within one boot never starts anything.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from './log.js';
import { DEFAULT_AUTOSTART, type AutostartMode, type DaemonEvent, type VmState } from './model.js';
import { writeFileAtomic, type VmRecord } from './records.js';

/** The kernel's ID of this boot: new at each boot, the same across daemon restarts. */
export const KERNEL_BOOT_ID = '/proc/sys/kernel/random/boot_id';
/** The boot ID the last vmkeepd that finished its boot work saw, in the state folder. */
export function bootIdFile(stateDir: string): string {
  return join(stateDir, 'boot-id');
}

export interface AutostartFacts {
  name: string;
  autostart?: AutostartMode;
  /** What the operator or the guest last chose; a host shutdown does not change it. */
  wanted?: 'running' | 'stopped';
  state: VmState;
  hasProcess: boolean;
}

export interface AutostartPlan {
  /** This start of vmkeepd is the first of a new boot. */
  boot: boolean;
  start: string[];
  /** VMs left as they are, and why (logged). */
  skipped: Array<{ name: string; why: string }>;
}

/**
 * A start is a boot when the kernel's boot ID differs from the one recorded. With none recorded
 * (a first install, or a daemon from before this file existed) it is taken as a restart: an
 * upgrade must never start VMs.
 */
export function planAutostart(input: { currentBootId: string; recordedBootId: string | undefined; vms: readonly AutostartFacts[] }): AutostartPlan {
  const boot = input.recordedBootId !== undefined && input.recordedBootId !== input.currentBootId;
  const plan: AutostartPlan = { boot, start: [], skipped: [] };
  if (!boot) return plan;
  for (const vm of [...input.vms].sort((a, b) => a.name.localeCompare(b.name))) {
    const mode = vm.autostart ?? DEFAULT_AUTOSTART;
    const skip = (why: string): void => void plan.skipped.push({ name: vm.name, why });
    if (vm.hasProcess) skip(`it has a QEMU already (${vm.state})`);
    else if (mode === 'never') skip('autostart=never');
    else if (mode === 'always') plan.start.push(vm.name);
    else if (vm.wanted === 'running') plan.start.push(vm.name);
    else skip(vm.wanted === 'stopped' ? 'autostart=last-state and it was stopped before the host went down' : 'autostart=last-state and it was not running');
  }
  return plan;
}

/** Reads the kernel's boot ID and the recorded one (undefined when none is). */
export async function readBootIds(stateDir: string, kernelBootId = KERNEL_BOOT_ID): Promise<{ current: string; recorded: string | undefined }> {
  const current = (await readFile(kernelBootId, 'utf8')).trim();
  const recorded = await readFile(bootIdFile(stateDir), 'utf8').then((t) => t.trim(), (error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return undefined;
    throw error;
  });
  return { current, recorded };
}

/** Written once the boot's starts are done: a daemon that crashed before that tries the rest again. */
export async function recordBootId(stateDir: string, bootId: string): Promise<void> {
  await writeFileAtomic(bootIdFile(stateDir), `${bootId}\n`);
}

/**
 * Runs `start` for every name, at most `parallel` at a time, waiting `delayMs` between two
 * launches. A failed start is reported through `onResult` and does not stop the others.
 */
export async function runBounded(
  names: readonly string[],
  options: { parallel: number; delayMs: number },
  start: (name: string) => Promise<void>,
  onResult: (name: string, error: Error | undefined) => void,
): Promise<void> {
  const queue = [...names];
  let gate = Promise.resolve();
  const nextSlot = (): Promise<void> => {
    // Launches are spaced by the delay, whichever worker takes the next one.
    const mine = gate;
    gate = mine.then(() => (options.delayMs > 0 ? new Promise((resolve) => setTimeout(resolve, options.delayMs)) : undefined));
    return mine;
  };
  const worker = async (): Promise<void> => {
    for (let name = queue.shift(); name !== undefined; name = queue.shift()) {
      await nextSlot();
      try {
        await start(name);
        onResult(name, undefined);
      } catch (error) {
        onResult(name, error as Error);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(options.parallel, names.length)) }, worker));
}

export interface AutostartOptions {
  stateDir: string;
  /** VMs started at once (default 2). */
  parallel: number;
  /** Pause between two starts. */
  delayMs: number;
  /** Test seam: where the kernel's boot ID is read. */
  kernelBootId?: string;
}

/** What the boot-time start needs of the manager (the manager passes itself in). */
export interface AutostartHost {
  vms(): VmRecord[];
  start(name: string): Promise<'started' | 'running'>;
  emit(event: Omit<DaemonEvent, 'time'>): void;
  logger: Logger;
  isClosed(): boolean;
}

/**
 * Reads the boot IDs, plans, starts, then records this boot's ID: a daemon that crashes
 * half-way through the starts tries the rest at its next start, still in the same boot.
 */
export async function autostartAtBoot(host: AutostartHost, options: AutostartOptions): Promise<AutostartPlan> {
  const { current, recorded } = await readBootIds(options.stateDir, options.kernelBootId);
  const plan = planAutostart({
    currentBootId: current,
    recordedBootId: recorded,
    vms: host.vms().map((r) => ({
      name: r.name, state: r.state, hasProcess: r.process !== undefined,
      ...(r.autostart === undefined ? {} : { autostart: r.autostart }),
      ...(r.wanted === undefined ? {} : { wanted: r.wanted }),
    })),
  });
  const { logger } = host;
  if (!plan.boot) {
    if (recorded === undefined) logger.info({ bootId: current }, 'no boot ID recorded yet: taken as a daemon restart, no VM autostarted');
    else logger.debug({ bootId: current }, 'same boot as the last vmkeepd: a restart, no VM autostarted');
  } else {
    logger.info({ bootId: current, previous: recorded, start: plan.start, skipped: plan.skipped },
      `host boot: starting ${plan.start.length} VM(s) by their autostart setting, ${options.parallel} at a time`);
    for (const { name, why } of plan.skipped) logger.info({ vm: name }, `${name} not autostarted: ${why}`);
    let failed = 0;
    await runBounded(plan.start, options, async (name) => {
      if (host.isClosed()) throw new Error('vmkeepd is stopping');
      const result = await host.start(name);
      if (result === 'running') logger.info({ vm: name }, `${name} has a QEMU already; not autostarted`);
    }, (name, error) => {
      if (error === undefined) {
        logger.info({ vm: name }, `${name} autostarted`);
        host.emit({ type: 'vm-autostart', vm: name, message: `${name} started at host boot` });
        return;
      }
      failed++;
      logger.error({ vm: name, err: error }, `${name} could not be autostarted: ${error.message}`);
      host.emit({ type: 'vm-autostart', vm: name, message: `${name} could not be started at host boot: ${error.message}` });
    });
    logger.info({ started: plan.start.length - failed, failed }, 'host boot: autostart done');
  }
  // A closed daemon writes nothing: the next one may already hold the lock.
  if (plan.boot || recorded === undefined) {
    if (!host.isClosed()) await recordBootId(options.stateDir, current);
  }
  return plan;
}
