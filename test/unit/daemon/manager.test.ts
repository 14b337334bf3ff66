// The VM manager against a fake QEMU host and an in-memory state folder: start, stop,
// reattach, migration and its failures, and the regressions of the faults found by probing.
import { afterEach, describe, expect, it } from 'vitest';
import { DaemonError, type DaemonEvent, type VmView } from '../../../daemon/index.js';
import { within } from '../qmp/fake-peer.js';
import { openWorld, type World } from './manager-world.js';

let world: World | undefined;
afterEach(async () => {
  await world?.close();
  world = undefined;
});

async function open(options: Parameters<typeof openWorld>[0] = {}): Promise<World> {
  world = await openWorld(options);
  return world;
}

async function failure(promise: Promise<unknown>): Promise<DaemonError> {
  const error = await promise.then(() => undefined, (e: unknown) => e);
  expect(error, 'expected the operation to fail').toBeInstanceOf(DaemonError);
  return error as DaemonError;
}

/** Resolves with the first event the predicate accepts (subscribed before the cause). */
function nextEvent(w: World, predicate: (e: DaemonEvent) => boolean, what: string): Promise<DaemonEvent> {
  return within(new Promise<DaemonEvent>((resolve) => {
    const off = w.manager.subscribe((event) => {
      if (predicate(event)) {
        off();
        resolve(event);
      }
    });
  }), 5_000, what);
}

/** Resolves once `vm` was seen paused and then running again (a paused copy's STOP and RESUME). */
function pausedThenRunning(w: World, vm: string): Promise<unknown> {
  let paused = false;
  return nextEvent(w, (e) => {
    if (e.vm === vm && e.state === 'paused') paused = true;
    return paused && e.vm === vm && e.state === 'running';
  }, `${vm} to be paused for the copy and then running again`);
}

describe('start and stop', () => {
  it('create starts the VM paused in its scope, then running; the record on disk says so', async () => {
    const w = await open();
    const vm = await w.manager.create(w.spec('web'));
    expect(vm).toMatchObject({ name: 'web', state: 'running', installation: 'a', scope: 'vmkeep-web.scope' });
    const [qemu] = w.host.of('web');
    expect(qemu?.status).toBe('running');
    expect(w.host.scopes.get('vmkeep-web.scope')).toBe(qemu?.pid);
    expect(w.fs.names(w.recordsDir)).toEqual(['web']);
    expect(vm.operation).toBeUndefined();
  });

  it('stop powers the guest off by ACPI and quits QEMU; the record keeps the reason', async () => {
    const w = await open();
    await w.manager.create(w.spec('web'));
    const vm = await w.manager.stop('web', { timeoutSec: 5 });
    expect(vm).toMatchObject({ state: 'stopped', lastExit: { reason: 'stopped by request' } });
    expect(w.host.of('web')).toEqual([]);
  });

  it('a guest that ignores ACPI is pressed again, then left running with STOP_TIMEOUT', async () => {
    const w = await open();
    await w.manager.create(w.spec('deaf'));
    const [qemu] = w.host.of('deaf');
    if (!qemu) throw new Error('no QEMU');
    qemu.honoursAcpi = false;
    // 5 s against a repeat every 2 s: a second press is due at 2 s, with 3 s to spare for a
    // loaded machine's late timers (3 s once left only one press).
    const error = await failure(w.manager.stop('deaf', { timeoutSec: 5 }));
    expect(error.code).toBe('STOP_TIMEOUT');
    expect(error.message).toMatch(/pressed [23] time/);
    expect(qemu.alive).toBe(true);
    expect((await w.manager.get('deaf')).state).toBe('running');
  });

  it('a guest still booting acts on a later press: the stop succeeds well within its timeout', async () => {
    const w = await open();
    await w.manager.create(w.spec('booting'));
    const [qemu] = w.host.of('booting');
    if (!qemu) throw new Error('no QEMU');
    qemu.honoursAcpi = false;
    const again = nextEvent(w, (e) => e.type === 'vm-power', 'the second press to be reported');
    const stopping = w.manager.stop('booting', { timeoutSec: 20 });
    await again;
    qemu.honoursAcpi = true;
    expect(await stopping).toMatchObject({ state: 'stopped' });
  });

  it('a SIGSTOPped QEMU: stop answers within its timeout that QEMU did not answer, and leaves it alone', async () => {
    const w = await open();
    await w.manager.create(w.spec('hung'));
    const [qemu] = w.host.of('hung');
    qemu?.sigstop();
    const began = Date.now();
    const error = await failure(w.manager.stop('hung', { timeoutSec: 1 }));
    expect(Date.now() - began).toBeLessThan(3_000);
    expect(error.code).toBe('UNREACHABLE');
    expect(error.message).toMatch(/did not answer the ACPI power-off request/);
    expect(qemu?.alive).toBe(true);
  });

  it('a start QEMU refuses (memory, not a kernel) is a 422, and the create leaves nothing behind', async () => {
    const w = await open();
    w.host.failLaunches = 1;
    const error = await failure(w.manager.create({ ...w.spec('huge'), memoryMiB: 1024 * 1024 }));
    expect(error.code).toBe('SPEC_REJECTED');
    expect(error.message).toMatch(/Nothing was kept/);
    expect(w.fs.names(w.recordsDir)).toEqual([]);
    expect(await w.manager.list()).toEqual([]);
    // The name is free again.
    expect((await w.manager.create(w.spec('huge'))).state).toBe('running');
  });
});

