import { randomBytes } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import { chmod, chown, lstat, mkdir, stat, unlink, type FileHandle } from 'node:fs/promises';
import { createServer, STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http';
import { connect, Server as NetServer, type Socket } from 'node:net';
import { dirname } from 'node:path';
import type { Duplex } from 'node:stream';
import {
  describeValue, ignoreMissing, isValidVmName, LaunchError, openOwnFileHandle, readOwnFile, VM_NAME_RULE, type LaunchErrorCode, type SpecProblem,
} from '../launcher/index.js';
import { isRecord, QmpError, type QmpErrorCode } from '../qmp/index.js';
import { parseStrategy, UpgradeError, type UpgradeErrorCode } from '../upgrade/index.js';
import { checkCancel, checkQmp, checkRoute, checkStop, starterOf, type AccessLevel, type Caller } from './access.js';
import { DaemonError, HTTP_STATUS, type DaemonErrorCode } from './errors.js';
import { rotatedFiles } from './log-rotation.js';
import { apiDescription, API_EXTENSIONS, API_VERSIONS } from './api-description.js';
import { parseEventFilter } from './event-filter.js';
import { METRICS_CONTENT_TYPE } from './metrics.js';
import { AUTOSTART_MODES, type AutostartMode, type CreateOptions, type DaemonEvent, type DaemonOps, type RefreshJobRequest, type RefreshOptions, type StopOptions, type VmSettings } from './model.js';
import type { Operation } from './operation-state.js';
import type { Operations } from './operations.js';
import { peerCredentials, type PeerCredentials } from './peer-cred.js';

/** A day: longer waits are typos, and timers past 2^31 ms would fire at once. */
const MAX_STOP_TIMEOUT_SEC = 86_400;

/** The part of a logger the API uses (vmkeepd's Logger fits). */
export interface ApiLogger {
  debug(fields: object, message: string): void;
  info(fields: object, message: string): void;
  warn(fields: object, message: string): void;
  error(fields: object, message: string): void;
}

export interface ApiServerOptions {
  socketPath: string;
  ops: DaemonOps;
  /** Where long requests (start, stop, refresh) run and are kept, followed by id. */
  operations: Operations;
  /** Permission bits of the socket: default 0o600 (root only), or 0o660 when `group` is given. */
  mode?: number;
  /** gid that may use the socket: the socket is chowned to it. */
  group?: number;
  /**
   * A listening socket systemd holds for us (vmkeepd.socket): served as it is, its owner and
   * mode set by the socket unit, never unlinked; `socketPath` only names it.
   */
  listenFd?: number;
  /** What the callers on this socket may do (default admin: everything). */
  level?: AccessLevel;
  logger?: ApiLogger;
  /** Told the number of open client connections each time it changes (--idle-exit). */
  onConnections?: (open: number) => void;
}

export interface ApiServer {
  readonly socketPath: string;
  /**
   * Stops listening (connections not yet accepted wait in systemd's socket for the next
   * vmkeepd), ends the event and console streams, lets requests in flight finish for a moment,
   * then cuts what is left.
   */
  close(): Promise<void>;
}

const API_PREFIX = '/1.0';
/** How long a closing server lets requests in flight finish before it cuts them. */
const CLOSE_GRACE_MS = 2_000;
const MAX_BODY_BYTES = 1024 * 1024;

// A body of 1 MiB over a local socket arrives in milliseconds; a request slower than this is stuck.
const HEADERS_TIMEOUT_MS = 10_000;
const REQUEST_TIMEOUT_MS = 30_000;
// A stream reader that stops reading is dropped rather than buffered without bound in the daemon.
const MAX_STREAM_BACKLOG_BYTES = 4 * 1024 * 1024;
const CONSOLE_CHUNK_BYTES = 64 * 1024;
// inotify can miss changes (and does not follow a replaced file); a slow poll backs it up.
const CONSOLE_POLL_MS = 250;
const STALE_PROBE_TIMEOUT_MS = 2_000;

const LAUNCH_CODES: Record<LaunchErrorCode, DaemonErrorCode> = {
  INVALID_SPEC: 'INVALID_SPEC',
  UNKNOWN_MACHINE: 'INVALID_SPEC',
  FILE_NOT_FOUND: 'INVALID_SPEC',
  FILE_CHANGED: 'BACKING_CHAIN_CHANGED',
  BACKING_CHAIN_CHANGED: 'BACKING_CHAIN_CHANGED',
  DISK_REFUSED: 'DISK_REFUSED',
  PROBE_FAILED: 'START_FAILED',
  QEMU_EXITED: 'START_FAILED',
  SPAWN_FAILED: 'START_FAILED',
  SCOPE_FAILED: 'START_FAILED',
  TIMEOUT: 'START_FAILED',
  UNSAFE_PATH: 'UNSAFE_PATH',
  OUTSIDE_STORAGE_ROOTS: 'FORBIDDEN',
};

const QMP_CODES: Record<QmpErrorCode, DaemonErrorCode> = {
  CONNECT_FAILED: 'UNREACHABLE',
  CONNECT_TIMEOUT: 'UNREACHABLE',
  GREETING_TIMEOUT: 'UNREACHABLE',
  COMMAND_TIMEOUT: 'UNREACHABLE',
  CLOSED: 'UNREACHABLE',
  NEGOTIATION_FAILED: 'QMP_FAILED',
  COMMAND_FAILED: 'QMP_FAILED',
  EVENT_TIMEOUT: 'QMP_FAILED',
  ABORTED: 'QMP_FAILED',
  LINE_TOO_LONG: 'QMP_FAILED',
  INVALID_JSON: 'QMP_FAILED',
  PROTOCOL: 'QMP_FAILED',
  INVALID_ARGUMENT: 'INVALID_REQUEST',
};

const UPGRADE_CODES: Record<UpgradeErrorCode, DaemonErrorCode> = {
  BAD_CONFIG: 'INVALID_REQUEST',
  NO_INSTALLATION: 'INVALID_REQUEST',
  BAD_STRATEGY: 'INVALID_REQUEST',
  BAD_VERSION: 'REFRESH_REFUSED',
  OLDER_TARGET: 'REFRESH_REFUSED',
  MACHINE_TYPE_MISSING: 'REFRESH_REFUSED',
  CPR_UNAVAILABLE: 'REFRESH_REFUSED',
  PIN_FAILED: 'START_FAILED',
  MIGRATION_FAILED: 'REFRESH_FAILED',
  MIGRATION_TIMEOUT: 'REFRESH_FAILED',
};

const silentLogger: ApiLogger = { debug() {}, info() {}, warn() {}, error() {} };

/**
 * Path parameters: ':name' a VM name (checked), ':id' an operation id (looked up as it is); and
 * who calls: the socket's level with the peer's credentials (awaited only where a rule needs them).
 */
type Params = { name: string; id: string; caller: Promise<Caller> };
type Handler = (req: IncomingMessage, res: ServerResponse, params: Params) => Promise<void>;

interface Route {
  /** Literal segments, with ':name' for the VM name. */
  segments: readonly string[];
  methods: Readonly<Record<string, Handler>>;
}

interface Context {
  ops: DaemonOps;
  operations: Operations;
  level: AccessLevel;
  logger: ApiLogger;
  /** Stoppers of the open streams, called when the server closes. */
  streams: Set<() => void>;
}

/**
 * Serves the control API (HTTP/1.1 + JSON) on a unix socket. A stale socket file is replaced
 * only when nothing answers on it; a live one is an error, never taken over.
 */
export async function startApiServer(options: ApiServerOptions): Promise<ApiServer> {
  const { socketPath, ops } = options;
  const logger = options.logger ?? silentLogger;
  const ctx: Context = { ops, operations: options.operations, level: options.level ?? 'admin', logger, streams: new Set() };
  const routes = buildRoutes(ctx);

  // Asked once per connection, when it is accepted: the log says who did what.
  const peers = new WeakMap<object, Promise<PeerCredentials | undefined>>();
  const server = createServer((req, res) => {
    void dispatch(routes, ctx, req, res, peers.get(req.socket) ?? Promise.resolve(undefined));
  });
  // The admin socket is root's alone (0600); an operator is told apart by its uid.
  if (ctx.level !== 'admin') server.on('connection', (socket: Socket) => {
    peers.set(socket, peerCredentials(socket).catch((error: Error) => {
      logger.warn({ err: error, access: ctx.level }, 'the caller\'s uid could not be read (SO_PEERCRED); its requests are logged with the access level only');
      return undefined;
    }));
  });
  server.headersTimeout = HEADERS_TIMEOUT_MS;
  // Counts only until the request is read, so long operations and streams are not cut.
  server.requestTimeout = REQUEST_TIMEOUT_MS;
  server.timeout = 0;
  server.on('clientError', (error: NodeJS.ErrnoException, socket: Duplex) => answerClientError(error, socket, logger));
  let open = 0;
  server.on('connection', (socket: Duplex) => {
    options.onConnections?.(++open);
    socket.once('close', () => options.onConnections?.(--open));
  });

  let closing: Promise<void> | undefined;
  const closeServer = (): Promise<void> => {
    closing ??= new Promise<void>((resolve) => {
      for (const stop of [...ctx.streams]) stop();
      // Node unlinks the socket file once the listener is closed (not one systemd passed).
      // net's close, not http's: http's also drops connections accepted whose request has not
      // been read yet, and those are requests a client already sent.
      NetServer.prototype.close.call(server, () => resolve());
      // A connection already accepted gets its answer if its request comes soon; then it is cut.
      setTimeout(() => server.closeAllConnections(), CLOSE_GRACE_MS).unref();
    });
    return closing;
  };

  await new Promise<void>((resolve, reject) => {
    const onError = (error: NodeJS.ErrnoException): void => reject(listenError(error, socketPath));
    server.once('error', onError);
    const listening = (): void => {
      server.off('error', onError);
      resolve();
    };
    if (options.listenFd !== undefined) {
      server.listen({ fd: options.listenFd }, listening);
      return;
    }
    void mkdir(dirname(socketPath), { recursive: true })
      .then(() => removeStaleSocket(socketPath))
      .then(() => server.listen(socketPath, listening), reject);
  });
  server.on('error', (error) => logger.error({ err: error, socket: socketPath }, 'control API server error'));
  if (options.listenFd !== undefined) return { socketPath, close: closeServer };

  try {
    if (options.group !== undefined) await chown(socketPath, -1, options.group);
    await chmod(socketPath, options.mode ?? (options.group === undefined ? 0o600 : 0o660));
  } catch (cause) {
    await closeServer();
    throw new DaemonError(
      'PERMISSION_DENIED',
      `cannot set the owner or mode of ${socketPath}: ${(cause as Error).message}; run vmkeepd as root, or choose a group it belongs to`,
      { cause },
    );
  }

  return { socketPath, close: closeServer };
}

// ---- socket set-up --------------------------------------------------------------------------

async function removeStaleSocket(path: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = (await lstat(path)).isSocket();
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw error;
  }
  if (!isSocket) {
    throw new DaemonError('SOCKET_IN_USE', `${path} exists and is not a socket; move it away or choose another socket path`);
  }
  const answer = await probeSocket(path);
  if (answer === 'answers') {
    throw new DaemonError(
      'SOCKET_IN_USE',
      `another process answers on ${path} (is another vmkeepd running?); stop it first or choose another socket path`,
    );
  }
  if (answer === 'refused') await unlink(path).catch(ignoreMissing);
}

