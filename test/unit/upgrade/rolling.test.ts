import { describe, expect, it } from 'vitest';
import { runRolling, type RollingItemResult } from '../../../upgrade/index.js';
import { within } from '../qmp/fake-peer.js';

interface Deferred<T> {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (error: unknown) => void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/**
 * A refresh function whose calls the test finishes by hand. Tracks how many run at once and
 * lets the test wait until a given number have started.
 */
class HandRefresh {
  readonly calls = new Map<string, Deferred<string>>();
  readonly started: string[] = [];
  active = 0;
  maxActive = 0;
  private readonly startWaiters: { n: number; resolve: () => void }[] = [];

  readonly refresh = (vm: string): Promise<string> => {
    const d = deferred<string>();
    this.calls.set(vm, d);
    this.started.push(vm);
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    for (const w of this.startWaiters.filter((x) => this.started.length >= x.n)) w.resolve();
    return d.promise.finally(() => {
      this.active--;
    });
  };

  /** Resolves once `n` refreshes have started in total. */
  startedAtLeast(n: number): Promise<void> {
    if (this.started.length >= n) return Promise.resolve();
    return within(new Promise<void>((resolve) => this.startWaiters.push({ n, resolve })), 2000, `${n} refreshes to start (started: ${this.started.join(', ')})`);
  }

  finish(vm: string, value = `done ${vm}`): void {
    this.call(vm).resolve(value);
  }

  fail(vm: string, error: unknown): void {
    this.call(vm).reject(error);
  }

