import type { Duplex } from 'node:stream';
import {
  parseMigrationInfo,
  parseStatusInfo,
  parseVersionInfo,
  type MigrationCapabilityStatus,
  type MigrationInfo,
  type QmpEvent,
  type QmpGreeting,
  type QmpVersionInfo,
  type StatusInfo,
} from './commands.js';
import { QmpError } from './errors.js';
import { LineDecoder, OVERSIZED_LINE } from './framing.js';
import { encodeCommand, parseMessage, type QmpMessage } from './protocol.js';

export const DEFAULT_COMMAND_TIMEOUT_MS = 10_000;
export const DEFAULT_GREETING_TIMEOUT_MS = 5_000;

// setTimeout fires at once for delays above this, which would turn a typo into a timeout.
const MAX_TIMER_MS = 2_147_483_647;

export interface QmpClientOptions {
  /** Names the peer in error messages (connectQmp uses the socket path). */
  label?: string;
  /** Default timeout of every command, including qmp_capabilities. Default 10 s. */
  commandTimeoutMs?: number;
  /** How long to wait for the greeting after connecting. Default 5 s. */
  greetingTimeoutMs?: number;
  /** Longest line accepted from the peer. Default 1 MiB. */
  maxLineBytes?: number;
  /**
   * Receives exceptions thrown by 'event'/'close' listeners, which are isolated so one bad
   * listener cannot break the connection or escape into the event loop.
   * Default: process.emitWarning.
   */
  onListenerError?: (err: unknown, listener: 'event' | 'close') => void;
}

export interface ExecuteOptions {
  /** Overrides the client's commandTimeoutMs for this call. */
  timeoutMs?: number;
}

export interface WaitForEventOptions {
  /** Default: the client's commandTimeoutMs. */
  timeoutMs?: number;
  /** Only an event for which this returns true settles the wait. If it throws, the wait rejects with that. */
  predicate?: (event: QmpEvent) => boolean;
  /** Cancels the wait (rejects with 'ABORTED'). */
  signal?: AbortSignal;
}

export type QmpEventListener = (event: QmpEvent) => void;
export type QmpCloseListener = (reason: QmpError) => void;

interface PendingCommand {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: QmpError) => void;
  timer: NodeJS.Timeout;
  /** For `quit`: QEMU may close the socket instead of (or right after) replying. */
  closeIsSuccess: boolean;
}

interface EventWaiter {
  deliver: (event: QmpEvent) => void;
  fail: (reason: QmpError) => void;
}

interface ResolvedOptions {
  label: string;
  commandTimeoutMs: number;
  greetingTimeoutMs: number;
  maxLineBytes: number | undefined;
  onListenerError: (err: unknown, listener: 'event' | 'close') => void;
}

export function checkTimeout(name: string, ms: number): number {
  if (typeof ms !== 'number' || !Number.isFinite(ms) || ms <= 0 || ms > MAX_TIMER_MS) {
    throw new QmpError('INVALID_ARGUMENT', `${name} must be a positive number of milliseconds up to ${MAX_TIMER_MS}, got ${String(ms)}`);
  }
  return ms;
}

function checkMaxLineBytes(max: number | undefined): number | undefined {
  if (max !== undefined && (!Number.isSafeInteger(max) || max < 1)) {
    throw new QmpError('INVALID_ARGUMENT', `maxLineBytes must be a positive integer, got ${String(max)}`);
  }
  return max;
}

function defaultListenerError(err: unknown, listener: 'event' | 'close'): void {
  const detail = err instanceof Error ? (err.stack ?? err.message) : String(err);
  process.emitWarning(`A QMP '${listener}' listener threw: ${detail}`, 'QmpListenerWarning');
}

