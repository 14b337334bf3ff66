// Access levels of the control API (ARCHITECTURE.md, invariant 11). The level is the socket's:
// the admin socket (root, 0600) may do everything; the operator socket (0660, the operator
// group) may create, start, stop, refresh and read, with the rules below. Each refusal names
// its rule. Pure: the API server and the manager ask, they do not decide.
import { forwardHost, type VmSpec } from '../launcher/index.js';
import { DaemonError } from './errors.js';

export const ACCESS_LEVELS = ['admin', 'operator'] as const;
export type AccessLevel = (typeof ACCESS_LEVELS)[number];

/** Who called: the socket's level and the peer's credentials (SO_PEERCRED), when known. */
export interface Caller {
  level: AccessLevel;
  uid?: number;
  gid?: number;
  pid?: number;
}

/** File name of the operator socket next to the admin socket (the default --operator-socket). */
export const OPERATOR_SOCKET_NAME = 'vmkeep-operator.sock';

/** The rules, by the name a refusal carries. */
export type AccessRule =
  | 'admin-only' | 'qmp-read-only' | 'storage-root' | 'no-kernel-path' | 'own-operations' | 'operator-bridge' | 'operator-forward'
  | 'operator-user-net';

/** A 403 naming the rule that refused. */
export function forbidden(rule: AccessRule, message: string): DaemonError {
  return new DaemonError('FORBIDDEN', `refused by rule ${rule}: ${message}`);
}

/** What an operator may do: "METHOD /route" with ':name' for a VM's name. Everything else is admin-only. */
const OPERATOR_ROUTES: ReadonlySet<string> = new Set([
  'GET /', 'GET /1.0', 'GET /1.0/openapi.json', 'GET /1.0/vms', 'POST /1.0/vms', 'GET /1.0/vms/:name',
  'POST /1.0/vms/:name/start', 'POST /1.0/vms/:name/stop', 'POST /1.0/vms/:name/refresh',
  'POST /1.0/refresh', 'GET /1.0/upgrade-status', 'GET /1.0/metrics',
  'GET /1.0/operations', 'GET /1.0/operations/:id', 'GET /1.0/operations/:id/wait', 'DELETE /1.0/operations/:id',
  'POST /1.0/vms/:name/qmp', 'GET /1.0/vms/:name/console', 'GET /1.0/events',
]);

/** Refuses a route the level may not use (`route` as in OPERATOR_ROUTES). */
export function checkRoute(level: AccessLevel, method: string, route: string): void {
  if (level === 'admin' || OPERATOR_ROUTES.has(`${method} ${route}`)) return;
  throw forbidden('admin-only', `${method} ${route} is for the admin socket only; operators may create, start, stop, refresh and read VMs`);
}

/**
 * Refuses a stop's options the level may not give: only vmkeep-guests.service, on the admin
 * socket, says the host is shutting down (the VM then stays wanted running for the next boot).
 */
export function checkStop(level: AccessLevel, options: { hostShutdown?: boolean }): void {
  if (level === 'admin' || options.hostShutdown !== true) return;
  throw forbidden('admin-only', '"hostShutdown" is for the admin socket only (vmkeep-guests.service, as the host shuts down); an operator\'s stop is a plain stop: leave it out');
}

/**
 * The QMP commands an operator may send: queries that read and change nothing. Not every
 * query-*: a new QEMU may add one that reveals more, so the list is explicit.
 */
export const OPERATOR_QMP_COMMANDS: readonly string[] = [
  'query-status', 'query-version', 'query-name', 'query-uuid', 'query-kvm', 'query-cpus-fast',
  'query-block', 'query-blockstats', 'query-migrate', 'query-memory-size-summary', 'query-balloon',
  'query-chardev', 'query-commands', 'query-hotpluggable-cpus', 'query-iothreads', 'query-target',
  'query-current-machine', 'query-rx-filter', 'query-memdev', 'query-pci',
];

/** Why an admin's raw QMP command is root-equivalent, for the operator's refusal message. */
const ROOT_EQUIVALENT: Readonly<Record<string, string>> = {
  migrate: 'an exec: URI runs a shell command as QEMU\'s user and a file: URI writes guest RAM to a host file; vmkeep refresh is the way to migrate',
  'human-monitor-command': 'the human monitor reaches every command, unfiltered',
  quit: 'it ends the guest without a power-off; use vmkeep stop',
  getfd: 'it hands QEMU a descriptor', 'add-fd': 'it hands QEMU a descriptor',
  'device_add': 'it adds devices to the guest', 'blockdev-add': 'it opens host files', 'object-add': 'it creates host-side objects',
  'netdev_add': 'it opens host network devices', 'chardev-add': 'it opens host files and sockets',
};

/** Refuses a QMP command the level may not send. */
export function checkQmp(level: AccessLevel, command: string): void {
  if (level === 'admin' || OPERATOR_QMP_COMMANDS.includes(command)) return;
  const why = ROOT_EQUIVALENT[command];
  throw forbidden('qmp-read-only',
    `${command} is not among the read-only queries operators may send (${OPERATOR_QMP_COMMANDS.join(', ')})${why === undefined ? '' : `: ${why}`}`);
}