/** Connects once: 'refused' means a socket file with no listener left behind by a dead process. */
function probeSocket(path: string): Promise<'answers' | 'refused' | 'gone'> {
  return new Promise((resolve, reject) => {
    const socket = connect(path);
    // A listener too busy to accept within the timeout is still alive.
    socket.setTimeout(STALE_PROBE_TIMEOUT_MS, () => finish('answers'));
    socket.once('connect', () => finish('answers'));
    socket.once('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'ECONNREFUSED') finish('refused');
      else if (error.code === 'ENOENT') finish('gone');
      else {
        socket.destroy();
        reject(new DaemonError('SOCKET_IN_USE', `cannot check whether ${path} is in use: ${error.message}`, { cause: error }));
      }
    });
    function finish(answer: 'answers' | 'refused' | 'gone'): void {
      socket.destroy();
      resolve(answer);
    }
  });
}

function listenError(error: NodeJS.ErrnoException, path: string): Error {
  if (error.code === 'EADDRINUSE') {
    return new DaemonError('SOCKET_IN_USE', `${path} was created by another process while vmkeepd started; stop it or choose another socket path`, { cause: error });
  }
  if (error.code === 'EACCES' || error.code === 'EPERM') {
    return new DaemonError('PERMISSION_DENIED', `cannot create the socket ${path}: ${error.message}; run vmkeepd as root or choose a socket path it may write`, { cause: error });
  }
  return error;
}

