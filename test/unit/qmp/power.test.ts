import { afterEach, describe, expect, it, vi } from 'vitest';
import { ACPI_REPEAT_MS, powerDownGuest, QmpError, type QmpClient } from '../../../qmp/index.js';

/** A monitor that answers every press at once; the guest powers off at `offAtMs` (never if undefined). */
function monitor(offAtMs?: number) {
  const pressedAt: number[] = [];
  const start = Date.now();
  const qmp = {
    systemPowerdown: async () => { pressedAt.push(Date.now() - start); },
    waitForEvent: (_name: string, opts: { timeoutMs: number; signal?: AbortSignal }) => new Promise((resolve, reject) => {
      const timeout = setTimeout(() => reject(new QmpError('EVENT_TIMEOUT', 'no SHUTDOWN')), opts.timeoutMs);
      if (offAtMs !== undefined) setTimeout(() => { clearTimeout(timeout); resolve({ event: 'SHUTDOWN' }); }, offAtMs);
      opts.signal?.addEventListener('abort', () => clearTimeout(timeout));
    }),
  } as unknown as QmpClient;
  return { qmp, pressedAt };
}

afterEach(() => { vi.useRealTimers(); });

describe('powerDownGuest', () => {
  it('presses every 2 s and not at the deadline, where a press could not be acted on', async () => {
    vi.useFakeTimers();
    const { qmp, pressedAt } = monitor();
    const outcome = powerDownGuest(qmp, { timeoutMs: 5_000 }).catch((e: unknown) => e);
    await vi.advanceTimersByTimeAsync(6_000);
    const error = await outcome;
    expect(error).toBeInstanceOf(QmpError);
    expect((error as QmpError).message).toMatch(/pressed 3 time\(s\)/);
    expect(pressedAt).toEqual([0, ACPI_REPEAT_MS, 2 * ACPI_REPEAT_MS]);
  });

  it('stops pressing once the guest powers off, and counts the presses it took', async () => {
    vi.useFakeTimers();
    const { qmp, pressedAt } = monitor(2_500);
    const outcome = powerDownGuest(qmp, { timeoutMs: 20_000 });
    await vi.advanceTimersByTimeAsync(3_000);
    await expect(outcome).resolves.toEqual({ presses: 2 });
    expect(pressedAt).toEqual([0, ACPI_REPEAT_MS]);
  });

  it('a timeout shorter than the repeat presses once and waits for the rest of it', async () => {
    vi.useFakeTimers();
    const { qmp, pressedAt } = monitor(1_500);
    const outcome = powerDownGuest(qmp, { timeoutMs: 1_800 });
    await vi.advanceTimersByTimeAsync(2_000);
    await expect(outcome).resolves.toEqual({ presses: 1 });
    expect(pressedAt).toEqual([0]);
  });
});
