// vmkeepd's logger: pino, one JSON object per line on stderr (journald keeps them), written
// synchronously so nothing is lost at a crash. The interface below is all the daemon uses, so a
// test can pass its own `write`.
import { pino } from 'pino';
import { journalDestination } from './journal-priority.js';

export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

type LogFn = {
  (fields: Record<string, unknown>, message?: string): void;
  (message: string): void;
};

export interface Logger {
  trace: LogFn;
  debug: LogFn;
  info: LogFn;
  warn: LogFn;
  error: LogFn;
  fatal: LogFn;
  /** A logger that adds these fields to every line. */
  child(bindings: Record<string, unknown>): Logger;
}

export interface LoggerOptions {
  name: string;
  level: LogLevel;
  /** Where each finished line goes; default: stderr, synchronously (nothing lost at a crash). */
  write?: (line: string) => void;
}

export function isLogLevel(value: string): value is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(value);
}

export function createLogger(options: LoggerOptions): Logger {
  // Each line carries its syslog priority when stderr is the journal's stream (journalctl -p).
  const destination = options.write === undefined ? journalDestination(pino.destination({ fd: 2, sync: true }), 2) : { write: options.write };
  // An error's cause is kept as an object of its own (the default folds it into the message).
  return pino({ name: options.name, level: options.level, serializers: { err: pino.stdSerializers.errWithCause } }, destination);
}