// ---- routing --------------------------------------------------------------------------------

/** Every route and method the server has, with `{name}` / `{id}` for parameters (the OpenAPI document's test reads it). */
export function routeTable(): Array<{ method: string; path: string }> {
  const routes = buildRoutes({ ops: undefined as never, operations: undefined as never, level: 'admin', logger: silentLogger, streams: new Set() });
  return routes.flatMap((route) => Object.keys(route.methods).map((method) => ({
    method,
    path: `/${route.segments.map((s) => (s.startsWith(':') ? `{${s.slice(1)}}` : s)).join('/')}`,
  })));
}

function buildRoutes(ctx: Context): Route[] {
  const { ops, operations } = ctx;
  return [
    { segments: [''], methods: { GET: async (_req, res) => sendJson(res, 200, { apiVersions: API_VERSIONS }) } },
    {
      segments: ['1.0'],
      methods: { GET: async (_req, res) => sendJson(res, 200, { ...ops.info(), apiVersion: '1.0', apiExtensions: API_EXTENSIONS }) },
    },
    { segments: ['1.0', 'openapi.json'], methods: { GET: async (_req, res) => sendJson(res, 200, apiDescription(ops.info().version)) } },
    {
      segments: ['1.0', 'vms'],
      methods: {
        GET: async (_req, res) => sendJson(res, 200, await ops.list()),
        POST: async (req, res) => {
          const body = await readJsonObject(req, { required: true });
          checkFields(body, ['spec', 'start', 'channel', 'policy', 'autostart']);
          if (!('spec' in body)) throw invalid('the body needs "spec": the VM spec object, e.g. {"spec": {"name": "web1", "kernel": "/srv/vmlinuz"}}');
          const options: CreateOptions = {};
          const start = optionalBoolean(body, 'start');
          if (start !== undefined) options.start = start;
          if (body.channel !== undefined) {
            if (typeof body.channel !== 'string') throw invalid(`"channel" must be a channel name, got ${describeValue(body.channel)}`);
            options.channel = body.channel;
          }
          if (body.policy !== undefined) options.policy = parseStrategy(body.policy, '"policy"');
          if (body.autostart !== undefined) options.autostart = autostartMode(body.autostart);
          if (ctx.level !== 'admin') options.caller = { level: ctx.level };
          sendJson(res, 201, await ops.create(body.spec, options));
        },
      },
    },
    {
      segments: ['1.0', 'vms', ':name'],
      methods: {
        GET: async (_req, res, { name }) => sendJson(res, 200, await ops.get(name)),
        PATCH: async (req, res, { name }) => {
          const body = await readJsonObject(req, { required: true });
          checkFields(body, ['autostart']);
          const settings: VmSettings = {};
          if (body.autostart !== undefined) settings.autostart = autostartMode(body.autostart);
          sendJson(res, 200, await ops.set(name, settings));
        },
        DELETE: async (_req, res, { name }) => {
          await ops.delete(name);
          sendJson(res, 200, { deleted: name });
        },
      },
    },
    {
      segments: ['1.0', 'vms', ':name', 'start'],
      methods: {
        POST: async (req, res, { name, caller }) => {
          checkFields(await readJsonObject(req, { required: false }), []);
          const by = starterOf(await caller);
          ops.admit('start', name);
          sendOperation(res, operations.begin('start', [name], (context) => ops.start(name, context), by));
        },
      },
    },
    {
      segments: ['1.0', 'vms', ':name', 'stop'],
      methods: {
        POST: async (req, res, { name, caller }) => {
          const body = await readJsonObject(req, { required: false });
          checkFields(body, ['timeoutSec', 'force', 'hostShutdown']);
          const stop: StopOptions = {};
          if (body.timeoutSec !== undefined) stop.timeoutSec = timeoutSeconds(body.timeoutSec);
          const force = optionalBoolean(body, 'force');
          if (force !== undefined) stop.force = force;
          const hostShutdown = optionalBoolean(body, 'hostShutdown');
          if (hostShutdown !== undefined) stop.hostShutdown = hostShutdown;
          checkStop(ctx.level, stop);
          const by = starterOf(await caller);
          ops.admit('stop', name);
          sendOperation(res, operations.begin('stop', [name], (context) => ops.stop(name, stop, context), by));
        },
      },
    },
    {
      segments: ['1.0', 'vms', ':name', 'disks', 'accept'],
      methods: {
        POST: async (req, res, { name }) => {
          checkFields(await readJsonObject(req, { required: false }), []);
          sendJson(res, 200, await ops.acceptDisks(name));
        },
      },
    },
    {
      segments: ['1.0', 'vms', ':name', 'refresh'],
      methods: {
        POST: async (req, res, { name, caller }) => {
          const body = await readJsonObject(req, { required: false });
          checkFields(body, ['strategy', 'timeoutSec', 'force']);
          const options = refreshOptions(body);
          const by = starterOf(await caller);
          ops.admit('refresh', name);
          sendOperation(res, operations.begin('refresh', [name], (context) => ops.refresh(name, options, context), by));
        },
      },
    },
    {
      segments: ['1.0', 'refresh'],
      methods: {
        POST: async (req, res, { caller }) => {
          const body = await readJsonObject(req, { required: true });
          checkFields(body, ['vms', 'all', 'stale', 'strategy', 'timeoutSec', 'force', 'parallel', 'stopOnError', 'batchIntervalSec', 'maxFailures']);
          const request: RefreshJobRequest = { ...refreshOptions(body) };
          if (body.vms !== undefined) {
            if (!Array.isArray(body.vms) || !body.vms.every((v) => typeof v === 'string')) throw invalid(`"vms" must be a list of VM names, got ${describeValue(body.vms)}`);
            request.vms = body.vms as string[];
          }
          const all = optionalBoolean(body, 'all');
          const stale = optionalBoolean(body, 'stale');
          const stopOnError = optionalBoolean(body, 'stopOnError');
          if (all !== undefined) request.all = all;
          if (stale !== undefined) request.stale = stale;
          if (stopOnError !== undefined) request.stopOnError = stopOnError;
          // Their ranges are the job's to check (refresh-jobs.ts).
          for (const field of ['parallel', 'batchIntervalSec', 'maxFailures'] as const) {
            const value = body[field];
            if (value === undefined) continue;
            if (typeof value !== 'number') throw invalid(`"${field}" must be a number, got ${describeValue(value)}`);
            request[field] = value;
          }
          const by = starterOf(await caller);
          const plan = await ops.planRefreshJob(request);
          sendOperation(res, operations.begin('rolling-refresh', plan.vms, (context) => ops.runRefreshJob(plan, context), by));
        },
      },
    },
    { segments: ['1.0', 'operations'], methods: { GET: async (_req, res) => sendJson(res, 200, operations.list()) } },
    {
      segments: ['1.0', 'operations', ':id'],
      methods: {
        GET: async (_req, res, { id }) => sendJson(res, 200, operations.get(id)),
        DELETE: async (_req, res, { id, caller }) => {
          const op = operations.get(id);
          checkCancel(await caller, op.startedBy);
          // A refresh's cancel depends on what its VM does now (only a migration can be undone).
          const view = op.kind === 'refresh' && op.vms[0] !== undefined ? await ops.get(op.vms[0]).catch(() => undefined) : undefined;
          const hold = view?.operation === undefined ? undefined : { kind: view.operation.kind, ...(view.operation.id ? { operation: view.operation.id } : {}), ...(view.operation.step ? { step: view.operation.step } : {}) };
          sendJson(res, 202, operations.cancel(id, hold));
        },
      },
    },
    {
      segments: ['1.0', 'operations', ':id', 'wait'],
      methods: { GET: async (req, res, { id }) => waitOperation(ctx, req, res, id) },
    },
    { segments: ['1.0', 'upgrade-status'], methods: { GET: async (_req, res) => sendJson(res, 200, await ops.upgradeStatus()) } },
    { segments: ['1.0', 'metrics'], methods: { GET: async (_req, res) => sendMetrics(res, await ops.metricsText()) } },
    {
      segments: ['1.0', 'vms', ':name', 'qmp'],
      methods: {
        POST: async (req, res, { name }) => {
          const body = await readJsonObject(req, { required: true });
          checkFields(body, ['execute', 'arguments']);
          if (typeof body.execute !== 'string' || body.execute === '') {
            throw invalid('the body needs "execute": the QMP command name, e.g. {"execute": "query-status"}');
          }
          if (body.arguments !== undefined && !isRecord(body.arguments)) {
            throw invalid('"arguments" must be a JSON object, e.g. {"execute": "human-monitor-command", "arguments": {"command-line": "info mtree"}}');
          }
          checkQmp(ctx.level, body.execute);
          const result = await ops.qmp(name, body.execute, body.arguments);
          sendJson(res, 200, { return: result ?? {} });
        },
      },
    },
    {
      segments: ['1.0', 'vms', ':name', 'console'],
      methods: {
        GET: async (req, res, { name }) => {
          const follow = parseFollow(req);
          await streamConsole(ctx, res, name, await ops.consolePath(name), follow);
        },
      },
    },
    { segments: ['1.0', 'events'], methods: { GET: async (req, res) => streamEvents(ctx, res, parseEventFilter(queryOf(req))) } },
  ];
}

