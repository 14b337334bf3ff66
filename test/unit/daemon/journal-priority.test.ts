// The sd-daemon priority prefix of vmkeepd's log lines, and when it is used.
import { closeSync, fstatSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { isJournalStream, linePriority, syslogPriority, withPriority } from '../../../daemon/journal-priority.js';

describe('journal priority', () => {
  it("maps pino's levels onto syslog priorities", () => {
    expect([10, 20, 30, 40, 50, 60].map(syslogPriority)).toEqual([7, 7, 6, 4, 3, 2]);
    expect(withPriority('{"level":40,"msg":"stale"}\n')).toBe('<4>{"level":40,"msg":"stale"}\n');
    expect(withPriority('not json\n')).toBe('<6>not json\n');
    // pino writes its level first; a logged field named `level` comes later and does not count.
    expect(linePriority('{"level":50,"msg":"x","level":"admin"}')).toBe(3);
  });

  it('prefixes only when the fd is the stream JOURNAL_STREAM names', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmkeep-journal-'));
    const fd = openSync(join(dir, 'log'), 'w');
    try {
      const { dev, ino } = fstatSync(fd);
      expect(isJournalStream(fd, `${dev}:${ino}`)).toBe(true);
      expect(isJournalStream(fd, `${dev}:${ino + 1}`)).toBe(false);
      expect(isJournalStream(fd, undefined)).toBe(false);
      expect(isJournalStream(fd, 'garbage')).toBe(false);
    } finally {
      closeSync(fd);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
