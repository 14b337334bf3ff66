import { describe, expect, it } from 'vitest';
import { mergeReport } from '../../bench/report.js';

const OLD = [
  '# vmkeep benchmarks', '', '- Date: 2026-01-01T00:00:00Z (whole run: 100 s)', '- Machine: x', '',
  '## 1. First', '', 'old one', '', '## 2. Second', '', 'old two', '',
].join('\n');

describe('mergeReport (a BENCH_ONLY run)', () => {
  it('replaces the sections it ran, keeps the others and their order, appends new ones, and says so in the header', () => {
    const partial = ['# vmkeep benchmarks', '', '- Date: 2026-02-02T00:00:00Z (whole run: 5 s)', '', '## 2. Second', '', 'new two', '', '## 7. Seventh', '', 'new seven', ''].join('\n');
    const merged = mergeReport(OLD, partial);
    expect(merged).toContain('- Date: 2026-02-02T00:00:00Z (whole run: 5 s); sections 2, 7 only (BENCH_ONLY), the others kept from the run of 2026-01-01T00:00:00Z (whole run: 100 s)');
    expect(merged.indexOf('old one')).toBeLessThan(merged.indexOf('new two'));
    expect(merged.indexOf('new two')).toBeLessThan(merged.indexOf('new seven'));
    expect(merged).not.toContain('old two');
    // A second partial run replaces the note instead of piling notes up, and still names the
    // run the untouched sections come from.
    const again = mergeReport(merged, partial.replace('2026-02-02', '2026-03-03'));
    expect(again.match(/only \(BENCH_ONLY\)/g)).toHaveLength(1);
    expect(again).toContain('- Date: 2026-03-03T00:00:00Z (whole run: 5 s); sections 2, 7 only (BENCH_ONLY), the others kept from the run of 2026-01-01T00:00:00Z (whole run: 100 s)');
  });
});