function autostartMode(value: unknown): AutostartMode {
  if ((AUTOSTART_MODES as readonly unknown[]).includes(value)) return value as AutostartMode;
  throw invalid(`"autostart" must be one of ${AUTOSTART_MODES.join(', ')}, got ${describeValue(value)}`);
}

async function dispatch(routes: Route[], ctx: Context, req: IncomingMessage, res: ServerResponse, peer: Promise<PeerCredentials | undefined>): Promise<void> {
  const started = performance.now();
  const method = req.method ?? 'GET';
  const [rawPath = ''] = (req.url ?? '').split('?', 1);
  res.once('finish', () => {
    void peer.then((creds) => {
      const fields = { method, path: rawPath, status: res.statusCode, ms: Math.round(performance.now() - started), access: ctx.level, ...creds };
      // Who did what: every change and every refusal, with the caller's uid from the kernel.
      if (method !== 'GET' || res.statusCode === 403) ctx.logger.info(fields, `${method} ${rawPath} by ${creds === undefined ? 'an unknown uid' : `uid ${creds.uid}`} (${ctx.level}): ${res.statusCode}`);
      else ctx.logger.debug(fields, 'api request');
    });
  });
  try {
    const { route, name, id } = matchRoute(routes, rawPath);
    const handler = route.methods[method];
    if (handler === undefined) {
      const allowed = Object.keys(route.methods);
      res.setHeader('Allow', allowed.join(', '));
      throw new DaemonError('METHOD_NOT_ALLOWED', `${method} is not allowed on ${rawPath}; use ${allowed.join(' or ')}`);
    }
    checkRoute(ctx.level, method, `/${route.segments.join('/')}`);
    const caller = peer.then((creds): Caller => ({ level: ctx.level, ...creds }));
    await handler(req, res, { name: name ?? '', id, caller });
  } catch (error) {
    sendError(ctx, req, res, error);
  }
}

