// GET /1.0/metrics: the Prometheus text exposition format (version 0.0.4), written by hand
// rather than with prom-client, for vmkeepd's start-up time (ARCHITECTURE.md, "Metrics").
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from './records.js';

export type Labels = Readonly<Record<string, string>>;

export interface Sample {
  /** Appended to the family's name (`_bucket`, `_sum`, `_count`), or none. */
  suffix?: string;
  labels: Labels;
  value: number;
}

export interface MetricFamily {
  name: string;
  help: string;
  type: 'counter' | 'gauge' | 'histogram';
  samples: Sample[];
}

/** The media type a scraper is answered with. */
export const METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

// Seconds: a QMP command answers in milliseconds; a migration's downtime is milliseconds, its
// total time seconds to minutes.
export const QMP_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10];
export const DOWNTIME_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5];
export const MIGRATION_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

function escapeLabel(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function formatValue(value: number): string {
  if (Number.isNaN(value)) return 'NaN';
  if (value === Infinity) return '+Inf';
  if (value === -Infinity) return '-Inf';
  return String(value);
}

/** The text format: HELP and TYPE, then one line per sample. Pure. */
export function formatExposition(families: readonly MetricFamily[]): string {
  const lines: string[] = [];
  for (const family of families) {
    lines.push(`# HELP ${family.name} ${family.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`, `# TYPE ${family.name} ${family.type}`);
    for (const sample of family.samples) {
      const labels = Object.entries(sample.labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(',');
      lines.push(`${family.name}${sample.suffix ?? ''}${labels === '' ? '' : `{${labels}}`} ${formatValue(sample.value)}`);
    }
  }
  return `${lines.join('\n')}\n`;
}

/** A key for a label set, stable whatever the order the labels were given in. */
function keyOf(labels: Labels): string {
  return JSON.stringify(Object.entries(labels).sort(([a], [b]) => a.localeCompare(b)));
}

export class Counter {
  private readonly values = new Map<string, { labels: Labels; value: number }>();

  inc(labels: Labels, by = 1): void {
    const key = keyOf(labels);
    const current = this.values.get(key);
    if (current) current.value += by;
    else this.values.set(key, { labels, value: by });
  }

  /** Forgets the series whose labels match (a deleted VM's). */
  remove(match: (labels: Labels) => boolean): void {
    for (const [key, { labels }] of this.values) if (match(labels)) this.values.delete(key);
  }

  samples(): Sample[] {
    return [...this.values.values()].map(({ labels, value }) => ({ labels, value }));
  }
}

export class Histogram {
  private readonly series = new Map<string, { labels: Labels; counts: number[]; sum: number; count: number }>();

  constructor(private readonly buckets: readonly number[]) {}

  observe(labels: Labels, value: number): void {
    const key = keyOf(labels);
    let s = this.series.get(key);
    if (!s) {
      s = { labels, counts: this.buckets.map(() => 0), sum: 0, count: 0 };
      this.series.set(key, s);
    }
    // Cumulative, as the format wants: a value counts in every bucket whose bound it is under.
    this.buckets.forEach((bound, i) => {
      if (value <= bound) (s.counts[i] as number)++;
    });
    s.sum += value;
    s.count++;
  }

  remove(match: (labels: Labels) => boolean): void {
    for (const [key, { labels }] of this.series) if (match(labels)) this.series.delete(key);
  }

  samples(): Sample[] {
    const out: Sample[] = [];
    for (const s of this.series.values()) {
      this.buckets.forEach((bound, i) => out.push({ suffix: '_bucket', labels: { ...s.labels, le: formatValue(bound) }, value: s.counts[i] as number }));
      out.push({ suffix: '_bucket', labels: { ...s.labels, le: '+Inf' }, value: s.count });
      out.push({ suffix: '_sum', labels: s.labels, value: s.sum });
      out.push({ suffix: '_count', labels: s.labels, value: s.count });
    }
    return out;
  }
}

/** What vmkeepd counts as it runs; the VM gauges are read at each scrape (DaemonMetrics.families). */
export class DaemonMetrics {
  readonly refreshes = new Counter();
  readonly migrationDowntime = new Histogram(DOWNTIME_BUCKETS);
  readonly migrationDuration = new Histogram(MIGRATION_BUCKETS);
  readonly qmpLatency = new Histogram(QMP_BUCKETS);
  readonly qmpTimeouts = new Counter();
  /** Seconds from the start of the reattach to the end of every VM's, once it ended. */
  startReattachSeconds: number | undefined;
  /** vmkeepd starts on this state folder, this one included (daemonStarts). */
  daemonStarts: number | undefined;

  /** One QMP command on a VM's monitor, answered or not. */
  qmpCommand(vm: string, seconds: number, timedOut: boolean): void {
    this.qmpLatency.observe({ vm }, seconds);
    if (timedOut) this.qmpTimeouts.inc({ vm });
  }

  forgetVm(vm: string): void {
    const isVm = (labels: Labels): boolean => labels.vm === vm;
    this.qmpLatency.remove(isVm);
    this.qmpTimeouts.remove(isVm);
  }

  families(now: { vmsByState: Readonly<Record<string, number>>; staleByInstallation: Readonly<Record<string, number>> }): MetricFamily[] {
    const gauge = (counts: Readonly<Record<string, number>>, label: string): Sample[] =>
      Object.entries(counts).sort(([a], [b]) => a.localeCompare(b)).map(([value, n]) => ({ labels: { [label]: value }, value: n }));
    return [
      { name: 'vmkeep_vms', type: 'gauge', help: 'VMs by state.', samples: gauge(now.vmsByState, 'state') },
      { name: 'vmkeep_stale_vms', type: 'gauge', help: 'Stale VMs (not on their current installation) by the installation they run on.', samples: gauge(now.staleByInstallation, 'installation') },
      { name: 'vmkeep_refreshes_total', type: 'counter', help: 'Refreshes of one VM by requested strategy and outcome (a result, or refused or failed).', samples: this.refreshes.samples() },
      { name: 'vmkeep_migration_downtime_seconds', type: 'histogram', help: 'Guest pause of each completed live migration or cpr-transfer, as QEMU reports it.', samples: this.migrationDowntime.samples() },
      { name: 'vmkeep_migration_duration_seconds', type: 'histogram', help: 'Total time of each completed live migration or cpr-transfer, as QEMU reports it.', samples: this.migrationDuration.samples() },
      { name: 'vmkeep_qmp_command_duration_seconds', type: 'histogram', help: "QMP command latency on each VM's monitor (timeouts included at their limit).", samples: this.qmpLatency.samples() },
      { name: 'vmkeep_qmp_timeouts_total', type: 'counter', help: 'QMP commands QEMU did not answer in time, by VM.', samples: this.qmpTimeouts.samples() },
      {
        name: 'vmkeep_start_reattach_seconds', type: 'gauge', help: 'At this vmkeepd start: seconds until every VM was reattached.',
        samples: this.startReattachSeconds === undefined ? [] : [{ labels: {}, value: this.startReattachSeconds }],
      },
      {
        name: 'vmkeep_daemon_starts_total', type: 'counter', help: 'vmkeepd starts on this state folder, this one included (restarts seen).',
        samples: this.daemonStarts === undefined ? [] : [{ labels: {}, value: this.daemonStarts }],
      },
    ];
  }
}

function startsFile(stateDir: string): string {
  return join(stateDir, 'daemon-starts');
}

/**
 * Counts this start in the state folder and returns the total. Written after READY, so it never
 * slows the start; a missing or unreadable count starts again from 1.
 */
export async function countDaemonStart(stateDir: string): Promise<number> {
  const before = Number.parseInt(await readFile(startsFile(stateDir), 'utf8').catch(() => '0'), 10);
  const starts = (Number.isSafeInteger(before) && before >= 0 ? before : 0) + 1;
  await writeFileAtomic(startsFile(stateDir), `${starts}\n`);
  return starts;
}
