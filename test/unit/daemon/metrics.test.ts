// The hand-written Prometheus text format, read back by the Prometheus project's own parser.
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { countDaemonStart, Counter, DaemonMetrics, formatExposition, Histogram } from '../../../daemon/metrics.js';
import { parsePrometheus, sampleValue } from '../../support/prometheus.js';

describe('formatExposition', () => {
  it('writes counters, gauges and labelled histograms a real parser reads back exactly', async () => {
    const counter = new Counter();
    counter.inc({ strategy: 'migrate', outcome: 'migrated' });
    counter.inc({ outcome: 'migrated', strategy: 'migrate' }, 2);
    const histogram = new Histogram([0.01, 0.1, 1]);
    for (const v of [0.005, 0.05, 0.5, 5]) histogram.observe({ vm: 'web1' }, v);
    histogram.observe({ vm: 'db' }, 0.1);
    const text = formatExposition([
      { name: 'x_total', type: 'counter', help: 'A counter.', samples: counter.samples() },
      { name: 'x_seconds', type: 'histogram', help: 'A histogram.', samples: histogram.samples() },
      { name: 'x_vms', type: 'gauge', help: 'A gauge.', samples: [{ labels: { state: 'running' }, value: 3 }] },
    ]);
    const families = await parsePrometheus(text);
    expect(families.map((f) => [f.name, f.type])).toEqual([['x', 'counter'], ['x_seconds', 'histogram'], ['x_vms', 'gauge']]);
    expect(sampleValue(families, 'x_total', { strategy: 'migrate', outcome: 'migrated' })).toBe(3);
    expect(sampleValue(families, 'x_seconds_bucket', { vm: 'web1', le: '0.01' })).toBe(1);
    expect(sampleValue(families, 'x_seconds_bucket', { vm: 'web1', le: '1' })).toBe(3);
    expect(sampleValue(families, 'x_seconds_bucket', { vm: 'web1', le: '+Inf' })).toBe(4);
    expect(sampleValue(families, 'x_seconds_count', { vm: 'web1' })).toBe(4);
    expect(sampleValue(families, 'x_seconds_sum', { vm: 'web1' })).toBeCloseTo(5.555);
    expect(sampleValue(families, 'x_seconds_bucket', { vm: 'db', le: '0.1' })).toBe(1);
    expect(sampleValue(families, 'x_vms', { state: 'running' })).toBe(3);
  });

  it('escapes label values and help text: quotes, backslashes and newlines survive the round trip', async () => {
    const hostile = 'a"b\\c\nd';
    const text = formatExposition([{ name: 'y', type: 'gauge', help: 'two\nlines \\ here', samples: [{ labels: { installation: hostile }, value: 1 }] }]);
    const [family] = await parsePrometheus(text);
    expect(family?.help).toBe('two\nlines \\ here');
    expect(family?.samples[0]?.labels).toEqual({ installation: hostile });
  });

  it('negative control: the parser refuses what escaping prevents (a raw newline or quote in a label value)', async () => {
    await expect(parsePrometheus('# TYPE y gauge\ny{installation="a\nb"} 1\n')).rejects.toThrow(/the Prometheus parser refused the text/);
    await expect(parsePrometheus('# TYPE y gauge\ny{installation="a"b"} 1\n')).rejects.toThrow(/the Prometheus parser refused the text/);
  });

  it('a family without samples is still valid (HELP and TYPE only)', async () => {
    const families = await parsePrometheus(formatExposition(new DaemonMetrics().families({ vmsByState: {}, staleByInstallation: {} })));
    expect(families.map((f) => f.name)).toContain('vmkeep_migration_downtime_seconds');
  });
});

describe('DaemonMetrics', () => {
  it('counts QMP latency and timeouts per VM, and forgets a deleted VM', async () => {
    const m = new DaemonMetrics();
    m.qmpCommand('web1', 0.002, false);
    m.qmpCommand('web1', 10, true);
    m.qmpCommand('db', 0.001, false);
    m.forgetVm('db');
    const families = await parsePrometheus(formatExposition(m.families({ vmsByState: { running: 1 }, staleByInstallation: { a: 1 } })));
    expect(sampleValue(families, 'vmkeep_qmp_command_duration_seconds_count', { vm: 'web1' })).toBe(2);
    expect(sampleValue(families, 'vmkeep_qmp_timeouts_total', { vm: 'web1' })).toBe(1);
    expect(sampleValue(families, 'vmkeep_qmp_command_duration_seconds_count', { vm: 'db' })).toBeUndefined();
    expect(sampleValue(families, 'vmkeep_stale_vms', { installation: 'a' })).toBe(1);
  });
});

describe('countDaemonStart', () => {
  it('counts each start in the state folder, and starts again from 1 over a damaged count', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'vk-starts-'));
    try {
      expect(await countDaemonStart(dir)).toBe(1);
      expect(await countDaemonStart(dir)).toBe(2);
      expect(await readFile(join(dir, 'daemon-starts'), 'utf8')).toBe('2\n');
      await writeFile(join(dir, 'daemon-starts'), 'garbage');
      expect(await countDaemonStart(dir)).toBe(1);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
