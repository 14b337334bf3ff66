// A fake QEMU host for unit tests of the VM manager: processes with PIDs and start times, each
// with a QMP monitor that answers like QEMU does (the real QmpClient talks to it over an
// in-memory pipe), a run state, ACPI, migration between two fakes, and the faults the tests
// inject (SIGSTOP, a kill, a refused start, an event flood, an oversized reply).
import { LaunchError, type DiskChain, type DiskSpec, type ExeInfo, type LaunchedVm, type LaunchVmOptions, type ProcessIdentity, type VmSpec } from '../../../launcher/index.js';
import { QmpClient, QmpError } from '../../../qmp/index.js';
import type { QemuPort, ScopePort } from '../../../daemon/ports.js';
import { pipePair } from '../qmp/fake-peer.js';

type Status = 'prelaunch' | 'running' | 'paused' | 'shutdown' | 'inmigrate' | 'postmigrate';

interface Command { execute: string; arguments?: Record<string, unknown>; id?: unknown }

export class FakeQemu {
  alive = true;
  /** SIGSTOP: the monitor neither greets nor answers until continued. */
  stopped = false;
  status: Status;
  /** A guest without an ACPI handler ignores the power button. */
  honoursAcpi = true;
  /** The device+inode of the binary it runs. */
  exe: ExeInfo;
  migration: { status: string; target?: FakeQemu } = { status: 'none' };
  private peer: FakePeerEnd | undefined;
  private readonly exitWaiters: Array<() => void> = [];

  constructor(
    private readonly host: FakeQemuHost,
    readonly pid: number,
    readonly startTime: string,
    readonly qmpSocket: string,
    readonly spec: VmSpec,
    binary: string,
    status: Status,
  ) {
    this.status = status;
    this.exe = { path: binary, deleted: false, ...host.identityOf(binary) };
  }

  /** A client holds the monitor (one whose end is already closed does not). */
  get connected(): boolean {
    return this.peer !== undefined && !this.peer.clientClosed;
  }

  /** Opens its one monitor connection (QMP serves one client at a time). */
  attach(): Promise<QmpClient> {
    const [clientEnd, peerEnd] = pipePair();
    const peer = new FakePeerEnd(peerEnd, clientEnd, (cmd) => this.answer(cmd), () => {
      if (this.peer === peer) this.peer = undefined;
    });
    peer.stoppedOf = () => this.stopped;
    this.peer = peer;
    const connecting = QmpClient.fromStream(clientEnd, { label: this.qmpSocket, greetingTimeoutMs: 500 });
    peer.send({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'fake' }, capabilities: [] } });
    return connecting;
  }

  /** SIGKILL or crash: the process and its monitor are gone. */
  die(): void {
    if (!this.alive) return;
    this.alive = false;
    this.peer?.hangUp();
    this.peer = undefined;
    this.host.forget(this);
    for (const resolve of this.exitWaiters.splice(0)) resolve();
  }

  sigstop(): void {
    this.stopped = true;
  }

  sigcont(): void {
    this.stopped = false;
    this.peer?.release();
  }

  event(name: string, data: Record<string, unknown> = {}): void {
    this.peer?.send({ event: name, data, timestamp: { seconds: Math.floor(Date.now() / 1000), microseconds: 0 } });
  }

  /** A reply line of `bytes` bytes to the next human-monitor-command (a huge memory dump). */
  hugeReplyBytes = 0;

  whenExited(): Promise<void> {
    return this.alive ? new Promise((resolve) => this.exitWaiters.push(resolve)) : Promise.resolve();
  }

  private answer(cmd: Command): { reply?: unknown; raw?: string; after?: () => void } {
    const ok = (value: unknown = {}, after?: () => void): { reply: unknown; after?: () => void } =>
      ({ reply: { return: value, id: cmd.id }, ...(after ? { after } : {}) });
    switch (cmd.execute) {
      case 'qmp_capabilities':
      case 'set-action':
      case 'migrate-set-capabilities':
      case 'migrate-set-parameters':
        return ok();
      case 'query-status':
        return ok({ status: this.status, running: this.status === 'running' });
      case 'query-version':
        return ok({ qemu: { major: 7, minor: 2, micro: 22 }, package: 'fake' });
      case 'cont':
        return ok({}, () => {
          if (this.status === 'prelaunch' || this.status === 'paused') {
            this.status = 'running';
            this.event('RESUME');
          }
        });
      case 'stop':
        return ok({}, () => {
          this.status = 'paused';
          this.event('STOP');
        });
      case 'system_powerdown':
        return ok({}, () => {
          if (!this.honoursAcpi || this.status !== 'running') return;
          this.status = 'shutdown';
          this.event('SHUTDOWN', { guest: true, reason: 'guest-shutdown' });
        });
      case 'quit':
        return ok({}, () => {
          this.event('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' });
          this.die();
        });
      case 'migrate-incoming':
        return ok();
      case 'migrate': {
        const uri = String(cmd.arguments?.uri ?? '');
        const target = this.host.byIncoming(uri);
        if (target === undefined || this.host.failMigrations) {
          return { reply: { error: { class: 'GenericError', desc: `Failed to connect to '${uri}'` }, id: cmd.id } };
        }
        // As QEMU: the destination runs the guest only if the source ran it (a stopped one waits for cont).
        const wasRunning = this.status === 'running';
        return ok({}, () => {
          this.migration = { status: 'active', target };
          this.event('MIGRATION', { status: 'active' });
          setImmediate(() => {
            if (!this.alive || !target.alive || this.migration.status !== 'active') return;
            this.migration = { status: 'completed', target };
            this.status = 'postmigrate';
            target.status = wasRunning ? 'running' : 'paused';
            if (wasRunning) target.event('RESUME');
            // The destination reports its own end once its run state is set (QEMU with events on).
            target.event('MIGRATION', { status: 'completed' });
            this.event('MIGRATION', { status: 'completed' });
          });
        });
      }
      case 'query-migrate':
        return ok(this.migration.status === 'none' ? {} : {
          status: this.migration.status,
          ...(this.migration.status === 'completed' ? { 'total-time': 40, downtime: 3, 'setup-time': 1 } : {}),
        });
      case 'migrate_cancel':
        return ok({}, () => {
          if (this.migration.status === 'active') this.migration = { status: 'cancelled' };
        });
      case 'human-monitor-command':
        if (this.hugeReplyBytes > 0) {
          return { raw: `{"return": "${'f'.repeat(this.hugeReplyBytes)}", "id": ${JSON.stringify(cmd.id)}}\r\n` };
        }
        return ok('');
      default:
        return { reply: { error: { class: 'CommandNotFound', desc: `The command ${cmd.execute} has not been found` }, id: cmd.id } };
    }
  }
}

