// Rolling refreshes of many VMs, run inside vmkeepd and followed on the event stream by id.
import { randomBytes } from 'node:crypto';
import { parseStrategy, runRolling } from '../upgrade/index.js';
import { DaemonError } from './errors.js';
import type { DaemonEvent, RefreshJob, RefreshJobRequest, RefreshOptions, RefreshOutcome, UpgradeStatus } from './model.js';

const MAX_JOBS_KEPT = 100;
const MAX_PARALLEL = 64;
/** A day: longer pauses are a schedule, not a batch interval. */
const MAX_BATCH_INTERVAL_SEC = 86_400;

export interface RefreshJobsDeps {
  /** Every VM name, sorted; throws NOT_FOUND for an unknown one when asked for it. */
  names(): string[];
  requireVm(name: string): void;
  upgradeStatus(): Promise<UpgradeStatus>;
  refresh(vm: string, options: RefreshOptions): Promise<RefreshOutcome>;
  emit(event: Omit<DaemonEvent, 'time'>): void;
  onJobDone(): Promise<void>;
  logError(fields: object, message: string): void;
}

export class RefreshJobs {
  private readonly jobs = new Map<string, RefreshJob>();

  constructor(private readonly deps: RefreshJobsDeps) {}

  async start(request: RefreshJobRequest): Promise<RefreshJob> {
    const { deps } = this;
    const modes = [request.vms !== undefined, request.all === true, request.stale === true].filter(Boolean).length;
    if (modes !== 1) throw new DaemonError('INVALID_REQUEST', 'name the VMs to refresh: exactly one of "vms" (a list), "all": true or "stale": true');
    const parallel = request.parallel ?? 1;
    if (!Number.isSafeInteger(parallel) || parallel < 1 || parallel > MAX_PARALLEL) {
      throw new DaemonError('INVALID_REQUEST', `parallel must be a whole number from 1 to ${MAX_PARALLEL}, got ${String(request.parallel)}`);
    }
    const batchIntervalSec = request.batchIntervalSec ?? 0;
    if (!Number.isFinite(batchIntervalSec) || batchIntervalSec < 0 || batchIntervalSec > MAX_BATCH_INTERVAL_SEC) {
      throw new DaemonError('INVALID_REQUEST', `batchIntervalSec must be a number of seconds from 0 to ${MAX_BATCH_INTERVAL_SEC}, got ${String(request.batchIntervalSec)}`);
    }
    if (request.maxFailures !== undefined && (!Number.isSafeInteger(request.maxFailures) || request.maxFailures < 1)) {
      throw new DaemonError('INVALID_REQUEST', `maxFailures must be a whole number from 1, got ${String(request.maxFailures)}`);
    }
    // stopOnError is maxFailures 1; with both, the stricter wins.
    const maxFailures = request.stopOnError === true ? 1 : request.maxFailures;
    const strategy = request.strategy === undefined ? undefined : parseStrategy(request.strategy);
    let vms: string[];
    if (request.vms !== undefined) {
      vms = [...new Set(request.vms)];
      for (const vm of vms) deps.requireVm(vm);
    } else if (request.all) {
      vms = deps.names();
    } else {
      const status = await deps.upgradeStatus();
      vms = status.vms.filter((v) => v.stale && (strategy ?? v.policy) !== 'manual').map((v) => v.name);
    }
    const job: RefreshJob = {
      id: `refresh-${randomBytes(4).toString('hex')}`, vms, state: 'running', parallel,
      ...(batchIntervalSec > 0 ? { batchIntervalSec } : {}),
      ...(maxFailures === undefined ? {} : { maxFailures }),
      startedAt: new Date().toISOString(), results: [],
    };
    this.jobs.set(job.id, job);
    const finished = [...this.jobs.values()].filter((j) => j.state === 'done');
    for (const old of finished.slice(0, Math.max(0, this.jobs.size - MAX_JOBS_KEPT))) this.jobs.delete(old.id);
    let failed = 0;
    const options: RefreshOptions = {
      ...(strategy === undefined ? {} : { strategy }),
      ...(request.timeoutSec === undefined ? {} : { timeoutSec: request.timeoutSec }),
      ...(request.force === undefined ? {} : { force: request.force }),
    };
    void runRolling({
      vms,
      parallel,
      ...(maxFailures === undefined ? {} : { maxFailures }),
      batchIntervalMs: batchIntervalSec * 1000,
      onPause: (ms, remaining) => deps.emit({ type: 'refresh', job: job.id, step: 'pause', message: `pausing ${ms / 1000} s before the next batch (${remaining} VM(s) to go)` }),
      refresh: (vm) => deps.refresh(vm, { ...options, onStep: (step, message) => deps.emit({ type: 'refresh', job: job.id, vm, step, message }) }),
      onStart: (vm) => deps.emit({ type: 'refresh', job: job.id, vm, step: 'started', message: `refreshing ${vm}` }),
      onEnd: (item, done, total) => {
        if (!item.ok) failed++;
        deps.emit({
          type: 'refresh', job: job.id, vm: item.vm, step: item.ok ? 'done' : 'failed',
          message: item.ok ? (item.result as RefreshOutcome).message : (item.error as Error).message,
          progress: { done, total, failed },
          ...(item.ok ? { outcome: item.result as RefreshOutcome } : {}),
        });
      },
    }).then(async (results) => {
      job.results = results.map((r) => ({
        vm: r.vm, ok: r.ok,
        ...(r.skipped ? { skipped: true } : {}),
        ...(r.result ? { outcome: r.result } : {}),
        ...(r.error ? { error: { code: (r.error as { code?: string }).code ?? 'INTERNAL', message: r.error.message } } : {}),
      }));
      for (const r of results.filter((x) => x.skipped)) {
        deps.emit({ type: 'refresh', job: job.id, vm: r.vm, step: 'skipped', message: `${r.vm} not attempted: the job stopped after ${maxFailures ?? 1} failed VM(s) (max failures)` });
      }
      const ok = results.filter((r) => r.ok).length;
      job.state = 'done';
      job.endedAt = new Date().toISOString();
      deps.emit({ type: 'refresh', job: job.id, step: 'job-done', progress: { done: results.length, total: vms.length, failed: results.length - ok }, message: `${ok} of ${vms.length} VM(s) refreshed` });
      await deps.onJobDone();
    }).catch((error: unknown) => {
      deps.logError({ job: job.id, err: error }, 'a refresh job failed unexpectedly');
    }).finally(() => {
      job.state = 'done';
      job.endedAt ??= new Date().toISOString();
    });
    return job;
  }

  get(id: string): RefreshJob {
    const job = this.jobs.get(id);
    if (!job) throw new DaemonError('NOT_FOUND', `no refresh job ${JSON.stringify(id.slice(0, 64))} (jobs are kept until vmkeepd restarts, the last ${MAX_JOBS_KEPT})`);
    return job;
  }
}