describe('races on one VM', () => {
  it('create racing delete: an acknowledged delete never comes back, a refused one leaves the VM listed and recorded', async () => {
    const w = await open();
    for (let round = 0; round < 50; round++) {
      const name = `r${round}`;
      const created = w.manager.create(w.spec(name), { start: round % 2 === 0 });
      const deleted = new Promise<void>((resolve) => setImmediate(resolve)).then(() => w.manager.delete(name));
      const [c, d] = await Promise.allSettled([created, deleted]);
      expect(c.status).toBe('fulfilled');
      const listed = (await w.manager.list()).some((v) => v.name === name);
      const onDisk = w.fs.names(w.recordsDir).includes(name);
      if (d.status === 'fulfilled') {
        expect(listed || onDisk, `${name}: deleted, yet still listed or on disk`).toBe(false);
      } else {
        expect(['BUSY', 'CONFLICT', 'NOT_FOUND']).toContain((d.reason as DaemonError).code);
        expect(listed).toBe(onDisk);
      }
    }
    const before = w.fs.names(w.recordsDir);
    await w.restart();
    expect((await w.manager.list()).map((v) => v.name)).toEqual(before);
  });

  it('a second refresh of a VM that is being refreshed is refused with what runs and since when', async () => {
    const w = await open();
    await w.manager.create(w.spec('web'));
    w.current = 'b';
    await w.restart();
    const first = w.manager.refresh('web', { strategy: 'migrate' });
    const second = await failure(w.manager.refresh('web', { strategy: 'migrate' }));
    expect(second.code).toBe('BUSY');
    expect(second.message).toMatch(/^busy: refreshing web since \d{4}-/);
    expect((await first).result).toBe('migrated');
  });
});