function matchRoute(routes: Route[], path: string): { route: Route; name: string | undefined; id: string } {
  const segments = path.startsWith('/') ? path.split('/').slice(1) : [];
  // One trailing slash is forgiven (curl users type it); anything else must match exactly.
  if (segments.length > 1 && segments[segments.length - 1] === '') segments.pop();
  for (const route of routes) {
    if (route.segments.length !== segments.length) continue;
    let name: string | undefined;
    let id = '';
    const matches = route.segments.every((expected, i) => {
      const actual = segments[i] ?? '';
      if (expected === ':id') id = actual;
      else if (expected === ':name') name = actual;
      else return expected === actual;
      return actual !== '';
    });
    if (matches) return { route, name: name === undefined ? undefined : decodeVmName(name), id };
  }
  throw new DaemonError('NOT_FOUND', `no such API path: ${path.slice(0, 200) || '(empty)'}; the routes are: ${routeList(routes).join(', ')}`);
}

/** Every route with its methods, for a 404 that helps a curl user: made from the table itself. */
function routeList(routes: Route[]): string[] {
  return routes.flatMap((route) => Object.keys(route.methods).map((method) =>
    `${method} /${route.segments.map((s) => (s.startsWith(':') ? s.slice(1).toUpperCase() : s)).join('/')}`));
}