function resolveOptions(options: QmpClientOptions): ResolvedOptions {
  return {
    label: options.label ?? 'the QMP peer',
    commandTimeoutMs: checkTimeout('commandTimeoutMs', options.commandTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS),
    greetingTimeoutMs: checkTimeout('greetingTimeoutMs', options.greetingTimeoutMs ?? DEFAULT_GREETING_TIMEOUT_MS),
    maxLineBytes: checkMaxLineBytes(options.maxLineBytes),
    onListenerError: options.onListenerError ?? defaultListenerError,
  };
}

/**
 * A QMP connection: greeting and capability negotiation, id-matched replies, events,
 * per-command timeouts, bounded input. Works over any Duplex (a unix socket in production,
 * an in-memory pair in tests). Nothing it does throws into the event loop: every failure
 * ends up as a rejected promise of the caller or a 'close' notification.
 */
export class QmpClient {
  readonly label: string;
  private readonly stream: Duplex;
  private readonly opts: ResolvedOptions;
  private readonly decoder: LineDecoder;
  private readonly pending = new Map<number, PendingCommand>();
  private readonly eventListeners = new Set<QmpEventListener>();
  private readonly closeListeners = new Set<QmpCloseListener>();
  private readonly waiters = new Set<EventWaiter>();
  private nextId = 1;
  private greetingInfo: QmpGreeting | undefined;
  private greetingWaiter: { resolve: (g: QmpGreeting) => void; reject: (e: QmpError) => void } | undefined;
  private oob = false;
  private commandObserver: ((command: string, seconds: number, error?: QmpError) => void) | undefined;
  private reason: QmpError | undefined;
  private readonly closed: Promise<QmpError>;
  private resolveClosed!: (reason: QmpError) => void;

  private constructor(stream: Duplex, opts: ResolvedOptions) {
    this.stream = stream;
    this.opts = opts;
    this.label = opts.label;
    this.decoder = new LineDecoder({
      ...(opts.maxLineBytes === undefined ? {} : { maxLineBytes: opts.maxLineBytes }),
      // A reply may legitimately be huge (a memory dump through human-monitor-command): it is
      // dropped and only its command fails. Anything else that long is not QMP.
      skipOversized: () => this.greetingInfo !== undefined && this.pending.size > 0,
    });
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    // Stays attached after close: a late socket error must never become an uncaught 'error'.
    stream.on('error', this.onError);
    stream.on('close', this.onStreamClose);
  }

  /**
   * Takes over a connected stream: waits for the greeting, negotiates capabilities (oob
   * only if offered). On failure the stream is destroyed and the promise rejects with
   * GREETING_TIMEOUT, NEGOTIATION_FAILED, CLOSED, LINE_TOO_LONG, INVALID_JSON, PROTOCOL or
   * COMMAND_TIMEOUT.
   */
  static async fromStream(stream: Duplex, options: QmpClientOptions = {}): Promise<QmpClient> {
    let opts: ResolvedOptions;
    try {
      opts = resolveOptions(options);
    } catch (err) {
      stream.destroy();
      throw err;
    }
    const client = new QmpClient(stream, opts);
    try {
      await client.handshake();
    } catch (err) {
      const error =
        err instanceof QmpError ? err : new QmpError('PROTOCOL', `QMP handshake with ${opts.label} failed`, { cause: err });
      client.finish(error, true);
      throw error;
    }
    return client;
  }

  /** The greeting QEMU sent (set before fromStream() resolves). */
  get greeting(): QmpGreeting {
    return this.greetingInfo as QmpGreeting;
  }

  /** Whether out-of-band execution was offered and enabled. */
  get oobEnabled(): boolean {
    return this.oob;
  }

  get isClosed(): boolean {
    return this.reason !== undefined;
  }

  /** Why the connection ended; undefined while open. */
  get closeReason(): QmpError | undefined {
    return this.reason;
  }

  /** Commands sent and not yet settled; a number that keeps growing means a stuck monitor. */
  get pendingCount(): number {
    return this.pending.size;
  }

  /** Resolves (never rejects) with the close reason once the connection has ended. */
  whenClosed(): Promise<QmpError> {
    return this.closed;
  }

