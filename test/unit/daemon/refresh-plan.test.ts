// planRefresh and planFallback (pure): what a refresh of one VM does, and when migrate-or-reboot
// falls back from a failed migration to a reboot.
import { describe, expect, it } from 'vitest';
import { planFallback, planRefresh, type RefreshFacts } from '../../../daemon/refresh-plan.js';

const FACTS: RefreshFacts = {
  vm: 'web1', strategy: 'migrate-or-reboot', state: 'running', hasProcess: true, stale: true,
  reasons: ['runs installation "a"'], monitorAnswers: true, target: { installation: 'b', version: '10.0.2' },
};

describe('planRefresh with migrate-or-reboot', () => {
  it('a running stale guest migrates, with a reboot as its fallback', () => {
    expect(planRefresh(FACTS)).toEqual({ action: 'migrate', fallback: 'reboot' });
  });

  it('plain migrate has no fallback; reboot reboots', () => {
    expect(planRefresh({ ...FACTS, strategy: 'migrate' })).toEqual({ action: 'migrate' });
    expect(planRefresh({ ...FACTS, strategy: 'reboot' })).toEqual({ action: 'reboot' });
  });

  it('a paused guest migrates without a fallback: it could not act on the ACPI button', () => {
    expect(planRefresh({ ...FACTS, state: 'paused' })).toEqual({ action: 'migrate' });
  });

  it('a target that cannot take the VM refuses the reboot too, and says why', () => {
    const plan = planRefresh({ ...FACTS, targetRefusal: 'web1 is pinned to machine type pc-i440fx-2.3, which "b" does not have' });
    expect(plan).toEqual({
      action: 'refuse', code: 'REFRESH_REFUSED',
      message: 'web1 is pinned to machine type pc-i440fx-2.3, which "b" does not have (a reboot cannot help: the new QEMU would have to start it)',
    });
  });

  it('current, unreachable and stopped VMs are planned as for any strategy', () => {
    expect(planRefresh({ ...FACTS, stale: false })).toMatchObject({ action: 'nothing', result: 'current' });
    expect(planRefresh({ ...FACTS, monitorAnswers: false })).toMatchObject({ action: 'refuse', code: 'UNREACHABLE' });
    expect(planRefresh({ ...FACTS, state: 'shutdown' })).toMatchObject({ action: 'refuse', code: 'CONFLICT' });
  });
});

describe('planFallback', () => {
  const error = 'live migration of web1 onto "b" failed: Length mismatch';

  it('reboots a guest back on its old QEMU whose new QEMU did start, naming the failure', () => {
    expect(planFallback({ error, onOldQemu: true, destinationStarted: true }))
      .toEqual({ action: 'reboot', reason: `the live migration failed (${error})` });
  });

  it('does not reboot when the new QEMU could not even start: the guest would stay down', () => {
    const plan = planFallback({ error, onOldQemu: true, destinationStarted: false });
    expect(plan).toMatchObject({ action: 'fail', why: expect.stringMatching(/No reboot either: the new QEMU did not start/) });
  });

  it('does not reboot while the migration is not settled back onto the old QEMU', () => {
    expect(planFallback({ error, onOldQemu: false, destinationStarted: true })).toEqual({ action: 'fail' });
  });

  it('does not reboot a refresh that was cancelled: the cancel stops it', () => {
    expect(planFallback({ error, onOldQemu: true, destinationStarted: true, cancelled: true })).toEqual({ action: 'fail' });
  });
});
