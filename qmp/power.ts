import type { QmpClient } from './client.js';
import { QmpError, isQmpError } from './errors.js';
import { QMP_EVENT } from './events.js';

/**
 * How often the ACPI power button is pressed again while the guest has not acted: a guest
 * still booting has no ACPI handler yet and drops the first press (ARCHITECTURE.md, "Operations").
 */
export const ACPI_REPEAT_MS = 2_000;

export interface PowerDownOptions {
  /** The whole wait, presses included. */
  timeoutMs: number;
  repeatEveryMs?: number;
  /** Told of each press (1, 2, ...), for progress output. */
  onPress?: (press: number) => void;
}

/**
 * Presses the ACPI power button (system_powerdown) until QEMU reports SHUTDOWN, pressing again
 * every `repeatEveryMs`. Rejects within `timeoutMs` either way: COMMAND_TIMEOUT when QEMU did not
 * even answer the press (it is hung, e.g. SIGSTOPped), EVENT_TIMEOUT when it answered but the
 * guest did not power off. Never ends QEMU itself.
 */
export async function powerDownGuest(qmp: QmpClient, options: PowerDownOptions): Promise<{ presses: number }> {
  const deadline = Date.now() + options.timeoutMs;
  const repeat = options.repeatEveryMs ?? ACPI_REPEAT_MS;
  const abort = new AbortController();
  const shutdown = qmp.waitForEvent(QMP_EVENT.SHUTDOWN, { timeoutMs: options.timeoutMs, signal: abort.signal });
  shutdown.catch(() => undefined);
  let presses = 0;
  let off = false;
  void shutdown.then(() => { off = true; }, () => undefined);
  try {
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      try {
        await qmp.systemPowerdown({ timeoutMs: left });
      } catch (error) {
        if (isQmpError(error) && error.code === 'COMMAND_TIMEOUT') {
          throw new QmpError('COMMAND_TIMEOUT',
            `QEMU did not answer the ACPI power-off request within ${Math.round(options.timeoutMs / 1000)} s: its monitor is hung (is the process stopped, e.g. SIGSTOP?)`,
            { cause: error, command: 'system_powerdown' });
        }
        if (!off) throw error;
      }
      presses++;
      options.onPress?.(presses);
      // No press once the next one would fall at the deadline: it could not be acted on in time,
      // and a timer firing a millisecond early would otherwise add one (pressed at 0, 2, 4 and 5 s).
      if (off || deadline - Date.now() <= repeat) break;
      const timer = new Promise<'again'>((resolve) => setTimeout(() => resolve('again'), repeat).unref());
      if ((await Promise.race([shutdown.then(() => 'off' as const, () => 'off' as const), timer])) === 'off') break;
    }
    await shutdown;
    return { presses };
  } catch (error) {
    if (isQmpError(error) && error.code === 'EVENT_TIMEOUT') {
      throw new QmpError('EVENT_TIMEOUT',
        `the guest did not power off within ${Math.round(options.timeoutMs / 1000)} s; the ACPI button was pressed ${presses} time(s)`,
        { cause: error, command: 'system_powerdown' });
    }
    throw error;
  } finally {
    abort.abort();
  }
}