  /**
   * 'event': every QMP event, in arrival order, interleaved with replies as QEMU sent them.
   * 'close': once, with the reason (code CLOSED, LINE_TOO_LONG, INVALID_JSON, PROTOCOL, ...).
   * Returns a function that removes the listener.
   */
  on(name: 'event', listener: QmpEventListener): () => void;
  on(name: 'close', listener: QmpCloseListener): () => void;
  on(name: 'event' | 'close', listener: QmpEventListener | QmpCloseListener): () => void {
    if (name === 'event') this.eventListeners.add(listener as QmpEventListener);
    else this.closeListeners.add(listener as QmpCloseListener);
    return () => this.off(name as 'event', listener as QmpEventListener);
  }

  off(name: 'event', listener: QmpEventListener): void;
  off(name: 'close', listener: QmpCloseListener): void;
  off(name: 'event' | 'close', listener: QmpEventListener | QmpCloseListener): void {
    if (name === 'event') this.eventListeners.delete(listener as QmpEventListener);
    else this.closeListeners.delete(listener as QmpCloseListener);
  }

  /**
   * Sends one command and resolves with its `return` value. Rejects with COMMAND_FAILED
   * (QMP error; `qmpClass` set), COMMAND_TIMEOUT (a late reply is then ignored),
   * INVALID_ARGUMENT, or the close reason's code if the connection ends first.
   */
  execute<T = unknown>(name: string, args?: object, opts: ExecuteOptions = {}): Promise<T> {
    const observer = this.commandObserver;
    if (observer === undefined) return this.send(name, args, opts, false) as Promise<T>;
    const began = performance.now();
    const report = (error?: QmpError): void => {
      try {
        observer(name, (performance.now() - began) / 1000, error);
      } catch (err) {
        this.opts.onListenerError(err, 'event');
      }
    };
    return this.send(name, args, opts, false).then((value) => {
      report();
      return value as T;
    }, (error: QmpError) => {
      report(error);
      throw error;
    });
  }

  /**
   * Told of every command `execute` sends once it settles: its name, seconds taken, and the
   * error if it failed (COMMAND_TIMEOUT when QEMU did not answer in time). One observer; for metrics.
   */
  observeCommands(observer: ((command: string, seconds: number, error?: QmpError) => void) | undefined): void {
    this.commandObserver = observer;
  }

  /**
   * Resolves with the first event called `name` (and accepted by the predicate) that
   * arrives after this call. Start waiting before sending the command that causes it.
   * Rejects with EVENT_TIMEOUT, ABORTED, or the close reason's code.
   */
  waitForEvent(name: string, opts: WaitForEventOptions = {}): Promise<QmpEvent> {
    return new Promise<QmpEvent>((resolve, reject) => {
      if (this.reason) {
        reject(this.closedError(`QMP event ${name}`));
        return;
      }
      const { predicate, signal } = opts;
      let timeoutMs: number;
      try {
        timeoutMs = checkTimeout('timeoutMs', opts.timeoutMs ?? this.opts.commandTimeoutMs);
      } catch (err) {
        reject(err);
        return;
      }
      if (signal?.aborted) {
        reject(new QmpError('ABORTED', `Waiting for QMP event ${name} was cancelled`, { cause: signal.reason }));
        return;
      }
      const done = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        this.waiters.delete(waiter);
      };
      const onAbort = (): void => {
        done();
        reject(new QmpError('ABORTED', `Waiting for QMP event ${name} was cancelled`, { cause: signal?.reason }));
      };
      const timer = setTimeout(() => {
        done();
        const which = predicate ? `${name} (with the expected data)` : name;
        reject(new QmpError('EVENT_TIMEOUT', `QEMU did not emit the QMP event ${which} within ${timeoutMs} ms (${this.label}).`));
      }, timeoutMs);
      const waiter: EventWaiter = {
        deliver: (event) => {
          if (event.event !== name) return;
          let matches: boolean;
          try {
            matches = predicate ? predicate(event) : true;
          } catch (err) {
            done();
            reject(err);
            return;
          }
          if (matches) {
            done();
            resolve(event);
          }
        },
        fail: (reason) => {
          done();
          reject(
            new QmpError(reason.code, `${reason.message} (while waiting for the QMP event ${name})`, { cause: reason }),
          );
        },
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiters.add(waiter);
    });
  }

