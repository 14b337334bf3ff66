// Transient systemd scopes over the org.freedesktop.systemd1 D-Bus API.
//
// Wrapped around dbus-next's gaps: one match rule and one Subscribe() per connection, our own
// timeout on every call and job, every pending call and job failed with BUS_CLOSED when the
// connection goes, and a fresh connection on the next call.
import { readFile } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { Variant } from 'dbus-next/lib/variant.js';
import { BusCallError, dbusNextBus, type BusCall, type BusConnection, type BusFactory, type BusSignal } from './bus.js';
import { cgroupIsScope, systemdCgroupPath, unitOfCgroupPath } from './cgroup.js';
import { ScopeError, type ScopeErrorCode } from './errors.js';

const SYSTEMD = 'org.freedesktop.systemd1';
const SYSTEMD_PATH = '/org/freedesktop/systemd1';
const MANAGER = 'org.freedesktop.systemd1.Manager';
const DEFAULT_SYSTEM_BUS = 'unix:path=/run/dbus/system_bus_socket';
const MATCH_RULE = `type='signal',sender='${SYSTEMD}',path='${SYSTEMD_PATH}',interface='${MANAGER}'`;

export const DEFAULT_SLICE = 'vmkeep.slice';
export const SCOPE_PREFIX = 'vmkeep-';

/** The scope of a VM: `vmkeep-<name>.scope`. */
export function scopeUnitName(vmName: string): string {
  return `${SCOPE_PREFIX}${vmName}.scope`;
}

/** The busAddress option, else DBUS_SYSTEM_BUS_ADDRESS, else the standard system bus socket. */
export function resolveBusAddress(option: string | undefined, env: NodeJS.ProcessEnv): string {
  if (option) return option;
  const fromEnv = env['DBUS_SYSTEM_BUS_ADDRESS'];
  return fromEnv ? fromEnv : DEFAULT_SYSTEM_BUS;
}

export interface ScopeManagerOptions {
  /** D-Bus address of the system bus; default DBUS_SYSTEM_BUS_ADDRESS or the standard socket. */
  busAddress?: string;
  /** Opens the bus connection; default dbus-next. Tests pass a fake. */
  busFactory?: BusFactory;
  /** Limit for each D-Bus call and for the start job of a scope; default 10 s. */
  callTimeoutMs?: number;
  /** How long createScope waits for an old unit of the same name to go; default 5 s. */
  existingScopeWaitMs?: number;
  /** Reads /proc/PID/cgroup (rejecting with code ENOENT for a gone process). */
  readProcCgroup?: (pid: number) => Promise<string>;
}

/** An extra transient-unit property, e.g. { TimeoutStopUSec: { signature: 't', value: 30_000_000n } }. */
export interface ScopeProperty {
  signature: string;
  value: unknown;
}

export interface CreateScopeOptions {
  /** Unit name, e.g. scopeUnitName('vm1'). */
  name: string;
  /** Processes to move, as seen in this process's pid namespace. */
  pids: number[];
  /** Default vmkeep.slice. */
  slice?: string;
  description?: string;
  /** Appended after ours; may not set PIDs or Slice. */
  properties?: Record<string, ScopeProperty>;
  /** Overrides existingScopeWaitMs for this call. */
  existingScopeWaitMs?: number;
}

export interface CreatedScope {
  name: string;
  slice: string;
  pids: number[];
  /** The cgroup each PID was verified in. */
  cgroupPath: string;
}

export interface ScopeInfo {
  name: string;
  activeState: string;
  subState: string;
  pids: number[];
  controlGroup: string;
  slice: string;
}

export interface ScopeSummary {
  name: string;
  description: string;
  activeState: string;
  subState: string;
}

interface JobOutcome {
  unit: string;
  result: string;
}