  private call(vm: string): Deferred<string> {
    const d = this.calls.get(vm);
    if (d === undefined) throw new Error(`refresh of ${vm} has not started (started: ${this.started.join(', ')})`);
    return d;
  }
}

/** Lets every pending promise callback run (one macrotask turn), so a start that would happen has happened. */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

describe('runRolling', () => {
  it('never runs more than `parallel` refreshes at once and keeps the given order in its results', async () => {
    const hand = new HandRefresh();
    const vms = ['a', 'b', 'c', 'd', 'e'];
    const run = runRolling({ vms, parallel: 2, refresh: hand.refresh });

    await hand.startedAtLeast(2);
    await settle();
    expect(hand.started).toEqual(['a', 'b']);

    // Finish out of order: b first, then the later ones before a.
    hand.finish('b');
    await hand.startedAtLeast(3);
    await settle();
    expect(hand.started).toEqual(['a', 'b', 'c']);
    hand.finish('c');
    await hand.startedAtLeast(4);
    hand.finish('d');
    await hand.startedAtLeast(5);
    await settle();
    expect(hand.active).toBe(2); // a and e
    hand.finish('e');
    hand.finish('a');

    const results = await within(run, 2000, 'runRolling to resolve');
    expect(hand.maxActive).toBe(2);
    expect(results).toEqual(vms.map((vm) => ({ vm, ok: true, result: `done ${vm}` })));
  });

  it('runs one at a time with parallel 1, and treats parallel below 1 as 1', async () => {
    for (const parallel of [1, 0, -3, 1.9]) {
      const hand = new HandRefresh();
      const run = runRolling({ vms: ['a', 'b', 'c'], parallel, refresh: hand.refresh });
      for (const [i, vm] of ['a', 'b', 'c'].entries()) {
        await hand.startedAtLeast(i + 1);
        await settle();
        expect(hand.active, `parallel ${parallel}`).toBe(1);
        hand.finish(vm);
      }
      expect((await within(run, 2000, 'runRolling to resolve')).every((r) => r.ok)).toBe(true);
      expect(hand.maxActive).toBe(1);
    }
  });

  it('starts them all at once when parallel exceeds the number of VMs', async () => {
    const hand = new HandRefresh();
    const run = runRolling({ vms: ['a', 'b', 'c'], parallel: 10, refresh: hand.refresh });
    await hand.startedAtLeast(3);
    for (const vm of ['c', 'a', 'b']) hand.finish(vm);
    expect((await within(run, 2000, 'runRolling to resolve')).map((r) => r.vm)).toEqual(['a', 'b', 'c']);
  });

  it('resolves with [] for no VMs', async () => {
    expect(await runRolling({ vms: [], parallel: 2, maxFailures: 1, refresh: () => Promise.resolve(1) })).toEqual([]);
  });

  it('goes on after a failure without maxFailures', async () => {
    const hand = new HandRefresh();
    const run = runRolling({ vms: ['a', 'b', 'c', 'd'], parallel: 2, refresh: hand.refresh });
    await hand.startedAtLeast(2);
    const boom = new Error('migration of b failed');
    hand.fail('b', boom);
    await hand.startedAtLeast(3);
    hand.fail('c', 'a plain string'); // not an Error: wrapped into one
    await hand.startedAtLeast(4);
    hand.finish('a');
    hand.finish('d');
    const results = await within(run, 2000, 'runRolling to resolve');
    expect(results[0]).toEqual({ vm: 'a', ok: true, result: 'done a' });
    expect(results[1]).toEqual({ vm: 'b', ok: false, error: boom });
    expect(results[2]?.ok).toBe(false);
    expect(results[2]?.error).toBeInstanceOf(Error);
    expect(results[2]?.error?.message).toBe('a plain string');
    expect(results[3]).toEqual({ vm: 'd', ok: true, result: 'done d' });
    expect(results.some((r) => r.skipped)).toBe(false);
  });

  it('catches a refresh that throws synchronously', async () => {
    const results = await runRolling({
      vms: ['a', 'b'],
      parallel: 1,
      refresh: (vm) => {
        if (vm === 'a') throw new Error('bad a');
        return Promise.resolve(vm);
      },
    });
    expect(results[0]?.error?.message).toBe('bad a');
    expect(results[1]).toEqual({ vm: 'b', ok: true, result: 'b' });
  });

  it('with maxFailures 1, begins no new VM after a failure, lets those in flight finish, and skips the rest', async () => {
    const hand = new HandRefresh();
    const ends: RollingItemResult<string>[] = [];
    const run = runRolling({
      vms: ['a', 'b', 'c', 'd', 'e'], parallel: 2, maxFailures: 1, refresh: hand.refresh, onEnd: (item) => ends.push(item),
    });
    await hand.startedAtLeast(2);
    hand.fail('b', new Error('b broke'));
    await settle();
    expect(hand.started).toEqual(['a', 'b']); // c not begun
    hand.finish('a'); // in flight: finishes and is reported
    const results = await within(run, 2000, 'runRolling to resolve');
    expect(hand.started).toEqual(['a', 'b']);
    expect(results.map((r) => [r.vm, r.ok, r.skipped ?? false])).toEqual([
      ['a', true, false], ['b', false, false], ['c', false, true], ['d', false, true], ['e', false, true],
    ]);
    expect(results[2]).toEqual({ vm: 'c', ok: false, skipped: true });
    expect(ends.map((e) => e.vm)).toEqual(['b', 'a']);
  });

  it('calls onStart and onEnd once per refreshed VM, start before end, with a running count', async () => {
    const log: string[] = [];
    const counts: [number, number][] = [];
    const results = await runRolling({
      vms: ['a', 'b', 'c'],
      parallel: 2,
      refresh: (vm) => (vm === 'b' ? Promise.reject(new Error('no')) : Promise.resolve(vm)),
      onStart: (vm) => log.push(`start ${vm}`),
      onEnd: (item, done, total) => {
        log.push(`end ${item.vm} ${item.ok}`);
        counts.push([done, total]);
      },
    });
    expect(results).toHaveLength(3);
    for (const vm of ['a', 'b', 'c']) {
      expect(log.filter((l) => l === `start ${vm}`)).toHaveLength(1);
      expect(log.filter((l) => l.startsWith(`end ${vm} `))).toHaveLength(1);
      expect(log.indexOf(`start ${vm}`)).toBeLessThan(log.findIndex((l) => l.startsWith(`end ${vm} `)));
    }
    expect(log).toContain('end b false');
    expect(counts).toEqual([[1, 3], [2, 3], [3, 3]]);
  });

  it('with maxFailures 2, stops after the second failure: the rest are not attempted', async () => {
    const results = await runRolling({
      vms: ['a', 'b', 'c', 'd', 'e'], parallel: 1, maxFailures: 2,
      refresh: (vm) => (vm === 'a' || vm === 'c' ? Promise.reject(new Error(`${vm} broke`)) : Promise.resolve(vm)),
    });
    expect(results.map((r) => [r.vm, r.ok, r.skipped ?? false])).toEqual([
      ['a', false, false], ['b', true, false], ['c', false, false], ['d', false, true], ['e', false, true],
    ]);
  });

  it('with a batch interval, runs batches of `parallel`, each ended before the pause, and no pause after the last', async () => {
    const log: string[] = [];
    const results = await runRolling({
      vms: ['a', 'b', 'c', 'd', 'e'], parallel: 2, batchIntervalMs: 30_000,
      refresh: async (vm) => {
        log.push(`start ${vm}`);
        await Promise.resolve();
        log.push(`end ${vm}`);
        return vm;
      },
      onPause: (ms, remaining) => log.push(`pause ${ms} (${remaining} to go)`),
      sleep: async (ms) => {
        log.push(`sleep ${ms}`);
      },
    });
    expect(results.every((r) => r.ok)).toBe(true);
    expect(log).toEqual([
      'start a', 'start b', 'end a', 'end b', 'pause 30000 (3 to go)', 'sleep 30000',
      'start c', 'start d', 'end c', 'end d', 'pause 30000 (1 to go)', 'sleep 30000',
      'start e', 'end e',
    ]);
  });

  it('with a batch interval, a cancel during the pause ends the job at once, the rest skipped (real timers: it would wait an hour)', async () => {
    const abort = new AbortController();
    const results = await runRolling({
      vms: ['a', 'b'], parallel: 1, batchIntervalMs: 3_600_000, signal: abort.signal,
      refresh: async (vm) => vm,
      onPause: () => setImmediate(() => abort.abort()),
    });
    expect(results.map((r) => [r.vm, r.ok, r.skipped ?? false])).toEqual([['a', true, false], ['b', false, true]]);
  });

  it('with a batch interval, a batch that reaches maxFailures ends the job without another pause', async () => {
    const sleeps: number[] = [];
    const results = await runRolling({
      vms: ['a', 'b', 'c', 'd'], parallel: 2, batchIntervalMs: 1000, maxFailures: 1,
      refresh: (vm) => (vm === 'b' ? Promise.reject(new Error('b broke')) : Promise.resolve(vm)),
      sleep: async (ms) => {
        sleeps.push(ms);
      },
    });
    expect(sleeps).toEqual([]);
    expect(results.map((r) => [r.vm, r.ok, r.skipped ?? false])).toEqual([
      ['a', true, false], ['b', false, false], ['c', false, true], ['d', false, true],
    ]);
  });
});
