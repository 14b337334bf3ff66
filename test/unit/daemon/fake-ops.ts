// An in-memory DaemonOps: what the control API translates to, without QEMU or systemd.
import { join } from 'node:path';
import { validateSpec } from '../../../launcher/index.js';
import { toApiError } from '../../../daemon/api-server.js';
import { Operations, type RunAs } from '../../../daemon/operations.js';
import {
  DaemonError, type CreateOptions, type DaemonEvent, type DaemonInfo, type DaemonOps, type DiskAcceptResult, type OperationContext, type RefreshJob, type RefreshJobPlan, type RefreshJobRequest,
  type RefreshOptions, type RefreshOutcome, type StopOptions, type UpgradeStatus, type VmSettings, type VmView,
} from '../../../daemon/index.js';

export interface FakeCall {
  op: keyof DaemonOps;
  args: unknown[];
}

type Listener = (event: DaemonEvent) => void;

/** The id of the n-th operation a FakeDaemonOps begins (a valid UUID). */
export function fakeOperationId(n: number): string {
  return `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`;
}

export class FakeDaemonOps implements DaemonOps {
  /** Every operation the API asked for, in order. */
  readonly calls: FakeCall[] = [];
  readonly vms = new Map<string, VmView>();
  /** The next call of an operation throws this instead of doing its work. */
  readonly failNext = new Map<keyof DaemonOps, unknown>();
  /** Every stop of the VM of that name throws this (e.g. a STOP_TIMEOUT for a guest that ignores ACPI). */
  readonly stopFailures = new Map<string, unknown>();
  /** While set, every stop waits for it before it answers: lets a test see stops in flight together. */
  holdStops: Promise<void> | undefined;
  /** Answers of the qmp operation by command name. */
  readonly qmpReplies = new Map<string, unknown>();
  private readonly listeners = new Set<Listener>();
  private readonly countWaiters: Array<{ count: number; resolve: () => void }> = [];
  private nextPid = 4000;

  private operationCount = 0;
  /** The operations the API runs these through, recorded in `consoleDir/operations`. */
  readonly operations: Operations;

  /** Console logs live in `consoleDir/NAME.log` (created by the test when it needs one). */
  constructor(readonly consoleDir: string) {
    this.operations = new Operations({
      dir: join(consoleDir, 'operations'),
      emit: (event) => this.emit(event),
      toError: (error) => toApiError(error) ?? { code: 'INTERNAL', message: String(error) },
      logError: () => undefined,
      // Fixed ids in order, so tests can name them: FAKE_OPERATION_ID(1) is the first.
      newId: () => fakeOperationId(++this.operationCount),
    });
  }

  get listenerCount(): number {
    return this.listeners.size;
  }

  /** Resolves once the number of event subscribers is `count`. */
  listenerCountReaches(count: number): Promise<void> {
    if (this.listeners.size === count) return Promise.resolve();
    return new Promise((resolve) => this.countWaiters.push({ count, resolve }));
  }

  emit(event: Omit<DaemonEvent, 'time'>): void {
    const full: DaemonEvent = { ...event, time: new Date().toISOString() };
    for (const listener of this.listeners) listener(full);
  }

  /** Adds a VM directly, as if the daemon had reattached it. */
  addVm(name: string, state: VmView['state'], extra: Partial<VmView> = {}): VmView {
    const now = '2025-01-01T00:00:00.000Z';
    const vm: VmView = {
      name,
      state,
      spec: validateSpec({ name, kernel: '/boot/vmlinuz' }),
      uuid: '6f1d3c2e-8c61-4a43-9d44-5d0c3b8e7a10',
      machineType: 'pc-q35-7.2',
      installation: 'default',
      channel: 'default',
      autostart: 'last-state',
      createdAt: now,
      updatedAt: now,
      ...(state === 'running' ? { pid: this.nextPid++, scope: `vmkeep-${name}.scope`, qemuVersion: '7.2.19' } : {}),
      ...extra,
    };
    this.vms.set(name, vm);
    return vm;
  }

  info(): DaemonInfo {
    this.record('info', []);
    return {
      version: '0.1.0-test',
      pid: process.pid,
      stateDir: '/var/lib/vmkeep',
      runtimeDir: '/run/vmkeep',
      startedAt: '2025-01-01T00:00:00.000Z',
      orphanScopes: [],
      damagedRecords: [],
    };
  }

  async list(): Promise<VmView[]> {
    this.record('list', []);
    return [...this.vms.values()];
  }

