// Long requests run as operations (the Incus model): answered at once with an id, followed by
// GET /1.0/operations/ID[/wait], cancelled where safe, and recorded in the state folder so a
// restarted vmkeepd still lists them and says how an interrupted one ended (ARCHITECTURE.md,
// "Operations"). The rules are in operation-state.ts; this file keeps them and writes them.
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { isLowercaseUuid } from '../launcher/index.js';
import { ACCESS_LEVELS, type OperationStarter } from './access.js';
import { DaemonError } from './errors.js';
import type { DaemonEvent } from './model.js';
import {
  decideCancel, DEFAULT_RETENTION, endedByRestart, endOf, isFinished, OPERATION_KINDS, OPERATION_STATUSES, pruneOperations, transition,
  type ApiOperationKind, type Operation, type OperationError, type OperationProgress, type Retention, type VmHold,
} from './operation-state.js';
import { nodeRecordFs, tempFileTarget, writeFileAtomic, type RecordFs } from './records.js';

/** Schema of an operation's file; a newer one is left alone and not listed. */
export const OPERATION_SCHEMA = 1;
const MAX_FILE_BYTES = 1024 * 1024;

/** What a VM operation runs as: the operation's id (marks the VM's lock and the events) and its cancel. */
export interface RunAs {
  id: string;
  signal?: AbortSignal;
  /** Told when it stops waiting (for the VM's lock) and begins: pending -> running. */
  onRunning?(): void;
}

/** What a running operation is handed: its id, a signal a granted cancel aborts, its progress. */
export interface OperationContext extends RunAs {
  signal: AbortSignal;
  onRunning(): void;
  progress(progress: OperationProgress): void;
}

export interface OperationsOptions {
  /** Folder of the records, e.g. STATE/operations. */
  dir: string;
  emit(event: Omit<DaemonEvent, 'time'>): void;
  /** Turns what a run threw into the API's error (code and message). */
  toError(error: unknown): OperationError;
  logError(fields: object, message: string): void;
  retention?: Retention;
  fs?: RecordFs;
  now?: () => number;
  /** Makes the ids (default randomUUID; tests pass fixed ones). */
  newId?: () => string;
}

export function operationsDir(stateDir: string): string {
  return join(stateDir, 'operations');
}

export class Operations {
  private readonly ops = new Map<string, Operation>();
  private readonly aborts = new Map<string, AbortController>();
  private readonly waiters = new Map<string, Set<() => void>>();
  /** Per operation, its writes in order: a later state never lands under an earlier one. */
  private readonly writes = new Map<string, Promise<void>>();
  private readonly fs: RecordFs;
  private readonly retention: Retention;
  private readonly now: () => number;
  private closed = false;

  constructor(private readonly options: OperationsOptions) {
    this.fs = options.fs ?? nodeRecordFs;
    this.retention = options.retention ?? DEFAULT_RETENTION;
    this.now = options.now ?? Date.now;
  }

  /**
   * Reads what earlier daemons recorded. Returns the operations they left unfinished, now
   * failed (DAEMON_RESTARTED); `explainRestart` adds where their VMs stand once reattached.
   */
  async load(): Promise<Operation[]> {
    await this.fs.mkdir(this.options.dir, 0o700);
    const ended: Operation[] = [];
    for (const file of await this.fs.readdir(this.options.dir)) {
      const path = join(this.options.dir, file);
      if (tempFileTarget(file) !== null) {
        // A write a crash cut off: the file it was to replace is whole.
        await this.fs.unlink(path).catch(() => undefined);
        continue;
      }
      if (!file.endsWith('.json')) continue;
      let op: Operation;
      try {
        op = parseOperation((await this.fs.readFile(path, MAX_FILE_BYTES)).toString('utf8'), file);
      } catch (error) {
        this.options.logError({ file: path, err: error }, `operation record ${file} is not readable; it is not listed`);
        continue;
      }
      this.ops.set(op.id, op);
      if (!isFinished(op.status)) ended.push(op);
    }
    for (const op of ended) this.put(endedByRestart(op, this.stamp()));
    await this.prune();
    return ended.map((op) => this.ops.get(op.id) as Operation);
  }

