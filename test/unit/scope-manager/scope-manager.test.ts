import { Variant } from 'dbus-next';
import { describe, expect, it } from 'vitest';
import {
  BusCallError,
  ScopeError,
  ScopeManager,
  resolveBusAddress,
  scopeUnitName,
  type BusCall,
  type ScopeManagerOptions,
} from '../../../scope-manager/index.js';
import { FakeBus, NO_SUCH_UNIT, variant } from './fake-bus.js';

const VM1 = 'vmkeep-vm1.scope';

/** A manager over fake buses; every (re)connection makes a new FakeBus, set up by `setup`. */
function harness(options: ScopeManagerOptions & { setup?: (bus: FakeBus) => void; cgroups?: Record<number, string> } = {}) {
  const buses: FakeBus[] = [];
  const cgroups: Record<number, string> = options.cgroups ?? { 42: `0::/vmkeep.slice/${VM1}\n` };
  const manager = new ScopeManager({
    busAddress: 'unix:path=/fake',
    callTimeoutMs: 200,
    existingScopeWaitMs: 100,
    busFactory: () => {
      const bus = new FakeBus();
      options.setup?.(bus);
      buses.push(bus);
      return bus;
    },
    readProcCgroup: async (pid) => {
      const text = cgroups[pid];
      if (text === undefined) throw Object.assign(new Error(`ENOENT: /proc/${pid}/cgroup`), { code: 'ENOENT' });
      return text;
    },
    ...options,
  });
  const bus = (): FakeBus => {
    const last = buses[buses.length - 1];
    if (!last) throw new Error('no connection made yet');
    return last;
  };
  return { manager, buses, bus };
}

async function scopeError(promise: Promise<unknown>): Promise<ScopeError> {
  const err = await promise.then(
    () => new Error('expected a ScopeError, got success'),
    (e: unknown) => e,
  );
  if (!(err instanceof ScopeError)) throw err;
  return err;
}

function propertiesOf(call: BusCall): Record<string, { signature: string; value: unknown }> {
  const props = call.body?.[2] as Array<[string, Variant]>;
  return Object.fromEntries(props.map(([k, v]) => [k, { signature: v.signature, value: v.value }]));
}

describe('scopeUnitName and bus address', () => {
  it('names the scope of a VM', () => {
    expect(scopeUnitName('web-1')).toBe('vmkeep-web-1.scope');
  });

  it('takes the option, else DBUS_SYSTEM_BUS_ADDRESS, else the standard system bus', () => {
    expect(resolveBusAddress('unix:path=/x', { DBUS_SYSTEM_BUS_ADDRESS: 'unix:path=/y' })).toBe('unix:path=/x');
    expect(resolveBusAddress(undefined, { DBUS_SYSTEM_BUS_ADDRESS: 'unix:path=/y' })).toBe('unix:path=/y');
    expect(resolveBusAddress(undefined, {})).toBe('unix:path=/run/dbus/system_bus_socket');
  });
});

