// The control API described: versions, extensions and the OpenAPI 3 document served at
// GET /1.0/openapi.json. Kept next to the routing table (api-server.ts); a unit test checks
// both ways that every route is described and every description has a route.
import { ACCESS_LEVELS } from './access.js';
import { HTTP_STATUS, type DaemonErrorCode } from './errors.js';
import { EVENT_FILTER_TYPES } from './event-filter.js';
import { AUTOSTART_MODES, EVENT_TYPES } from './model.js';
import { OPERATION_KINDS, OPERATION_STATUSES } from './operation-state.js';
import { REFRESH_STRATEGIES } from '../upgrade/index.js';

export const API_VERSIONS = ['/1.0'] as const;

/**
 * Features added to /1.0 since it was first released, by name: a client checks
 * GET /1.0's apiExtensions before it uses one. Only ever appended to.
 */
export const API_EXTENSIONS: readonly string[] = ['operations', 'events_filter', 'openapi', 'metrics', 'refresh_migrate_or_reboot', 'refresh_batches', 'disks', 'operation_started_by', 'nic_problems'];

type Schema = Record<string, unknown>;
const ref = (name: string): Schema => ({ $ref: `#/components/schemas/${name}` });
const str = (description?: string): Schema => ({ type: 'string', ...(description === undefined ? {} : { description }) });
const int = (description?: string): Schema => ({ type: 'integer', ...(description === undefined ? {} : { description }) });
const bool = (description: string): Schema => ({ type: 'boolean', description });
const obj = (properties: Record<string, Schema>, required: string[] = [], extra: Schema = {}): Schema => ({
  type: 'object', properties, ...(required.length > 0 ? { required } : {}), ...extra,
});

