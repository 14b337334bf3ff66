import { supportsCprTransfer, type Accel, type InstallationInfo, type MemoryBackend } from '../launcher/index.js';
import { UpgradeError } from './errors.js';
import { compareQemuVersions } from './version.js';

/**
 * How a stale VM moves onto the current installation.
 * - auto: cpr where both QEMUs and the VM's memory allow it, else migrate
 * - cpr: cpr-transfer into a new QEMU, guest RAM handed over (not copied); the guest keeps running
 * - migrate: live migration into a new QEMU; the guest keeps running
 * - migrate-or-reboot: migrate; when the migration is refused or fails and the guest is still on
 *   its old QEMU, a reboot instead (the outcome says which and why)
 * - reboot: ACPI power-off, then a start on the current installation
 * - on-guest-shutdown: waits for the guest's own power-off or reboot, then starts on the current one
 * - manual: only reported
 */
export type RefreshStrategy = 'auto' | 'cpr' | 'migrate' | 'migrate-or-reboot' | 'reboot' | 'on-guest-shutdown' | 'manual';
/** The one list of strategies; the snap's shell scripts carry a copy a unit test compares to it. */
export const REFRESH_STRATEGIES: readonly RefreshStrategy[] = ['auto', 'cpr', 'migrate', 'migrate-or-reboot', 'reboot', 'on-guest-shutdown', 'manual'];

/** Why cpr cannot move this VM, or undefined when it can. */
export function cprBlocker(input: { memoryBackend: MemoryBackend; runningVersion: string | undefined; targetVersion: string }): string | undefined {
  if (input.memoryBackend !== 'memfd-shared') return 'its RAM is not a shared memfd (created with memory.backend anonymous, or before vmkeep chose memfd-shared)';
  if (input.runningVersion === undefined) return 'the running QEMU\'s version is not known';
  if (!supportsCprTransfer(input.runningVersion)) return `it runs QEMU ${input.runningVersion}, and cpr-transfer needs 10.0 or newer on both sides`;
  if (!supportsCprTransfer(input.targetVersion)) return `the current installation is QEMU ${input.targetVersion}, and cpr-transfer needs 10.0 or newer on both sides`;
  return undefined;
}

/**
 * The live strategy `auto` stands for, and why: cpr where it can work (no copy of guest RAM),
 * else migrate. An explicit `cpr` that cannot work is refused before anything is touched.
 */
export function chooseLiveStrategy(requested: 'auto' | 'cpr', input: Parameters<typeof cprBlocker>[0] & { vm: string }): { strategy: 'cpr' | 'migrate'; why: string } {
  const blocker = cprBlocker(input);
  if (blocker === undefined) return { strategy: 'cpr', why: 'both QEMUs support cpr-transfer and its RAM is a shared memfd: handed over, not copied' };
  if (requested === 'cpr') {
    throw new UpgradeError('CPR_UNAVAILABLE', `${input.vm} cannot be refreshed by cpr: ${blocker}; use --strategy migrate (copies its RAM) or auto (picks what works)`);
  }
  return { strategy: 'migrate', why: `cpr is not possible: ${blocker}` };
}

/**
 * The oldest source QEMU whose live copy under TCG was measured sound. From QEMU 7.2 under TCG on
 * a loaded host, a live copy sometimes leaves the destination a guest whose kernel memory is
 * stale (a BUG, then a panic); with the guest stopped for the copy it never did (ARCHITECTURE.md,
 * "Paused copy"). Versions between 7.2 and 10.0 were not measured.
 */
export const TCG_LIVE_COPY_SOUND_FROM = '10.0.0';

/**
 * Why a migration must stop the guest for the whole RAM copy (the pause becomes the copy's
 * length, ~0.2-1 s for 128 MiB on one host), or undefined when it may copy live. Pure.
 * An unknown running version counts as old: a crashed guest costs more than a longer pause.
 */
export function pausedCopyReason(input: { accel: Accel; runningVersion: string | undefined }): string | undefined {
  if (input.accel !== 'tcg') return undefined;
  if (input.runningVersion !== undefined && compareQemuVersions(input.runningVersion, TCG_LIVE_COPY_SOUND_FROM) >= 0) return undefined;
  const running = input.runningVersion === undefined ? 'a QEMU of unknown version' : `QEMU ${input.runningVersion}`;
  return `it runs ${running} under TCG, whose live copy can corrupt the guest's memory (sound from ${TCG_LIVE_COPY_SOUND_FROM}): the guest is paused for the whole RAM copy`;
}

export function parseStrategy(value: unknown, what = 'strategy'): RefreshStrategy {
  if (typeof value === 'string' && (REFRESH_STRATEGIES as readonly string[]).includes(value)) return value as RefreshStrategy;
  throw new UpgradeError('BAD_STRATEGY', `${what} ${JSON.stringify(value)} is not one of ${REFRESH_STRATEGIES.join(', ')}`);
}

/**
 * Refuses a refresh target that cannot take the VM: an older QEMU than the running one
 * (migration streams are not backward compatible, and an upgrade is not a downgrade), or one
 * without the VM's pinned machine type. Checked before anything is touched.
 */
export function checkRefreshTarget(input: {
  vm: string;
  runningVersion: string | undefined;
  machineType: string;
  target: { name: string; info: InstallationInfo };
  allowOlder?: boolean;
}): void {
  const { vm, runningVersion, machineType, target } = input;
  if (runningVersion !== undefined && !input.allowOlder && compareQemuVersions(target.info.version, runningVersion) < 0) {
    throw new UpgradeError('OLDER_TARGET',
      `${vm} runs QEMU ${runningVersion}, and the current installation "${target.name}" is older (${target.info.version}); vmkeep does not move a VM onto an older QEMU. Make a newer installation current, or leave ${vm} as it is`);
  }
  if (!target.info.machines.some((m) => m.name === machineType)) {
    const versioned = target.info.machines.map((m) => m.name).filter((n) => n.startsWith(machineType.replace(/-[\d.]+$/, ''))).slice(-5);
    throw new UpgradeError('MACHINE_TYPE_MISSING',
      `${vm} is pinned to machine type ${machineType}, which the current installation "${target.name}" (QEMU ${target.info.version}) does not have${versioned.length > 0 ? ` (it has ${versioned.join(', ')})` : ''}; the guest cannot move onto it without a new machine type: recreate the VM, or keep an installation that has ${machineType}`);
  }
}

/** What the policy will do for a VM, in words for upgrade-status. */
export function policyOutcome(stale: boolean, strategy: RefreshStrategy): string {
  if (!stale) return 'nothing (current)';
  switch (strategy) {
    case 'auto':
      return 'move live onto the current installation on the next refresh (cpr where possible, else migrate)';
    case 'cpr':
      return 'hand over live (cpr-transfer, RAM not copied) onto the current installation on the next refresh';
    case 'migrate':
      return 'live-migrate onto the current installation on the next refresh';
    case 'migrate-or-reboot':
      return 'live-migrate onto the current installation on the next refresh; if the migration fails, power off (ACPI) and start on it';
    case 'reboot':
      return 'power off (ACPI) and start on the current installation on the next refresh';
    case 'on-guest-shutdown':
      return 'start on the current installation when the guest next powers off or reboots';
    case 'manual':
      return 'nothing: refresh it by hand (vmkeep refresh NAME --strategy migrate|reboot)';
  }
}
