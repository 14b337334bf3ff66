// Operations: the pure rules (operation-state.ts) and the registry that keeps and records them
// (operations.ts), against a real folder.
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DaemonError } from '../../../daemon/errors.js';
import type { DaemonEvent } from '../../../daemon/model.js';
import {
  decideCancel, endedByRestart, endOf, isFinished, pruneOperations, transition, type Operation,
} from '../../../daemon/operation-state.js';
import { OPERATION_SCHEMA, Operations, type OperationContext } from '../../../daemon/operations.js';
import { parseEventFilter } from '../../../daemon/event-filter.js';
import { OperationLock } from '../../../daemon/operation-lock.js';

const T0 = '2026-01-01T00:00:00.000Z';
const ID = '11111111-2222-4333-8444-555555555555';

function op(patch: Partial<Operation> = {}): Operation {
  return { id: ID, kind: 'refresh', vms: ['web1'], status: 'running', createdAt: T0, updatedAt: T0, ...patch };
}

describe('status transitions', () => {
  it('pending -> running -> succeeded/failed/cancelled; a finished operation never changes', () => {
    const pending = op({ status: 'pending' });
    const running = transition(pending, 'running', T0);
    expect(running.status).toBe('running');
    expect(transition(running, 'succeeded', T0, { result: { ok: 1 } })).toMatchObject({ status: 'succeeded', result: { ok: 1 } });
    expect(transition(running, 'failed', T0, { error: { code: 'X', message: 'm' } })).toMatchObject({ status: 'failed', error: { code: 'X' } });
    for (const done of ['succeeded', 'failed', 'cancelled'] as const) {
      expect(isFinished(done)).toBe(true);
      expect(() => transition(op({ status: done }), 'running', T0)).toThrow(/cannot become running/);
    }
    expect(() => transition(running, 'pending', T0)).toThrow();
  });

  it('a run ends succeeded, failed, or cancelled when a granted cancel took effect', () => {
    expect(endOf(op(), { ok: true, value: 1 })).toEqual({ status: 'succeeded', result: 1 });
    expect(endOf(op(), { ok: false, error: { code: 'REFRESH_FAILED', message: 'm' } })).toEqual({ status: 'failed', error: { code: 'REFRESH_FAILED', message: 'm' } });
    // Cancelled migration: rolled back, the refresh failed because of the cancel.
    expect(endOf(op({ cancelRequested: true }), { ok: false, error: { code: 'REFRESH_FAILED', message: 'cancelled by QEMU' } }))
      .toMatchObject({ status: 'cancelled', error: { code: 'CANCELLED' } });
    // Too late: the migration had completed; the success stands.
    expect(endOf(op({ cancelRequested: true }), { ok: true, value: 2 })).toEqual({ status: 'succeeded', result: 2 });
    // A cancelled rolling refresh keeps what it did.
    expect(endOf(op({ kind: 'rolling-refresh', cancelRequested: true }), { ok: true, value: { results: [] } }))
      .toMatchObject({ status: 'cancelled', result: { results: [] }, error: { code: 'CANCELLED' } });
    // A failed rolling refresh keeps its per-VM results too.
    expect(endOf(op({ kind: 'rolling-refresh' }), { ok: false, error: { code: 'REFRESH_FAILED', message: 'm' }, result: { results: [1] } }))
      .toMatchObject({ status: 'failed', result: { results: [1] } });
  });
});

describe('the VM lock and an operation', () => {
  it('a stop queued behind a refresh is told it began only once the refresh let go; the lock names its operation', async () => {
    const lock = new OperationLock('web1');
    let release!: () => void;
    const refresh = lock.run('refresh', () => new Promise<void>((resolve) => (release = resolve)), { operation: 'op-refresh' });
    await Promise.resolve();
    let began = false;
    const stop = lock.run('stop', async () => undefined, { operation: 'op-stop', onRunning: () => (began = true) });
    await new Promise((resolve) => setImmediate(resolve));
    expect(began).toBe(false);
    expect(lock.current).toMatchObject({ kind: 'refresh', operation: 'op-refresh' });
    expect(lock.busyError().message).toContain('vmkeep operations op-refresh --wait');
    release();
    await refresh;
    await stop;
    expect(began).toBe(true);
  });
});