describe('createScope', () => {
  it('starts a transient scope with the PIDs and waits for its job, then checks /proc', async () => {
    const { manager, bus } = harness();
    const created = await manager.createScope({ name: VM1, pids: [42], description: 'VM vm1' });
    expect(created).toEqual({ name: VM1, slice: 'vmkeep.slice', pids: [42], cgroupPath: `/vmkeep.slice/${VM1}` });

    const [start] = bus().callsOf('StartTransientUnit');
    expect(start).toMatchObject({ destination: 'org.freedesktop.systemd1', signature: 'ssa(sv)a(sa(sv))' });
    expect(start!.body?.slice(0, 2)).toEqual([VM1, 'fail']);
    expect(start!.body?.[3]).toEqual([]);
    expect(propertiesOf(start!)).toEqual({
      Description: { signature: 's', value: 'VM vm1' },
      PIDs: { signature: 'au', value: [42] },
      Slice: { signature: 's', value: 'vmkeep.slice' },
      CollectMode: { signature: 's', value: 'inactive-or-failed' },
      SendSIGKILL: { signature: 'b', value: false },
    });
  });

  it('adds one match rule and subscribes once per connection, however many calls', async () => {
    const { manager, bus, buses } = harness({ cgroups: { 42: `0::/vmkeep.slice/${VM1}`, 43: '0::/vmkeep.slice/vmkeep-vm2.scope' } });
    await Promise.all([manager.createScope({ name: VM1, pids: [42] }), manager.createScope({ name: 'vmkeep-vm2.scope', pids: [43] })]);
    await manager.listScopes().catch(() => undefined);
    expect(buses).toHaveLength(1);
    expect(bus().callsOf('AddMatch').map((c) => c.body)).toEqual([
      ["type='signal',sender='org.freedesktop.systemd1',path='/org/freedesktop/systemd1',interface='org.freedesktop.systemd1.Manager'"],
    ]);
    expect(bus().callsOf('Subscribe')).toHaveLength(1);
    // Subscribed before the first job was asked for.
    expect(bus().calls.findIndex((c) => c.member === 'Subscribe')).toBeLessThan(bus().calls.findIndex((c) => c.member === 'StartTransientUnit'));
  });

  it('matches a JobRemoved that arrives before the method reply', async () => {
    const { manager } = harness({
      setup: (bus) => {
        bus.handlers['StartTransientUnit'] = (call, b) => {
          const job = b.nextJob();
          b.emitJobRemoved(job, VM1, 'done');
          return [job];
        };
      },
    });
    await expect(manager.createScope({ name: VM1, pids: [42] })).resolves.toMatchObject({ name: VM1 });
  });

  it('ignores JobRemoved of other jobs and other interfaces', async () => {
    const { manager } = harness({
      setup: (bus) => {
        bus.handlers['StartTransientUnit'] = (_call, b) => {
          const job = b.nextJob();
          b.emitJobRemoved('/org/freedesktop/systemd1/job/999', VM1, 'failed');
          setImmediate(() => {
            b.emit('JobRemoved', [1, job, VM1, 'failed'], '/org/freedesktop/systemd1', 'org.example.Other');
            b.emitJobRemoved(job, VM1, 'done');
          });
          return [job];
        };
      },
    });
    await expect(manager.createScope({ name: VM1, pids: [42] })).resolves.toMatchObject({ name: VM1 });
  });

  it.each(['failed', 'canceled', 'dependency', 'timeout'])('fails with JOB_FAILED when the job result is %s', async (result) => {
    const { manager } = harness({
      setup: (bus) => {
        bus.handlers['StartTransientUnit'] = (_call, b) => {
          const job = b.nextJob();
          setImmediate(() => b.emitJobRemoved(job, VM1, result));
          return [job];
        };
      },
    });
    const err = await scopeError(manager.createScope({ name: VM1, pids: [42] }));
    expect(err.code).toBe('JOB_FAILED');
    expect(err.message).toContain(`"${result}"`);
  });

  it('fails with PID_NOT_MOVED when /proc shows the process elsewhere', async () => {
    const { manager } = harness({ cgroups: { 42: '12:name=systemd:/\n0::/system.slice/vmkeepd.service\n' } });
    const err = await scopeError(manager.createScope({ name: VM1, pids: [42] }));
    expect(err.code).toBe('PID_NOT_MOVED');
    expect(err.message).toContain('/system.slice/vmkeepd.service');
  });

  it('fails with NO_SUCH_PID when the process is gone by the time of the check', async () => {
    const { manager } = harness({ cgroups: {} });
    expect((await scopeError(manager.createScope({ name: VM1, pids: [42] }))).code).toBe('NO_SUCH_PID');
  });

  it.each([
    'org.freedesktop.systemd1.NoSuchProcess',
    'org.freedesktop.DBus.Error.UnixProcessIdUnknown',
  ])('maps systemd refusing the PID (%s) to NO_SUCH_PID and keeps the D-Bus name', async (errorName) => {
    const { manager } = harness({
      setup: (bus) => {
        bus.handlers['StartTransientUnit'] = () => {
          throw new BusCallError(errorName, 'Process with ID 42 does not exist.');
        };
      },
    });
    const err = await scopeError(manager.createScope({ name: VM1, pids: [42] }));
    expect(err).toMatchObject({ code: 'NO_SUCH_PID', dbusName: errorName });
    expect(err.message).toContain(errorName);
    expect(err.cause).toBeInstanceOf(BusCallError);
  });

  it('refuses PID 0 and negative PIDs without asking systemd', async () => {
    const { manager, buses } = harness();
    expect((await scopeError(manager.createScope({ name: VM1, pids: [0] }))).code).toBe('NO_SUCH_PID');
    expect(buses).toHaveLength(0);
  });

  it('waits for an existing unit of the same name to go, then creates the scope', async () => {
    let loaded = true;
    const { manager, bus } = harness({
      setup: (b) => {
        b.handlers['GetUnit'] = (call) => {
          if (!loaded) throw NO_SUCH_UNIT(VM1);
          return [`/org/freedesktop/systemd1/unit/${String(call.body?.[0])}`];
        };
      },
    });
    const creating = manager.createScope({ name: VM1, pids: [42], existingScopeWaitMs: 5_000 });
    await waitUntil(() => bus().callsOf('GetUnit').length === 1);
    expect(bus().callsOf('StartTransientUnit')).toHaveLength(0);
    loaded = false;
    bus().emitUnitRemoved(VM1);
    await expect(creating).resolves.toMatchObject({ name: VM1 });
    expect(bus().callsOf('GetUnit')).toHaveLength(2);
  });

  it('fails with SCOPE_EXISTS when the old unit does not go in time', async () => {
    const { manager, bus } = harness({
      setup: (b) => {
        b.handlers['GetUnit'] = () => ['/org/freedesktop/systemd1/unit/vmkeep_2dvm1_2escope'];
        b.handlers['Get'] = (call) => [variant('s', call.body?.[1] === 'ActiveState' ? 'active' : 'x')];
        b.handlers['GetUnitProcesses'] = () => [[['/vmkeep.slice/vmkeep-vm1.scope', 7, 'qemu']]];
      },
    });
    const err = await scopeError(manager.createScope({ name: VM1, pids: [42], existingScopeWaitMs: 30 }));
    expect(err.code).toBe('SCOPE_EXISTS');
    expect(err.message).toMatch(/still exists after 30 ms \(active\/x, PIDs 7\)/);
    expect(bus().callsOf('StartTransientUnit')).toHaveLength(0);
  });

  it('maps UnitExists from StartTransientUnit (a race with another creator) to SCOPE_EXISTS', async () => {
    const { manager } = harness({
      setup: (b) => {
        b.handlers['StartTransientUnit'] = () => {
          throw new BusCallError('org.freedesktop.systemd1.UnitExists', `Unit ${VM1} was already loaded or has a fragment file.`);
        };
      },
    });
    expect(await scopeError(manager.createScope({ name: VM1, pids: [42] }))).toMatchObject({ code: 'SCOPE_EXISTS' });
  });
});