describe('reattach after a restart', () => {
  it('a running VM is found again with the same QEMU; one killed while away is exited', async () => {
    const w = await open();
    await w.manager.create(w.spec('keep'));
    await w.manager.create(w.spec('gone'));
    const keep = w.host.of('keep')[0];
    await w.manager.close();
    w.host.of('gone')[0]?.die();
    await w.restart();
    expect(await w.manager.get('keep')).toMatchObject({ state: 'running', pid: keep?.pid });
    expect(await w.manager.get('gone')).toMatchObject({ state: 'exited', lastExit: { reason: 'exited while away' } });
  });

  it('a SIGSTOPped QEMU is unreachable at once (no greeting wait), and running again once continued', async () => {
    const w = await open({ retryIntervalMs: 30 });
    await w.manager.create(w.spec('hung'));
    const [qemu] = w.host.of('hung');
    await w.manager.close();
    qemu?.sigstop();
    await w.restart();
    expect((await w.manager.get('hung')).state).toBe('unreachable');
    expect((await w.manager.get('hung')).problem).toMatch(/is stopped/);
    const back = nextEvent(w, (e) => e.vm === 'hung' && e.state === 'running', 'hung to be running again');
    qemu?.sigcont();
    await back;
  });

  it('a record that is a FIFO does not hang the start: it is reported, its name taken, the others served', async () => {
    const w = await open();
    await w.manager.create(w.spec('ok'));
    w.fs.files.set(`${w.recordsDir}/bad.json`, Buffer.from('{"schema": 2, "name": "bad", '));
    await w.restart();
    expect((await w.manager.get('ok')).state).toBe('running');
    expect((await failure(w.manager.get('bad'))).code).toBe('RECORD_CORRUPT');
    expect((await failure(w.manager.create(w.spec('bad')))).code).toBe('EXISTS');
    expect(w.manager.info().damagedRecords).toEqual([expect.objectContaining({ name: 'bad' })]);
  });
});

