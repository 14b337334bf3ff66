// A VM manager on a fake QEMU host and an in-memory state folder that can fill up: what the
// manager's unit tests and its fault harness run on. "Restarting the daemon" is closing one
// manager and starting another on the same records and the same QEMUs.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { pino } from 'pino';
import { VmManager } from '../../../daemon/manager.js';
import { RecordStore, type RecordFs, type RecordFileHandle } from '../../../daemon/records.js';
import type { Installation, InstallationInfo } from '../../../launcher/index.js';
import { FakeQemuHost } from './fake-qemu.js';

/**
 * Records in memory; `full` makes every write fail with ENOSPC, as a full disk does. Each
 * daemon gets its own view (`forDaemon`): a restart fences the previous one, whose operations
 * still under way then fail as they would in a process that is gone.
 */
export class MemoryRecordFs implements RecordFs {
  readonly files = new Map<string, Buffer>();
  full = false;
  private generation = 0;

  forDaemon(): RecordFs {
    const mine = ++this.generation;
    const alive = (): void => {
      if (this.generation !== mine) throw Object.assign(new Error('this vmkeepd is gone'), { code: 'EIO' });
    };
    const fenced = <A extends unknown[], R>(f: (...args: A) => Promise<R>) => async (...args: A): Promise<R> => {
      alive();
      return f(...args);
    };
    return {
      mkdir: fenced(() => this.mkdir()),
      create: fenced(async (path: string) => {
        const handle = await this.create(path);
        return { ...handle, write: fenced((data: Uint8Array) => handle.write(data)) };
      }),
      rename: fenced((from: string, to: string) => this.rename(from, to)),
      unlink: fenced((path: string) => this.unlink(path)),
      readdir: fenced((path: string) => this.readdir(path)),
      readFile: fenced((path: string, max: number) => this.readFile(path, max)),
      syncDir: fenced(() => this.syncDir()),
    };
  }

  async mkdir(): Promise<void> {}

  async create(path: string): Promise<RecordFileHandle> {
    if (this.files.has(path)) throw Object.assign(new Error(`EEXIST: ${path}`), { code: 'EEXIST' });
    this.files.set(path, Buffer.alloc(0));
    return {
      write: async (data) => {
        if (this.full) throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
        this.files.set(path, Buffer.concat([this.files.get(path) ?? Buffer.alloc(0), Buffer.from(data)]));
      },
      sync: async () => undefined,
      close: async () => undefined,
    };
  }

  async rename(from: string, to: string): Promise<void> {
    const data = this.files.get(from);
    if (data === undefined) throw Object.assign(new Error(`ENOENT: ${from}`), { code: 'ENOENT' });
    this.files.delete(from);
    this.files.set(to, data);
  }

  async unlink(path: string): Promise<void> {
    if (!this.files.delete(path)) throw Object.assign(new Error(`ENOENT: ${path}`), { code: 'ENOENT' });
  }

  async readdir(path: string): Promise<string[]> {
    return [...this.files.keys()].filter((f) => dirname(f) === path).map((f) => f.slice(path.length + 1));
  }

  async readFile(path: string, maxBytes: number): Promise<Buffer> {
    const data = this.files.get(path);
    if (data === undefined) throw Object.assign(new Error(`ENOENT: ${path}`), { code: 'ENOENT' });
    return data.subarray(0, maxBytes + 1);
  }

  async syncDir(): Promise<void> {}

  /** VM names whose records are on "disk". */
  names(dir: string): string[] {
    return [...this.files.keys()].filter((f) => dirname(f) === dir && f.endsWith('.json')).map((f) => f.slice(dir.length + 1, -5)).sort();
  }
}

export const INSTALLATION_A: Installation = { name: 'a', binary: '/opt/qemu-a/qemu-system-x86_64', firmwareDirs: [] };
export const INSTALLATION_B: Installation = { name: 'b', binary: '/opt/qemu-b/qemu-system-x86_64', firmwareDirs: [] };

export interface World {
  host: FakeQemuHost;
  fs: MemoryRecordFs;
  recordsDir: string;
  kernel: string;
  /** The manager now running (the "daemon"). */
  manager: VmManager;
  /** Makes `b` (or `a`) the current installation for the next manager. */
  current: 'a' | 'b';
  restart(): Promise<VmManager>;
  spec(name: string): Record<string, unknown>;
  close(): Promise<void>;
}

export async function openWorld(options: { healthIntervalMs?: number; retryIntervalMs?: number } = {}): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), 'vmkeep-manager-'));
  const kernel = join(dir, 'vmlinuz');
  const header = Buffer.alloc(0x210);
  header.write('HdrS', 0x202, 'latin1');
  await writeFile(kernel, header);
  const host = new FakeQemuHost();
  const fs = new MemoryRecordFs();
  const recordsDir = join(dir, 'state', 'vms');
  const probe = async (installation: Installation): Promise<InstallationInfo> => ({
    identity: { path: installation.binary, ...host.identityOf(installation.binary), size: 1, mtimeMs: 1 },
    version: '7.2.22',
    machines: [{ name: 'pc-q35-7.2', alias: 'q35', isDefault: false }],
  });
  const world: World = {
    host, fs, recordsDir, kernel, current: 'a',
    manager: undefined as unknown as VmManager,
    async restart() {
      await world.manager?.close();
      const store = new RecordStore(recordsDir, fs.forDaemon());
      await store.init();
      world.manager = new VmManager({
        store,
        scopes: host.scopePort(),
        qemu: host,
        slice: 'vmkeep.slice',
        installations: { installations: [INSTALLATION_A, INSTALLATION_B], current: { default: world.current } },
        defaultPolicy: 'manual',
        pinRoot: join(dir, 'state', 'modules'),
        probe,
        runtimeDir: join(dir, 'run'),
        logDir: join(dir, 'log'),
        logger: pino({ level: 'silent' }),
        info: { version: 'test', pid: process.pid, stateDir: join(dir, 'state'), runtimeDir: join(dir, 'run'), startedAt: new Date().toISOString() },
        greetingTimeoutMs: 200,
        retryIntervalMs: options.retryIntervalMs ?? 50,
        healthIntervalMs: options.healthIntervalMs ?? 0,
      });
      await world.manager.reattachAll();
      return world.manager;
    },
    spec: (name) => ({ name, kernel, memoryMiB: 128 }),
    async close() {
      await world.manager?.close();
      for (const q of host.qemus.values()) q.die();
      await rm(dir, { recursive: true, force: true });
    },
  };
  await world.restart();
  return world;
}
