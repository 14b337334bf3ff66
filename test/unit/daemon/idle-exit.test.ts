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
    vi.advanceTimersByTime(900);
    facts.connections = 1;
    watch.poke();
    vi.advanceTimersByTime(5000);
    expect(fired).toBe(0);
    facts.connections = 0;
    watch.poke();
    vi.advanceTimersByTime(999);
    expect(fired).toBe(0);
    // An operation began without an event: seen when the timer fires, which then waits again.
    facts.operations = 1;
    vi.advanceTimersByTime(1);
    expect(fired).toBe(0);
    facts.operations = 0;
    watch.poke();
    vi.advanceTimersByTime(1000);
    expect(fired).toBe(1);
    watch.poke();
    vi.advanceTimersByTime(5000);
    expect(fired).toBe(1);
  });

  it('a stopped watch never fires', () => {
    let fired = 0;
    const watch = watchIdle(1000, () => ({ connections: 0, vmsWithQemu: 0, operations: 0 }), () => fired++);
    watch.stop();
    vi.advanceTimersByTime(5000);
    expect(fired).toBe(0);
  });
});
