import { describe, expect, it } from 'vitest';
import type { InstallationInfo, MachineType } from '../../../launcher/index.js';
import {
  checkRefreshTarget, chooseLiveStrategy, cprBlocker, parseStrategy, pausedCopyReason, policyOutcome, REFRESH_STRATEGIES, TCG_LIVE_COPY_SOUND_FROM, UpgradeError,
} from '../../../upgrade/index.js';

function info(version: string, names: string[]): InstallationInfo {
  const machines: MachineType[] = names.map((name) => ({ name, isDefault: false }));
  return { identity: { path: '/usr/bin/qemu-system-x86_64', dev: 1, ino: 2, size: 3, mtimeMs: 4 }, version, machines };
}

const MACHINES_8_2 = ['pc-q35-7.1', 'pc-q35-7.2', 'pc-q35-8.0', 'pc-q35-8.1', 'pc-q35-8.2', 'pc-i440fx-8.2', 'microvm'];

function thrown(fn: () => unknown): UpgradeError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(UpgradeError);
    return err as UpgradeError;
  }
  throw new Error('expected an UpgradeError, but nothing was thrown');
}

describe('parseStrategy', () => {
  it('accepts every known strategy', () => {
    for (const s of REFRESH_STRATEGIES) expect(parseStrategy(s)).toBe(s);
    expect(REFRESH_STRATEGIES).toEqual(['auto', 'cpr', 'migrate', 'migrate-or-reboot', 'reboot', 'on-guest-shutdown', 'manual']);
  });

  it('refuses anything else with BAD_STRATEGY, naming the value, the field and the choices', () => {
    for (const value of ['Migrate', 'kill', '', undefined, 3, null, ['migrate']]) {
      const err = thrown(() => parseStrategy(value, '--strategy'));
      expect(err.code).toBe('BAD_STRATEGY');
      expect(err.message).toContain(`--strategy ${JSON.stringify(value)} is not one of auto, cpr, migrate, migrate-or-reboot, reboot, on-guest-shutdown, manual`);
    }
  });
});

describe('checkRefreshTarget', () => {
  const base = { vm: 'web', machineType: 'pc-q35-7.2', target: { name: 'system', info: info('8.2.2', MACHINES_8_2) } };

  it('accepts a newer or the same target that has the machine type', () => {
    expect(() => checkRefreshTarget({ ...base, runningVersion: '7.2.22' })).not.toThrow();
    expect(() => checkRefreshTarget({ ...base, runningVersion: '8.2.2 (Debian 1:8.2.2+ds)' })).not.toThrow();
  });

  it('accepts any target version when the running version is unknown', () => {
    expect(() => checkRefreshTarget({ ...base, runningVersion: undefined })).not.toThrow();
  });

  it('refuses an older target with OLDER_TARGET, naming both versions', () => {
    const err = thrown(() => checkRefreshTarget({ ...base, runningVersion: '9.0.0' }));
    expect(err.code).toBe('OLDER_TARGET');
    expect(err.message).toContain('web runs QEMU 9.0.0');
    expect(err.message).toContain('"system" is older (8.2.2)');
  });

  it('accepts an older target when allowOlder is set', () => {
    expect(() => checkRefreshTarget({ ...base, runningVersion: '9.0.0', allowOlder: true })).not.toThrow();
  });

  it('refuses a target without the machine type with MACHINE_TYPE_MISSING, naming the type', () => {
    const target = { name: 'new', info: info('9.2.0', ['pc-q35-8.0', 'pc-q35-9.2', 'pc-i440fx-9.2']) };
    const err = thrown(() => checkRefreshTarget({ ...base, machineType: 'pc-q35-7.2', target, runningVersion: '8.2.2' }));
    expect(err.code).toBe('MACHINE_TYPE_MISSING');
    expect(err.message).toContain('pinned to machine type pc-q35-7.2');
    expect(err.message).toContain('"new" (QEMU 9.2.0) does not have');
    // Suggests the same family, not others.
    expect(err.message).toContain('(it has pc-q35-8.0, pc-q35-9.2)');
    expect(err.message).not.toContain('pc-i440fx-9.2');
  });

  it('omits the suggestion when the target has no type of that family', () => {
    const target = { name: 'new', info: info('9.2.0', ['microvm']) };
    const err = thrown(() => checkRefreshTarget({ ...base, target, runningVersion: '8.2.2' }));
    expect(err.code).toBe('MACHINE_TYPE_MISSING');
    expect(err.message).not.toContain('(it has');
  });

  it('checks the version before the machine type', () => {
    const target = { name: 'old', info: info('7.0.0', ['pc-q35-7.0']) };
    expect(thrown(() => checkRefreshTarget({ ...base, target, runningVersion: '8.2.2' })).code).toBe('OLDER_TARGET');
  });
});

