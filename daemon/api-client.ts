import { request, type IncomingMessage } from 'node:http';
import { StringDecoder } from 'node:string_decoder';
import { DaemonError, type DaemonErrorCode } from './errors.js';
import { DEFAULT_MIGRATE_TIMEOUT_SEC, DEFAULT_REBOOT_TIMEOUT_SEC, DEFAULT_STOP_TIMEOUT_SEC } from './model.js';
import type {
  CreateOptions, DaemonEvent, DaemonEventType, DaemonInfo, RefreshJobRequest, RefreshOptions, RefreshOutcome, StopOptions,
  DiskAcceptResult, UpgradeStatus, VmSettings, VmView,
} from './model.js';
import type { Operation } from './operation-state.js';

/** Which events to receive (GET /1.0/events?type=...&vm=...); "vm" is every vm-* type. */
export interface EventFilter {
  type?: ReadonlyArray<DaemonEventType | 'vm'>;
  vm?: readonly string[];
}

export interface ApiClientOptions {
  socketPath: string;
  /** How long a quick request (info, list, get, delete, qmp) waits for vmkeepd's answer; default 30 s. */
  timeoutMs?: number;
}

export interface ConsoleOptions {
  /** Keep streaming what the guest writes until `signal` aborts. */
  follow?: boolean;
  /** Receives the console bytes as they come instead of collecting them. */
  onData?: (chunk: Buffer) => void;
  signal?: AbortSignal;
}

export const DEFAULT_SOCKET_PATH = '/run/vmkeep/vmkeep.sock';
const DEFAULT_CLIENT_TIMEOUT_MS = 30_000;
// Starting a VM probes QEMU, creates a scope and boots to `cont`: minutes on a loaded host.
const SLOW_OPERATION_TIMEOUT_MS = 5 * 60_000;
// Room, beyond the guest's ACPI wait, for the quit that follows and the answer.
const STOP_MARGIN_MS = 60_000;
// The daemon's longest default refresh wait (a reboot's ACPI timeout).
const DEFAULT_REFRESH_WAIT_SEC = Math.max(DEFAULT_MIGRATE_TIMEOUT_SEC, DEFAULT_REBOOT_TIMEOUT_SEC);
// No real answer comes near this; a bigger one is not the vmkeep API.
const MAX_RESPONSE_BYTES = 64 * 1024 * 1024;
const MAX_EVENT_LINE_BYTES = 1024 * 1024;
/** Seconds each wait request asks vmkeepd to hold the answer; the client asks again until the end. */
const WAIT_STEP_SEC = 30;

interface Call {
  method: 'GET' | 'POST' | 'PATCH' | 'DELETE';
  path: string;
  body?: unknown;
  timeoutMs: number;
}

/**
 * The control API seen from a program: one method per route. Every failure is a DaemonError:
 * the daemon's own code and message, or DAEMON_DOWN / DAEMON_TIMEOUT / PERMISSION_DENIED /
 * BAD_RESPONSE when the socket itself is the problem.
 */
/** How long a read cut off by a daemon going away is retried against the next one. */
const READ_RETRY_MS = 10_000;

export class ApiClient {
  readonly socketPath: string;
  private readonly timeoutMs: number;

  constructor(options: ApiClientOptions) {
    this.socketPath = options.socketPath;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_CLIENT_TIMEOUT_MS;
  }

  info(): Promise<DaemonInfo> {
    return this.json({ method: 'GET', path: '/1.0', timeoutMs: this.timeoutMs });
  }

  list(): Promise<VmView[]> {
    return this.json({ method: 'GET', path: '/1.0/vms', timeoutMs: this.timeoutMs });
  }

  get(name: string): Promise<VmView> {
    return this.json({ method: 'GET', path: vmPath(name), timeoutMs: this.timeoutMs });
  }

  /** Creates a VM from a spec (validated by the daemon) and starts it unless `start` is false. */
  create(spec: unknown, options: CreateOptions = {}): Promise<VmView> {
    return this.json({ method: 'POST', path: '/1.0/vms', body: { spec, ...options }, timeoutMs: this.slowTimeout() });
  }

