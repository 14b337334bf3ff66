import { describe, expect, it } from 'vitest';
import { classifyReattach, type ReattachObservation } from '../../../daemon/reattach.js';

const alive = (status: string, extra: Partial<ReattachObservation> = {}): ReattachObservation => ({
  recordedState: 'running',
  hasProcess: true,
  process: 'same',
  monitor: { status },
  ...extra,
});

describe('classifyReattach', () => {
  it('a running QEMU whose monitor answers is reattached as running', () => {
    expect(classifyReattach(alive('running'))).toEqual({ state: 'running', action: 'watch', dropProcess: false });
  });

  it('a guest that powered off while the daemon was away is finished as a guest shutdown', () => {
    expect(classifyReattach(alive('shutdown'))).toMatchObject({ state: 'shutdown', action: 'finish-shutdown', dropProcess: false });
  });

  it('paused-like statuses are paused, never resumed on their own', () => {
    for (const status of ['paused', 'postmigrate', 'inmigrate', 'io-error', 'guest-panicked']) {
      expect(classifyReattach(alive(status))).toMatchObject({ state: 'paused', action: 'watch' });
    }
  });

  it('a start interrupted after the QEMU was recorded is finished', () => {
    expect(classifyReattach(alive('prelaunch', { recordedState: 'starting' }))).toMatchObject({ state: 'starting', action: 'finish-start' });
  });

  it('a QEMU that is gone is "exited while away"', () => {
    const d = classifyReattach({ recordedState: 'running', hasProcess: true, process: 'gone' });
    expect(d).toMatchObject({ state: 'exited', action: 'none', dropProcess: true, lastExit: { reason: 'exited while away' } });
  });

  it('a recycled PID is never adopted: the VM is exited and the process left alone', () => {
    const d = classifyReattach({ recordedState: 'running', hasProcess: true, process: 'recycled', monitor: { status: 'running' } });
    expect(d.state).toBe('exited');
    expect(d.action).toBe('none');
    expect(d.dropProcess).toBe(true);
    expect(d.lastExit?.reason).toMatch(/another process/);
  });

  it('a silent monitor makes the VM unreachable, retried, never dropped', () => {
    const d = classifyReattach({ recordedState: 'running', hasProcess: true, process: 'same', monitor: { error: 'no greeting' } });
    expect(d).toMatchObject({ state: 'unreachable', action: 'retry', dropProcess: false });
    expect(d.problem).toMatch(/no greeting/);
  });

  it('a process in another scope than recorded is left alone and reported', () => {
    const d = classifyReattach(alive('running', { scopeMatches: false, actualScope: 'user.slice', recordedScope: 'vmkeep-a.scope' }));
    expect(d).toMatchObject({ state: 'unreachable', action: 'retry', dropProcess: false });
    expect(d.problem).toMatch(/user\.slice/);
  });

  it('records without a process keep their settled state; an interrupted start before spawn is exited', () => {
    expect(classifyReattach({ recordedState: 'stopped', hasProcess: false })).toMatchObject({ state: 'stopped', action: 'none' });
    expect(classifyReattach({ recordedState: 'exited', hasProcess: false })).toMatchObject({ state: 'exited', action: 'none' });
    expect(classifyReattach({ recordedState: 'starting', hasProcess: false })).toMatchObject({ state: 'exited', lastExit: { reason: /interrupted/ } });
  });
});
