// vmkeepd's logger: pino, one JSON object per line on stderr (journald keeps them), written
// synchronously so nothing is lost at a crash; under systemd with journald, structured entries
// through the journal's own socket (journal-native.ts: each line goes into the helper's pipe at
// once while the pipe has room, and the helper outlives a crash). The interface below is all
// the daemon uses, so a test can pass its own `write`.
import { existsSync } from 'node:fs';
import { pino } from 'pino';
import { JOURNAL_SOCKET, journalSink } from './journal-native.js';
import { isJournalStream, withPriority } from './journal-priority.js';

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

/**
 * stderr, each line with its syslog priority when stderr is the journal's stream (journalctl
 * -p); and when journald's socket is there too, its native protocol, stderr being the fallback.
 */
function stderrDestination(identifier: string, warn: (reason: string) => void): { write(line: string): unknown } {
  const stderr = pino.destination({ fd: 2, sync: true });
  if (!isJournalStream(2)) return stderr;
  const prefixed = (line: string): unknown => stderr.write(withPriority(line));
  if (!existsSync(JOURNAL_SOCKET)) return { write: prefixed };
  return journalSink({ identifier, fallback: prefixed, onFallback: warn });
}

export function createLogger(options: LoggerOptions): Logger {
  let logger: Logger | undefined;
  const destination = options.write === undefined
    ? stderrDestination(options.name, (reason) => logger?.warn({ reason }, `log lines go to stderr, without their journal fields (VM=...): ${reason}`))
    : { write: options.write };
  // An error's cause is kept as an object of its own (the default folds it into the message).
  logger = pino({ name: options.name, level: options.level, serializers: { err: pino.stdSerializers.errWithCause } }, destination);
  return logger;
}