  /** Refreshes one VM and waits for the outcome (as long as its timeout allows, and then some). */
  async refresh(name: string, options: Omit<RefreshOptions, 'onStep'> = {}): Promise<RefreshOutcome> {
    const waitMs = (options.timeoutSec ?? DEFAULT_REFRESH_WAIT_SEC) * 1000;
    return this.outcome<RefreshOutcome>(await this.beginRefresh(name, options), Math.max(this.slowTimeout(), waitMs + STOP_MARGIN_MS));
  }

  /** Begins a refresh of one VM: its operation, without waiting. */
  beginRefresh(name: string, options: Omit<RefreshOptions, 'onStep'> = {}): Promise<Operation> {
    return this.json({ method: 'POST', path: `${vmPath(name)}/refresh`, body: options, timeoutMs: this.timeoutMs });
  }

  /** Begins a rolling refresh: its operation (the job's id); progress comes on the event stream (type "refresh"). */
  startRefreshJob(request: RefreshJobRequest): Promise<Operation> {
    return this.json({ method: 'POST', path: '/1.0/refresh', body: request, timeoutMs: this.slowTimeout() });
  }

  operations(): Promise<Operation[]> {
    return this.json({ method: 'GET', path: '/1.0/operations', timeoutMs: this.timeoutMs });
  }

  operation(id: string): Promise<Operation> {
    return this.json({ method: 'GET', path: operationPath(id), timeoutMs: this.timeoutMs });
  }

  /** The operation once finished, or as it is after `timeoutSec` (still running then). */
  waitOperation(id: string, timeoutSec: number): Promise<Operation> {
    return this.json({ method: 'GET', path: `${operationPath(id)}/wait?timeout=${timeoutSec}`, timeoutMs: timeoutSec * 1000 + this.timeoutMs });
  }

  /** Asks the operation to stop where that is safe; CONFLICT with the reason where it is not. */
  cancelOperation(id: string): Promise<Operation> {
    return this.json({ method: 'DELETE', path: operationPath(id), timeoutMs: this.timeoutMs });
  }

