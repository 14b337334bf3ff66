import type { QmpEvent } from './commands.js';

// The QMP events vmkeep acts on, named once, with the fields it reads checked here so callers
// never cast `event.data` themselves. Field meanings are QEMU's (QMP reference, run-state and
// migration sections).

export const QMP_EVENT = {
  SHUTDOWN: 'SHUTDOWN',
  POWERDOWN: 'POWERDOWN',
  STOP: 'STOP',
  RESUME: 'RESUME',
  RESET: 'RESET',
  GUEST_PANICKED: 'GUEST_PANICKED',
  MIGRATION: 'MIGRATION',
} as const;

export interface ShutdownData {
  /** true: the guest itself powered off (ACPI, a halt); false: the host ended QEMU (signal, quit). */
  guest: boolean;
  /** e.g. guest-shutdown, guest-reset (a reboot turned into a shutdown by set-action), host-signal, host-qmp-quit. */
  reason: string;
}

export interface ResetData {
  guest: boolean;
  reason: string;
}

/** The typed table of callbacks a monitor's owner fills in; events without one are ignored. */
export interface MonitorCallbacks {
  onShutdown?(data: ShutdownData): void;
  onStop?(): void;
  onResume?(): void;
  onReset?(data: ResetData): void;
  onGuestPanicked?(data: Record<string, unknown>): void;
  onMigration?(status: string): void;
}

export function shutdownData(event: QmpEvent): ShutdownData {
  return { guest: event.data.guest === true, reason: typeof event.data.reason === 'string' ? event.data.reason : 'unknown' };
}

export function migrationStatus(event: QmpEvent): string {
  return typeof event.data.status === 'string' ? event.data.status : 'unknown';
}

/** Calls the callback that matches `event`; returns whether one did. */
export function dispatchMonitorEvent(event: QmpEvent, callbacks: MonitorCallbacks): boolean {
  switch (event.event) {
    case QMP_EVENT.SHUTDOWN:
      return call(callbacks.onShutdown, shutdownData(event));
    case QMP_EVENT.STOP:
      return call(callbacks.onStop);
    case QMP_EVENT.RESUME:
      return call(callbacks.onResume);
    case QMP_EVENT.RESET:
      return call(callbacks.onReset, shutdownData(event));
    case QMP_EVENT.GUEST_PANICKED:
      return call(callbacks.onGuestPanicked, event.data);
    case QMP_EVENT.MIGRATION:
      return call(callbacks.onMigration, migrationStatus(event));
    default:
      return false;
  }
}

function call<A extends unknown[]>(callback: ((...args: A) => void) | undefined, ...args: A): boolean {
  if (callback === undefined) return false;
  callback(...args);
  return true;
}