describe('timeouts and a closing bus', () => {
  it('fails with CALL_TIMEOUT when systemd does not answer', async () => {
    const { manager } = harness({
      callTimeoutMs: 50,
      setup: (b) => {
        b.handlers['StartTransientUnit'] = () => new Promise(() => undefined);
      },
    });
    const err = await scopeError(manager.createScope({ name: VM1, pids: [42] }));
    expect(err.code).toBe('CALL_TIMEOUT');
    expect(err.message).toMatch(/StartTransientUnit vmkeep-vm1\.scope: no answer .* within 50 ms/);
  });

  it('fails with CALL_TIMEOUT when the job never finishes', async () => {
    const { manager } = harness({
      callTimeoutMs: 50,
      setup: (b) => {
        b.handlers['StartTransientUnit'] = (_c, bus) => [bus.nextJob()];
      },
    });
    const err = await scopeError(manager.createScope({ name: VM1, pids: [42] }));
    expect(err.code).toBe('CALL_TIMEOUT');
    expect(err.message).toMatch(/did not finish within 50 ms/);
  });

  it('fails with BUS_CLOSED when the bus closes mid-call, and reconnects on the next call', async () => {
    const { manager, buses, bus } = harness({
      setup: (b) => {
        if (buses.length === 0) b.handlers['StartTransientUnit'] = () => new Promise(() => undefined);
        b.handlers['ListUnitsByPatterns'] = () => [[[VM1, 'desc', 'loaded', 'active', 'running', '', '/x', 0, '', '/']]];
      },
    });
    const creating = manager.createScope({ name: VM1, pids: [42] });
    await waitUntil(() => buses.length === 1 && bus().callsOf('StartTransientUnit').length === 1);
    bus().closeFromPeer();
    const err = await scopeError(creating);
    expect(err.code).toBe('BUS_CLOSED');

    expect(await manager.listScopes()).toEqual([{ name: VM1, description: 'desc', activeState: 'active', subState: 'running' }]);
    expect(buses).toHaveLength(2);
    expect(buses[1]!.callsOf('AddMatch')).toHaveLength(1);
    expect(buses[1]!.callsOf('Subscribe')).toHaveLength(1);
  });

  it('fails with BUS_CLOSED when the bus closes while a job is awaited', async () => {
    const { manager, bus } = harness({
      setup: (b) => {
        b.handlers['StopUnit'] = (_c, x) => {
          setImmediate(() => x.closeFromPeer());
          return [x.nextJob()];
        };
      },
    });
    expect((await scopeError(manager.stopScope(VM1))).code).toBe('BUS_CLOSED');
    expect(bus().closedByClient).toBe(false);
  });

  it('close() fails pending calls with BUS_CLOSED', async () => {
    const { manager, bus } = harness({
      setup: (b) => {
        b.handlers['KillUnit'] = () => new Promise(() => undefined);
      },
    });
    const killing = manager.killScope(VM1, 'SIGTERM');
    await waitUntil(() => bus().callsOf('KillUnit').length === 1);
    manager.close();
    expect((await scopeError(killing)).code).toBe('BUS_CLOSED');
  });
});