/**
 * What an operator's user-mode NICs reach (--operator-user-net). `restricted`: nothing but
 * what the host forwards bring in, since QEMU's user-mode network otherwise hands the guest the
 * host's loopback at 10.0.2.2 and fec0::2 (services bound on 127.0.0.1 or ::1 only, which the
 * operator cannot reach) and every network the host reaches. `open`: as the admin's NICs.
 */
export const OPERATOR_USER_NETS = ['restricted', 'open'] as const;
export type OperatorUserNet = (typeof OPERATOR_USER_NETS)[number];
export const DEFAULT_OPERATOR_USER_NET: OperatorUserNet = 'restricted';

/** What vmkeepd's flags let operators use. */
export interface OperatorPolicy {
  /** --storage-root folders: an operator's disks must be inside one. */
  storageRoots: readonly string[];
  /** --operator-bridge names: the only bridges an operator's NICs may join. */
  bridges: readonly string[];
  /** --operator-user-net. */
  userNet: OperatorUserNet;
}

/** The lowest host port an operator's user-mode NIC may forward: below it are the host's services' ports. */
export const OPERATOR_MIN_HOST_PORT = 1024;

/**
 * An operator's spec, checked and returned as the operator gets it: no kernel or initrd (QEMU
 * opens them by path itself, so an operator's VM boots from its disks); disks only with storage
 * roots (the paths are checked by the manager, links resolved); bridge NICs only on the
 * --operator-bridge bridges; user-mode forwards only from an unprivileged port on a loopback
 * address (not every address: that would open the guest to the network, past what the
 * administrator chose to bridge); user-mode NICs restricted unless --operator-user-net open
 * (set here, so the record carries it to every QEMU of the VM: restarts, refreshes, migrations).
 */
export function checkOperatorSpec(spec: VmSpec, policy: OperatorPolicy): VmSpec {
  for (const field of ['kernel', 'initrd'] as const) {
    if (spec[field] !== undefined) {
      throw forbidden('no-kernel-path', `"${field}" is for the admin socket only (QEMU opens it by path); an operator's VM boots from its disks`);
    }
  }
  if (spec.disks.length > 0 && policy.storageRoots.length === 0) {
    throw forbidden('storage-root', 'vmkeepd has no --storage-root, so operators may not name disk images; ask the administrator to add one');
  }
  for (const [i, nic] of (spec.nics ?? []).entries()) {
    if (nic.mode === 'bridge') {
      if (policy.bridges.includes(nic.bridge)) continue;
      const allowed = policy.bridges.length === 0 ? 'vmkeepd allows operators no bridge' : `operators may use ${policy.bridges.join(', ')}`;
      throw forbidden('operator-bridge', `nics[${i}].bridge ${nic.bridge} is not for operators (${allowed}); use a user-mode NIC, or ask the administrator to run vmkeepd --operator-bridge ${nic.bridge}`);
    }
    for (const [j, forward] of nic.hostForward.entries()) {
      const { address, port } = forwardHost(forward);
      if (address.split('.')[0] === '127' && port >= OPERATOR_MIN_HOST_PORT) continue;
      throw forbidden('operator-forward', `nics[${i}].hostForward[${j}].host ${JSON.stringify(forward.host)} is not for operators: they may forward a host port from ${OPERATOR_MIN_HOST_PORT} to 65535 on a loopback address, e.g. "127.0.0.1:${Math.max(port, OPERATOR_MIN_HOST_PORT)}"`);
    }
    if (nic.restrict === false && policy.userNet === 'restricted') {
      throw forbidden('operator-user-net', `nics[${i}].restrict false is not for operators: their user-mode NICs are restricted (the guest reaches neither the host's loopback at 10.0.2.2 and fec0::2 nor beyond; host forwards still work); leave "restrict" out, or ask the administrator to run vmkeepd --operator-user-net open`);
    }
  }
  if (policy.userNet === 'open' || spec.nics === undefined) return spec;
  return { ...spec, nics: spec.nics.map((nic) => (nic.mode === 'user' ? { ...nic, restrict: true } : nic)) };
}

/**
 * Who began an operation, as recorded in it. Absent: vmkeepd itself (--refresh-at-start), or a
 * record written before vmkeepd recorded it.
 */
export interface OperationStarter {
  level: AccessLevel;
  /** The caller's uid (SO_PEERCRED), when it could be read. */
  uid?: number;
}

export function starterOf(caller: Caller): OperationStarter {
  return { level: caller.level, ...(caller.uid === undefined ? {} : { uid: caller.uid }) };
}

/**
 * Refuses a cancel the caller may not ask: the admin cancels anything; an operator only what
 * it began itself (same level and uid, so one whose uid is unknown cancels nothing).
 */
export function checkCancel(caller: Caller, startedBy: OperationStarter | undefined): void {
  if (caller.level === 'admin') return;
  if (startedBy?.level === caller.level && startedBy.uid !== undefined && startedBy.uid === caller.uid) return;
  const by = startedBy === undefined ? 'vmkeepd itself (or a vmkeepd too old to record who)'
    : startedBy.level === 'admin' ? 'the admin'
      : startedBy.uid === undefined ? 'an operator whose uid is unknown' : `uid ${startedBy.uid} (${startedBy.level})`;
  const you = caller.uid === undefined ? 'your uid could not be read, so no operation is known to be yours' : `you are uid ${caller.uid}`;
  throw forbidden('own-operations', `operators may cancel only the operations they began; this one was begun by ${by}, ${you}; ask the administrator to cancel it`);
}