/** A VM name from the URL, checked before any operation sees it. */
function decodeVmName(raw: string): string {
  let name: string;
  try {
    name = decodeURIComponent(raw);
  } catch {
    throw invalid(`the VM name in the path is not valid URL encoding: ${JSON.stringify(raw)}`);
  }
  if (!isValidVmName(name)) throw invalid(`${describeValue(name)} is not a valid VM name: VM names are ${VM_NAME_RULE}`);
  return name;
}

function queryOf(req: IncomingMessage): URLSearchParams {
  return new URLSearchParams((req.url ?? '').split('?').slice(1).join('?'));
}

function parseFollow(req: IncomingMessage): boolean {
  const value = queryOf(req).get('follow');
  if (value === null || value === '0' || value === 'false') return false;
  if (value === '' || value === '1' || value === 'true') return true;
  throw invalid(`follow must be 1 or 0, got ${describeValue(value)}`);
}

// ---- request bodies -------------------------------------------------------------------------

/** Reads a JSON object body of at most MAX_BODY_BYTES; an empty body is {} unless required. */
async function readJsonObject(req: IncomingMessage, { required }: { required: boolean }): Promise<Record<string, unknown>> {
  const type = (req.headers['content-type'] ?? '').split(';', 1)[0]!.trim().toLowerCase();
  // curl -d sends application/x-www-form-urlencoded unless told otherwise: the body decides.
  if (type !== '' && type !== 'application/json' && !type.endsWith('+json') && type !== 'application/x-www-form-urlencoded') {
    throw new DaemonError('UNSUPPORTED_MEDIA_TYPE', `the body must be JSON, got Content-Type ${type}; send Content-Type: application/json`);
  }
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > MAX_BODY_BYTES) throw bodyTooLarge();

  const text = await readBody(req);
  if (text.trim() === '') {
    if (required) throw invalid('the request needs a JSON object body');
    return {};
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw invalid(`the body is not valid JSON (${(error as Error).message}); send a JSON object`);
  }
  if (!isRecord(parsed)) throw invalid(`the body must be a JSON object, got ${Array.isArray(parsed) ? 'an array' : parsed === null ? 'null' : typeof parsed}`);
  return parsed;
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise<string>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const finish = (error: Error | undefined): void => {
      req.off('data', onData).off('end', onEnd).off('error', onError);
      if (error === undefined) resolve(Buffer.concat(chunks).toString('utf8'));
      else reject(error);
    };
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        // Stops reading: the 413 goes out with Connection: close and the socket ends after it.
        req.pause();
        finish(bodyTooLarge());
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = (): void => finish(undefined);
    const onError = (cause: Error): void => finish(invalid(`the client went away while sending the body (${cause.message})`));
    req.on('data', onData).on('end', onEnd).on('error', onError);
  });
}

function bodyTooLarge(): DaemonError {
  return new DaemonError('BODY_TOO_LARGE', `the request body is larger than ${MAX_BODY_BYTES} bytes; a VM spec or QMP command is far smaller`);
}

/** Unknown fields are refused so a typo ("timeout" for "timeoutSec") is not silently ignored. */
function checkFields(body: Record<string, unknown>, allowed: readonly string[]): void {
  const unknown = Object.keys(body).filter((key) => !allowed.includes(key));
  if (unknown.length > 0) {
    const known = allowed.length === 0 ? 'this request takes no fields' : `known fields: ${allowed.join(', ')}`;
    throw invalid(`unknown field${unknown.length === 1 ? '' : 's'} ${unknown.map((k) => JSON.stringify(k)).join(', ')} in the body; ${known}`);
  }
}

/** strategy, timeoutSec and force, as a refresh of one VM or of many takes them. */
function refreshOptions(body: Record<string, unknown>): RefreshOptions {
  const options: RefreshOptions = {};
  if (body.strategy !== undefined) options.strategy = parseStrategy(body.strategy, '"strategy"');
  if (body.timeoutSec !== undefined) options.timeoutSec = timeoutSeconds(body.timeoutSec);
  const force = optionalBoolean(body, 'force');
  if (force !== undefined) options.force = force;
  return options;
}

function timeoutSeconds(value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value > MAX_STOP_TIMEOUT_SEC) {
    throw invalid(`"timeoutSec" must be a number of seconds from 0 to ${MAX_STOP_TIMEOUT_SEC} (a day), got ${describeValue(value)}`);
  }
  return value;
}