describe('no systemd', () => {
  it('says NO_SYSTEMD, with the alternatives, when the bus cannot be reached', async () => {
    const manager = new ScopeManager({
      busAddress: 'unix:path=/nonexistent',
      busFactory: () => new FakeBus(Object.assign(new Error('connect ENOENT /nonexistent'), { code: 'ENOENT' })),
    });
    const err = await scopeError(manager.listScopes());
    expect(err.code).toBe('NO_SYSTEMD');
    expect(err.message).toMatch(/no systemd on the system bus at unix:path=\/nonexistent: cannot connect \(connect ENOENT/);
    expect(err.message).toMatch(/DBUS_SYSTEM_BUS_ADDRESS/);
    expect(err.message).toMatch(/--no-scope/);
  });

  it('says NO_SYSTEMD when the address is unusable', async () => {
    const manager = new ScopeManager({
      busAddress: 'garbage',
      busFactory: () => {
        throw new TypeError("Cannot read properties of undefined (reading 'split')");
      },
    });
    expect((await scopeError(manager.listScopes())).code).toBe('NO_SYSTEMD');
  });

  it.each(['org.freedesktop.DBus.Error.ServiceUnknown', 'org.freedesktop.DBus.Error.Spawn.ChildExited'])(
    'says NO_SYSTEMD when the bus has no systemd on it (%s)',
    async (errorName) => {
      const { manager } = harness({
        setup: (b) => {
          b.handlers['Subscribe'] = () => {
            throw new BusCallError(errorName, 'The name org.freedesktop.systemd1 was not provided by any .service files');
          };
        },
      });
      expect(await scopeError(manager.listScopes())).toMatchObject({ code: 'NO_SYSTEMD', dbusName: errorName });
    },
  );
});

describe('inspecting and stopping scopes', () => {
  function withUnit(b: FakeBus): void {
    b.handlers['GetUnit'] = (call) => {
      if (call.body?.[0] !== VM1) throw NO_SUCH_UNIT(String(call.body?.[0]));
      return ['/org/freedesktop/systemd1/unit/vmkeep_2dvm1_2escope'];
    };
    const props: Record<string, string> = {
      ActiveState: 'active',
      SubState: 'running',
      ControlGroup: `/vmkeep.slice/${VM1}`,
      Slice: 'vmkeep.slice',
    };
    b.handlers['Get'] = (call) => [variant('s', props[String(call.body?.[1])])];
    b.handlers['GetUnitProcesses'] = () => [
      [
        [`/vmkeep.slice/${VM1}`, 42, 'qemu-system-x86_64'],
        [`/vmkeep.slice/${VM1}`, 7, 'helper'],
        [`/vmkeep.slice/${VM1}`, 42, 'qemu-system-x86_64 (thread)'],
      ],
    ];
  }

  it('getScope reports state, PIDs, cgroup and slice', async () => {
    const { manager } = harness({ setup: withUnit });
    expect(await manager.getScope(VM1)).toEqual({
      name: VM1,
      activeState: 'active',
      subState: 'running',
      pids: [7, 42],
      controlGroup: `/vmkeep.slice/${VM1}`,
      slice: 'vmkeep.slice',
    });
    expect(await manager.getScope('vmkeep-other.scope')).toBeNull();
  });

  it('getScope is null when the unit vanishes between calls', async () => {
    const { manager } = harness({
      setup: (b) => {
        withUnit(b);
        b.handlers['Get'] = () => {
          throw new BusCallError('org.freedesktop.DBus.Error.UnknownObject', 'Unknown object');
        };
      },
    });
    expect(await manager.getScope(VM1)).toBeNull();
  });

  it('listScopes asks for the prefix pattern and keeps only matching scopes, sorted', async () => {
    const { manager, bus } = harness({
      setup: (b) => {
        b.handlers['ListUnitsByPatterns'] = () => [
          [
            ['vmkeep-b.scope', 'B', 'loaded', 'failed', 'failed', '', '/b', 0, '', '/'],
            ['vmkeep-a.scope', 'A', 'loaded', 'active', 'running', '', '/a', 0, '', '/'],
          ],
        ];
      },
    });
    expect(await manager.listScopes()).toEqual([
      { name: 'vmkeep-a.scope', description: 'A', activeState: 'active', subState: 'running' },
      { name: 'vmkeep-b.scope', description: 'B', activeState: 'failed', subState: 'failed' },
    ]);
    expect(bus().callsOf('ListUnitsByPatterns')[0]!.body).toEqual([[], ['vmkeep-*.scope']]);
    await expect(manager.listScopes('bad*prefix')).rejects.toThrow(TypeError);
  });

  it('scopeOfPid names the unit, or null when systemd knows none', async () => {
    const { manager } = harness({
      setup: (b) => {
        b.handlers['GetUnitByPID'] = (call) => {
          if (call.body?.[0] === 42) return ['/org/freedesktop/systemd1/unit/vmkeep_2dvm1_2escope'];
          throw new BusCallError('org.freedesktop.systemd1.NoUnitForPID', 'PID 5 does not belong to any loaded unit.');
        };
        b.handlers['Get'] = () => [variant('s', VM1)];
      },
    });
    expect(await manager.scopeOfPid(42)).toBe(VM1);
    expect(await manager.scopeOfPid(5)).toBeNull();
  });

  it('scopeOfPid reads the unit from /proc/PID/cgroup, and asks systemd only when the cgroup names none', async () => {
    const asked: unknown[] = [];
    const { manager } = harness({
      cgroups: { 42: `0::/vmkeep.slice/${VM1}\n`, 7: '0::/vmkeep.slice/vmkeep-vm2.scope/inner\n', 8: '1:name=systemd:/system.slice/x.service\n0::/\n' },
      setup: (b) => {
        b.handlers['GetUnitByPID'] = (call) => {
          asked.push(call.body?.[0]);
          return ['/org/freedesktop/systemd1/unit/vmkeep_2dvm2_2escope'];
        };
        b.handlers['Get'] = () => [variant('s', 'vmkeep-vm2.scope')];
      },
    });
    expect(await manager.scopeOfPid(42)).toBe(VM1);
    expect(await manager.scopeOfPid(8)).toBe('x.service');
    expect(await manager.scopeOfPid(9)).toBeNull();
    expect(asked).toEqual([]);
    expect(await manager.scopeOfPid(7)).toBe('vmkeep-vm2.scope');
    expect(asked).toEqual([7]);
  });

  it('stopScope waits for the stop job; NO_SUCH_SCOPE when there is no such unit', async () => {
    const { manager, bus } = harness({
      setup: (b) => {
        b.handlers['StopUnit'] = (call, x) => {
          if (call.body?.[0] !== VM1) throw NO_SUCH_UNIT(String(call.body?.[0]));
          const job = x.nextJob();
          setImmediate(() => x.emitJobRemoved(job, VM1, 'done'));
          return [job];
        };
      },
    });
    await manager.stopScope(VM1);
    expect(bus().callsOf('StopUnit')[0]!.body).toEqual([VM1, 'replace']);
    expect(await scopeError(manager.stopScope('vmkeep-gone.scope'))).toMatchObject({
      code: 'NO_SUCH_SCOPE',
      dbusName: 'org.freedesktop.systemd1.NoSuchUnit',
    });
  });

  it('killScope sends the signal number to all processes of the unit', async () => {
    const { manager, bus } = harness({ setup: (b) => (b.handlers['KillUnit'] = () => []) });
    await manager.killScope(VM1, 'SIGKILL');
    await manager.killScope(VM1, 15);
    expect(bus().callsOf('KillUnit').map((c) => c.body)).toEqual([
      [VM1, 'all', 9],
      [VM1, 'all', 15],
    ]);
  });

  it('waitScopeGone resolves false at the deadline and true once UnitRemoved came', async () => {
    let loaded = true;
    const { manager, bus } = harness({
      setup: (b) => {
        b.handlers['GetUnit'] = () => {
          if (!loaded) throw NO_SUCH_UNIT(VM1);
          return ['/u'];
        };
      },
    });
    expect(await manager.waitScopeGone(VM1, 20)).toBe(false);
    const waiting = manager.waitScopeGone(VM1, 5_000);
    await waitUntil(() => bus().callsOf('GetUnit').length === 2);
    bus().emitUnitRemoved('vmkeep-unrelated.scope');
    loaded = false;
    bus().emitUnitRemoved(VM1);
    expect(await waiting).toBe(true);
  });

  it('rejects unit names that are not scopes', async () => {
    const { manager } = harness();
    await expect(manager.getScope('vmkeepd.service')).rejects.toThrow(TypeError);
    await expect(manager.createScope({ name: VM1, pids: [42], slice: 'nope' })).rejects.toThrow(TypeError);
    await expect(manager.createScope({ name: VM1, pids: [42], properties: { PIDs: { signature: 'au', value: [1] } } })).rejects.toThrow(
      TypeError,
    );
  });
});

async function waitUntil(condition: () => boolean, timeoutMs = 2_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((r) => setImmediate(r));
  }
}