  async get(name: string): Promise<VmView> {
    this.record('get', [name]);
    return this.vm(name);
  }

  async create(spec: unknown, options: CreateOptions = {}): Promise<VmView> {
    this.record('create', [spec, options]);
    const valid = validateSpec(spec);
    if (this.vms.has(valid.name)) throw new DaemonError('EXISTS', `a VM named ${valid.name} exists already`);
    const vm = this.addVm(valid.name, options.start === false ? 'stopped' : 'running');
    vm.spec = valid;
    this.emit({ type: 'vm-created', vm: vm.name });
    return vm;
  }

  admit(kind: 'start' | 'stop' | 'refresh', name: string): void {
    this.record('admit', [kind, name]);
    this.vm(name);
  }

  /** As the VM lock would, the operation is told it began (pending -> running) once it is called. */
  async start(name: string, runAs?: RunAs): Promise<VmView> {
    this.record('start', [name]);
    runAs?.onRunning?.();
    const vm = this.vm(name);
    if (vm.state === 'running') throw new DaemonError('CONFLICT', `${name} is already running; stop it first (vmkeep stop ${name})`);
    return this.addVm(name, 'running', { spec: vm.spec });
  }

  async stop(name: string, options: StopOptions = {}, runAs?: RunAs): Promise<VmView> {
    this.record('stop', [name, options]);
    runAs?.onRunning?.();
    const vm = this.vm(name);
    if (this.holdStops !== undefined) await this.holdStops;
    if (this.stopFailures.has(name)) throw this.stopFailures.get(name);
    return this.addVm(name, 'stopped', {
      spec: vm.spec,
      lastExit: { reason: options.force ? 'quit by request' : 'guest shutdown', at: '2025-01-01T00:01:00.000Z' },
    });
  }

  async set(name: string, settings: VmSettings): Promise<VmView> {
    this.record('set', [name, settings]);
    const vm = this.vms.get(name);
    if (!vm) throw new DaemonError('NOT_FOUND', `no VM named "${name}"`);
    Object.assign(vm, settings);
    return vm;
  }

  async delete(name: string): Promise<void> {
    this.record('delete', [name]);
    const vm = this.vm(name);
    if (vm.pid !== undefined) throw new DaemonError('CONFLICT', `${name} has a QEMU (pid ${vm.pid}); stop it first (vmkeep stop ${name})`);
    this.vms.delete(name);
  }

  async qmp(name: string, command: string, args?: Record<string, unknown>): Promise<unknown> {
    this.record('qmp', args === undefined ? [name, command] : [name, command, args]);
    this.vm(name);
    return this.qmpReplies.get(command) ?? {};
  }

  async consolePath(name: string): Promise<string> {
    this.record('consolePath', [name]);
    this.vm(name);
    return join(this.consoleDir, `${name}.log`);
  }

  /** Every running VM counts as stale; a refresh "migrates" it at once. */
  async refresh(name: string, options: RefreshOptions = {}, runAs?: RunAs): Promise<RefreshOutcome> {
    this.record('refresh', [name, options]);
    runAs?.onRunning?.();
    const vm = this.vm(name);
    const strategy = options.strategy ?? 'manual';
    if (vm.state !== 'running' || strategy === 'manual') {
      return { vm: name, strategy, result: vm.state === 'running' ? 'reported' : 'current', totalMs: 0, message: `${name}: nothing done` };
    }
    const moved = this.addVm(name, 'running', { spec: vm.spec, installation: 'new', qemuVersion: '7.2.22' });
    return {
      vm: name, strategy, result: 'migrated', totalMs: 500, downtimeMs: 12, message: `${name} migrated`,
      from: { installation: vm.installation, version: vm.qemuVersion ?? '7.2.19' }, to: { installation: 'new', version: '7.2.22', pid: moved.pid as number },
    };
  }

  /** While set, a job begun from now on waits for it before its first VM: lets a test act while the job runs. */
  holdJobs: Promise<void> | undefined;

  async planRefreshJob(request: RefreshJobRequest): Promise<RefreshJobPlan> {
    this.record('planRefreshJob', [request]);
    // As vmkeepd: --stale without a strategy leaves out the VMs whose policy is manual (all of them here).
    const vms = request.stale === true && request.strategy === undefined
      ? []
      : (request.vms ?? [...this.vms.keys()].filter((n) => request.all || this.vms.get(n)?.state === 'running'));
    for (const vm of vms) this.vm(vm);
    const maxFailures = request.stopOnError === true ? 1 : request.maxFailures;
    return {
      vms, parallel: request.parallel ?? 1, batchIntervalSec: request.batchIntervalSec ?? 0,
      ...(maxFailures === undefined ? {} : { maxFailures }),
      options: request.strategy === undefined ? {} : { strategy: request.strategy },
    };
  }

