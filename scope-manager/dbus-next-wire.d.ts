// Types for the parts of dbus-next's wire layer bus.ts uses (the package types only its index,
// whose MessageBus loads xml2js). The Message and Variant classes are the index's own.
declare module 'dbus-next/lib/connection.js' {
  import type { EventEmitter } from 'node:events';
  import type { Duplex } from 'node:stream';
  import type { Message } from 'dbus-next';

  interface WireConnection extends EventEmitter {
    stream: Duplex;
    /** Queued until the authentication handshake is done; needs msg.serial set. */
    message(msg: Message): void;
  }
  export default function createConnection(options: { busAddress: string }): WireConnection;
}

declare module 'dbus-next/lib/constants.js' {
  export { MessageType } from 'dbus-next';
}

declare module 'dbus-next/lib/message-type.js' {
  export { Message } from 'dbus-next';
}

declare module 'dbus-next/lib/variant.js' {
  export { Variant } from 'dbus-next';
}