  /**
   * Begins `run` now and answers its operation: pending until `run` calls onRunning (it got
   * the VM's lock), then running. `run` gets the id and a signal that a granted cancel aborts;
   * what it returns is the result, what it throws the error. `startedBy`: the API's caller
   * (absent when vmkeepd begins it itself).
   */
  begin(kind: ApiOperationKind, vms: string[], run: (context: OperationContext) => Promise<unknown>, startedBy?: OperationStarter): Operation {
    const stamp = this.stamp();
    const pending: Operation = {
      id: (this.options.newId ?? randomUUID)(), kind, vms, status: 'pending', createdAt: stamp, updatedAt: stamp,
      ...(startedBy === undefined ? {} : { startedBy }),
    };
    const abort = new AbortController();
    this.aborts.set(pending.id, abort);
    const running = this.put(pending);
    const context: OperationContext = {
      id: running.id,
      signal: abort.signal,
      onRunning: () => {
        const op = this.ops.get(running.id) as Operation;
        if (op.status === 'pending') this.put(transition(op, 'running', this.stamp()));
      },
      progress: (progress) => {
        const op = this.ops.get(running.id) as Operation;
        if (!isFinished(op.status)) this.put({ ...op, progress, updatedAt: this.stamp() }, false);
      },
    };
    // Called now, not a tick later: the VM's lock is taken before the 202 goes out, so what
    // admit() checked still holds.
    let ran: Promise<unknown>;
    try {
      ran = Promise.resolve(run(context));
    } catch (error) {
      ran = Promise.reject(error);
    }
    void ran
      // A failure may still carry a result (a rolling refresh's per-VM outcomes).
      .then((value) => ({ ok: true as const, value }), (error: unknown) => ({ ok: false as const, error: this.options.toError(error), result: (error as { result?: unknown } | undefined)?.result }))
      .then((end) => {
        // A run that never said it began (it had nothing to wait for) was running all along.
        if (end.ok) context.onRunning();
        const op = this.ops.get(running.id) as Operation;
        const { status, ...fields } = endOf(op, end);
        this.aborts.delete(op.id);
        this.put(transition(op, status, this.stamp(), fields));
        return this.prune();
      })
      .catch((error: unknown) => this.options.logError({ operation: running.id, err: error }, 'an operation failed unexpectedly'));
    return this.ops.get(running.id) as Operation;
  }

  /** Adds to an operation a restart ended where its VMs stand now (the reattach settled them). */
  explainRestart(id: string, after: string): void {
    const op = this.ops.get(id);
    if (op?.error?.code !== 'DAEMON_RESTARTED') return;
    this.put({ ...op, error: { ...op.error, message: `${op.error.message}; ${after}` }, updatedAt: this.stamp() }, false);
  }

  list(): Operation[] {
    return [...this.ops.values()].sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  }

  get(id: string): Operation {
    const op = isLowercaseUuid(id) ? this.ops.get(id) : undefined;
    if (op === undefined) {
      throw new DaemonError('NOT_FOUND', `no operation ${JSON.stringify(id.slice(0, 64))}: finished operations are kept ${Math.round(this.retention.maxAgeMs / 3_600_000)} h (the last ${this.retention.maxCount}); list them with GET /1.0/operations`);
    }
    return op;
  }

  /** The operation once it finished, or as it is after `timeoutMs` (still running then). */
  async wait(id: string, timeoutMs: number, signal?: AbortSignal): Promise<Operation> {
    const op = this.get(id);
    if (isFinished(op.status)) return op;
    await new Promise<void>((resolve) => {
      const set = this.waiters.get(id) ?? new Set();
      this.waiters.set(id, set);
      const done = (): void => {
        clearTimeout(timer);
        set.delete(done);
        signal?.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, timeoutMs);
      signal?.addEventListener('abort', done, { once: true });
      set.add(done);
    });
    return this.get(id);
  }