describe('a vmkeepd outside systemd\'s PID namespace (a container without --pid=host)', () => {
  /** A bus that knows our unique name and reports `pid` as the PID of our connection. */
  const seenAs = (pid: number) => (bus: FakeBus): void => {
    bus.uniqueName = () => ':1.7';
    bus.handlers.GetConnectionUnixProcessID = (call) => {
      expect(call.body).toEqual([':1.7']);
      return [pid];
    };
  };

  it('refuses to create a scope, naming --pid=host, and never calls StartTransientUnit', async () => {
    const { manager, bus } = harness({ setup: seenAs(process.pid + 1000) });
    const err = await scopeError(manager.createScope({ name: VM1, pids: [42] }));
    expect(err.code).toBe('PID_NAMESPACE');
    expect(err.message).toContain('--pid=host');
    expect(err.message).toContain(`PID ${process.pid} to itself but PID ${process.pid + 1000}`);
    expect(bus().calls.map((c) => c.member)).not.toContain('StartTransientUnit');
    // Asked again, refused again: a wrong namespace does not go away.
    expect((await scopeError(manager.checkPidNamespace())).code).toBe('PID_NAMESPACE');
  });

  it('creates the scope when the bus sees our own PID, and asks only once', async () => {
    const { manager, bus } = harness({ setup: seenAs(process.pid) });
    await manager.createScope({ name: VM1, pids: [42] });
    await manager.createScope({ name: VM1, pids: [42] });
    expect(bus().calls.filter((c) => c.member === 'GetConnectionUnixProcessID')).toHaveLength(1);
  });

  it('names the flag when StartTransientUnit does not know the PID', async () => {
    const { manager } = harness({
      setup: (bus) => {
        bus.handlers.StartTransientUnit = () => {
          throw new BusCallError('org.freedesktop.DBus.Error.UnixProcessIdUnknown', 'PID 42 does not exist');
        };
      },
    });
    const err = await scopeError(manager.createScope({ name: VM1, pids: [42] }));
    expect(err.code).toBe('NO_SUCH_PID');
    expect(err.message).toContain('--pid=host');
  });
});