/** One connection and everything that dies with it. */
interface Link {
  conn: BusConnection;
  closed: boolean;
  pending: Set<(err: ScopeError) => void>;
  jobWaiters: Map<string, (outcome: JobOutcome) => void>;
  /** JobRemoved signals seen while a job-creating call awaits its reply (the signal may come first). */
  earlyJobs: Map<string, JobOutcome>;
  jobCallsInFlight: number;
}

const defaultReadProcCgroup = (pid: number): Promise<string> => readFile(`/proc/${pid}/cgroup`, 'utf8');

export class ScopeManager {
  readonly busAddress: string;
  private readonly factory: BusFactory;
  private readonly callTimeoutMs: number;
  private readonly existingScopeWaitMs: number;
  private readonly readProcCgroup: (pid: number) => Promise<string>;
  private link: Link | null = null;
  private connecting: Promise<Link> | null = null;
  private readonly unitRemovedListeners = new Set<(unit: string | null) => void>();
  private pidNamespaceChecked = false;

  constructor(options: ScopeManagerOptions = {}) {
    this.busAddress = resolveBusAddress(options.busAddress, process.env);
    this.factory = options.busFactory ?? dbusNextBus;
    this.callTimeoutMs = options.callTimeoutMs ?? 10_000;
    this.existingScopeWaitMs = options.existingScopeWaitMs ?? 5_000;
    this.readProcCgroup = options.readProcCgroup ?? defaultReadProcCgroup;
  }

