import { isRecord, isVersionInfo, parseVersionInfo, type QmpEvent, type QmpGreeting } from './commands.js';
import { QmpError } from './errors.js';

/** One decoded line from QEMU. `id` is whatever the peer echoed (undefined if absent). */
export type QmpMessage =
  | { kind: 'greeting'; greeting: QmpGreeting }
  | { kind: 'return'; id: unknown; value: unknown }
  | { kind: 'error'; id: unknown; qmpClass: string; desc: string }
  | { kind: 'event'; event: QmpEvent };

const EXCERPT_CHARS = 80;

/** A short, printable piece of hostile input for an error message; never the whole line. */
function excerpt(text: string): string {
  const cut = text.length > EXCERPT_CHARS ? `${text.slice(0, EXCERPT_CHARS)}...` : text;
  return JSON.stringify(cut);
}

function protocolError(what: string, line: string): QmpError {
  return new QmpError(
    'PROTOCOL',
    `QMP peer sent ${what} (${excerpt(line)}); it does not behave like QEMU, so the connection was closed. ` +
      'Check that the socket belongs to the VM\'s QEMU.',
  );
}

/** Parses and shape-checks one line. Pure; throws QmpError 'INVALID_JSON' or 'PROTOCOL'. */
export function parseMessage(line: string): QmpMessage {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch (err) {
    throw new QmpError(
      'INVALID_JSON',
      `QMP peer sent a line that is not JSON (${excerpt(line)}); the connection was closed. ` +
        'Check that the socket belongs to the VM\'s QEMU.',
      { cause: err },
    );
  }
  if (!isRecord(value)) throw protocolError('a JSON value that is not an object', line);

  if (Object.hasOwn(value, 'QMP')) {
    const qmp = value.QMP;
    if (!isRecord(qmp) || !isVersionInfo(qmp.version)) throw protocolError('a greeting without a valid version', line);
    const caps = qmp.capabilities;
    if (!Array.isArray(caps) || !caps.every((c) => typeof c === 'string')) {
      throw protocolError('a greeting without a valid capabilities list', line);
    }
    return { kind: 'greeting', greeting: { version: parseVersionInfo(qmp.version), capabilities: [...caps] } };
  }
  if (Object.hasOwn(value, 'return')) return { kind: 'return', id: value.id, value: value.return };
  if (Object.hasOwn(value, 'error')) {
    const error = value.error;
    if (!isRecord(error) || typeof error.class !== 'string' || typeof error.desc !== 'string') {
      throw protocolError('an error reply without class and desc', line);
    }
    return { kind: 'error', id: value.id, qmpClass: error.class, desc: error.desc };
  }
  if (Object.hasOwn(value, 'event')) {
    const { event, data, timestamp } = value;
    if (typeof event !== 'string') throw protocolError('an event whose name is not a string', line);
    let eventData: Record<string, unknown> = {};
    if (data !== undefined) {
      if (!isRecord(data)) throw protocolError('an event whose data is not an object', line);
      eventData = data;
    }
    if (
      !isRecord(timestamp) ||
      typeof timestamp.seconds !== 'number' ||
      typeof timestamp.microseconds !== 'number'
    ) {
      throw protocolError('an event without a valid timestamp', line);
    }
    return {
      kind: 'event',
      event: {
        event,
        data: eventData,
        timestamp: { seconds: timestamp.seconds, microseconds: timestamp.microseconds },
      },
    };
  }
  throw protocolError('an object that is no QMP message', line);
}

/** Serialises a command as one '\n'-terminated line. Throws QmpError 'INVALID_ARGUMENT'. */
export function encodeCommand(id: number, name: string, args?: object): string {
  if (typeof name !== 'string' || name.length === 0) {
    throw new QmpError('INVALID_ARGUMENT', `QMP command name must be a non-empty string, got ${String(name)}`);
  }
  if (args !== undefined && !isRecord(args)) {
    throw new QmpError('INVALID_ARGUMENT', `Arguments of QMP command '${name}' must be an object`, {
      command: name,
    });
  }
  const message = args === undefined ? { execute: name, id } : { execute: name, arguments: args, id };
  try {
    // JSON.stringify escapes '\n' inside strings, so the result is always exactly one line.
    return `${JSON.stringify(message)}\n`;
  } catch (err) {
    throw new QmpError('INVALID_ARGUMENT', `Arguments of QMP command '${name}' cannot be serialised to JSON`, {
      cause: err,
      command: name,
    });
  }
}
