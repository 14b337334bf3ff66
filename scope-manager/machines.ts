// Registration of VMs with systemd-machined (org.freedesktop.machine1), so `machinectl list`
// shows them. RegisterMachine with a leader PID files the machine under the unit that process
// is already in (the VM's scope): machined creates no scope of its own and moves nothing.
// UnregisterMachine forgets a machine without touching its processes; TerminateMachine would
// kill them, and is never called (ARCHITECTURE.md, invariant 3).
import { Variant } from 'dbus-next/lib/variant.js';
import type { BusCall } from './bus.js';
import { ScopeError } from './errors.js';

const MACHINED = 'org.freedesktop.machine1';
const MACHINED_PATH = '/org/freedesktop/machine1';
const MANAGER = 'org.freedesktop.machine1.Manager';
const MACHINE = 'org.freedesktop.machine1.Machine';

/** The `service` field of every machine vmkeep registers: how it tells its own from others'. */
export const MACHINE_SERVICE = 'vmkeep';

/**
 * Error names that mean "no machined on this bus": not installed (no activation file), its unit
 * unknown to systemd (the bus asked systemd to start it), or it failed to start.
 */
const ABSENT = new Set([
  'org.freedesktop.DBus.Error.ServiceUnknown',
  'org.freedesktop.DBus.Error.NameHasNoOwner',
  'org.freedesktop.systemd1.NoSuchUnit',
  'org.freedesktop.systemd1.LoadFailed',
  'org.freedesktop.systemd1.UnitMasked',
]);

export interface MachineToRegister {
  /** A valid host name (launcher's isValidMachineName). */
  name: string;
  /** The VM's UUID (8-4-4-4-12 hex): machined's 16-byte machine ID. */
  uuid: string;
  /** The QEMU, as seen in this process's PID namespace; already in its scope. */
  leader: number;
}

export interface RegisteredMachine {
  leader: number;
  service: string;
  unit: string;
}

/** The bus call of ScopeManager: one connection, its timeouts and reconnect. */
export interface BusCaller {
  call(message: BusCall, what: string): Promise<unknown[]>;
}

export class MachineRegistry {
  constructor(private readonly bus: BusCaller) {}

  /** RegisterMachine: class vm, service vmkeep, no root directory, under the leader's unit. */
  async register(machine: MachineToRegister): Promise<void> {
    const id = Buffer.from(machine.uuid.replace(/-/g, ''), 'hex');
    if (id.length !== 16) throw new TypeError(`machine ${machine.name}: ${JSON.stringify(machine.uuid)} is not a UUID`);
    await this.call(manager('RegisterMachine', 'sayssus', [machine.name, id, MACHINE_SERVICE, 'vm', machine.leader, '']), `RegisterMachine ${machine.name}`);
  }

  /** UnregisterMachine (its processes are left alone); a machine machined no longer knows is no error. */
  async unregister(name: string): Promise<void> {
    try {
      await this.call(manager('UnregisterMachine', 's', [name]), `UnregisterMachine ${name}`);
    } catch (err) {
      if (!(err instanceof ScopeError && err.dbusName === 'org.freedesktop.machine1.NoSuchMachine')) throw err;
    }
  }

  /** The machine machined lists under that name, or null when it lists none. */
  async lookup(name: string): Promise<RegisteredMachine | null> {
    let path: string;
    try {
      [path] = (await this.call(manager('GetMachine', 's', [name]), `GetMachine ${name}`)) as [string];
    } catch (err) {
      if (err instanceof ScopeError && err.dbusName === 'org.freedesktop.machine1.NoSuchMachine') return null;
      throw err;
    }
    // One round trip: a daemon start looks up every VM.
    const [all] = (await this.call(
      { destination: MACHINED, path, interface: 'org.freedesktop.DBus.Properties', member: 'GetAll', signature: 's', body: [MACHINE] },
      `GetAll of machine ${name}`,
    )) as [Record<string, unknown>];
    const value = (prop: string): unknown => {
      const v = all?.[prop];
      return v instanceof Variant ? v.value : v;
    };
    return { leader: Number(value('Leader')), service: String(value('Service')), unit: String(value('Unit')) };
  }

  private async call(message: BusCall, what: string): Promise<unknown[]> {
    try {
      return await this.bus.call(message, what);
    } catch (err) {
      if (err instanceof ScopeError && err.dbusName !== undefined && (ABSENT.has(err.dbusName) || err.dbusName.startsWith('org.freedesktop.DBus.Error.Spawn.'))) {
        throw new ScopeError('NO_MACHINED',
          `${what}: systemd-machined is not on the system bus (${err.dbusName}); VMs run as usual but machinectl does not list them. Install systemd-container to have them listed`,
          { cause: err, dbusName: err.dbusName });
      }
      throw err;
    }
  }
}

function manager(member: string, signature: string, body: unknown[]): BusCall {
  return { destination: MACHINED, path: MACHINED_PATH, interface: MANAGER, member, signature, body };
}