  /**
   * Creates `name` in its slice with the given processes and verifies, in /proc, that they moved.
   *
   * Properties: CollectMode=inactive-or-failed, so a scope whose QEMU crashed does not linger and
   * block its name (a failed scope that still has processes is kept: systemd never collects a
   * populated cgroup). SendSIGKILL=no, so stopping the scope (a forced stop, an operator's
   * `systemctl stop`) sends SIGTERM only and does not escalate to SIGKILL after TimeoutStopSec:
   * a QEMU that does not exit stays running in a `failed` scope, to be reported (ARCHITECTURE.md,
   * invariant 3). Only an explicit killScope(name, 'SIGKILL') kills hard (and, at host power-off, systemd's
   * final kill of all remaining processes). No AddRef: nothing of the scope may depend on the
   * daemon's bus connection (ARCHITECTURE.md, invariant 2).
   */
  async createScope(options: CreateScopeOptions): Promise<CreatedScope> {
    const { name, pids } = options;
    const slice = options.slice ?? DEFAULT_SLICE;
    checkUnitName(name, '.scope');
    checkUnitName(slice, '.slice');
    if (pids.length === 0) throw new TypeError('createScope needs at least one PID');
    for (const pid of pids) {
      if (!Number.isSafeInteger(pid) || pid <= 0) {
        // PID 0 would mean "the caller" to systemd; a caller outside systemd's pid namespace crashes systemd 252.
        throw new ScopeError('NO_SUCH_PID', `${pid} is not a process ID; createScope needs the PIDs of running processes`);
      }
    }
    const extra = Object.entries(options.properties ?? {});
    for (const [key] of extra) {
      if (key === 'PIDs' || key === 'Slice') throw new TypeError(`createScope sets ${key} itself; pass it as an option`);
    }

    await this.checkPidNamespace();

    const waitMs = options.existingScopeWaitMs ?? this.existingScopeWaitMs;
    if (!(await this.waitScopeGone(name, waitMs))) {
      const old = await this.getScope(name).catch(() => null);
      throw new ScopeError(
        'SCOPE_EXISTS',
        `systemd unit ${name} still exists after ${waitMs} ms (${old ? `${old.activeState}/${old.subState}, PIDs ${old.pids.join(' ') || 'none'}` : 'state unknown'}); ` +
          `a new scope cannot take its name until it is gone. Stop it (systemctl stop ${name}) or find out what still runs in it.`,
      );
    }

    const properties: Array<[string, Variant]> = [
      ['Description', new Variant('s', options.description ?? `vmkeep ${name}`)],
      ['PIDs', new Variant('au', pids)],
      ['Slice', new Variant('s', slice)],
      ['CollectMode', new Variant('s', 'inactive-or-failed')],
      ['SendSIGKILL', new Variant('b', false)],
      ...extra.map(([key, p]): [string, Variant] => [key, new Variant(p.signature, p.value)]),
    ];
    const outcome = await this.runJob(
      managerCall('StartTransientUnit', 'ssa(sv)a(sa(sv))', [name, 'fail', properties, []]),
      `StartTransientUnit ${name}`,
      this.callTimeoutMs,
    ).catch((err: unknown) => {
      if (err instanceof ScopeError && err.dbusName === 'org.freedesktop.DBus.Error.UnixProcessIdUnknown') {
        throw new ScopeError('NO_SUCH_PID',
          `${err.message}. systemd does not know PID ${pids.join(' ')}: the process ended, or this process runs in a PID namespace other than systemd's (a container run without --pid=host)`,
          { cause: err.cause, dbusName: err.dbusName });
      }
      throw err;
    });
    if (outcome.result !== 'done') {
      throw new ScopeError(
        'JOB_FAILED',
        `systemd's start job for ${name} ended with result "${outcome.result}" instead of "done"; the processes were not put in the scope. ` +
          `systemctl status ${name} (or the journal) says why.`,
      );
    }

    let cgroupPath = '';
    for (const pid of pids) {
      let text: string;
      try {
        text = await this.readProcCgroup(pid);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
          throw new ScopeError('NO_SUCH_PID', `process ${pid} exited while scope ${name} was being created`, { cause: err });
        }
        throw err;
      }
      const path = systemdCgroupPath(text);
      if (path === null || !cgroupIsScope(path, slice, name)) {
        throw new ScopeError(
          'PID_NOT_MOVED',
          `systemd reported scope ${name} started, but process ${pid} is in cgroup ${path ?? '(none)'}, not .../${slice}/${name}. ` +
            'It would die with its parent; not treating it as scoped.',
        );
      }
      cgroupPath = path;
    }
    return { name, slice, pids: [...pids], cgroupPath };
  }

  /**
   * Refuses (PID_NAMESPACE) when this process is not in systemd's PID namespace: the PIDs it
   * would pass to StartTransientUnit mean nothing there, or, worse, name other processes of the
   * host. That is a container run without --pid=host; its QEMUs would also die with it. The
   * bus daemon reports our PID as seen from its namespace (the kernel translates the socket's
   * peer credentials): it must be our own. Checked once; skipped for a bus that cannot tell.
   */
  async checkPidNamespace(): Promise<void> {
    if (this.pidNamespaceChecked) return;
    const link = await this.connection();
    const name = link.conn.uniqueName?.();
    if (name === undefined) return;
    const [seen] = await this.callOn(
      link,
      { destination: 'org.freedesktop.DBus', path: '/org/freedesktop/DBus', interface: 'org.freedesktop.DBus', member: 'GetConnectionUnixProcessID', signature: 's', body: [name] },
      'GetConnectionUnixProcessID',
      this.callTimeoutMs,
    );
    if (Number(seen) !== process.pid) {
      throw new ScopeError(
        'PID_NAMESPACE',
        `vmkeepd runs in a PID namespace of its own: it is PID ${process.pid} to itself but PID ${String(seen)} to the system bus at ${this.busAddress}. ` +
          'systemd could not put its QEMUs into scopes, and they would die with their container; no VM is started. ' +
          'Run its container with --pid=host (packaging/oci/vmkeepd.service has every flag it needs).',
      );
    }
    this.pidNamespaceChecked = true;
  }

  /** Stops the scope (SIGTERM to its processes, see createScope) and waits for the stop job. */
  async stopScope(name: string, options: { timeoutMs?: number } = {}): Promise<void> {
    checkUnitName(name, '.scope');
    // The default outlasts systemd's own stop timeout (90 s by default).
    const outcome = await this.runJob(managerCall('StopUnit', 'ss', [name, 'replace']), `StopUnit ${name}`, options.timeoutMs ?? 120_000);
    if (outcome.result !== 'done') {
      throw new ScopeError('JOB_FAILED', `systemd's stop job for ${name} ended with result "${outcome.result}" instead of "done"`);
    }
  }

  /** Sends a signal to every process of the scope. */
  async killScope(name: string, signal: NodeJS.Signals | number): Promise<void> {
    checkUnitName(name, '.scope');
    const signo = typeof signal === 'number' ? signal : osConstants.signals[signal];
    if (signo === undefined) throw new TypeError(`unknown signal ${String(signal)}`);
    await this.call(managerCall('KillUnit', 'ssi', [name, 'all', signo]), `KillUnit ${name}`);
  }

  /** The scope's state and processes, or null when no such unit is loaded. */
  async getScope(name: string): Promise<ScopeInfo | null> {
    checkUnitName(name, '.scope');
    try {
      const [path] = (await this.call(managerCall('GetUnit', 's', [name]), `GetUnit ${name}`)) as [string];
      const get = async (iface: string, prop: string): Promise<string> => {
        const [v] = await this.call(
          { destination: SYSTEMD, path, interface: 'org.freedesktop.DBus.Properties', member: 'Get', signature: 'ss', body: [iface, prop] },
          `Get ${prop} of ${name}`,
        );
        return String(v instanceof Variant ? v.value : v);
      };
      const [activeState, subState, controlGroup, slice, processes] = await Promise.all([
        get('org.freedesktop.systemd1.Unit', 'ActiveState'),
        get('org.freedesktop.systemd1.Unit', 'SubState'),
        get('org.freedesktop.systemd1.Scope', 'ControlGroup'),
        get('org.freedesktop.systemd1.Scope', 'Slice'),
        this.call(managerCall('GetUnitProcesses', 's', [name]), `GetUnitProcesses ${name}`),
      ]);
      const pids = [...new Set(((processes[0] ?? []) as Array<[string, number, string]>).map(([, pid]) => Number(pid)))];
      return { name, activeState, subState, pids: pids.sort((a, b) => a - b), controlGroup, slice };
    } catch (err) {
      // The unit may also vanish between GetUnit and the property reads.
      if (err instanceof ScopeError && (err.code === 'NO_SUCH_SCOPE' || err.dbusName === 'org.freedesktop.DBus.Error.UnknownObject')) {
        return null;
      }
      throw err;
    }
  }

  /** Loaded scopes whose name starts with the prefix (default `vmkeep-`), in any state, sorted by name. */
  async listScopes(prefix: string = SCOPE_PREFIX): Promise<ScopeSummary[]> {
    if (!/^[A-Za-z0-9:_.\\-]*$/.test(prefix)) throw new TypeError(`invalid scope name prefix ${JSON.stringify(prefix)}`);
    const [units] = await this.call(managerCall('ListUnitsByPatterns', 'asas', [[], [`${prefix}*.scope`]]), 'ListUnitsByPatterns');
    return ((units ?? []) as Array<[string, string, string, string, string]>)
      .map(([unit, description, , activeState, subState]) => ({ name: unit, description, activeState, subState }))
      .filter((s) => s.name.startsWith(prefix) && s.name.endsWith('.scope'))
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /** Name of the unit systemd has the process in (a scope, or e.g. a service), or null if none. */
  async scopeOfPid(pid: number): Promise<string | null> {
    // The kernel's /proc/PID/cgroup names the unit of a process in a unit's own cgroup (every
    // QEMU in its scope): no bus round trips, which a daemon start would pay twice per VM.
    let procCgroup: string | undefined;
    try {
      procCgroup = await this.readProcCgroup(pid);
    } catch (err) {
      // No such process: systemd answers NoUnitForPID for it too.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ESRCH') return null;
    }
    const cgroupPath = procCgroup === undefined ? null : systemdCgroupPath(procCgroup);
    const unit = cgroupPath === null ? undefined : unitOfCgroupPath(cgroupPath);
    if (unit !== undefined) return unit;
    try {
      const [path] = (await this.call(managerCall('GetUnitByPID', 'u', [pid]), `GetUnitByPID ${pid}`)) as [string];
      const [id] = await this.call(
        { destination: SYSTEMD, path, interface: 'org.freedesktop.DBus.Properties', member: 'Get', signature: 'ss', body: ['org.freedesktop.systemd1.Unit', 'Id'] },
        `Get Id of the unit of PID ${pid}`,
      );
      return String(id instanceof Variant ? id.value : id);
    } catch (err) {
      // systemd answers NoUnitForPID both for a process outside any unit and for no process at all.
      if (err instanceof ScopeError && err.dbusName === 'org.freedesktop.systemd1.NoUnitForPID') return null;
      throw err;
    }
  }

  /** Resolves true once no unit of that name is loaded, false if one still is at the deadline. */
  async waitScopeGone(name: string, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    let removed = false;
    let wake: (() => void) | null = null;
    const listener = (unit: string | null): void => {
      // null: the connection closed, a signal may be lost; look again.
      if (unit === null || unit === name) {
        removed = true;
        wake?.();
      }
    };
    this.unitRemovedListeners.add(listener);
    try {
      for (;;) {
        removed = false;
        if (!(await this.unitLoaded(name))) return true;
        const left = deadline - Date.now();
        if (left <= 0) return false;
        if (removed) continue;
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, left);
          wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        wake = null;
      }
    } finally {
      this.unitRemovedListeners.delete(listener);
    }
  }

  /** Closes the connection (also one still being set up); pending calls fail with BUS_CLOSED. A later call connects again. */
  close(): void {
    this.link?.conn.close();
    this.connecting?.then(
      (link) => link.conn.close(),
      () => undefined,
    );
  }

  private async unitLoaded(name: string): Promise<boolean> {
    try {
      await this.call(managerCall('GetUnit', 's', [name]), `GetUnit ${name}`);
      return true;
    } catch (err) {
      if (err instanceof ScopeError && err.code === 'NO_SUCH_SCOPE') return false;
      throw err;
    }
  }

  /**
   * A call to another service on the same bus (systemd-machined, machines.ts), with this
   * connection's timeout and reconnect. Error replies keep their D-Bus name (ScopeError.dbusName).
   */
  async call(message: BusCall, what: string): Promise<unknown[]> {
    return this.callOn(await this.connection(), message, what, this.callTimeoutMs);
  }

  private callOn(link: Link, message: BusCall, what: string, timeoutMs: number): Promise<unknown[]> {
    if (link.closed) return Promise.reject(busClosed(what, this.busAddress));
    return new Promise((resolve, reject) => {
      const fail = (err: ScopeError): void => {
        clearTimeout(timer);
        link.pending.delete(fail);
        reject(err);
      };
      const timer = setTimeout(
        () =>
          fail(
            new ScopeError(
              'CALL_TIMEOUT',
              `${what}: no answer from ${message.destination} within ${timeoutMs} ms on ${this.busAddress}; systemd or the bus may be hung or overloaded. Retry, or check \`systemctl status\`.`,
            ),
          ),
        timeoutMs,
      );
      link.pending.add(fail);
      link.conn.call(message).then(
        (body) => {
          if (!link.pending.has(fail)) return;
          clearTimeout(timer);
          link.pending.delete(fail);
          resolve(body);
        },
        (err: unknown) => {
          if (link.pending.has(fail)) fail(mapCallError(err, what, this.busAddress, link.closed));
        },
      );
    });
  }

  /** Calls a method that answers with a job path and waits for that job's JobRemoved signal. */
  private async runJob(message: BusCall, what: string, jobTimeoutMs: number): Promise<JobOutcome> {
    const link = await this.connection();
    link.jobCallsInFlight++;
    let released = false;
    const release = (): void => {
      if (released) return;
      released = true;
      if (--link.jobCallsInFlight === 0) link.earlyJobs.clear();
    };
    try {
      const [job] = (await this.callOn(link, message, what, this.callTimeoutMs)) as [string];
      const early = link.earlyJobs.get(job);
      if (early) {
        link.earlyJobs.delete(job);
        return early;
      }
      const outcome = this.waitJob(link, job, what, jobTimeoutMs);
      release(); // the waiter is registered: later signals go to it
      return await outcome;
    } finally {
      release();
    }
  }

  private waitJob(link: Link, job: string, what: string, timeoutMs: number): Promise<JobOutcome> {
    return new Promise((resolve, reject) => {
      const fail = (err: ScopeError): void => {
        clearTimeout(timer);
        link.jobWaiters.delete(job);
        link.pending.delete(fail);
        reject(err);
      };
      const timer = setTimeout(
        () =>
          fail(
            new ScopeError(
              'CALL_TIMEOUT',
              `${what}: systemd accepted job ${job} but it did not finish within ${timeoutMs} ms; see systemctl list-jobs.`,
            ),
          ),
        timeoutMs,
      );
      link.pending.add(fail);
      link.jobWaiters.set(job, (outcome) => {
        clearTimeout(timer);
        link.pending.delete(fail);
        resolve(outcome);
      });
    });
  }

  private connection(): Promise<Link> {
    if (this.link && !this.link.closed) return Promise.resolve(this.link);
    this.connecting ??= this.connect().finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  private async connect(): Promise<Link> {
    let conn: BusConnection;
    try {
      conn = this.factory(this.busAddress);
    } catch (err) {
      throw noSystemd(this.busAddress, `the address is not usable (${(err as Error).message})`, err);
    }
    const link: Link = { conn, closed: false, pending: new Set(), jobWaiters: new Map(), earlyJobs: new Map(), jobCallsInFlight: 0 };
    conn.onSignal((signal) => this.onSignal(link, signal));
    conn.onClose((cause) => this.onClose(link, cause));
    try {
      await this.handshake(link);
    } catch (err) {
      conn.close();
      throw err;
    }
    this.link = link;
    return link;
  }

  private async handshake(link: Link): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        link.conn.ready.catch((err: unknown) => {
          throw noSystemd(this.busAddress, `cannot connect (${(err as Error).message ?? String(err)})`, err);
        }),
        new Promise((_, reject) => {
          timer = setTimeout(
            () => reject(new ScopeError('CALL_TIMEOUT', `the D-Bus bus at ${this.busAddress} did not accept the connection within ${this.callTimeoutMs} ms`)),
            this.callTimeoutMs,
          );
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
    // Our own single match rule: dbus-next's per-proxy rules are never removed.
    await this.callOn(
      link,
      { destination: 'org.freedesktop.DBus', path: '/org/freedesktop/DBus', interface: 'org.freedesktop.DBus', member: 'AddMatch', signature: 's', body: [MATCH_RULE] },
      'AddMatch',
      this.callTimeoutMs,
    );
    // systemd only sends JobRemoved/UnitRemoved to subscribed clients.
    await this.callOn(link, managerCall('Subscribe', '', []), 'Subscribe', this.callTimeoutMs);
  }

  private onSignal(link: Link, signal: BusSignal): void {
    if (signal.interface !== MANAGER || signal.path !== SYSTEMD_PATH) return;
    if (signal.member === 'JobRemoved') {
      const [, job, unit, result] = signal.body as [number, string, string, string];
      const waiter = link.jobWaiters.get(job);
      if (waiter) {
        link.jobWaiters.delete(job);
        waiter({ unit, result });
      } else if (link.jobCallsInFlight > 0) {
        link.earlyJobs.set(job, { unit, result });
      }
    } else if (signal.member === 'UnitRemoved') {
      const [unit] = signal.body as [string];
      for (const listener of this.unitRemovedListeners) listener(unit);
    }
  }

  private onClose(link: Link, cause: Error | null): void {
    if (link.closed) return;
    link.closed = true;
    if (this.link === link) this.link = null;
    for (const fail of [...link.pending]) fail(busClosed('the pending call', this.busAddress, cause));
    for (const listener of this.unitRemovedListeners) listener(null);
  }
}

function managerCall(member: string, signature: string, body: unknown[]): BusCall {
  return { destination: SYSTEMD, path: SYSTEMD_PATH, interface: MANAGER, member, signature, body };
}

function checkUnitName(name: string, suffix: string): void {
  if (!/^[A-Za-z0-9:_.\\-]+$/.test(name) || !name.endsWith(suffix) || name.length <= suffix.length || name.length > 255) {
    throw new TypeError(`invalid unit name ${JSON.stringify(name)}: expected a systemd unit name ending in ${suffix}`);
  }
}

function noSystemd(address: string, why: string, cause?: unknown, dbusName?: string): ScopeError {
  return new ScopeError(
    'NO_SYSTEMD',
    `no systemd on the system bus at ${address}: ${why}. vmkeep puts every VM in its own systemd scope, which needs ` +
      'systemd (org.freedesktop.systemd1) on the system bus; containers and hosts without systemd have none. ' +
      'Run vmkeep on a systemd host, set DBUS_SYSTEM_BUS_ADDRESS to a bus where systemd is, or use --no-scope ' +
      '(VMs then run in the daemon\'s cgroup and die with their parent).',
    { cause, dbusName },
  );
}

function busClosed(what: string, address: string, cause?: unknown): ScopeError {
  return new ScopeError('BUS_CLOSED', `${what} failed: the D-Bus connection to ${address} closed; the next call reconnects`, { cause });
}

const CODE_OF_DBUS_ERROR: Record<string, ScopeErrorCode> = {
  'org.freedesktop.systemd1.NoSuchUnit': 'NO_SUCH_SCOPE',
  'org.freedesktop.systemd1.UnitExists': 'SCOPE_EXISTS',
  'org.freedesktop.systemd1.NoSuchProcess': 'NO_SUCH_PID',
  'org.freedesktop.DBus.Error.UnixProcessIdUnknown': 'NO_SUCH_PID',
  'org.freedesktop.DBus.Error.NoReply': 'CALL_TIMEOUT',
  'org.freedesktop.DBus.Error.Timeout': 'CALL_TIMEOUT',
  'org.freedesktop.DBus.Error.Disconnected': 'BUS_CLOSED',
};

function mapCallError(err: unknown, what: string, address: string, linkClosed: boolean): ScopeError {
  if (err instanceof ScopeError) return err;
  if (err instanceof BusCallError) {
    // No systemd1 name on the bus; or the bus tried to activate it and failed (a container's
    // system bus has an activation file for it that cannot work without systemd as PID 1).
    if (
      err.errorName === 'org.freedesktop.DBus.Error.ServiceUnknown' ||
      err.errorName === 'org.freedesktop.DBus.Error.NameHasNoOwner' ||
      err.errorName.startsWith('org.freedesktop.DBus.Error.Spawn.')
    ) {
      return noSystemd(address, `${what} answered ${err.errorName}: ${err.message}`, err, err.errorName);
    }
    const code = CODE_OF_DBUS_ERROR[err.errorName] ?? 'DBUS_ERROR';
    return new ScopeError(code, `${what} failed: ${err.errorName}: ${err.message}`, { cause: err, dbusName: err.errorName });
  }
  const message = err instanceof Error ? err.message : String(err);
  // dbus-next rejects a write on a stream that is gone with a plain Error.
  if (linkClosed || /stream is closed|closed stream/i.test(message)) return busClosed(what, address, err);
  return new ScopeError('DBUS_ERROR', `${what} failed: ${message}`, { cause: err });
}
