// The one place that touches dbus-next. ScopeManager talks to a BusConnection, so unit tests
// pass a fake. Only dbus-next's wire layer is used (connection, marshalling, Message): its
// MessageBus loads xml2js for introspection at import, and its proxy objects add match rules
// that are never removed. Replies are matched to calls by serial here, and a closed stream,
// which dbus-next does not report, ends the connection.
import createConnection from 'dbus-next/lib/connection.js';
import { MessageType } from 'dbus-next/lib/constants.js';
import { Message } from 'dbus-next/lib/message-type.js';

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
  const connection = createConnection({ busAddress: address });
  const closeListeners: Array<(cause: Error | null) => void> = [];
  const signalListeners: Array<(signal: BusSignal) => void> = [];
  const replies = new Map<number, { resolve: (body: unknown[]) => void; reject: (error: Error) => void }>();
  let serial = 1;
  let closed = false;
  let connected = false;
  let rejectReady: (err: Error) => void = () => undefined;
  let resolveReady: () => void = () => undefined;
  const ready = new Promise<void>((resolve, reject) => {
    resolveReady = resolve;
    rejectReady = reject;
  });
  // Never left unhandled: ScopeManager awaits it, but only after attaching its listeners.
  ready.catch(() => undefined);

  const markClosed = (cause: Error | null): void => {
    if (closed) return;
    closed = true;
    const why = cause ?? new Error('the D-Bus connection closed');
    if (!connected) rejectReady(cause ?? new Error('connection closed before the bus accepted it'));
    for (const pending of replies.values()) pending.reject(why);
    replies.clear();
    for (const listener of closeListeners) listener(cause);
  };
  // Without an 'error' listener an unreachable socket would crash the process.
  connection.on('error', (err: unknown) => markClosed(err instanceof Error ? err : new Error(String(err))));
  connection.on('end', () => markClosed(null));
  connection.stream.on('close', () => markClosed(null));

  connection.on('message', (msg: Message) => {
    if (msg.type === MessageType.METHOD_RETURN || msg.type === MessageType.ERROR) {
      // A number on the wire, whatever dbus-next's types say.
      const key = Number(msg.replySerial);
      const pending = replies.get(key);
      if (pending === undefined) return;
      replies.delete(key);
      if (msg.type === MessageType.ERROR) {
        const text = typeof msg.body?.[0] === 'string' ? msg.body[0] : '';
        pending.reject(new BusCallError(msg.errorName ?? 'org.freedesktop.DBus.Error.Failed', text));
      } else {
        pending.resolve(msg.body ?? []);
      }
    } else if (msg.type === MessageType.SIGNAL) {
      const signal: BusSignal = { path: msg.path, interface: msg.interface, member: msg.member, body: msg.body ?? [] };
      if (msg.sender) signal.sender = msg.sender;
      for (const listener of signalListeners) listener(signal);
    }
    // Method calls to us: nothing here exports an object; the bus's own pings go unanswered.
  });

  const call = (message: BusCall): Promise<unknown[]> => {
    if (closed) return Promise.reject(new Error('Tried to write a message to a closed stream'));
    return new Promise<unknown[]>((resolve, reject) => {
      const msg = new Message({ ...message, body: message.body ?? [] });
      msg.serial = serial++;
      replies.set(msg.serial, { resolve, reject });
      connection.message(msg);
    });
  };

  // Hello first: the bus accepts no other call before it.
  let uniqueName: string | undefined;
  call({ destination: 'org.freedesktop.DBus', path: '/org/freedesktop/DBus', interface: 'org.freedesktop.DBus', member: 'Hello' }).then(
    (body) => {
      // The bus's name for this connection (":1.42"): the reply's one string.
      if (typeof body[0] === 'string') uniqueName = body[0];
      connected = true;
      resolveReady();
    },
    (err: unknown) => markClosed(err instanceof Error ? err : new Error(String(err))),
  );

  return {
    ready,
    call,
    onSignal(listener) {
      signalListeners.push(listener);
    },
    onClose(listener) {
      closeListeners.push(listener);
    },
    close() {
      if (closed) return;
      connection.stream.end();
      markClosed(null);
    },
    uniqueName() {
      return uniqueName;
    },
  };
};
