// --idle-exit's decision and its timer (the real socket unit restarting vmkeepd:
// test/integration/daemon-status.test.ts).
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { isIdle, watchIdle, type IdleFacts } from '../../../daemon/idle-exit.js';

beforeEach(() => vi.useFakeTimers());
afterEach(() => vi.useRealTimers());

describe('idle exit', () => {
  it('is idle only with no client, no QEMU and no operation', () => {
    expect(isIdle({ connections: 0, vmsWithQemu: 0, operations: 0 })).toBe(true);
    expect(isIdle({ connections: 1, vmsWithQemu: 0, operations: 0 })).toBe(false);
    expect(isIdle({ connections: 0, vmsWithQemu: 1, operations: 0 })).toBe(false);
    expect(isIdle({ connections: 0, vmsWithQemu: 0, operations: 1 })).toBe(false);
  });

  it('fires after an unbroken idle period; a client in between starts the count again; facts read again at the end', () => {
    const facts: IdleFacts = { connections: 0, vmsWithQemu: 0, operations: 0 };
    let fired = 0;
    const watch = watchIdle(1000, () => ({ ...facts }), () => fired++);
    /** Changes the facts (told with a poke, unless `silent`), lets `ms` pass, returns how often it fired. */
    const after = (change: Partial<IdleFacts>, ms: number, silent = false): number => {
      Object.assign(facts, change);
      if (!silent) watch.poke();
      vi.advanceTimersByTime(ms);
      return fired;
    };
    expect(after({}, 900)).toBe(0);
    expect(after({ connections: 1 }, 5000)).toBe(0);
    expect(after({ connections: 0 }, 999)).toBe(0);
    // An operation began without an event: seen when the timer fires, which then waits again.
    expect(after({ operations: 1 }, 1, true)).toBe(0);
    expect(after({ operations: 0 }, 1000)).toBe(1);
    // Once only.
    expect(after({}, 5000)).toBe(1);
  });

  it('a stopped watch never fires', () => {
    let fired = 0;
    const watch = watchIdle(1000, () => ({ connections: 0, vmsWithQemu: 0, operations: 0 }), () => fired++);
    watch.stop();
    vi.advanceTimersByTime(5000);
    expect(fired).toBe(0);
  });
});