const SCHEMAS: Record<string, Schema> = {
  Error: obj({
    error: obj({
      code: { type: 'string', enum: Object.keys(HTTP_STATUS), description: 'a stable code; the HTTP status follows from it' },
      message: str('what went wrong and the fix'),
      problems: { type: 'array', items: obj({ field: str(), message: str() }), description: 'INVALID_SPEC: every problem of the spec' },
    }, ['code', 'message']),
  }, ['error']),
  OperationError: obj({ code: str('an Error code, or CANCELLED / DAEMON_RESTARTED'), message: str() }, ['code', 'message']),
  Operation: obj({
    id: str('UUID; also in the events it causes and in the VM view while it holds the VM'),
    kind: { type: 'string', enum: [...OPERATION_KINDS] },
    vms: { type: 'array', items: str() },
    status: { type: 'string', enum: [...OPERATION_STATUSES] },
    createdAt: str('ISO 8601'),
    updatedAt: str('ISO 8601'),
    progress: obj({ done: int(), total: int(), failed: int() }),
    result: { description: 'start/stop: the VM; refresh: a RefreshOutcome; rolling-refresh: a RefreshJob' },
    error: ref('OperationError'),
    cancelRequested: bool('a cancel was granted; it stops at its next safe point'),
    startedBy: obj({
      level: { type: 'string', enum: [...ACCESS_LEVELS], description: 'the socket it was asked on' },
      uid: int('the caller\'s uid (SO_PEERCRED), when it could be read'),
    }, ['level'], { description: 'who began it: an operator may cancel only its own (same level and uid); absent: vmkeepd itself, or a record from before the field' }),
  }, ['id', 'kind', 'vms', 'status', 'createdAt', 'updatedAt']),
  VmSpec: obj({
    name: str('1 to 63 characters: lowercase letters, digits, "_", "." and "-"'),
    kernel: str('path of the kernel to boot'),
    initrd: str(),
    append: str('kernel command line'),
    memoryMiB: int(),
    vcpus: int(),
    machine: str('machine type, e.g. q35'),
    accel: str(),
    cpu: str(),
    disks: { type: 'array', items: { type: 'object', additionalProperties: true } },
  }, ['name'], { additionalProperties: true, description: 'validated by vmkeepd; INVALID_SPEC lists every problem' }),
  Vm: obj({
    name: str(),
    state: { type: 'string', enum: ['starting', 'running', 'paused', 'shutdown', 'stopped', 'exited', 'unreachable'] },
    spec: ref('VmSpec'),
    uuid: str(),
    machineType: str(),
    installation: str(),
    channel: str(),
    policy: { type: 'string', enum: [...REFRESH_STRATEGIES] },
    autostart: { type: 'string', enum: [...AUTOSTART_MODES] },
    qemuVersion: str(),
    refreshing: str(),
    pid: int(),
    scope: str(),
    taps: { type: 'array', items: str(), description: 'the TAP devices its running QEMU opened (bridge NICs)' },
    nicProblems: {
      type: 'array', description: 'bridge NICs cut off from their bridge, with the fix (README, "Network restarts")',
      items: obj({
        nic: int(), tap: str(), bridge: str(), problem: { type: 'string', enum: ['detached', 'bridge-missing', 'tap-gone'] }, message: str(), fix: str(),
      }, ['nic', 'tap', 'bridge', 'problem', 'message', 'fix']),
    },
    problem: str(),
    lastExit: obj({ reason: str(), at: str() }),
    operation: obj({ kind: str(), step: str(), since: str(), id: str('the API operation, when a request began it') }),
    createdAt: str(),
    updatedAt: str(),
  }, ['name', 'state', 'spec', 'uuid', 'machineType', 'installation', 'channel', 'autostart', 'createdAt', 'updatedAt']),
  DaemonInfo: obj({
    version: str(), pid: int(), stateDir: str(), runtimeDir: str(), startedAt: str(),
    orphanScopes: { type: 'array', items: str() },
    damagedRecords: { type: 'array', items: obj({ name: str(), file: str(), problem: str() }) },
    apiVersion: str('1.0'),
    apiExtensions: { type: 'array', items: str(), description: 'features added since 1.0: check before using one' },
  }, ['version', 'apiVersion', 'apiExtensions']),
  RefreshOutcome: obj({
    vm: str(), strategy: str(),
    result: { type: 'string', enum: ['migrated', 'rebooted', 'armed', 'current', 'reported'] },
    downtimeMs: int(), migrationMs: int(), totalMs: int(), reason: str(), message: str(),
  }, ['vm', 'strategy', 'result', 'totalMs', 'message'], { additionalProperties: true }),
  RefreshJob: obj({
    id: str('the operation id'), vms: { type: 'array', items: str() }, parallel: int(),
    batchIntervalSec: { type: 'number' }, maxFailures: int(),
    results: { type: 'array', items: obj({ vm: str(), ok: { type: 'boolean' }, skipped: { type: 'boolean' }, outcome: ref('RefreshOutcome'), error: ref('OperationError') }, ['vm', 'ok']) },
  }, ['id', 'vms', 'parallel', 'results']),
  UpgradeStatus: obj({
    defaultPolicy: str(),
    channels: { type: 'array', items: obj({ channel: str(), installation: str(), binary: str(), version: str() }) },
    vms: { type: 'array', items: { type: 'object', additionalProperties: true } },
  }, ['defaultPolicy', 'channels', 'vms']),
  Event: obj({
    type: { type: 'string', enum: [...EVENT_TYPES] },
    vm: str(), vms: { type: 'array', items: str() }, operation: str('the operation that caused it, if any'),
    status: str(), state: str(), previous: str(), message: str(), job: str(), step: str(),
    progress: obj({ done: int(), total: int(), failed: int() }), outcome: ref('RefreshOutcome'), time: str(),
  }, ['type', 'time']),
};

interface RouteDoc {
  summary: string;
  body?: Schema;
  /** The success answer: status, schema (JSON unless contentType says otherwise). */
  ok: { status: number; schema?: Schema; contentType?: string; description?: string };
  errors: DaemonErrorCode[];
  parameters?: Schema[];
}