/** The QEMU end of one monitor connection: parses commands, holds them while SIGSTOPped. */
class FakePeerEnd {
  private buffered = '';
  private held: string[] = [];
  private readonly end: ReturnType<typeof pipePair>[1];

  constructor(
    end: ReturnType<typeof pipePair>[1],
    private readonly clientEnd: ReturnType<typeof pipePair>[0],
    private readonly answer: (cmd: Command) => { reply?: unknown; raw?: string; after?: () => void },
    onGone: () => void,
  ) {
    this.end = end;
    end.setEncoding('utf8');
    end.on('data', (text: string) => {
      this.buffered += text;
      let newline: number;
      while ((newline = this.buffered.indexOf('\n')) !== -1) {
        const line = this.buffered.slice(0, newline);
        this.buffered = this.buffered.slice(newline + 1);
        this.held.push(line);
      }
      this.pump();
    });
    end.on('end', onGone);
    end.on('close', onGone);
    end.on('error', () => undefined);
  }

  stoppedOf: () => boolean = () => false;

  get clientClosed(): boolean {
    return this.clientEnd.destroyed;
  }

  release(): void {
    this.pump();
  }

  private pump(): void {
    while (this.held.length > 0 && !this.stoppedOf()) {
      const line = this.held.shift() as string;
      let cmd: Command;
      try {
        cmd = JSON.parse(line) as Command;
      } catch {
        continue;
      }
      const { reply, raw, after } = this.answer(cmd);
      if (raw !== undefined) this.write(raw);
      else this.send(reply);
      after?.();
    }
  }

  send(message: unknown): void {
    if (!this.stoppedOf()) this.write(`${JSON.stringify(message)}\r\n`);
  }

  private write(data: string): void {
    if (!this.end.destroyed) this.end.write(data);
  }

  hangUp(): void {
    this.end.end();
  }
}

/** The fake machine: its QEMUs, its scopes, and the QemuPort and ScopePort the manager uses. */
export class FakeQemuHost implements QemuPort {
  private nextPid = 1000;
  readonly qemus = new Map<number, FakeQemu>();
  /** Every QEMU ever started, dead ones included. */
  readonly started: FakeQemu[] = [];
  private readonly incoming = new Map<string, FakeQemu>();
  /** The next launches fail as QEMU refusing the spec would. */
  failLaunches = 0;
  failMigrations = false;
  readonly scopes = new Map<string, number>();

  /** What each image path is now: tests replace a file (a new inode) or its chain. */
  readonly images = new Map<string, DiskChain>();

