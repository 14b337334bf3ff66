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

/**
 * A pino line's syslog priority, from the level pino writes first (a logged field also named
 * `level` does not change it); info when the line has none.
 */
export function linePriority(line: string): number {
  const level = LEVEL_RE.exec(line)?.[1];
  return syslogPriority(level === undefined ? 30 : Number(level));
}

/** One pino JSON line with its `<N>` prefix. */
export function withPriority(line: string): string {
  return `<${linePriority(line)}>${line}`;
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