describe('pausedCopyReason', () => {
  it('stops the guest for the whole copy from a QEMU older than 10.0 under TCG, saying why', () => {
    const why = pausedCopyReason({ accel: 'tcg', runningVersion: '7.2.22' });
    expect(why).toContain('QEMU 7.2.22 under TCG');
    expect(why).toContain('paused for the whole RAM copy');
    expect(pausedCopyReason({ accel: 'tcg', runningVersion: '9.2.4 (Debian 1:9.2.4)' })).toBeDefined();
  });

  it('copies live from 10.0 on, and under KVM whatever the version', () => {
    expect(TCG_LIVE_COPY_SOUND_FROM).toBe('10.0.0');
    expect(pausedCopyReason({ accel: 'tcg', runningVersion: '10.0.2' })).toBeUndefined();
    expect(pausedCopyReason({ accel: 'tcg', runningVersion: '10.1.0' })).toBeUndefined();
    expect(pausedCopyReason({ accel: 'kvm', runningVersion: '7.2.22' })).toBeUndefined();
    expect(pausedCopyReason({ accel: 'kvm', runningVersion: undefined })).toBeUndefined();
  });

  it('counts an unknown running version as old under TCG', () => {
    expect(pausedCopyReason({ accel: 'tcg', runningVersion: undefined })).toContain('a QEMU of unknown version');
  });
});

describe('policyOutcome', () => {
  it('says "current" for a VM that is not stale, whatever the strategy', () => {
    for (const s of REFRESH_STRATEGIES) expect(policyOutcome(false, s)).toBe('nothing (current)');
  });

  it('says something different for each strategy when stale', () => {
    const outcomes = REFRESH_STRATEGIES.map((s) => policyOutcome(true, s));
    expect(new Set(outcomes).size).toBe(REFRESH_STRATEGIES.length);
    for (const o of outcomes) expect(o).not.toContain('current)');
    expect(policyOutcome(true, 'migrate')).toMatch(/live-migrate/);
    expect(policyOutcome(true, 'reboot')).toMatch(/power off \(ACPI\)/);
    expect(policyOutcome(true, 'migrate-or-reboot')).toMatch(/live-migrate .*if the migration fails, power off \(ACPI\)/);
    expect(policyOutcome(true, 'on-guest-shutdown')).toMatch(/when the guest next powers off/);
    expect(policyOutcome(true, 'manual')).toMatch(/by hand/);
  });
});

describe('chooseLiveStrategy (auto and cpr)', () => {
  const ok = { vm: 'web', memoryBackend: 'memfd-shared' as const, runningVersion: '10.0.2', targetVersion: '10.1.0' };

  it('picks cpr where both QEMUs are 10.0 or newer and the RAM is a shared memfd, and says why', () => {
    for (const requested of ['auto', 'cpr'] as const) {
      const choice = chooseLiveStrategy(requested, ok);
      expect(choice.strategy).toBe('cpr');
      expect(choice.why).toMatch(/handed over, not copied/);
    }
  });

  it.each([
    [{ memoryBackend: 'anonymous' as const }, /RAM is not a shared memfd/],
    [{ runningVersion: '7.2.22' }, /runs QEMU 7\.2\.22, and cpr-transfer needs 10\.0/],
    [{ runningVersion: undefined }, /version is not known/],
    [{ targetVersion: '9.2.0' }, /current installation is QEMU 9\.2\.0/],
  ])('auto falls back to migrate, naming the reason; cpr is refused with CPR_UNAVAILABLE (%o)', (change, reason) => {
    const input = { ...ok, ...change };
    const choice = chooseLiveStrategy('auto', input);
    expect(choice.strategy).toBe('migrate');
    expect(choice.why).toMatch(reason);
    const err = thrown(() => chooseLiveStrategy('cpr', input));
    expect(err.code).toBe('CPR_UNAVAILABLE');
    expect(err.message).toMatch(reason);
    expect(err.message).toMatch(/--strategy migrate/);
    expect(cprBlocker(input)).toMatch(reason);
  });

  it('has no blocker when cpr can work', () => {
    expect(cprBlocker(ok)).toBeUndefined();
  });
});