  /**
   * Waits, a request at a time, until the operation finished (or `totalMs` passed: DAEMON_TIMEOUT).
   * Resolves to it; a failed or cancelled one is not an error here.
   */
  async finished(op: Operation, totalMs = Number.POSITIVE_INFINITY): Promise<Operation> {
    const deadline = Date.now() + totalMs;
    let current = op;
    while (current.status === 'pending' || current.status === 'running') {
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new DaemonError('DAEMON_TIMEOUT', `operation ${op.id} (${op.kind} of ${op.vms.join(', ')}) has not finished within ${Math.round(totalMs / 1000)} s; it goes on in vmkeepd: vmkeep operations ${op.id} --wait`);
      }
      current = await this.waitOperation(op.id, Math.max(1, Math.min(WAIT_STEP_SEC, Math.ceil(left / 1000))));
    }
    return current;
  }

  /** The result of a finished operation, or its error as a DaemonError. */
  private async outcome<T>(op: Operation, totalMs: number): Promise<T> {
    const done = await this.finished(op, totalMs);
    if (done.status === 'succeeded') return done.result as T;
    throw new DaemonError((done.error?.code ?? 'INTERNAL') as DaemonErrorCode, done.error?.message ?? `operation ${done.id} ${done.status}`);
  }

  upgradeStatus(): Promise<UpgradeStatus> {
    return this.json({ method: 'GET', path: '/1.0/upgrade-status', timeoutMs: this.slowTimeout() });
  }

  /** Records each disk's backing chain as it is now (after BACKING_CHAIN_CHANGED). */
  acceptDisks(name: string): Promise<DiskAcceptResult> {
    return this.json({ method: 'POST', path: `${vmPath(name)}/disks/accept`, body: {}, timeoutMs: this.slowTimeout() });
  }

  async start(name: string): Promise<VmView> {
    return this.outcome<VmView>(await this.beginStart(name), this.slowTimeout());
  }

  beginStart(name: string): Promise<Operation> {
    return this.json({ method: 'POST', path: `${vmPath(name)}/start`, body: {}, timeoutMs: this.timeoutMs });
  }

  /** Waits as long as the guest is given to power off, and then some. */
  async stop(name: string, options: StopOptions = {}): Promise<VmView> {
    const waitMs = options.force ? 0 : (options.timeoutSec ?? DEFAULT_STOP_TIMEOUT_SEC) * 1000;
    return this.outcome<VmView>(await this.beginStop(name, options), Math.max(this.timeoutMs, waitMs + STOP_MARGIN_MS));
  }

  beginStop(name: string, options: StopOptions = {}): Promise<Operation> {
    return this.json({ method: 'POST', path: `${vmPath(name)}/stop`, body: options, timeoutMs: this.timeoutMs });
  }

  /** Changes settings of an existing VM (autostart). */
  set(name: string, settings: VmSettings): Promise<VmView> {
    return this.json({ method: 'PATCH', path: vmPath(name), body: settings, timeoutMs: this.timeoutMs });
  }

  async delete(name: string): Promise<void> {
    await this.json({ method: 'DELETE', path: vmPath(name), timeoutMs: this.timeoutMs });
  }

  /** One QMP command on the VM's monitor; resolves to QMP's `return` value. */
  async qmp(name: string, execute: string, args?: Record<string, unknown>): Promise<unknown> {
    const body = args === undefined ? { execute } : { execute, arguments: args };
    const reply = await this.json<{ return?: unknown }>({ method: 'POST', path: `${vmPath(name)}/qmp`, body, timeoutMs: this.timeoutMs });
    return reply.return;
  }

  /**
   * The VM's serial console log. Without `onData` it resolves to the whole log; with it, each
   * chunk is delivered and it resolves at the end of the log or, with `follow`, when `signal`
   * aborts. A followed stream that vmkeepd ends itself (it stopped) rejects with DAEMON_DOWN.
   */
  console(name: string, options: ConsoleOptions & { onData: (chunk: Buffer) => void }): Promise<void>;
  console(name: string, options?: { signal?: AbortSignal }): Promise<Buffer>;
  async console(name: string, options: ConsoleOptions = {}): Promise<Buffer | void> {
    const follow = options.follow === true;
    const chunks: Buffer[] = [];
    let size = 0;
    const onData =
      options.onData ??
      ((chunk: Buffer): void => {
        size += chunk.length;
        if (size > MAX_RESPONSE_BYTES) throw this.badResponse(`the console log is larger than ${MAX_RESPONSE_BYTES} bytes`);
        chunks.push(chunk);
      });
    await this.stream(`${vmPath(name)}/console${follow ? '?follow=1' : ''}`, follow, onData, options.signal);
    return options.onData === undefined ? Buffer.concat(chunks) : undefined;
  }

  /**
   * Delivers every daemon event until `signal` aborts (then resolves). If vmkeepd ends the
   * stream (it stopped or restarted), rejects with DAEMON_DOWN: subscribe again to go on.
   */
  async events(onEvent: (event: DaemonEvent) => void, options: { signal?: AbortSignal; onOpen?: () => void; filter?: EventFilter } = {}): Promise<void> {
    const decoder = new StringDecoder('utf8');
    let pending = '';
    const query = new URLSearchParams();
    if (options.filter?.type !== undefined) query.set('type', options.filter.type.join(','));
    if (options.filter?.vm !== undefined) query.set('vm', options.filter.vm.join(','));
    await this.stream(
      `/1.0/events${query.size > 0 ? `?${query.toString()}` : ''}`,
      true,
      (chunk) => {
        pending += decoder.write(chunk);
        const lines = pending.split('\n');
        pending = lines.pop() ?? '';
        if (pending.length > MAX_EVENT_LINE_BYTES) throw this.badResponse('an event line is longer than 1 MiB');
        for (const line of lines) {
          if (line.trim() === '') continue;
          let event: unknown;
          try {
            event = JSON.parse(line);
          } catch {
            throw this.badResponse(`an event line is not JSON: ${line.slice(0, 80)}`);
          }
          if (typeof event !== 'object' || event === null || typeof (event as { type?: unknown }).type !== 'string') {
            throw this.badResponse(`an event has no "type": ${line.slice(0, 80)}`);
          }
          onEvent(event as DaemonEvent);
        }
      },
      options.signal,
      options.onOpen,
    );
  }

  // ---- transport ------------------------------------------------------------------------------

  private slowTimeout(): number {
    return Math.max(this.timeoutMs, SLOW_OPERATION_TIMEOUT_MS);
  }

  /**
   * One request with a JSON answer; a status >= 400 becomes the daemon's DaemonError. A read
   * that a daemon going away cut off (a restart, an upgrade) is asked again of the next one for
   * a few seconds; a daemon that is simply not running fails at once.
   */
  private async json<T>(call: Call): Promise<T> {
    const deadline = Date.now() + READ_RETRY_MS;
    let wentAway = false;
    let exchanged: { response: IncomingMessage; body: Buffer };
    for (let attempt = 1; ; attempt++) {
      try {
        exchanged = await this.exchange(call);
        break;
      } catch (error) {
        const cause = (error as { cause?: NodeJS.ErrnoException }).cause?.code;
        if (cause === 'ECONNRESET' || cause === 'EPIPE') wentAway = true;
        if (call.method !== 'GET' || !wentAway || (error as DaemonError).code !== 'DAEMON_DOWN' || Date.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, Math.min(50 * attempt, 500)));
      }
    }
    const { response, body } = exchanged;
    const text = body.toString('utf8');
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw this.badResponse(`${call.method} ${call.path} answered ${response.statusCode} with a body that is not JSON: ${text.slice(0, 80)}`);
    }
    if ((response.statusCode ?? 0) >= 400) throw this.daemonError(response.statusCode ?? 0, parsed, call);
    return parsed as T;
  }

  /** Sends a request and reads the whole answer, within the call's timeout. */
  private exchange(call: Call): Promise<{ response: IncomingMessage; body: Buffer }> {
    return new Promise((resolve, reject) => {
      const payload = call.body === undefined ? undefined : JSON.stringify(call.body);
      const headers: Record<string, string | number> = { Accept: 'application/json' };
      if (payload !== undefined) {
        headers['Content-Type'] = 'application/json';
        headers['Content-Length'] = Buffer.byteLength(payload);
      }
      let settled = false;
      const timer = setTimeout(() => {
        fail(new DaemonError('DAEMON_TIMEOUT', `vmkeepd did not answer ${call.method} ${call.path} within ${Math.round(call.timeoutMs / 1000)} s; it may be stuck: check its log (journalctl -u vmkeepd)`));
        req.destroy();
      }, call.timeoutMs);
      const fail = (error: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        reject(error);
      };
      const req = request({ socketPath: this.socketPath, method: call.method, path: call.path, headers, agent: false }, (response) => {
        const chunks: Buffer[] = [];
        let size = 0;
        response.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > MAX_RESPONSE_BYTES) {
            fail(this.badResponse(`the answer to ${call.method} ${call.path} is larger than ${MAX_RESPONSE_BYTES} bytes`));
            req.destroy();
            return;
          }
          chunks.push(chunk);
        });
        response.on('end', () => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          resolve({ response, body: Buffer.concat(chunks) });
        });
        response.on('error', (error) => fail(this.transportError(error, call.path)));
      });
      req.on('error', (error) => fail(this.transportError(error, call.path)));
      req.end(payload);
    });
  }

  /** A long-lived GET: chunks go to onData until the end, the signal, or an error. */
  /** `onOpen`: told once the daemon answered 200 (for events: subscribed, nothing missed from then). */
  private stream(path: string, follow: boolean, onData: (chunk: Buffer) => void, signal: AbortSignal | undefined, onOpen?: () => void): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (signal?.aborted) {
        resolve();
        return;
      }
      let settled = false;
      let aborting = false;
      const timer = setTimeout(() => {
        finish(new DaemonError('DAEMON_TIMEOUT', `vmkeepd did not answer GET ${path} within ${Math.round(this.timeoutMs / 1000)} s; it may be stuck: check its log (journalctl -u vmkeepd)`));
      }, this.timeoutMs);
      const onAbort = (): void => {
        aborting = true;
        finish(undefined);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      const finish = (error: Error | undefined): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        req.destroy();
        if (error === undefined) resolve();
        else reject(error);
      };
      const call: Call = { method: 'GET', path, timeoutMs: this.timeoutMs };
      const req = request({ socketPath: this.socketPath, method: 'GET', path, agent: false }, (response) => {
        clearTimeout(timer);
        if ((response.statusCode ?? 0) >= 400) {
          collectError(response, (body) => {
            let parsed: unknown;
            try {
              parsed = JSON.parse(body);
            } catch {
              finish(this.badResponse(`GET ${path} answered ${response.statusCode} with a body that is not JSON: ${body.slice(0, 80)}`));
              return;
            }
            finish(this.daemonError(response.statusCode ?? 0, parsed, call));
          });
          return;
        }
        onOpen?.();
        response.on('data', (chunk: Buffer) => {
          if (settled) return;
          try {
            onData(chunk);
          } catch (error) {
            finish(error as Error);
          }
        });
        response.on('end', () => {
          finish(follow ? new DaemonError('DAEMON_DOWN', `vmkeepd ended the stream GET ${path} (it stopped or restarted); run the command again once it is back`) : undefined);
        });
        response.on('error', (error) => {
          if (!aborting) finish(this.transportError(error, path));
        });
      });
      req.on('error', (error) => {
        if (!aborting) finish(this.transportError(error, path));
      });
      req.end();
    });
  }

  private daemonError(status: number, parsed: unknown, call: Call): DaemonError {
    const error = (parsed as { error?: { code?: unknown; message?: unknown } } | null)?.error;
    if (typeof error?.code !== 'string' || typeof error.message !== 'string') {
      return this.badResponse(`${call.method} ${call.path} answered ${status} without an error object`);
    }
    // A newer daemon may send a code this client does not know: it is passed on as it is.
    return new DaemonError(error.code as DaemonErrorCode, error.message);
  }

  private transportError(error: NodeJS.ErrnoException, path: string): DaemonError {
    switch (error.code) {
      case 'ENOENT':
      case 'ECONNREFUSED':
        return new DaemonError(
          'DAEMON_DOWN',
          `vmkeepd is not running (no answer on ${this.socketPath}): start it with \`systemctl start vmkeepd\` or \`vmkeep daemon\`, or point --socket / VMKEEP_SOCKET at it`,
          { cause: error },
        );
      case 'EACCES':
      case 'EPERM':
        return new DaemonError(
          'PERMISSION_DENIED',
          `permission denied on ${this.socketPath}: run vmkeep as root, or as a member of the group vmkeepd gives the socket to`,
          { cause: error },
        );
      case 'ECONNRESET':
      case 'EPIPE':
        return new DaemonError('DAEMON_DOWN', `vmkeepd closed the connection before answering ${path} (did it stop or crash?); check its state with \`systemctl status vmkeepd\``, { cause: error });
      case 'HPE_INVALID_CONSTANT':
      case 'HPE_INVALID_VERSION':
      case 'HPE_INVALID_STATUS':
        return this.badResponse(`${path}: the answer is not HTTP (${error.message})`, error);
      default:
        return new DaemonError('DAEMON_DOWN', `cannot talk to vmkeepd on ${this.socketPath}: ${error.message}`, { cause: error });
    }
  }

  private badResponse(detail: string, cause?: unknown): DaemonError {
    return new DaemonError(
      'BAD_RESPONSE',
      `${this.socketPath} does not answer like vmkeepd (${detail}); is --socket / VMKEEP_SOCKET pointing at another program's socket, or at a newer vmkeepd?`,
      cause === undefined ? undefined : { cause },
    );
  }
}

function operationPath(id: string): string {
  return `/1.0/operations/${encodeURIComponent(id)}`;
}

function vmPath(name: string): string {
  return `/1.0/vms/${encodeURIComponent(name)}`;
}

/** Reads a small error body (bounded: a hostile peer cannot fill memory). */
function collectError(response: IncomingMessage, done: (body: string) => void): void {
  const chunks: Buffer[] = [];
  let size = 0;
  response.on('data', (chunk: Buffer) => {
    size += chunk.length;
    if (size <= MAX_EVENT_LINE_BYTES) chunks.push(chunk);
  });
  response.on('end', () => done(Buffer.concat(chunks).toString('utf8')));
}