  /** Asks the operation to stop where that is safe; CONFLICT with the reason where it is not. */
  cancel(id: string, hold: VmHold | undefined): Operation {
    const op = this.get(id);
    const verdict = decideCancel(op, hold);
    if (!verdict.ok) throw new DaemonError('CONFLICT', `operation ${id} cannot be cancelled: ${verdict.reason}`);
    if (op.cancelRequested) return op;
    const next = this.put({ ...op, cancelRequested: true, updatedAt: this.stamp() });
    this.aborts.get(id)?.abort(new DaemonError('CONFLICT', verdict.how));
    return next;
  }

  /** Settles when every record written so far is on disk. */
  async flush(): Promise<void> {
    await Promise.all([...this.writes.values()]);
  }

  /**
   * A closing daemon: what was written is let finish, nothing more is written (the next
   * vmkeepd may already hold the state folder; ARCHITECTURE.md, "Operations").
   */
  async close(): Promise<void> {
    this.closed = true;
    await this.flush();
  }

  private put(op: Operation, announce = true): Operation {
    this.ops.set(op.id, op);
    if (announce) {
      this.options.emit({ type: 'operation', operation: op.id, vms: op.vms, status: op.status, message: `${op.kind} of ${op.vms.join(', ') || 'no VM'}: ${op.status}` });
    }
    if (isFinished(op.status)) {
      for (const wake of [...(this.waiters.get(op.id) ?? [])]) wake();
      this.waiters.delete(op.id);
    }
    this.write(op);
    return op;
  }

  private write(op: Operation): void {
    if (this.closed) return;
    const path = join(this.options.dir, `${op.id}.json`);
    const text = `${JSON.stringify({ schema: OPERATION_SCHEMA, operation: op })}\n`;
    // An operation goes on whether or not its record could be written (a full disk): the log says so.
    const previous = this.writes.get(op.id) ?? Promise.resolve();
    const next = previous.then(() => writeFileAtomic(path, text, { fs: this.fs })).catch((error: unknown) => {
      this.options.logError({ operation: op.id, err: error }, `could not record operation ${op.id}; it is listed until vmkeepd restarts`);
    });
    this.writes.set(op.id, next);
    void next.then(() => {
      if (this.writes.get(op.id) === next) this.writes.delete(op.id);
    });
  }

  private async prune(): Promise<void> {
    if (this.closed) return;
    for (const id of pruneOperations([...this.ops.values()], this.now(), this.retention)) {
      this.ops.delete(id);
      await this.writes.get(id);
      await this.fs.unlink(join(this.options.dir, `${id}.json`)).catch(() => undefined);
    }
  }

  private stamp(): string {
    return new Date(this.now()).toISOString();
  }
}

/** One operation file; throws on anything that is not a whole, known-schema record. */
export function parseOperation(text: string, file: string): Operation {
  const raw = JSON.parse(text) as { schema?: unknown; operation?: Partial<Operation> };
  if (raw.schema !== OPERATION_SCHEMA) {
    throw new Error(`${file}: operation schema ${String(raw.schema)} is not ${OPERATION_SCHEMA} (written by a newer vmkeepd?)`);
  }
  const op = raw.operation;
  if (
    typeof op !== 'object' || op === null || typeof op.id !== 'string' || !isLowercaseUuid(op.id) || `${op.id}.json` !== file
    || !(OPERATION_KINDS as readonly unknown[]).includes(op.kind) || !(OPERATION_STATUSES as readonly unknown[]).includes(op.status)
    || !Array.isArray(op.vms) || typeof op.createdAt !== 'string' || typeof op.updatedAt !== 'string'
    || (op.startedBy !== undefined && !isStarter(op.startedBy))
  ) {
    throw new Error(`${file}: not an operation record`);
  }
  return op as Operation;
}

/** A recorded `startedBy` (records from before it have none, and are read all the same). */
function isStarter(value: unknown): value is OperationStarter {
  if (typeof value !== 'object' || value === null) return false;
  const { level, uid } = value as Record<string, unknown>;
  return (ACCESS_LEVELS as readonly unknown[]).includes(level) && (uid === undefined || (Number.isSafeInteger(uid) && (uid as number) >= 0));
}
