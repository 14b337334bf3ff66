// The one place that touches dbus-next. ScopeManager talks to a BusConnection, so unit tests
// pass a fake; this adapter also papers over what dbus-next 0.10.2 does not report (a closed
// stream) and bypasses its proxy objects (introspection, and match rules that are never removed).
import type { EventEmitter } from 'node:events';
import { DBusError, Message, MessageType, sessionBus, type MessageBus } from 'dbus-next';

export interface BusCall {
  destination: string;
  path: string;
  interface: string;
  member: string;
  signature?: string;
  body?: unknown[];
}

export interface BusSignal {
  sender?: string;
  path: string;
  interface: string;
  member: string;
  body: unknown[];
}

/** An error reply: `errorName` is the D-Bus error name (e.g. org.freedesktop.systemd1.NoSuchUnit). */
export class BusCallError extends Error {
  constructor(
    readonly errorName: string,
    message: string,
  ) {
    super(message);
    this.name = 'BusCallError';
  }
}

export interface BusConnection {
  /** Resolves once the bus accepted the connection (Hello answered); rejects if connecting failed. */
  readonly ready: Promise<void>;
  /** Resolves with the reply body; rejects with BusCallError on an error reply. No timeout of its own. */
  call(message: BusCall): Promise<unknown[]>;
  onSignal(listener: (signal: BusSignal) => void): void;
  /** Called once when the connection is gone (error or end of stream). */
  onClose(listener: (cause: Error | null) => void): void;
  close(): void;
  /** This connection's unique name on the bus (`:1.42`) once ready; absent: not known. */
  uniqueName?(): string | undefined;
}

/** Creates a connection to the bus at a D-Bus address (e.g. unix:path=/run/dbus/system_bus_socket). */
export type BusFactory = (address: string) => BusConnection;

export const dbusNextBus: BusFactory = (address) => {
  // sessionBus() is dbus-next's only constructor taking an explicit address; nothing session-specific.
  const bus: MessageBus = sessionBus({ busAddress: address });
  const closeListeners: Array<(cause: Error | null) => void> = [];
  let closed = false;
  let connected = false;
  let rejectReady: (err: Error) => void = () => undefined;
  const ready = new Promise<void>((resolve, reject) => {
    rejectReady = reject;
    bus.once('connect', () => {
      connected = true;
      resolve();
    });
  });
  // Never left unhandled: ScopeManager awaits it, but only after attaching its listeners.
  ready.catch(() => undefined);

  const markClosed = (cause: Error | null): void => {
    if (closed) return;
    closed = true;
    if (!connected) rejectReady(cause ?? new Error('connection closed before the bus accepted it'));
    for (const listener of closeListeners) listener(cause);
  };
  // Without an 'error' listener an unreachable socket would crash the process.
  bus.on('error', (err: unknown) => markClosed(err instanceof Error ? err : new Error(String(err))));
  // dbus-next does not forward the end of its stream; listen on its connection directly.
  const connection = (bus as unknown as { _connection?: EventEmitter & { stream?: EventEmitter } })._connection;
  connection?.on('end', () => markClosed(null));
  connection?.stream?.on('close', () => markClosed(null));

  const signalListeners: Array<(signal: BusSignal) => void> = [];
  bus.on('message', (msg: Message) => {
    if (msg.type !== MessageType.SIGNAL) return;
    const signal: BusSignal = { path: msg.path, interface: msg.interface, member: msg.member, body: msg.body ?? [] };
    if (msg.sender) signal.sender = msg.sender;
    for (const listener of signalListeners) listener(signal);
  });

  return {
    ready,
    async call(message) {
      try {
        const reply = await bus.call(new Message({ ...message, body: message.body ?? [] }));
        return reply?.body ?? [];
      } catch (err) {
        if (err instanceof DBusError) throw new BusCallError(err.type, err.text);
        throw err;
      }
    },
    onSignal(listener) {
      signalListeners.push(listener);
    },
    onClose(listener) {
      closeListeners.push(listener);
    },
    close() {
      if (closed) return;
      bus.disconnect();
      markClosed(null);
    },
    uniqueName() {
      // Set by dbus-next from the Hello reply; its typings do not declare it.
      const name = (bus as unknown as { name?: string | null }).name;
      return typeof name === 'string' ? name : undefined;
    },
  };
};
