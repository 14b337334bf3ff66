// RefreshJobs on fake deps: the request's checks and how --max-failures, --stop-on-error and
// --batch-interval reach the job and its events.
import { describe, expect, it } from 'vitest';
import { DaemonError, type DaemonEvent, type RefreshOutcome } from '../../../daemon/index.js';
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
  return { subject, events, done: () => within(done, 5_000, 'the job to end') };
}

describe('RefreshJobs', () => {
  it('stops after maxFailures failed VMs; the rest are not attempted, each said so', async () => {
    const { subject, events, done } = jobs(['a', 'b']);
    const job = await subject.start({ all: true, maxFailures: 2 });
    expect(job).toMatchObject({ maxFailures: 2, parallel: 1 });
    await done();
    expect(job.results.map((r) => [r.vm, r.ok, r.skipped ?? false])).toEqual([['a', false, false], ['b', false, false], ['c', false, true], ['d', false, true]]);
    expect(events.filter((e) => e.step === 'skipped').map((e) => e.message)).toEqual([
      'c not attempted: the job stopped after 2 failed VM(s) (max failures)',
      'd not attempted: the job stopped after 2 failed VM(s) (max failures)',
    ]);
  });

  it('stopOnError is maxFailures 1', async () => {
    const { subject, done } = jobs(['b']);
    const job = await subject.start({ all: true, stopOnError: true, maxFailures: 3 });
    expect(job.maxFailures).toBe(1);
    await done();
    expect(job.results.filter((r) => r.skipped).map((r) => r.vm)).toEqual(['c', 'd']);
  });

  it('a batch interval pauses between batches and says so on the event stream', async () => {
    const { subject, events, done } = jobs([]);
    const job = await subject.start({ vms: ['a', 'b', 'c'], parallel: 2, batchIntervalSec: 0.01 });
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
    const error = await subject.start({ all: true, ...bad }).then(() => undefined, (e: unknown) => e);
    expect(error).toBeInstanceOf(DaemonError);
    expect(error).toMatchObject({ code: 'INVALID_REQUEST', message });
  });
});