  async readDiskChains(disks: readonly DiskSpec[]): Promise<DiskChain[]> {
    return disks.map((d) => this.images.get(d.path) ?? [{ path: d.path, format: d.format, virtualSize: 1 << 30, ...this.identityOf(d.path) }]);
  }

  identityOf(binary: string): { dev: number; ino: number } {
    return { dev: 1, ino: [...binary].reduce((n, c) => (n * 31 + c.charCodeAt(0)) % 1_000_003, 7) };
  }

  /** The live QEMUs of a VM (by the name in its spec). */
  of(name: string): FakeQemu[] {
    return [...this.qemus.values()].filter((q) => q.alive && q.spec.name === name);
  }

  byIncoming(uri: string): FakeQemu | undefined {
    const q = this.incoming.get(uri);
    return q?.alive ? q : undefined;
  }

  forget(q: FakeQemu): void {
    this.qemus.delete(q.pid);
    for (const [name, pid] of this.scopes) if (pid === q.pid) this.scopes.delete(name);
  }

  async launch(options: LaunchVmOptions): Promise<LaunchedVm> {
    if (this.failLaunches > 0) {
      this.failLaunches--;
      throw new LaunchError('QEMU_EXITED', `QEMU exited at once (code 1): qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory`);
    }
    const pid = this.nextPid++;
    const incoming = options.incoming !== undefined;
    const q = new FakeQemu(this, pid, String(pid * 7), options.paths.qmpSocket, options.spec, options.installation.binary, incoming ? 'inmigrate' : 'prelaunch');
    this.qemus.set(pid, q);
    this.started.push(q);
    try {
      await options.placeInScope?.(pid);
    } catch (error) {
      q.die();
      throw error;
    }
    const qmp = await this.connect(options.paths.qmpSocket, { greetingTimeoutMs: 500 });
    if (incoming) {
      // The manager's migration sends migrate-incoming with this URI form.
      const uriOf = (socket: string): string => `unix:${socket.replace(/qmp-([0-9a-f]+)\.sock$/, 'migrate-$1.sock')}`;
      this.incoming.set(uriOf(options.paths.qmpSocket), q);
    }
    return { spec: options.spec, pid, startTime: q.startTime, machineType: options.machineType ?? 'pc-q35-7.2', command: { binary: options.installation.binary, args: [], env: {} } as never, qmp };
  }

  /** cpr-transfer needs a shared-memory QEMU 10: the integration tests cover it. */
  async launchCpr(): Promise<never> {
    throw new LaunchError('QEMU_EXITED', 'the fake QEMU host does not do cpr-transfer');
  }

  async connect(socketPath: string, _options: { greetingTimeoutMs: number }): Promise<QmpClient> {
    const q = [...this.qemus.values()].find((x) => x.alive && x.qmpSocket === socketPath);
    if (q === undefined) throw new QmpError('CONNECT_FAILED', `Cannot connect to ${socketPath}: ENOENT`);
    if (q.stopped || q.connected) throw new QmpError('GREETING_TIMEOUT', `no greeting from ${socketPath}`);
    const client = await q.attach();
    return client;
  }

  identity(pid: number): ProcessIdentity | null {
    const q = this.qemus.get(pid);
    if (q === undefined || !q.alive) return null;
    return { pid, startTime: q.startTime, state: q.stopped ? 'T' : 'S' } as ProcessIdentity;
  }

  isSame(pid: number, startTime: string): boolean {
    const q = this.qemus.get(pid);
    return q !== undefined && q.alive && q.startTime === startTime;
  }

  async waitForExit(pid: number, startTime: string, timeoutMs: number): Promise<void> {
    const q = this.qemus.get(pid);
    if (q === undefined || q.startTime !== startTime) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([q.whenExited(), new Promise((_, reject) => {
      timer = setTimeout(() => reject(new LaunchError('TIMEOUT', `process ${pid} still running after ${timeoutMs} ms`)), timeoutMs);
    })]).finally(() => clearTimeout(timer));
  }

  async exe(pid: number, startTime: string): Promise<ExeInfo | null> {
    return this.isSame(pid, startTime) ? (this.qemus.get(pid)?.exe ?? null) : null;
  }

  kill(pid: number): void {
    this.qemus.get(pid)?.die();
  }

  /** The fake systemd: scopes by name, their PIDs. */
  scopePort(): ScopePort {
    return {
      createScope: async (options) => {
        if (this.scopes.has(options.name)) throw new Error(`Unit ${options.name} already exists`);
        this.scopes.set(options.name, options.pids[0] as number);
      },
      scopeOfPid: async (pid) => [...this.scopes].find(([, p]) => p === pid)?.[0] ?? null,
      listScopes: async () => [...this.scopes.keys()].map((name) => ({ name })),
    };
  }
}