const NAME_PARAM: Schema = { name: 'name', in: 'path', required: true, schema: { type: 'string' }, description: 'VM name' };
const ID_PARAM: Schema = { name: 'id', in: 'path', required: true, schema: { type: 'string', format: 'uuid' }, description: 'operation id' };
const ACCEPTED = { status: 202, schema: ref('Operation'), description: 'accepted: follow it at the Location header (/1.0/operations/ID)' };
const REQUEST_ERRORS: DaemonErrorCode[] = ['INVALID_REQUEST', 'BODY_TOO_LARGE', 'UNSUPPORTED_MEDIA_TYPE'];
const refreshFields = {
  strategy: { type: 'string', enum: [...REFRESH_STRATEGIES] },
  timeoutSec: { type: 'number', description: 'seconds for the migration, or for the guest to power off (reboot)' },
  force: bool('reboot: quit a guest that ignores ACPI'),
};

/** Every route, by "METHOD path" with {name} / {id} for the parameters. */
export const ROUTE_DOCS: Readonly<Record<string, RouteDoc>> = {
  'GET /': { summary: 'the API versions this daemon serves', ok: { status: 200, schema: obj({ apiVersions: { type: 'array', items: str() } }, ['apiVersions']) }, errors: [] },
  'GET /1.0': { summary: "the daemon's version, API extensions, orphan scopes and damaged records", ok: { status: 200, schema: ref('DaemonInfo') }, errors: [] },
  'GET /1.0/openapi.json': { summary: 'this document', ok: { status: 200, schema: { type: 'object' } }, errors: [] },
  'GET /1.0/vms': { summary: 'every VM', ok: { status: 200, schema: { type: 'array', items: ref('Vm') } }, errors: [] },
  'POST /1.0/vms': {
    summary: 'create a VM (and start it unless start is false); answers once it runs',
    body: obj({ spec: ref('VmSpec'), start: bool('default true'), channel: str('installations channel'), policy: { type: 'string', enum: [...REFRESH_STRATEGIES] }, autostart: { type: 'string', enum: [...AUTOSTART_MODES] } }, ['spec']),
    ok: { status: 201, schema: ref('Vm') },
    errors: [...REQUEST_ERRORS, 'FORBIDDEN', 'INVALID_SPEC', 'EXISTS', 'DISK_REFUSED', 'IMAGE_IN_USE', 'SPEC_REJECTED', 'START_FAILED', 'STATE_IO'],
  },
  'GET /1.0/vms/{name}': { summary: 'one VM', parameters: [NAME_PARAM], ok: { status: 200, schema: ref('Vm') }, errors: ['INVALID_REQUEST', 'NOT_FOUND'] },
  'PATCH /1.0/vms/{name}': {
    summary: "change a VM's settings", parameters: [NAME_PARAM], body: obj({ autostart: { type: 'string', enum: [...AUTOSTART_MODES] } }),
    ok: { status: 200, schema: ref('Vm') }, errors: [...REQUEST_ERRORS, 'FORBIDDEN', 'NOT_FOUND', 'STATE_IO'],
  },
  'DELETE /1.0/vms/{name}': {
    summary: 'delete a VM that has no QEMU (a running one is CONFLICT: stop it first)', parameters: [NAME_PARAM],
    ok: { status: 200, schema: obj({ deleted: str() }, ['deleted']) }, errors: ['INVALID_REQUEST', 'FORBIDDEN', 'NOT_FOUND', 'CONFLICT', 'BUSY', 'STATE_IO'],
  },
  'POST /1.0/vms/{name}/disks/accept': {
    summary: "record each disk's backing chain as it is now, after BACKING_CHAIN_CHANGED and a check by the operator",
    parameters: [NAME_PARAM], body: obj({}),
    ok: {
      status: 200,
      schema: obj({ vm: str(), previous: { type: 'array', nullable: true, items: { type: 'array', items: { type: 'object' } } }, disks: { type: 'array', items: { type: 'array', items: { type: 'object' } } } }, ['vm', 'previous', 'disks']),
    },
    errors: [...REQUEST_ERRORS, 'FORBIDDEN', 'NOT_FOUND', 'BUSY', 'DISK_REFUSED', 'IMAGE_IN_USE', 'STATE_IO'],
  },
  'POST /1.0/vms/{name}/start': {
    summary: 'start a VM: an operation (its result: the VM)', parameters: [NAME_PARAM], body: obj({}),
    ok: ACCEPTED, errors: [...REQUEST_ERRORS, 'NOT_FOUND', 'BUSY'],
  },
  'POST /1.0/vms/{name}/stop': {
    summary: 'ACPI power-off (or quit with force): an operation, queued behind the one holding the VM; cannot be cancelled', parameters: [NAME_PARAM],
    body: obj({ timeoutSec: { type: 'number' }, force: bool('quit QEMU at once'), hostShutdown: bool('the host is shutting down: the VM stays wanted running (admin socket only)') }),
    ok: ACCEPTED, errors: [...REQUEST_ERRORS, 'FORBIDDEN', 'NOT_FOUND'],
  },
  'POST /1.0/vms/{name}/refresh': {
    summary: 'move one VM onto its current installation: an operation (its result: a RefreshOutcome); a live migration can be cancelled', parameters: [NAME_PARAM],
    body: obj(refreshFields), ok: ACCEPTED, errors: [...REQUEST_ERRORS, 'NOT_FOUND', 'BUSY'],
  },
  'POST /1.0/refresh': {
    summary: 'rolling refresh of many VMs: an operation (its result: a RefreshJob); a cancel begins no further VM',
    body: obj({
      vms: { type: 'array', items: str() }, all: bool('every VM'), stale: bool('every stale VM whose strategy is not manual'),
      ...refreshFields, parallel: int('VMs at a time, 1 to 64'), stopOnError: bool('begin no VM after a failure (maxFailures 1)'),
      batchIntervalSec: { type: 'number', description: 'seconds to pause between batches of parallel VMs, 0 to 86400' },
      maxFailures: int('stop the job after this many failed VMs; the rest are not attempted'),
    }),
    ok: ACCEPTED, errors: [...REQUEST_ERRORS, 'NOT_FOUND'],
  },
  'GET /1.0/operations': { summary: 'the operations kept (running ones, finished ones for 24 h, the last 1000)', ok: { status: 200, schema: { type: 'array', items: ref('Operation') } }, errors: [] },
  'GET /1.0/operations/{id}': { summary: 'one operation', parameters: [ID_PARAM], ok: { status: 200, schema: ref('Operation') }, errors: ['NOT_FOUND'] },
  'DELETE /1.0/operations/{id}': {
    summary: 'cancel an operation where it can stop safely (rolling refresh, live migration); CONFLICT with the reason otherwise; an operator only its own (FORBIDDEN, rule own-operations)', parameters: [ID_PARAM],
    ok: { status: 202, schema: ref('Operation'), description: 'the cancel was granted; wait for the operation to see how it ended' }, errors: ['FORBIDDEN', 'NOT_FOUND', 'CONFLICT'],
  },
  'GET /1.0/operations/{id}/wait': {
    summary: 'the operation once it finished, or as it is after timeout seconds (still running then)',
    parameters: [ID_PARAM, { name: 'timeout', in: 'query', schema: { type: 'number', minimum: 0, maximum: 3600, default: 60 }, description: 'seconds' }],
    ok: { status: 200, schema: ref('Operation') }, errors: ['INVALID_REQUEST', 'NOT_FOUND'],
  },
  'GET /1.0/metrics': {
    summary: 'metrics in the Prometheus text format (VMs by state, stale VMs, refreshes, migration times, QMP latency, daemon starts)',
    ok: { status: 200, contentType: 'text/plain', schema: { type: 'string' } }, errors: ['STATE_IO'],
  },
  'GET /1.0/upgrade-status': { summary: 'which VMs run an old QEMU and what their policy will do', ok: { status: 200, schema: ref('UpgradeStatus') }, errors: ['STATE_IO'] },
  'POST /1.0/vms/{name}/qmp': {
    summary: "one QMP command on the VM's monitor (operator pass-through)", parameters: [NAME_PARAM],
    body: obj({ execute: str('QMP command'), arguments: { type: 'object' } }, ['execute']),
    ok: { status: 200, schema: obj({ return: {} }, ['return']) }, errors: [...REQUEST_ERRORS, 'FORBIDDEN', 'NOT_FOUND', 'UNREACHABLE', 'QMP_FAILED'],
  },
  'GET /1.0/vms/{name}/console': {
    summary: "the VM's serial console log (follow=1: keep streaming)",
    parameters: [NAME_PARAM, { name: 'follow', in: 'query', schema: { type: 'string', enum: ['1', '0', 'true', 'false'] } }],
    ok: { status: 200, contentType: 'text/plain', schema: { type: 'string' } }, errors: ['INVALID_REQUEST', 'NOT_FOUND'],
  },
  'GET /1.0/events': {
    summary: 'the event stream: one JSON object per line, as long as the connection stays open',
    parameters: [
      { name: 'type', in: 'query', schema: { type: 'string' }, description: `comma-separated: ${EVENT_FILTER_TYPES.join(', ')}` },
      { name: 'vm', in: 'query', schema: { type: 'string' }, description: 'comma-separated VM names' },
    ],
    ok: { status: 200, contentType: 'application/x-ndjson', schema: ref('Event') }, errors: ['INVALID_REQUEST'],
  },
};

