// RefreshJobs on fake deps: the request's checks and how --max-failures, --stop-on-error and
// --batch-interval reach the job and its events.
import { describe, expect, it } from 'vitest';
import { DaemonError, type DaemonEvent, type RefreshJob, type RefreshJobRequest, type RefreshOutcome } from '../../../daemon/index.js';
import { RefreshJobs } from '../../../daemon/refresh-jobs.js';
import { within } from '../qmp/fake-peer.js';

function jobs(failing: readonly string[]) {
  const events: Omit<DaemonEvent, 'time'>[] = [];
  let resolveDone: () => void = () => undefined;
  const done = new Promise<void>((resolve) => {
    resolveDone = resolve;
  });
  const names = ['a', 'b', 'c', 'd'];
  const subject = new RefreshJobs({
    names: () => names,
    requireVm: () => undefined,
    upgradeStatus: () => Promise.reject(new Error('not used')),
    refresh: async (vm) => {
      if (failing.includes(vm)) throw new DaemonError('REFRESH_FAILED', `${vm} broke`);
      return { vm, strategy: 'migrate', result: 'migrated', totalMs: 1, message: `${vm} moved` } satisfies RefreshOutcome;
    },
    emit: (event) => events.push(event),
    onJobDone: async () => resolveDone(),
    logError: () => undefined,
  });
  /** Plans the request and runs it as an operation; resolves to the job (a failed one's too). */
  const start = async (request: RefreshJobRequest) => {
    const plan = await subject.plan(request);
    const abort = new AbortController();
    const run = subject.run(plan, { id: 'job-1', signal: abort.signal, onRunning: () => undefined, progress: () => undefined })
      .catch((error: { result?: RefreshJob }) => error.result as RefreshJob);
    return { plan, job: () => within(run, 5_000, 'the job to end'), cancel: () => abort.abort() };
  };
  return { subject, events, start, done: () => within(done, 5_000, 'the job to end') };
}

describe('RefreshJobs', () => {
  it('stops after maxFailures failed VMs; the rest are not attempted, each said so', async () => {
    const { start, events } = jobs(['a', 'b']);
    const run = await start({ all: true, maxFailures: 2 });
    expect(run.plan).toMatchObject({ maxFailures: 2, parallel: 1 });
    const job = await run.job();
    expect(job).toMatchObject({ maxFailures: 2, parallel: 1 });
    expect(job.results.map((r) => [r.vm, r.ok, r.skipped ?? false])).toEqual([['a', false, false], ['b', false, false], ['c', false, true], ['d', false, true]]);
    expect(events.filter((e) => e.step === 'skipped').map((e) => e.message)).toEqual([
      'c not attempted: the job stopped after 2 failed VM(s) (max failures)',
      'd not attempted: the job stopped after 2 failed VM(s) (max failures)',
    ]);
  });

  it('stopOnError is maxFailures 1', async () => {
    const { start } = jobs(['b']);
    const job = await (await start({ all: true, stopOnError: true, maxFailures: 3 })).job();
    expect(job.maxFailures).toBe(1);
    expect(job.results.filter((r) => r.skipped).map((r) => r.vm)).toEqual(['c', 'd']);
  });

  it('a batch interval pauses between batches and says so on the event stream', async () => {
    const { start, events, done } = jobs([]);
    const job = await (await start({ vms: ['a', 'b', 'c'], parallel: 2, batchIntervalSec: 0.01 })).job();
    expect(job.batchIntervalSec).toBe(0.01);
    await done();
    expect(events.filter((e) => e.step === 'pause').map((e) => e.message)).toEqual(['pausing 0.01 s before the next batch (1 VM(s) to go)']);
    expect(job.results.every((r) => r.ok)).toBe(true);
  });

  it.each([
    [{ maxFailures: 0 }, 'maxFailures must be a whole number from 1, got 0'],
    [{ maxFailures: 1.5 }, 'maxFailures must be a whole number from 1, got 1.5'],
    [{ batchIntervalSec: -1 }, 'batchIntervalSec must be a number of seconds from 0 to 86400, got -1'],
    [{ batchIntervalSec: 90_000 }, 'batchIntervalSec must be a number of seconds from 0 to 86400, got 90000'],
  ])('refuses %o', async (bad, message) => {
    const { subject } = jobs([]);
    const error = await subject.plan({ all: true, ...bad }).then(() => undefined, (e: unknown) => e);
    expect(error).toBeInstanceOf(DaemonError);
    expect(error).toMatchObject({ code: 'INVALID_REQUEST', message });
  });

  it('a cancel during the pause between batches begins no further batch', async () => {
    const { start, events } = jobs([]);
    const run = await start({ vms: ['a', 'b', 'c'], parallel: 1, batchIntervalSec: 0.2 });
    const job = run.job();
    await within(new Promise<void>((resolve) => {
      const poll = (): void => (events.some((e) => e.step === 'pause') ? resolve() : void setTimeout(poll, 5));
      poll();
    }), 5_000, 'the first pause');
    run.cancel();
    const ended = await job;
    expect(ended.results.map((r) => [r.vm, r.ok, r.skipped ?? false])).toEqual([['a', true, false], ['b', false, true], ['c', false, true]]);
    expect(events.filter((e) => e.step === 'skipped').map((e) => e.message)).toEqual(['b not attempted: the job was cancelled', 'c not attempted: the job was cancelled']);
  });
});
