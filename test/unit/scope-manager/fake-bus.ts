// An in-memory BusConnection that plays a small systemd: it records calls, answers them through
// per-member handlers and emits signals when told to.
import { Variant } from 'dbus-next';
import { BusCallError, type BusCall, type BusConnection, type BusSignal } from '../../../scope-manager/index.js';

type Handler = (call: BusCall, bus: FakeBus) => unknown[] | Promise<unknown[]>;

export const NO_SUCH_UNIT = (name: string): BusCallError =>
  new BusCallError('org.freedesktop.systemd1.NoSuchUnit', `Unit ${name} not loaded.`);

export class FakeBus implements BusConnection {
  readonly calls: BusCall[] = [];
  readonly ready: Promise<void>;
  closedByClient = false;
  /** Set by a test to play a bus that tells our unique name (the PID namespace check). */
  uniqueName?: () => string | undefined;
  private jobSeq = 0;
  private readonly signalListeners: Array<(s: BusSignal) => void> = [];
  private readonly closeListeners: Array<(cause: Error | null) => void> = [];

  /** Default: a systemd with no units whose start jobs finish ('done') just after the reply. */
  readonly handlers: Record<string, Handler> = {
    AddMatch: () => [],
    Subscribe: () => [],
    GetUnit: (call) => {
      throw NO_SUCH_UNIT(String(call.body?.[0]));
    },
    StartTransientUnit: (call, bus) => {
      const job = bus.nextJob();
      setImmediate(() => bus.emitJobRemoved(job, String(call.body?.[0]), 'done'));
      return [job];
    },
    StopUnit: (call, bus) => {
      const job = bus.nextJob();
      setImmediate(() => bus.emitJobRemoved(job, String(call.body?.[0]), 'done'));
      return [job];
    },
  };

  constructor(connectError?: Error) {
    this.ready = connectError ? Promise.reject(connectError) : Promise.resolve();
    this.ready.catch(() => undefined);
  }

  nextJob(): string {
    return `/org/freedesktop/systemd1/job/${++this.jobSeq}`;
  }

  async call(message: BusCall): Promise<unknown[]> {
    this.calls.push(message);
    await Promise.resolve();
    const handler = this.handlers[message.member];
    if (!handler) throw new BusCallError('org.freedesktop.DBus.Error.UnknownMethod', `no fake for ${message.member}`);
    return handler(message, this);
  }

  onSignal(listener: (s: BusSignal) => void): void {
    this.signalListeners.push(listener);
  }

  onClose(listener: (cause: Error | null) => void): void {
    this.closeListeners.push(listener);
  }

  close(): void {
    this.closedByClient = true;
    this.closeFromPeer(null);
  }

  /** The other end went away. */
  closeFromPeer(cause: Error | null = new Error('read ECONNRESET')): void {
    for (const listener of this.closeListeners.splice(0)) listener(cause);
  }

  emit(member: string, body: unknown[], path = '/org/freedesktop/systemd1', iface = 'org.freedesktop.systemd1.Manager'): void {
    for (const listener of this.signalListeners) listener({ path, interface: iface, member, body });
  }

  emitJobRemoved(job: string, unit: string, result: string): void {
    this.emit('JobRemoved', [Number(job.split('/').pop()), job, unit, result]);
  }

  emitUnitRemoved(unit: string): void {
    this.emit('UnitRemoved', [unit, `/org/freedesktop/systemd1/unit/${unit}`]);
  }

  callsOf(member: string): BusCall[] {
    return this.calls.filter((c) => c.member === member);
  }
}

export function variant(signature: string, value: unknown): Variant {
  return new Variant(signature, value);
}