function optionalBoolean(body: Record<string, unknown>, field: string): boolean | undefined {
  const value = body[field];
  if (value === undefined || typeof value === 'boolean') return value;
  throw invalid(`"${field}" must be true or false, got ${describeValue(value)}`);
}


function invalid(message: string): DaemonError {
  return new DaemonError('INVALID_REQUEST', message);
}

// ---- responses ------------------------------------------------------------------------------

function sendJson(res: ServerResponse, status: number, value: unknown, headers: Record<string, string> = {}): void {
  const body = `${JSON.stringify(value)}\n`;
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), 'Cache-Control': 'no-store', ...headers });
  res.end(body);
}

/** A long request's answer: 202 with the operation and where to follow it. */
function sendOperation(res: ServerResponse, op: Operation): void {
  sendJson(res, 202, op, { Location: `${API_PREFIX}/operations/${op.id}` });
}

/** The longest wait one request may ask for; a client that wants longer asks again. */
const MAX_WAIT_SEC = 3_600;
const DEFAULT_WAIT_SEC = 60;

/** Answers the operation once it finished, or as it is at the timeout; a closing server or a gone client ends the wait. */
async function waitOperation(ctx: Context, req: IncomingMessage, res: ServerResponse, id: string): Promise<void> {
  const raw = queryOf(req).get('timeout');
  const timeoutSec = raw === null || raw === '' ? DEFAULT_WAIT_SEC : Number(raw);
  if (!Number.isFinite(timeoutSec) || timeoutSec < 0 || timeoutSec > MAX_WAIT_SEC) {
    throw invalid(`timeout must be a number of seconds from 0 to ${MAX_WAIT_SEC}, got ${describeValue(raw)}`);
  }
  ctx.operations.get(id);
  const abort = new AbortController();
  const stop = (): void => abort.abort();
  ctx.streams.add(stop);
  res.once('close', stop);
  try {
    const op = await ctx.operations.wait(id, timeoutSec * 1000, abort.signal);
    if (!res.destroyed) sendJson(res, 200, op);
  } finally {
    ctx.streams.delete(stop);
    res.off('close', stop);
  }
}

/** The Prometheus text format, for a scraper (daemon/metrics.ts). */
function sendMetrics(res: ServerResponse, text: string): void {
  res.writeHead(200, { 'Content-Type': METRICS_CONTENT_TYPE, 'Content-Length': Buffer.byteLength(text), 'Cache-Control': 'no-store' });
  res.end(text);
}

interface ApiErrorBody {
  code: DaemonErrorCode;
  message: string;
  /** Every problem of an invalid spec, for a program to show next to each field. */
  problems?: readonly SpecProblem[];
}

/** Turns what an operation threw into the API's error; only known error classes speak for themselves. */
export function toApiError(error: unknown): ApiErrorBody | undefined {
  if (error instanceof DaemonError) return { code: error.code, message: error.message };
  if (error instanceof LaunchError) {
    return error.problems.length > 0
      ? { code: LAUNCH_CODES[error.code], message: error.message, problems: error.problems }
      : { code: LAUNCH_CODES[error.code], message: error.message };
  }
  if (error instanceof QmpError) return { code: QMP_CODES[error.code], message: error.message };
  if (error instanceof UpgradeError) return { code: UPGRADE_CODES[error.code], message: error.message };
  return undefined;
}

function sendError(ctx: Context, req: IncomingMessage, res: ServerResponse, error: unknown): void {
  let body = toApiError(error);
  const where = { method: req.method, path: (req.url ?? '').split('?', 1)[0] };
  if (body === undefined) {
    // Unknown errors may carry paths or internals: the client gets a reference, the log the details.
    const reference = randomBytes(4).toString('hex');
    ctx.logger.error({ err: error, ...where, reference }, 'control API request failed unexpectedly');
    body = {
      code: 'INTERNAL',
      message: `vmkeepd failed unexpectedly handling ${where.method} ${where.path} (reference ${reference}); the details are in its log (journalctl -u vmkeepd)`,
    };
  } else if (HTTP_STATUS[body.code] >= 500) {
    ctx.logger.warn({ err: error, ...where, code: body.code }, body.message);
  }
  if (res.headersSent) {
    // A stream failed after it began: the client can only see the connection end.
    res.destroy();
    return;
  }
  // The client may still be sending the body we refused: close rather than read the rest.
  if (body.code === 'BODY_TOO_LARGE') res.setHeader('Connection', 'close');
  sendJson(res, HTTP_STATUS[body.code] ?? 500, { error: body });
}

