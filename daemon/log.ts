// vmkeepd's logger: one JSON object per line on stderr (journald keeps them), in the shape
// pino writes (level number, time, pid, hostname, name, msg, bindings, `err` with type, message
// and stack), so existing log readers keep working. Written here because pino's worker and
// stream machinery cost more start-up time and memory than the daemon's few log lines are worth.
import { writeSync } from 'node:fs';
import { hostname } from 'node:os';

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

// pino's numbers, which log readers filter on.
const LEVEL_VALUES: Record<LogLevel, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60 };

export function isLogLevel(value: string): value is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(value);
}

/** An Error as plain fields (its own enumerable ones, e.g. code, included). */
function serializeError(error: Error): Record<string, unknown> {
  const out: Record<string, unknown> = { type: error.name, message: error.message, stack: error.stack };
  for (const [key, value] of Object.entries(error)) if (!(key in out)) out[key] = value;
  if (error.cause instanceof Error) out['cause'] = serializeError(error.cause);
  return out;
}

function replacer(_key: string, value: unknown): unknown {
  if (value instanceof Error) return serializeError(value);
  if (typeof value === 'bigint') return value.toString();
  return value;
}

function writeStderr(line: string): void {
  try {
    writeSync(2, line);
  } catch (error) {
    // A non-blocking stderr that is full: hand it to Node's stream, which waits for room.
    if ((error as NodeJS.ErrnoException).code === 'EAGAIN') process.stderr.write(line);
  }
}

export function createLogger(options: LoggerOptions): Logger {
  const threshold = LEVEL_VALUES[options.level];
  const write = options.write ?? writeStderr;
  const base = JSON.stringify({ pid: process.pid, hostname: hostname(), name: options.name }).slice(1, -1);
  const make = (bindings: string): Logger => {
    const at = (level: LogLevel): LogFn => {
      const value = LEVEL_VALUES[level];
      return ((first: Record<string, unknown> | string, message?: string): void => {
        if (value < threshold) return;
        const fields = typeof first === 'string' ? undefined : first;
        const msg = typeof first === 'string' ? first : message;
        let extra = fields === undefined ? '' : JSON.stringify(fields, replacer).slice(1, -1);
        if (extra !== '') extra = `,${extra}`;
        const tail = msg === undefined ? '' : `,"msg":${JSON.stringify(msg)}`;
        write(`{"level":${value},"time":${Date.now()},${base}${bindings}${extra}${tail}}\n`);
      }) as LogFn;
    };
    return {
      trace: at('trace'),
      debug: at('debug'),
      info: at('info'),
      warn: at('warn'),
      error: at('error'),
      fatal: at('fatal'),
      child: (more) => {
        const added = JSON.stringify(more, replacer).slice(1, -1);
        return make(added === '' ? bindings : `${bindings},${added}`);
      },
    };
  };
  return make('');
}
