// vmkeepd's log lines reach journald with their priority: each stderr line starts with the
// sd-daemon prefix `<N>` (syslog priority), so `journalctl -u vmkeepd -p warning` shows
// warnings and errors only. Only when stderr is the journal's stream (JOURNAL_STREAM names it):
// on a terminal or in a file the lines stay plain JSON.
import { fstatSync } from 'node:fs';

/** pino's numeric level to a syslog priority: trace/debug 7, info 6, warn 4, error 3, fatal 2. */
export function syslogPriority(pinoLevel: number): number {
  if (pinoLevel >= 60) return 2;
  if (pinoLevel >= 50) return 3;
  if (pinoLevel >= 40) return 4;
  if (pinoLevel >= 30) return 6;
  return 7;
}

const LEVEL_RE = /^\{"level":(\d+)/;

/** One pino JSON line with its `<N>` prefix (info when the level cannot be read). */
export function withPriority(line: string): string {
  const level = LEVEL_RE.exec(line)?.[1];
  return `<${syslogPriority(level === undefined ? 30 : Number(level))}>${line}`;
}

/** JOURNAL_STREAM is "DEV:INODE" of the journal's stream; it must be the very fd we write to. */
export function isJournalStream(fd: number, journalStream = process.env.JOURNAL_STREAM): boolean {
  if (journalStream === undefined || !/^\d+:\d+$/.test(journalStream)) return false;
  try {
    const stat = fstatSync(fd);
    return `${stat.dev}:${stat.ino}` === journalStream;
  } catch {
    return false;
  }
}

/**
 * A pino destination writing to `fd` synchronously, every line with its `<N>` prefix when `fd`
 * is the journal's stream. pino writes one whole line per call.
 */
export function journalDestination<T extends { write(text: string): unknown }>(destination: T, fd: number): T | { write(text: string): unknown } {
  if (!isJournalStream(fd)) return destination;
  return { write: (text: string) => destination.write(withPriority(text)) };
}
