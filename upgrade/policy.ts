import type { InstallationInfo } from '../launcher/index.js';
import { UpgradeError } from './errors.js';
import { compareQemuVersions } from './version.js';

/**
 * How a stale VM moves onto the current installation.
 * - migrate: live migration into a new QEMU; the guest keeps running
 * - reboot: ACPI power-off, then a start on the current installation
 * - on-guest-shutdown: waits for the guest's own power-off or reboot, then starts on the current one
 * - manual: only reported
 */
export type RefreshStrategy = 'migrate' | 'reboot' | 'on-guest-shutdown' | 'manual';
export const REFRESH_STRATEGIES: readonly RefreshStrategy[] = ['migrate', 'reboot', 'on-guest-shutdown', 'manual'];

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
    case 'migrate':
      return 'live-migrate onto the current installation on the next refresh';
    case 'reboot':
      return 'power off (ACPI) and start on the current installation on the next refresh';
    case 'on-guest-shutdown':
      return 'start on the current installation when the guest next powers off or reboots';
    case 'manual':
      return 'nothing: refresh it by hand (vmkeep refresh NAME --strategy migrate|reboot)';
  }
}