describe('decideCancel', () => {
  it('a rolling refresh stops after the VMs in progress', () => {
    expect(decideCancel(op({ kind: 'rolling-refresh' }), undefined)).toMatchObject({ ok: true });
  });

  it('a refresh only while its own migration runs', () => {
    expect(decideCancel(op(), { operation: ID, kind: 'refresh', step: 'migrating' })).toMatchObject({ ok: true });
    expect(decideCancel(op(), { operation: ID, kind: 'refresh', step: 'powering off' })).toMatchObject({ ok: false, reason: expect.stringContaining('powering off') });
    expect(decideCancel(op(), { operation: ID, kind: 'refresh', step: 'handing over (cpr-transfer)' })).toMatchObject({ ok: false });
    // Another operation's migration on the same VM is not this one's to cancel.
    expect(decideCancel(op(), { operation: 'other', kind: 'refresh', step: 'migrating' })).toMatchObject({ ok: false, reason: expect.stringContaining('not under way yet') });
  });

  it('a stop or a start never; a finished operation has nothing to cancel', () => {
    expect(decideCancel(op({ kind: 'stop' }), undefined)).toMatchObject({ ok: false, reason: expect.stringMatching(/^a stop cannot be cancelled/) });
    expect(decideCancel(op({ kind: 'start' }), undefined)).toMatchObject({ ok: false, reason: expect.stringMatching(/^a start cannot be cancelled/) });
    expect(decideCancel(op({ status: 'succeeded' }), undefined)).toMatchObject({ ok: false, reason: expect.stringContaining('already succeeded') });
  });
});

describe('pruneOperations', () => {
  const hour = 3_600_000;
  const at = (h: number): string => new Date(Date.parse(T0) + h * hour).toISOString();
  const now = Date.parse(T0) + 100 * hour;

  it('forgets finished operations past the age, then the oldest past the count; never an unfinished one', () => {
    const ops = [
      op({ id: 'old', status: 'succeeded', updatedAt: at(1) }),
      op({ id: 'old-running', status: 'running', updatedAt: at(1) }),
      op({ id: 'a', status: 'failed', updatedAt: at(97) }),
      op({ id: 'b', status: 'succeeded', updatedAt: at(98) }),
      op({ id: 'c', status: 'cancelled', updatedAt: at(99) }),
    ];
    expect(pruneOperations(ops, now, { maxAgeMs: 24 * hour, maxCount: 10 })).toEqual(['old']);
    expect(pruneOperations(ops, now, { maxAgeMs: 24 * hour, maxCount: 2 }).sort()).toEqual(['a', 'old']);
  });
});

describe('endedByRestart', () => {
  it('an unfinished operation failed with DAEMON_RESTARTED; a finished one stays as it was', () => {
    expect(endedByRestart(op(), T0)).toMatchObject({ status: 'failed', error: { code: 'DAEMON_RESTARTED' } });
    expect(endedByRestart(op({ status: 'pending' }), T0).status).toBe('failed');
    const done = op({ status: 'succeeded' });
    expect(endedByRestart(done, T0)).toBe(done);
  });
});

describe('parseEventFilter', () => {
  const event = (e: Partial<DaemonEvent>): DaemonEvent => ({ type: 'vm-state', time: T0, ...e });
  const filter = (query: string) => parseEventFilter(new URLSearchParams(query));

  it('type: event types and the "vm" group; vm: the VM or one of an operation\'s VMs', () => {
    const f = filter('type=vm,refresh&vm=web1');
    expect(f(event({ type: 'vm-state', vm: 'web1' }))).toBe(true);
    expect(f(event({ type: 'vm-power', vm: 'web1' }))).toBe(true);
    expect(f(event({ type: 'refresh', vm: 'web1', step: 'done' }))).toBe(true);
    expect(f(event({ type: 'refresh', vm: 'db' }))).toBe(false);
    expect(f(event({ type: 'daemon' }))).toBe(false);
    expect(f(event({ type: 'operation', vms: ['web1'] }))).toBe(false);
    expect(filter('vm=web1')(event({ type: 'operation', vms: ['db', 'web1'] }))).toBe(true);
    expect(filter('')(event({ type: 'daemon' }))).toBe(true);
  });

  it('refuses what names nothing', () => {
    expect(() => filter('type=vms')).toThrow(/unknown event type "vms"; known: vm, vm-state/);
    expect(() => filter('vm=Bad Name')).toThrow(/not a valid VM name/);
    expect(() => filter('type=')).toThrow(/needs a value/);
    expect(() => filter('kind=vm')).toThrow(/unknown query parameter/);
  });
});

