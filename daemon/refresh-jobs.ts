// Rolling refreshes of many VMs, run inside vmkeepd as operations (operations.ts), followed on
// the event stream by the operation's id.
import { parseStrategy, runRolling } from '../upgrade/index.js';
import { DaemonError, type DaemonErrorCode } from './errors.js';
import type { DaemonEvent, RefreshJob, RefreshJobPlan, RefreshJobRequest, RefreshOptions, RefreshOutcome, UpgradeStatus } from './model.js';
import type { OperationContext, RunAs } from './operations.js';
const MAX_PARALLEL = 64;
/** A day: longer pauses are a schedule, not a batch interval. */
const MAX_BATCH_INTERVAL_SEC = 86_400;

export interface RefreshJobsDeps {
  /** Every VM name, sorted; throws NOT_FOUND for an unknown one when asked for it. */
  names(): string[];
  requireVm(name: string): void;
  upgradeStatus(): Promise<UpgradeStatus>;
  refresh(vm: string, options: RefreshOptions, runAs: RunAs): Promise<RefreshOutcome>;
  emit(event: Omit<DaemonEvent, 'time'>): void;
  onJobDone(): Promise<void>;
  logError(fields: object, message: string): void;
}

export class RefreshJobs {
  constructor(private readonly deps: RefreshJobsDeps) {}

  /** Checks the request and resolves its VMs, before any operation begins. */
  async plan(request: RefreshJobRequest): Promise<RefreshJobPlan> {
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
    const options: RefreshJobPlan['options'] = {
      ...(strategy === undefined ? {} : { strategy }),
      ...(request.timeoutSec === undefined ? {} : { timeoutSec: request.timeoutSec }),
      ...(request.force === undefined ? {} : { force: request.force }),
    };
    return { vms, parallel, batchIntervalSec, ...(maxFailures === undefined ? {} : { maxFailures }), options };
  }

  /**
   * Runs the plan as the operation `context` (its id is the job's, on every event). A cancel
   * begins no further VM: those in progress finish, the rest are reported skipped.
   */
  async run(plan: RefreshJobPlan, context: OperationContext): Promise<RefreshJob> {
    const { deps } = this;
    const { vms } = plan;
    const id = context.id;
    const tag = { type: 'refresh' as const, job: id, operation: id };
    context.onRunning();
    let failed = 0;
    const results = await runRolling({
      vms,
      parallel: plan.parallel,
      ...(plan.maxFailures === undefined ? {} : { maxFailures: plan.maxFailures }),
      batchIntervalMs: plan.batchIntervalSec * 1000,
      signal: context.signal,
      onPause: (ms, remaining) => deps.emit({ ...tag, step: 'pause', message: `pausing ${ms / 1000} s before the next batch (${remaining} VM(s) to go)` }),
      // The VM's lock and events carry the job's id; its cancel is not passed on: a migration in
      // progress finishes, only the VMs not begun are left out.
      refresh: (vm) => deps.refresh(vm, { ...plan.options, onStep: (step, message) => deps.emit({ ...tag, vm, step, message }) }, { id }),
      onStart: (vm) => deps.emit({ ...tag, vm, step: 'started', message: `refreshing ${vm}` }),
      onEnd: (item, done, total) => {
        if (!item.ok) failed++;
        context.progress({ done, total, failed });
        deps.emit({
          ...tag, vm: item.vm, step: item.ok ? 'done' : 'failed',
          message: item.ok ? (item.result as RefreshOutcome).message : (item.error as Error).message,
          progress: { done, total, failed },
          ...(item.ok ? { outcome: item.result as RefreshOutcome } : {}),
        });
      },
    });
    const job: RefreshJob = {
      id, vms, parallel: plan.parallel,
      ...(plan.batchIntervalSec > 0 ? { batchIntervalSec: plan.batchIntervalSec } : {}),
      ...(plan.maxFailures === undefined ? {} : { maxFailures: plan.maxFailures }),
      results: results.map((r) => ({
        vm: r.vm, ok: r.ok,
        ...(r.skipped ? { skipped: true } : {}),
        ...(r.result ? { outcome: r.result } : {}),
        ...(r.error ? { error: { code: (r.error as { code?: string }).code ?? 'INTERNAL', message: r.error.message } } : {}),
      })),
    };
    const why = context.signal.aborted ? 'the job was cancelled' : `the job stopped after ${plan.maxFailures ?? 1} failed VM(s) (max failures)`;
    for (const r of results.filter((x) => x.skipped)) deps.emit({ ...tag, vm: r.vm, step: 'skipped', message: `${r.vm} not attempted: ${why}` });
    const ok = results.filter((r) => r.ok).length;
    deps.emit({ ...tag, step: 'job-done', progress: { done: results.length, total: vms.length, failed: results.length - ok }, message: `${ok} of ${vms.length} VM(s) refreshed` });
    await deps.onJobDone().catch((error: unknown) => deps.logError({ job: id, err: error }, 'collecting unused module pins after a refresh job failed'));
    if (ok < results.length && !context.signal.aborted) {
      const first = job.results.find((r) => !r.ok && !r.skipped);
      throw Object.assign(new DaemonError((first?.error?.code ?? 'REFRESH_FAILED') as DaemonErrorCode,
        `${results.length - ok} of ${vms.length} VM(s) not refreshed${first?.error ? `; ${first.vm}: ${first.error.message}` : ''}`), { result: job });
    }
    return job;
  }
}
