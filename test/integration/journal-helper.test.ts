// The journal helper's fallback, with a real perl: every line it did not send goes to the
// fallback, in order, and the switch is said once. A real journald: journal-fields.test.ts.
import { describe, expect, it } from 'vitest';
import { journalSink } from '../../daemon/journal-native.js';
import { waitFor } from '../support/systemd-host.js';

function sinkWith(options: { socketPath?: string; perl?: string }) {
  const fallback: string[] = [];
  const reasons: string[] = [];
  const sink = journalSink({ identifier: 'vmkeepd', fallback: (line) => fallback.push(line), onFallback: (reason) => reasons.push(reason), ...options });
  return { sink, fallback, reasons };
}

const LINES = Array.from({ length: 50 }, (_, i) => `{"level":30,"vm":"web${i}","msg":"line ${i}"}\n`);

describe('journal helper fallback', () => {
  it('a send that fails (no socket there): the helper ends, every line goes to the fallback in order, said once', async () => {
    const { sink, fallback, reasons } = sinkWith({ socketPath: '/nonexistent/journal/socket' });
    for (const line of LINES) sink.write(line);
    await waitFor('the fallback notice', 10_000, () => (reasons.length > 0 ? true : undefined));
    sink.write('{"level":40,"msg":"after"}\n');
    expect(fallback).toEqual([...LINES, '{"level":40,"msg":"after"}\n']);
    expect(reasons).toHaveLength(1);
    expect(reasons[0]).toMatch(/send to \/nonexistent\/journal\/socket: No such file or directory/);
  });

  it('no perl: every line goes to the fallback at once, said once with the reason', async () => {
    const { sink, fallback, reasons } = sinkWith({ perl: '/nonexistent/perl' });
    for (const line of LINES) sink.write(line);
    expect(fallback).toEqual(LINES);
    await waitFor('the fallback notice', 10_000, () => (reasons.length > 0 ? true : undefined));
    expect(reasons).toEqual([expect.stringMatching(/cannot run \/nonexistent\/perl: .*ENOENT/)]);
  });
});