  /** Ends the connection; pending commands and event waits reject with CLOSED. Idempotent. */
  close(): void {
    this.finish(new QmpError('CLOSED', `The QMP connection to ${this.label} was closed by this client.`), true);
  }

  // Typed helpers. Replies that decisions depend on are shape-checked (PROTOCOL if wrong).

  async queryStatus(opts?: ExecuteOptions): Promise<StatusInfo> {
    return parseStatusInfo(await this.execute('query-status', undefined, opts));
  }

  async queryVersion(opts?: ExecuteOptions): Promise<QmpVersionInfo> {
    return parseVersionInfo(await this.execute('query-version', undefined, opts));
  }

  async cont(opts?: ExecuteOptions): Promise<void> {
    await this.execute('cont', undefined, opts);
  }

  async stop(opts?: ExecuteOptions): Promise<void> {
    await this.execute('stop', undefined, opts);
  }

  /** ACPI power button; the guest decides. Watch for the SHUTDOWN event or poll queryStatus. */
  async systemPowerdown(opts?: ExecuteOptions): Promise<void> {
    await this.execute('system_powerdown', undefined, opts);
  }

  /** What QEMU does on guest events; vmkeep turns reboots into shutdowns it can see. */
  async setAction(actions: { reboot?: 'reset' | 'shutdown'; shutdown?: 'poweroff' | 'pause'; panic?: 'pause' | 'shutdown' | 'none' }, opts?: ExecuteOptions): Promise<void> {
    await this.execute('set-action', actions, opts);
  }

  /** Asks QEMU to exit. The connection closing after the command was sent counts as success. */
  async quit(opts?: ExecuteOptions): Promise<void> {
    await this.send('quit', undefined, opts ?? {}, true);
  }

  /** Starts an outgoing migration (e.g. uri 'unix:/path'); returns once QEMU accepted it. */
  async migrate(uri: string, opts?: ExecuteOptions): Promise<void> {
    await this.execute('migrate', { uri }, opts);
  }

  /** On a QEMU started with `-incoming defer`: listen for the incoming migration. */
  async migrateIncoming(uri: string, opts?: ExecuteOptions): Promise<void> {
    await this.execute('migrate-incoming', { uri }, opts);
  }

  async migrateCancel(opts?: ExecuteOptions): Promise<void> {
    await this.execute('migrate_cancel', undefined, opts);
  }

  async queryMigrate(opts?: ExecuteOptions): Promise<MigrationInfo> {
    return parseMigrationInfo(await this.execute('query-migrate', undefined, opts));
  }

  async migrateSetCapabilities(capabilities: MigrationCapabilityStatus[], opts?: ExecuteOptions): Promise<void> {
    await this.execute('migrate-set-capabilities', { capabilities }, opts);
  }

  async migrateSetParameters(params: Record<string, unknown>, opts?: ExecuteOptions): Promise<void> {
    await this.execute('migrate-set-parameters', params, opts);
  }

  private async handshake(): Promise<void> {
    const greeting = await this.waitForGreeting();
    this.oob = greeting.capabilities.includes('oob');
    try {
      await this.execute('qmp_capabilities', this.oob ? { enable: ['oob'] } : undefined);
    } catch (err) {
      if (err instanceof QmpError && err.code === 'COMMAND_FAILED') {
        throw new QmpError('NEGOTIATION_FAILED', `${this.label} refused QMP capability negotiation: ${err.message}`, {
          cause: err,
          qmpClass: err.qmpClass,
          command: 'qmp_capabilities',
        });
      }
      throw err;
    }
  }

