import type { DaemonEvent, RefreshJob, RefreshOutcome, UpgradeStatus } from '../daemon/index.js';
import { formatTable, printable } from './table.js';

/** Channels, then one row per VM, then why each stale VM is stale. */
export function formatUpgradeStatus(status: UpgradeStatus): string {
  const channels = status.channels.map((c) => `channel ${c.channel}: installation ${c.installation}, QEMU ${c.version} (${c.binary})`);
  const table = formatTable(
    ['NAME', 'STATE', 'RUNS', 'CURRENT', 'STALE', 'POLICY', 'WILL'],
    status.vms.map((vm) => [
      vm.name,
      vm.refreshing ? `${vm.state} (refreshing: ${vm.refreshing})` : vm.state,
      vm.runningVersion === undefined ? '-' : `${vm.installation} ${vm.runningVersion}`,
      `${vm.currentInstallation} ${vm.currentVersion}`,
      vm.stale ? 'yes' : 'no',
      vm.policy,
      vm.outcome,
    ]),
  );
  const reasons = status.vms.filter((vm) => vm.stale).map((vm) => `  ${vm.name}: ${vm.reasons.join('; ')}${vm.exe ? ` [exe ${vm.exe}]` : ''}`);
  return [
    ...channels.map(printable),
    printable(`default policy: ${status.defaultPolicy}`),
    '',
    status.vms.length === 0 ? 'no VMs' : table,
    ...(reasons.length > 0 ? ['', 'stale because:', ...reasons.map(printable)] : []),
  ].join('\n');
}

/** One refresh event as a line for a person; undefined for steps not worth a line. */
export function formatRefreshEvent(event: DaemonEvent): string | undefined {
  const line = refreshEventText(event);
  return line === undefined ? undefined : printable(line);
}

function refreshEventText(event: DaemonEvent): string | undefined {
  const count = event.progress ? `[${event.progress.done}/${event.progress.total}] ` : '';
  switch (event.step) {
    case 'started':
      return `${event.vm}: refreshing`;
    case 'migrating':
    case 'powering-off':
    case 'starting':
      return `${event.vm}: ${event.message ?? event.step}`;
    case 'done':
      return `${count}${event.vm}: ${event.outcome ? outcomeLine(event.outcome) : event.message ?? 'done'}`;
    case 'failed':
      return `${count}${event.vm}: FAILED: ${event.message ?? 'unknown error'}`;
    case 'skipped':
      return `${event.vm}: skipped (${event.message ?? 'not attempted'})`;
    case 'pause':
      return event.message ?? 'pausing before the next batch';
    default:
      return undefined;
  }
}

export function outcomeLine(outcome: RefreshOutcome): string {
  const seconds = `${(outcome.totalMs / 1000).toFixed(1)} s`;
  switch (outcome.result) {
    case 'migrated': {
      const how = outcome.strategy === 'cpr' ? 'handed over (cpr-transfer, RAM not copied)' : 'migrated';
      const why = outcome.strategy === 'migrate' && outcome.reason !== undefined ? ` (${outcome.reason})` : '';
      return `${how} onto ${target(outcome)}${outcome.downtimeMs === undefined ? '' : `, guest paused ${outcome.downtimeMs} ms`}, ${seconds}${why}`;
    }
    case 'rebooted':
      return `rebooted onto ${target(outcome)}, ${seconds}${outcome.reason === undefined ? '' : ` (${outcome.reason})`}`;
    default:
      return outcome.message;
  }
}

function target(outcome: RefreshOutcome): string {
  return outcome.to === undefined ? 'the current installation' : `${outcome.to.installation} (QEMU ${outcome.to.version})`;
}

/** `[=========>          ] 3/7, 1 failed` */
export function progressBar(done: number, total: number, failed: number, width = 30): string {
  const filled = total === 0 ? width : Math.round((done / total) * width);
  const bar = filled >= width ? '='.repeat(width) : `${'='.repeat(Math.max(0, filled - 1))}>${' '.repeat(width - Math.max(1, filled))}`;
  return `[${bar}] ${done}/${total}${failed > 0 ? `, ${failed} failed` : ''}`;
}

export function formatJobSummary(job: RefreshJob): string {
  const ok = job.results.filter((r) => r.ok).length;
  const failed = job.results.filter((r) => !r.ok && !r.skipped);
  const skipped = job.results.filter((r) => r.skipped).length;
  const lines = [`refresh ${job.id}: ${ok} of ${job.vms.length} VM(s) done${failed.length > 0 ? `, ${failed.length} failed` : ''}${skipped > 0 ? `, ${skipped} not attempted` : ''}`];
  for (const r of failed) lines.push(`  ${r.vm}: ${r.error === undefined ? 'failed' : `[${r.error.code}] ${r.error.message}`}`);
  return lines.map(printable).join('\n');
}