/** Codes any request can meet: a wrong method, an unexpected failure. */
const ALWAYS: DaemonErrorCode[] = ['METHOD_NOT_ALLOWED', 'INTERNAL'];

/** The OpenAPI 3.0 document of the whole API, from ROUTE_DOCS. */
export function apiDescription(version: string): Schema {
  const paths: Record<string, Record<string, Schema>> = {};
  for (const [key, doc] of Object.entries(ROUTE_DOCS)) {
    const [method, path] = key.split(' ') as [string, string];
    const responses: Record<string, Schema> = {
      [String(doc.ok.status)]: {
        description: doc.ok.description ?? 'success',
        ...(doc.ok.status === 202 && doc.ok.schema === ACCEPTED.schema ? { headers: { Location: { description: '/1.0/operations/ID', schema: { type: 'string' } } } } : {}),
        ...(doc.ok.schema === undefined ? {} : { content: { [doc.ok.contentType ?? 'application/json']: { schema: doc.ok.schema } } }),
      },
    };
    const byStatus = new Map<number, DaemonErrorCode[]>();
    for (const code of [...doc.errors, ...ALWAYS]) byStatus.set(HTTP_STATUS[code], [...(byStatus.get(HTTP_STATUS[code]) ?? []), code]);
    for (const [status, codes] of [...byStatus].sort((a, b) => a[0] - b[0])) {
      responses[String(status)] = { description: `error: ${codes.join(', ')}`, content: { 'application/json': { schema: ref('Error') } } };
    }
    paths[path] ??= {};
    paths[path][method.toLowerCase()] = {
      summary: doc.summary,
      operationId: `${method.toLowerCase()}${path.replace(/[^A-Za-z0-9]+(.)?/g, (_m, c: string | undefined) => (c ?? '').toUpperCase())}`,
      ...(doc.parameters === undefined ? {} : { parameters: doc.parameters }),
      ...(doc.body === undefined ? {} : { requestBody: { required: method !== 'POST' || path === '/1.0/vms' || path === '/1.0/refresh' || path.endsWith('/qmp'), content: { 'application/json': { schema: doc.body } } } }),
      responses,
    };
  }
  return {
    openapi: '3.0.3',
    info: {
      title: 'vmkeep control API',
      version,
      description: 'HTTP/1.1 + JSON on a unix socket (curl --unix-socket /run/vmkeep/vmkeep.sock http://vmkeep/1.0). Long requests answer 202 with an operation.',
    },
    servers: [{ url: 'http://vmkeep' }],
    paths,
    components: { schemas: SCHEMAS },
  };
}