  private waitForGreeting(): Promise<QmpGreeting> {
    return new Promise<QmpGreeting>((resolve, reject) => {
      if (this.greetingInfo) {
        resolve(this.greetingInfo);
        return;
      }
      if (this.reason) {
        reject(this.reason);
        return;
      }
      const ms = this.opts.greetingTimeoutMs;
      const timer = setTimeout(() => {
        this.finish(
          new QmpError(
            'GREETING_TIMEOUT',
            `No QMP greeting from ${this.label} within ${ms} ms. A QMP monitor serves one client at a time, ` +
              'so this one is probably held by another client, for example another vmkeep daemon that is ' +
              'still running or hung. Stop that client (`ss -xp` shows who has the socket open) and try again.',
          ),
          true,
        );
      }, ms);
      this.greetingWaiter = {
        resolve: (g) => {
          clearTimeout(timer);
          resolve(g);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  private send(name: string, args: object | undefined, opts: ExecuteOptions, closeIsSuccess: boolean): Promise<unknown> {
    return new Promise<unknown>((resolve, reject) => {
      if (this.reason) {
        reject(
          new QmpError('CLOSED', `Cannot send '${name}': the QMP connection is closed. ${this.reason.message}`, {
            cause: this.reason,
            command: name,
          }),
        );
        return;
      }
      const id = this.nextId++;
      let line: string;
      let timeoutMs: number;
      try {
        timeoutMs = checkTimeout('timeoutMs', opts.timeoutMs ?? this.opts.commandTimeoutMs);
        line = encodeCommand(id, name, args);
      } catch (err) {
        reject(err);
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(
          new QmpError(
            'COMMAND_TIMEOUT',
            `QEMU did not answer '${name}' within ${timeoutMs} ms (${this.label}). The monitor is busy or hung; ` +
              'the command may still take effect. Check the VM with query-status before retrying.',
            { command: name },
          ),
        );
      }, timeoutMs);
      this.pending.set(id, { command: name, resolve, reject, timer, closeIsSuccess });
      if (this.stream.destroyed || !this.stream.writable) {
        this.finish(new QmpError('CLOSED', `The QMP connection to ${this.label} is no longer writable.`), false);
        return;
      }
      this.stream.write(line);
    });
  }

  private readonly onData = (chunk: Buffer | string): void => {
    if (this.reason) return;
    let lines: string[];
    try {
      lines = this.decoder.push(typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk);
    } catch (err) {
      this.finish(err instanceof QmpError ? err : new QmpError('PROTOCOL', String(err), { cause: err }), false);
      return;
    }
    for (const line of lines) {
      // A listener may have closed the client, or a line may have been fatal.
      if (this.reason) return;
      if (line.trim() === '') continue;
      if (line === OVERSIZED_LINE) {
        this.failOldestPending();
        continue;
      }
      let message: QmpMessage;
      try {
        message = parseMessage(line);
      } catch (err) {
        this.finish(err as QmpError, false);
        return;
      }
      this.dispatch(message, line);
    }
  };

  /** Replies come in command order: a reply that was too long belongs to the oldest command. */
  private failOldestPending(): void {
    const oldest = Math.min(...this.pending.keys());
    const pending = this.pending.get(oldest);
    if (!pending) return;
    this.pending.delete(oldest);
    clearTimeout(pending.timer);
    pending.reject(new QmpError('LINE_TOO_LONG',
      `the reply to '${pending.command}' was longer than ${this.decoder.maxLineBytes} bytes and was dropped; the connection stays open. Ask for less (a smaller range or a narrower query)`,
      { command: pending.command }));
  }

  private dispatch(message: QmpMessage, line: string): void {
    if (!this.greetingInfo) {
      if (message.kind !== 'greeting') {
        this.finish(protocolViolation(`sent a ${message.kind} message before its greeting`, line, this.label), false);
        return;
      }
      this.greetingInfo = message.greeting;
      const waiter = this.greetingWaiter;
      this.greetingWaiter = undefined;
      waiter?.resolve(message.greeting);
      return;
    }
    switch (message.kind) {
      case 'greeting':
        this.finish(protocolViolation('sent a second greeting', line, this.label), false);
        return;
      case 'event':
        this.emitEvent(message.event);
        return;
      case 'return':
      case 'error': {
        // Replies without one of our ids cannot be matched: late replies to timed-out
        // commands, or QEMU's id-less error for input it could not parse. Dropping them is
        // safe: the command they belong to (if any) has already settled or will time out.
        if (typeof message.id !== 'number') return;
        const pending = this.pending.get(message.id);
        if (!pending) return;
        this.pending.delete(message.id);
        clearTimeout(pending.timer);
        if (message.kind === 'return') {
          pending.resolve(message.value);
        } else {
          pending.reject(
            new QmpError('COMMAND_FAILED', `QEMU refused '${pending.command}': ${message.desc} (${message.qmpClass})`, {
              qmpClass: message.qmpClass,
              command: pending.command,
            }),
          );
        }
        return;
      }
    }
  }

  private emitEvent(event: QmpEvent): void {
    for (const listener of [...this.eventListeners]) {
      try {
        listener(event);
      } catch (err) {
        this.reportListenerError(err, 'event');
      }
    }
    for (const waiter of [...this.waiters]) waiter.deliver(event);
  }

  private reportListenerError(err: unknown, listener: 'event' | 'close'): void {
    try {
      this.opts.onListenerError(err, listener);
    } catch {
      // The error reporter itself failed; there is nowhere left to report to.
    }
  }

  private readonly onEnd = (): void => {
    const message = this.greetingInfo
      ? `QEMU closed the QMP connection (${this.label}).`
      : `${this.label} closed the connection before sending a QMP greeting: it is not a QMP monitor, or QEMU is exiting.`;
    this.finish(new QmpError('CLOSED', message), false);
  };

  private readonly onError = (err: Error): void => {
    this.finish(new QmpError('CLOSED', `The QMP connection to ${this.label} failed: ${err.message}`, { cause: err }), false);
  };

  private readonly onStreamClose = (): void => {
    this.finish(new QmpError('CLOSED', `The QMP connection to ${this.label} was closed.`), false);
  };

  private closedError(subject: string): QmpError {
    const reason = this.reason as QmpError;
    return new QmpError('CLOSED', `Cannot wait for ${subject}: the QMP connection is closed. ${reason.message}`, {
      cause: reason,
    });
  }

  /** The single way the connection ends. Settles everything outstanding exactly once. */
  private finish(reason: QmpError, byUs: boolean): void {
    if (this.reason) return;
    this.reason = reason;
    this.decoder.reset();
    this.stream.destroy();

    const greetingWaiter = this.greetingWaiter;
    this.greetingWaiter = undefined;
    greetingWaiter?.reject(reason);

    const peerClosed = reason.code === 'CLOSED' && !byUs;
    for (const [id, pending] of this.pending) {
      this.pending.delete(id);
      clearTimeout(pending.timer);
      if (pending.closeIsSuccess && peerClosed) {
        pending.resolve(undefined);
      } else {
        pending.reject(
          new QmpError(reason.code, `${reason.message} (while waiting for the reply to '${pending.command}')`, {
            cause: reason,
            command: pending.command,
          }),
        );
      }
    }
    for (const waiter of [...this.waiters]) waiter.fail(reason);

    this.resolveClosed(reason);
    for (const listener of [...this.closeListeners]) {
      try {
        listener(reason);
      } catch (err) {
        this.reportListenerError(err, 'close');
      }
    }
  }
}

function protocolViolation(what: string, line: string, label: string): QmpError {
  const excerpt = line.length > 80 ? `${line.slice(0, 80)}...` : line;
  return new QmpError(
    'PROTOCOL',
    `${label} ${what} (${JSON.stringify(excerpt)}); it does not behave like QEMU, so the connection was closed.`,
  );
}