/** Requests that never parsed as HTTP: answer in JSON like every other error, then close. */
function answerClientError(error: NodeJS.ErrnoException, socket: Duplex, logger: ApiLogger): void {
  logger.debug({ code: error.code, message: error.message }, 'malformed request on the control socket');
  if (error.code === 'ECONNRESET' || !socket.writable) {
    socket.destroy();
    return;
  }
  const status = error.code === 'HPE_HEADER_OVERFLOW' ? 431 : error.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
  const body = `${JSON.stringify({
    error: { code: 'INVALID_REQUEST', message: `not a valid HTTP/1.1 request (${STATUS_CODES[status]}); this socket speaks HTTP + JSON, e.g. curl --unix-socket SOCKET http://vmkeep${API_PREFIX}` },
  })}\n`;
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
    () => socket.destroy(),
  );
}

// ---- streams --------------------------------------------------------------------------------

/** Registers a stream with the server so close() can end it; returns the promise of its end. */
function trackStream(ctx: Context, res: ServerResponse, stop: () => void): Promise<void> {
  return new Promise<void>((resolve) => {
    const end = (): void => {
      ctx.streams.delete(end);
      stop();
      if (!res.writableEnded) res.end();
      resolve();
    };
    ctx.streams.add(end);
    res.once('close', end);
  });
}

/** True when the client keeps up; a client far behind is dropped. */
function writeStream(ctx: Context, res: ServerResponse, chunk: string | Buffer, what: string): boolean {
  if (res.writableLength > MAX_STREAM_BACKLOG_BYTES) {
    ctx.logger.warn({ backlog: res.writableLength, stream: what }, 'dropping a stream client that does not read');
    res.destroy();
    return false;
  }
  return res.write(chunk);
}

/** Resolves when the response can take more, or is gone. */
function drained(res: ServerResponse): Promise<void> {
  if (res.destroyed || res.writableEnded) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const done = (): void => {
      res.off('drain', done).off('close', done);
      resolve();
    };
    res.on('drain', done).on('close', done);
  });
}

async function streamEvents(ctx: Context, res: ServerResponse, wanted: (event: DaemonEvent) => boolean): Promise<void> {
  // Subscribed before the headers go out: a client that has seen the 200 misses nothing.
  const unsubscribe = ctx.ops.subscribe((event) => {
    if (wanted(event)) writeStream(ctx, res, `${JSON.stringify(event)}\n`, 'events');
  });
  res.writeHead(200, { 'Content-Type': 'application/x-ndjson', 'Cache-Control': 'no-store' });
  res.flushHeaders();
  await trackStream(ctx, res, unsubscribe);
}

async function streamConsole(ctx: Context, res: ServerResponse, name: string, path: string, follow: boolean): Promise<void> {
  let handle: FileHandle;
  // The whole log: its rotated files, oldest first, then the live one (followed from its start).
  const older = follow ? [] : await rotatedFiles(path);
  try {
    handle = await openOwnFileHandle(path, 'read');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new DaemonError('NOT_FOUND', `${name} has no console log yet: it has not been started (vmkeep start ${name})`, { cause: error });
    }
    throw error;
  }
  res.writeHead(200, { 'Content-Type': 'text/plain; charset=utf-8', 'Cache-Control': 'no-store', 'X-Content-Type-Options': 'nosniff' });
  res.flushHeaders();

  let ended = false;
  let wake: (() => void) | undefined;
  const poke = (): void => {
    const resolve = wake;
    wake = undefined;
    resolve?.();
  };
  let watcher: FSWatcher | undefined;
  let timer: NodeJS.Timeout | undefined;
  if (follow) {
    try {
      watcher = watch(path, poke);
      watcher.on('error', () => undefined);
    } catch {
      // The poll below still sees every change.
    }
    timer = setInterval(poke, CONSOLE_POLL_MS);
  }
  const done = trackStream(ctx, res, () => {
    ended = true;
    watcher?.close();
    if (timer !== undefined) clearInterval(timer);
    poke();
  });

  const buffer = Buffer.alloc(CONSOLE_CHUNK_BYTES);
  let position = 0;
  try {
    for (const file of older) {
      const text = await readOwnFile(file).catch(() => Buffer.alloc(0));
      if (ended) break;
      if (text.length > 0 && !writeStream(ctx, res, text, 'console')) await drained(res);
    }
    while (!ended) {
      const { bytesRead } = await handle.read(buffer, 0, CONSOLE_CHUNK_BYTES, position);
      if (bytesRead > 0) {
        position += bytesRead;
        // Copied: the read buffer is reused while the response may still hold the chunk.
        if (!writeStream(ctx, res, Buffer.from(buffer.subarray(0, bytesRead)), 'console')) await drained(res);
        continue;
      }
      if (!follow) break;
      // A restarted VM gets a new or truncated log: start again from its first byte.
      const [current, onDisk] = await Promise.all([handle.stat(), stat(path).catch(() => undefined)]);
      if (onDisk !== undefined && onDisk.ino !== current.ino) {
        await handle.close();
        handle = await openOwnFileHandle(path, 'read');
        position = 0;
        continue;
      }
      if (current.size < position) {
        position = 0;
        continue;
      }
      if (!ended) await new Promise<void>((resolve) => (wake = resolve));
    }
  } finally {
    await handle.close().catch(() => undefined);
    if (!res.writableEnded && !res.destroyed) res.end();
  }
  await done;
}