describe('a full disk', () => {
  it('a stop while the state folder is full: the API says stopped (not yet on disk), and the write follows once there is room', async () => {
    const w = await open({ retryIntervalMs: 30 });
    await w.manager.create(w.spec('web'));
    w.fs.full = true;
    const vm = await w.manager.stop('web', { timeoutSec: 5 });
    expect(vm.state).toBe('stopped');
    expect(vm.problem).toMatch(/not on disk yet.*ENOSPC/);
    expect(w.host.of('web')).toEqual([]);
    // A start is an intent that must be on disk before QEMU runs: refused while the disk is full.
    expect((await failure(w.manager.start('web'))).code).toBe('STATE_IO');
    expect(w.host.of('web')).toEqual([]);
    w.fs.full = false;
    await within((async () => {
      for (;;) {
        const text = w.fs.files.get(`${w.recordsDir}/web.json`)?.toString() ?? '';
        if (text.includes('"stopped"')) return;
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    })(), 5_000, 'the stopped state to reach the disk');
    await w.manager.delete('web');
    expect(w.fs.names(w.recordsDir)).toEqual([]);
  });

  it('a restart while the disk is full reports a QEMU gone while away as exited, not unreachable', async () => {
    const w = await open();
    await w.manager.create(w.spec('web'));
    await w.manager.close();
    w.host.of('web')[0]?.die();
    w.fs.full = true;
    await w.restart();
    const vm = await w.manager.get('web');
    expect(vm.state).toBe('exited');
    expect(vm.problem).toMatch(/not on disk yet/);
  });
});

describe('the monitor', () => {
  it('a reply over the line limit fails only that QMP command; the VM stays supervised', async () => {
    const w = await open();
    await w.manager.create(w.spec('web'));
    const [qemu] = w.host.of('web');
    if (!qemu) throw new Error('no QEMU');
    qemu.hugeReplyBytes = 2 * 1024 * 1024;
    const error = await failure(w.manager.qmp('web', 'human-monitor-command', { 'command-line': 'xp /200000xg 0' }));
    expect(error.code).toBe('QMP_FAILED');
    expect(error.message).toMatch(/was dropped; the connection stays open/);
    qemu.hugeReplyBytes = 0;
    expect(await w.manager.qmp('web', 'query-status')).toMatchObject({ status: 'running' });
    expect((await w.manager.get('web')).state).toBe('running');
  });

  it('a hung QEMU is reported unreachable by the health check and does not slow upgrade-status', async () => {
    const w = await open({ healthIntervalMs: 50 });
    await w.manager.create(w.spec('hung'));
    await w.manager.create(w.spec('fine'));
    const unreachable = nextEvent(w, (e) => e.vm === 'hung' && e.state === 'unreachable', 'hung to be unreachable');
    w.host.of('hung')[0]?.sigstop();
    await unreachable;
    // The health check's unanswered command is a timeout of that VM alone, in the metrics.
    const metrics = await w.manager.metricsText();
    expect(metrics).toMatch(/^vmkeep_qmp_timeouts_total\{vm="hung"\} [1-9]\d*$/m);
    expect(metrics).not.toMatch(/vmkeep_qmp_timeouts_total\{vm="fine"\}/);
    expect(metrics).toMatch(/^vmkeep_qmp_command_duration_seconds_count\{vm="fine"\} [1-9]\d*$/m);
    const began = Date.now();
    const status = await w.manager.upgradeStatus();
    expect(Date.now() - began).toBeLessThan(500);
    expect(status.vms.map((v) => v.name)).toEqual(['fine', 'hung']);
    expect((await w.manager.get('fine')).state).toBe('running');
    const running = nextEvent(w, (e) => e.vm === 'hung' && e.state === 'running', 'hung to answer again');
    w.host.of('hung')[0]?.sigcont();
    await running;
  });
});

describe('refresh by migration', () => {
  async function staleWorld(): Promise<{ w: World; before: VmView }> {
    const w = await open();
    const before = await w.manager.create(w.spec('web'));
    w.current = 'b';
    await w.restart();
    return { w, before };
  }

  it('moves the guest into a new QEMU of the current installation, in a new scope; the old one ends', async () => {
    const { w, before } = await staleWorld();
    const outcome = await w.manager.refresh('web', { strategy: 'migrate' });
    expect(outcome).toMatchObject({ result: 'migrated', from: { installation: 'a', pid: before.pid }, to: { installation: 'b' } });
    const metrics = await w.manager.metricsText();
    expect(metrics).toMatch(/^vmkeep_refreshes_total\{strategy="migrate",outcome="migrated"\} 1$/m);
    expect(metrics).toMatch(/^vmkeep_migration_downtime_seconds_count\{mode="migrate"\} 1$/m);
    expect(metrics).toMatch(/^vmkeep_migration_duration_seconds_count\{mode="migrate"\} 1$/m);
    const after = await w.manager.get('web');
    expect(after).toMatchObject({ state: 'running', installation: 'b' });
    expect(after.pid).not.toBe(before.pid);
    expect(after.scope).toMatch(/^vmkeep-web:[0-9a-f]{8}\.scope$/);
    expect(w.host.of('web').map((q) => q.pid)).toEqual([after.pid]);
    const record = JSON.parse(w.fs.files.get(`${w.recordsDir}/web.json`)?.toString() ?? '{}') as Record<string, unknown>;
    expect(record).not.toHaveProperty('refresh');
    expect(record).not.toHaveProperty('retired');
  });

  it('a destination that cannot start: the source keeps the guest, the record is unchanged but for the problem', async () => {
    const { w, before } = await staleWorld();
    w.host.failLaunches = 1;
    const error = await failure(w.manager.refresh('web', { strategy: 'migrate' }));
    expect(error.code).toBe('REFRESH_FAILED');
    expect(await w.manager.get('web')).toMatchObject({ state: 'running', installation: 'a', pid: before.pid });
    expect(w.host.of('web').map((q) => q.pid)).toEqual([before.pid]);
  });

  it('a migration the source refuses: the destination is removed, the source runs on', async () => {
    const { w, before } = await staleWorld();
    w.host.failMigrations = true;
    // From 7.2 under TCG the copy stopped the guest first: its STOP and RESUME settle after the refresh.
    const resumed = pausedThenRunning(w, 'web');
    const error = await failure(w.manager.refresh('web', { strategy: 'migrate' }));
    expect(error.code).toBe('REFRESH_FAILED');
    expect(error.message).toMatch(/keeps running on its old QEMU/);
    expect(w.host.of('web').map((q) => q.pid)).toEqual([before.pid]);
    await resumed;
    expect((await w.manager.get('web')).state).toBe('running');
  });

  it('migrate-or-reboot: a failed migration falls back to a reboot onto the current installation, and says why', async () => {
    const { w, before } = await staleWorld();
    w.host.failMigrations = true;
    const steps: string[] = [];
    const outcome = await w.manager.refresh('web', { strategy: 'migrate-or-reboot', onStep: (step, message) => steps.push(`${step}: ${message}`) });
    expect(outcome).toMatchObject({ result: 'rebooted', strategy: 'reboot', from: { installation: 'a', pid: before.pid }, to: { installation: 'b' } });
    expect(outcome.reason).toMatch(/^the live migration failed \(live migration of web onto "b" failed: .*keeps running on its old QEMU/);
    expect(steps.join('\n')).toMatch(/powering-off: web: the live migration failed .*; rebooting it instead/);
    const after = await w.manager.get('web');
    expect(after).toMatchObject({ state: 'running', installation: 'b' });
    expect(w.host.of('web').map((q) => q.pid)).toEqual([after.pid]);
  });

  it('migrate-or-reboot: a migration that works needs no reboot', async () => {
    const { w } = await staleWorld();
    const outcome = await w.manager.refresh('web', { strategy: 'migrate-or-reboot' });
    expect(outcome).toMatchObject({ result: 'migrated', strategy: 'migrate' });
    expect(outcome.reason).toMatch(/^the live migration worked, no reboot needed; /);
  });

  it('from QEMU 7.2 under TCG the guest is stopped for the whole copy and resumed on the new QEMU; the outcome and the progress say why', async () => {
    const { w } = await staleWorld();
    const steps: string[] = [];
    const outcome = await w.manager.refresh('web', { strategy: 'migrate', onStep: (step, message) => steps.push(`${step}: ${message}`) });
    expect(outcome.message).toMatch(/^web moved \(paused for the whole copy\) onto "b" .*guest paused \d+ ms \(migrate: it runs QEMU 7\.2\.22 under TCG/);
    expect(outcome.reason).toMatch(/the guest is paused for the whole RAM copy$/);
    expect(steps.join('\n')).toMatch(/migrating: migrating web to pid \d+, paused for the whole copy: it runs QEMU 7\.2\.22 under TCG/);
    const after = await w.manager.get('web');
    expect(after).toMatchObject({ state: 'running', installation: 'b' });
    expect(w.host.of('web').map((q) => q.status)).toEqual(['running']);
  });

  it('under KVM the same move stays live (negative control of the paused copy)', async () => {
    const w = await open();
    await w.manager.create({ ...w.spec('web'), accel: 'kvm' });
    w.current = 'b';
    await w.restart();
    const outcome = await w.manager.refresh('web', { strategy: 'migrate' });
    expect(outcome.message).toMatch(/^web moved live onto "b"/);
    expect(outcome).not.toHaveProperty('reason');
  });

  it('a paused copy that fails resumes the guest on its old QEMU', async () => {
    const { w, before } = await staleWorld();
    w.host.failMigrations = true;
    const resumed = pausedThenRunning(w, 'web');
    const error = await failure(w.manager.refresh('web', { strategy: 'migrate' }));
    expect(error.message).toMatch(/keeps running on its old QEMU/);
    expect(w.host.of('web').map((q) => [q.pid, q.status])).toEqual([[before.pid, 'running']]);
    await resumed;
    expect((await w.manager.get('web')).state).toBe('running');
  });

  it('migrate-or-reboot: a new QEMU that cannot start is no reason to power the guest off', async () => {
    const { w, before } = await staleWorld();
    w.host.failLaunches = 1;
    const error = await failure(w.manager.refresh('web', { strategy: 'migrate-or-reboot' }));
    expect(error.code).toBe('REFRESH_FAILED');
    expect(error.message).toMatch(/keeps running on its old QEMU.*No reboot either: the new QEMU did not start/s);
    expect(await w.manager.get('web')).toMatchObject({ state: 'running', installation: 'a', pid: before.pid });
  });

  it('manual policy reports, on-guest-shutdown arms, and a VM without QEMU is current', async () => {
    const { w } = await staleWorld();
    expect((await w.manager.refresh('web')).result).toBe('reported');
    expect((await w.manager.refresh('web', { strategy: 'on-guest-shutdown' })).result).toBe('armed');
    await w.manager.stop('web', { timeoutSec: 5 });
    expect((await w.manager.refresh('web', { strategy: 'migrate' })).result).toBe('current');
  });
});
