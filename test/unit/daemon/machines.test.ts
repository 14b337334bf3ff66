// systemd-machined's list kept in line with the records: the pure decisions, and the sync on a
// fake machined (the real one: test/integration/machined.test.ts).
import { describe, expect, it } from 'vitest';
import { machineOf, MachineSync, planMachine } from '../../../daemon/machines.js';
import type { MachinePort } from '../../../daemon/ports.js';
import type { VmRecord } from '../../../daemon/records.js';
import { machineNameProblem } from '../../../launcher/index.js';
import { MACHINE_SERVICE, ScopeError, type MachineToRegister, type RegisteredMachine } from '../../../scope-manager/index.js';

const UUID = '0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';

function record(state: string, pid?: number, name = 'web'): VmRecord {
  return {
    name, uuid: UUID, state,
    ...(pid === undefined ? {} : { process: { pid, startTime: '1', scope: `vmkeep-${name}.scope` } }),
  } as unknown as VmRecord;
}

class FakeMachined implements MachinePort {
  readonly machines = new Map<string, RegisteredMachine>();
  readonly calls: string[] = [];
  absent = false;
  async register(m: MachineToRegister): Promise<void> {
    this.check(`register ${m.name} ${m.leader}`);
    if (this.machines.has(m.name)) throw new ScopeError('DBUS_ERROR', `Machine '${m.name}' already exists`);
    this.machines.set(m.name, { leader: m.leader, service: MACHINE_SERVICE, unit: `vmkeep-${m.name}.scope` });
  }
  async unregister(name: string): Promise<void> {
    this.check(`unregister ${name}`);
    this.machines.delete(name);
  }
  async lookup(name: string): Promise<RegisteredMachine | null> {
    this.check(`lookup ${name}`);
    return this.machines.get(name) ?? null;
  }
  private check(call: string): void {
    this.calls.push(call);
    if (this.absent) throw new ScopeError('NO_MACHINED', 'systemd-machined is not on the system bus');
  }
}

function logger(lines: string[]) {
  const log = (level: string) => (a: unknown, b?: string) => lines.push(`${level} ${typeof a === 'string' ? a : b}`);
  return { trace: log('trace'), debug: log('debug'), info: log('info'), warn: log('warn'), error: log('error'), fatal: log('fatal'), child: () => logger(lines) } as never;
}

describe('machineOf', () => {
  it('lists a running, paused or powered-off QEMU in its scope; none without one; no opinion while unsettled', () => {
    expect(machineOf(record('running', 42))).toEqual({ name: 'web', uuid: UUID, leader: 42 });
    expect(machineOf(record('paused', 42))?.leader).toBe(42);
    expect(machineOf(record('shutdown', 42))?.leader).toBe(42);
    expect(machineOf(record('stopped'))).toBeNull();
    expect(machineOf(record('exited'))).toBeNull();
    expect(machineOf(record('starting', 42))).toBeUndefined();
    expect(machineOf(record('unreachable', 42))).toBeUndefined();
    const unscoped = record('running', 42);
    unscoped.process = { ...unscoped.process!, scope: null };
    expect(machineOf(unscoped)).toBeNull();
  });
});

describe('planMachine', () => {
  const wanted = { name: 'web', uuid: UUID, leader: 42 };
  const ours = (leader: number): RegisteredMachine => ({ leader, service: MACHINE_SERVICE, unit: 'vmkeep-web.scope' });
  it('registers, keeps, replaces (a migration) and unregisters; never touches another service\'s machine', () => {
    expect(planMachine(wanted, null)).toBe('register');
    expect(planMachine(wanted, ours(42))).toBe('keep');
    expect(planMachine(wanted, ours(41))).toBe('replace');
    expect(planMachine(null, ours(41))).toBe('unregister');
    expect(planMachine(null, null)).toBe('keep');
    expect(planMachine(wanted, { leader: 7, service: 'nspawn', unit: 'systemd-nspawn@web.service' })).toBe('foreign');
    expect(planMachine(null, { leader: 7, service: 'nspawn', unit: 'systemd-nspawn@web.service' })).toBe('foreign');
  });
});

describe('machineNameProblem', () => {
  it('accepts host names, refuses what machined refuses', () => {
    for (const ok of ['web', 'web-1', 'a.b', 'x9']) expect(machineNameProblem(ok), ok).toBeUndefined();
    for (const bad of ['web_1', 'web-', 'a.-b', 'a-.b', 'web.']) expect(machineNameProblem(bad), bad).toBeDefined();
  });
});

describe('MachineSync', () => {
  it('follows a VM through start, migration and stop; the latest record wins', async () => {
    const machined = new FakeMachined();
    const sync = new MachineSync(machined, logger([]));
    sync.sync(record('starting', 42));
    sync.sync(record('running', 42));
    await sync.idle();
    expect(machined.machines.get('web')?.leader).toBe(42);
    sync.sync(record('running', 43));
    await sync.idle();
    expect(machined.machines.get('web')?.leader).toBe(43);
    expect(machined.calls.slice(-3)).toEqual(['lookup web', 'unregister web', 'register web 43']);
    sync.sync(record('stopped'));
    await sync.idle();
    expect(machined.machines.has('web')).toBe(false);
  });

  it('says once that machined is absent and never throws; a name machined refuses is said once too', async () => {
    const machined = new FakeMachined();
    machined.absent = true;
    const lines: string[] = [];
    const sync = new MachineSync(machined, logger(lines));
    for (const pid of [1, 2, 3]) {
      sync.sync(record('running', pid));
      await sync.idle();
    }
    sync.sync(record('stopped'));
    await sync.idle();
    expect(lines.filter((l) => l.includes('not on the system bus'))).toHaveLength(1);
    // Not tried again once known to be absent (until the next vmkeepd).
    expect(machined.calls).toEqual(['lookup web']);
    sync.sync(record('running', 5, 'db_1'));
    sync.sync(record('running', 6, 'db_1'));
    await sync.idle();
    expect(lines.filter((l) => l.includes('db_1'))).toHaveLength(1);
  });

  it('a closed sync changes nothing (the next vmkeepd owns the list)', async () => {
    const machined = new FakeMachined();
    const sync = new MachineSync(machined, logger([]));
    sync.close();
    sync.sync(record('running', 42));
    await sync.idle();
    expect(machined.calls).toEqual([]);
  });
});