describe('the registry (operations.ts) on a real folder', () => {
  let dir: string;
  let events: Array<Omit<DaemonEvent, 'time'>>;
  let errors: string[];
  let clock: number;

  const made: Operations[] = [];
  const registry = (): Operations => remember(new Operations({
    dir,
    emit: (event) => events.push(event),
    toError: (error) => ({ code: (error as DaemonError).code ?? 'INTERNAL', message: (error as Error).message }),
    logError: (_fields, message) => errors.push(message),
    now: () => clock,
    retention: { maxAgeMs: 60_000, maxCount: 3 },
  }));
  const remember = (ops: Operations): Operations => {
    made.push(ops);
    return ops;
  };

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmkeep-ops-'));
    events = [];
    errors = [];
    clock = Date.parse(T0);
  });
  afterEach(async () => {
    // Writes still in flight (an operation left running) must not race the folder's removal.
    for (const ops of made.splice(0)) await ops.flush();
    await rm(dir, { recursive: true, force: true });
  });

  it('a run: running at once, then its result; waiters woken; each change recorded and announced', async () => {
    const ops = registry();
    await ops.load();
    let finish!: (value: string) => void;
    let began!: () => void;
    const begun = ops.begin('start', ['web1'], (context) => {
      began = context.onRunning;
      return new Promise<string>((resolve) => (finish = resolve));
    });
    // Pending while it waits (for the VM's lock), running once it says it began.
    expect(begun).toMatchObject({ kind: 'start', vms: ['web1'], status: 'pending' });
    began();
    expect((await ops.wait(begun.id, 10)).status).toBe('running');
    const waiting = ops.wait(begun.id, 60_000);
    finish('done');
    expect(await waiting).toMatchObject({ status: 'succeeded', result: 'done' });
    await ops.flush();
    const file = JSON.parse(await readFile(join(dir, `${begun.id}.json`), 'utf8'));
    expect(file).toMatchObject({ schema: OPERATION_SCHEMA, operation: { id: begun.id, status: 'succeeded', result: 'done' } });
    expect(events.map((e) => [e.type, e.operation, e.status])).toEqual([
      ['operation', begun.id, 'pending'], ['operation', begun.id, 'running'], ['operation', begun.id, 'succeeded'],
    ]);
  });

  it('a thrown error becomes the failed operation\'s error; unknown ids are NOT_FOUND', async () => {
    const ops = registry();
    await ops.load();
    const begun = ops.begin('stop', ['web1'], async () => {
      throw new DaemonError('STOP_TIMEOUT', 'the guest did not power off');
    });
    expect(await ops.wait(begun.id, 60_000)).toMatchObject({ status: 'failed', error: { code: 'STOP_TIMEOUT', message: 'the guest did not power off' } });
    expect(() => ops.get('nope')).toThrow(expect.objectContaining({ code: 'NOT_FOUND' }));
    expect(() => ops.get('../../etc/passwd')).toThrow(expect.objectContaining({ code: 'NOT_FOUND' }));
  });

  it('cancel: a rolling refresh\'s signal aborts and it ends cancelled; a stop is CONFLICT with the reason', async () => {
    const ops = registry();
    await ops.load();
    let seen: OperationContext | undefined;
    const rolling = ops.begin('rolling-refresh', ['a', 'b'], (context) => {
      seen = context;
      context.onRunning();
      return new Promise((resolve) => context.signal.addEventListener('abort', () => resolve({ results: [] })));
    });
    const stop = ops.begin('stop', ['c'], () => new Promise(() => undefined));
    await Promise.resolve();
    expect(() => ops.cancel(stop.id, undefined)).toThrow(expect.objectContaining({ code: 'CONFLICT', message: expect.stringContaining('a stop cannot be cancelled') }));
    expect(ops.cancel(rolling.id, undefined)).toMatchObject({ status: 'running', cancelRequested: true });
    expect(seen?.signal.aborted).toBe(true);
    expect(await ops.wait(rolling.id, 60_000)).toMatchObject({ status: 'cancelled', error: { code: 'CANCELLED' }, result: { results: [] } });
  });

  it('after a restart: finished ones still listed, a running one failed DAEMON_RESTARTED with where its VMs stand', async () => {
    const first = registry();
    await first.load();
    const done = first.begin('start', ['web1'], async () => 'ok');
    await first.wait(done.id, 60_000);
    const cut = first.begin('refresh', ['web1'], () => new Promise(() => undefined));
    await first.flush();

    // The next daemon reads the same folder; a temp file a crash left is removed.
    await writeFile(join(dir, `.${cut.id}.json.123-0123456789abcdef.tmp`), 'half');
    const second = registry();
    const ended = await second.load();
    expect(ended.map((o) => o.id)).toEqual([cut.id]);
    expect(second.get(done.id)).toMatchObject({ status: 'succeeded', result: 'ok' });
    expect(second.get(cut.id)).toMatchObject({ status: 'failed', error: { code: 'DAEMON_RESTARTED' } });
    second.explainRestart(cut.id, 'after the restart: web1 running on "new"');
    expect(second.get(cut.id).error?.message).toMatch(/while this refresh was running; nothing of it goes on; after the restart: web1 running on "new"$/);
    await second.flush();
    expect((await readdir(dir)).sort()).toEqual([`${cut.id}.json`, `${done.id}.json`].sort());
    expect(JSON.parse(await readFile(join(dir, `${cut.id}.json`), 'utf8')).operation.error.code).toBe('DAEMON_RESTARTED');
  });

  it('retention: finished operations past the age or the count are forgotten, their files removed', async () => {
    const ops = registry();
    await ops.load();
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      clock += 1000;
      const begun = ops.begin('start', [`vm${i}`], async () => i);
      await ops.wait(begun.id, 60_000);
      ids.push(begun.id);
    }
    await ops.flush();
    // Pruned at each end: the last 3 are kept.
    expect(ops.list().map((o) => o.id)).toEqual(ids.slice(2));
    clock += 120_000;
    const last = ops.begin('start', ['late'], async () => 'late');
    await ops.wait(last.id, 60_000);
    await ops.flush();
    expect(ops.list().map((o) => o.id)).toEqual([last.id]);
    expect(await readdir(dir)).toEqual([`${last.id}.json`]);
  });

  it('once closed, an operation that ends writes nothing (the next daemon may own the folder)', async () => {
    const ops = registry();
    await ops.load();
    let finish!: () => void;
    const begun = ops.begin('stop', ['web1'], (context) => {
      context.onRunning();
      return new Promise<void>((resolve) => (finish = resolve));
    });
    await ops.close();
    const before = await readFile(join(dir, `${begun.id}.json`), 'utf8');
    finish();
    expect(await ops.wait(begun.id, 60_000)).toMatchObject({ status: 'succeeded' });
    await ops.flush();
    expect(await readFile(join(dir, `${begun.id}.json`), 'utf8')).toBe(before);
    expect(JSON.parse(before).operation.status).toBe('running');
  });

  it('who began it is recorded and read back; a record from before the field is read as begun by vmkeepd; a wrong one is skipped', async () => {
    const first = registry();
    await first.load();
    const mine = first.begin('start', ['web1'], async () => 'ok', { level: 'operator', uid: 1001 });
    const own = first.begin('rolling-refresh', [], async () => 'ok');
    expect(mine.startedBy).toEqual({ level: 'operator', uid: 1001 });
    expect(own.startedBy).toBeUndefined();
    await first.wait(mine.id, 60_000);
    await first.wait(own.id, 60_000);
    await first.flush();
    expect(JSON.parse(await readFile(join(dir, `${mine.id}.json`), 'utf8')).operation.startedBy).toEqual({ level: 'operator', uid: 1001 });
    // As an older vmkeepd wrote it: no startedBy.
    const older = '33333333-3333-4333-8333-333333333333';
    await writeFile(join(dir, `${older}.json`), JSON.stringify({ schema: OPERATION_SCHEMA, operation: op({ id: older, status: 'succeeded' }) }));
    const forged = '44444444-4444-4444-8444-444444444444';
    for (const startedBy of [{ level: 'root' }, { level: 'operator', uid: -1 }, 'admin']) {
      await writeFile(join(dir, `${forged}.json`), JSON.stringify({ schema: OPERATION_SCHEMA, operation: op({ id: forged, status: 'succeeded', startedBy: startedBy as never }) }));
      const next = registry();
      await next.load();
      expect(next.get(mine.id).startedBy).toEqual({ level: 'operator', uid: 1001 });
      expect(next.get(older)).toMatchObject({ status: 'succeeded' });
      expect(next.get(older).startedBy).toBeUndefined();
      expect(() => next.get(forged)).toThrow(/no operation/);
    }
    expect(errors.filter((e) => e.includes(forged))).toHaveLength(3);
  });

  it('records it cannot read are skipped with a log line, not fatal; a newer schema is not listed', async () => {
    await writeFile(join(dir, `${ID}.json`), JSON.stringify({ schema: OPERATION_SCHEMA + 1, operation: op() }));
    await writeFile(join(dir, '22222222-2222-4222-8222-222222222222.json'), '{ broken');
    const ops = registry();
    expect(await ops.load()).toEqual([]);
    expect(ops.list()).toEqual([]);
    expect(errors).toHaveLength(2);
  });
});
