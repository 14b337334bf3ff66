// One operation at a time per VM, and knowing which one: a conflict names what runs and since
// when instead of queueing blindly (ARCHITECTURE.md, "Operations").
import { DaemonError } from './errors.js';

/** What can hold a VM. User operations may refuse to wait behind each other; the rest queue. */
export type OperationKind =
  | 'create' | 'start' | 'stop' | 'delete' | 'refresh' | 'set'
  | 'reattach' | 'supervise' | 'autostart' | 'disk-accept';

const USER_OPERATIONS: ReadonlySet<OperationKind> = new Set(['create', 'start', 'stop', 'delete', 'refresh']);

/** Present-participle names for messages: "busy: migrating web1 since ...". */
const DOING: Record<OperationKind, string> = {
  create: 'creating',
  start: 'starting',
  stop: 'stopping',
  delete: 'deleting',
  refresh: 'refreshing',
  reattach: 'reattaching to',
  supervise: 'handling an event of',
  set: 'changing the settings of',
  autostart: 'starting at boot',
  'disk-accept': 'accepting the disk chains of',
};

export interface RunningOperation {
  kind: OperationKind;
  /** A finer word for what it does now (e.g. "migrating"), for messages. */
  step?: string;
  since: string;
  /** The API operation it runs as (operations.ts), if a request began it. */
  operation?: string;
}

export class OperationLock {
  private tail: Promise<unknown> = Promise.resolve();
  private readonly held: RunningOperation[] = [];

  constructor(private readonly vm: string) {}

  /** The operation running now, if any. */
  get current(): RunningOperation | undefined {
    return this.held[0];
  }

  /** Whether a user operation runs or waits. */
  get busyWithUser(): boolean {
    return this.held.some((op) => USER_OPERATIONS.has(op.kind));
  }

  /** Names the running operation's step (shown in conflicts and in the VM's view). */
  setStep(step: string): void {
    const op = this.held[0];
    if (op) op.step = step;
  }

  /**
   * Runs `operation` after those queued before it. With `refuseIfBusy`, fails at once with BUSY
   * when a user operation runs or waits: two requests on one VM never silently pile up.
   */
  run<T>(kind: OperationKind, operation: () => Promise<T>, options: { refuseIfBusy?: boolean; operation?: string; onRunning?: () => void } = {}): Promise<T> {
    if (options.refuseIfBusy && this.busyWithUser) return Promise.reject(this.busyError());
    const op: RunningOperation = { kind, since: new Date().toISOString(), ...(options.operation === undefined ? {} : { operation: options.operation }) };
    this.held.push(op);
    const body = async (): Promise<T> => {
      // The queue order is the held order: this one is first now.
      op.since = new Date().toISOString();
      options.onRunning?.();
      try {
        return await operation();
      } finally {
        this.held.splice(this.held.indexOf(op), 1);
      }
    };
    const run = this.tail.then(body, body);
    this.tail = run.catch(() => undefined);
    return run;
  }

  busyError(): DaemonError {
    const op = this.held.find((o) => USER_OPERATIONS.has(o.kind)) ?? this.held[0];
    const what = op === undefined ? 'busy' : `busy: ${op.step ?? DOING[op.kind]} ${this.vm} since ${op.since}`;
    const wait = op?.operation === undefined ? 'vmkeep events shows its end' : `vmkeep operations ${op.operation} --wait`;
    return new DaemonError('BUSY', `${what}; wait for it to finish (${wait}) and try again`);
  }
}