  /** Runs the refreshes one by one and emits the events a real job would; a cancel begins no further VM. */
  async runRefreshJob(plan: RefreshJobPlan, context: OperationContext): Promise<RefreshJob> {
    this.record('runRefreshJob', [plan]);
    context.onRunning();
    const job: RefreshJob = { id: context.id, vms: plan.vms, parallel: plan.parallel, results: [] };
    const tag = { type: 'refresh' as const, job: job.id, operation: job.id };
    const hold = this.holdJobs;
    await new Promise((resolve) => setImmediate(resolve));
    // As vmkeepd: a job of no VM ends at once.
    if (hold !== undefined && plan.vms.length > 0) await hold;
    let failed = 0;
    for (const [i, vm] of plan.vms.entries()) {
      if (context.signal.aborted) {
        job.results.push({ vm, ok: false, skipped: true });
        continue;
      }
      this.emit({ ...tag, vm, step: 'started' });
      try {
        const outcome = await this.refresh(vm, plan.options);
        job.results.push({ vm, ok: true, outcome });
        this.emit({ ...tag, vm, step: 'done', outcome, progress: { done: i + 1, total: plan.vms.length, failed } });
      } catch (error) {
        failed++;
        job.results.push({ vm, ok: false, error: { code: (error as DaemonError).code ?? 'INTERNAL', message: (error as Error).message } });
        this.emit({ ...tag, vm, step: 'failed', message: (error as Error).message, progress: { done: i + 1, total: plan.vms.length, failed } });
      }
    }
    this.emit({ ...tag, step: 'job-done', progress: { done: plan.vms.length, total: plan.vms.length, failed } });
    return job;
  }

  async metricsText(): Promise<string> {
    this.record('metricsText', []);
    return '# HELP vmkeep_vms VMs by state.\n# TYPE vmkeep_vms gauge\nvmkeep_vms{state="running"} 1\n';
  }

  async upgradeStatus(): Promise<UpgradeStatus> {
    this.record('upgradeStatus', []);
    return {
      defaultPolicy: 'manual',
      channels: [{ channel: 'default', installation: 'new', binary: '/usr/bin/qemu-system-x86_64', version: '7.2.22' }],
      vms: [...this.vms.values()].map((vm) => ({
        name: vm.name, state: vm.state, channel: vm.channel, installation: vm.installation, currentInstallation: 'new', currentVersion: '7.2.22',
        stale: vm.installation !== 'new' && vm.state === 'running', reasons: vm.installation !== 'new' && vm.state === 'running' ? ['it runs an old binary'] : [],
        policy: 'manual', outcome: 'nothing',
        ...(vm.qemuVersion === undefined ? {} : { runningVersion: vm.qemuVersion }),
      })),
    };
  }

  async acceptDisks(name: string): Promise<DiskAcceptResult> {
    this.record('acceptDisks', [name]);
    const vm = this.vms.get(name);
    if (!vm) throw new DaemonError('NOT_FOUND', `no VM named ${JSON.stringify(name)}`);
    const disks = [[
      { path: '/vm/web.qcow2', format: 'qcow2' as const, virtualSize: 1 << 30, dev: 1, ino: 2 },
      { path: '/vm/base.raw', format: 'raw' as const, virtualSize: 1 << 30, dev: 1, ino: 3 },
    ]];
    return { vm: name, previous: null, disks };
  }

  subscribe(listener: Listener): () => void {
    this.record('subscribe', []);
    this.listeners.add(listener);
    this.countChanged();
    return () => {
      this.listeners.delete(listener);
      this.countChanged();
    };
  }

  private record(op: keyof DaemonOps, args: unknown[]): void {
    this.calls.push({ op, args });
    const failure = this.failNext.get(op);
    if (failure !== undefined) {
      this.failNext.delete(op);
      throw failure;
    }
  }

  private vm(name: string): VmView {
    const vm = this.vms.get(name);
    if (!vm) throw new DaemonError('NOT_FOUND', `no VM named ${JSON.stringify(name)}; see vmkeep list`);
    return vm;
  }

  private countChanged(): void {
    for (const waiter of this.countWaiters.splice(0)) {
      if (waiter.count === this.listeners.size) waiter.resolve();
      else this.countWaiters.push(waiter);
    }
  }
}
