// Crash safety of the real record store and the single-daemon lock, with real processes
// killed by SIGKILL. The child programs import the compiled modules (globalSetup builds dist/).
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { readProcessIdentity, validateSpec } from '../../launcher/index.js';
import { DaemonError } from '../../daemon/errors.js';
import { acquireDaemonLock, PID_FILE_NAME, readPidFile } from '../../daemon/lock.js';
import { parseRecord, RECORD_SCHEMA, RecordStore, type VmRecord } from '../../daemon/records.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const DIST_RECORDS = pathToFileURL(join(ROOT, 'dist/daemon/records.js')).href;
const DIST_LOCK = pathToFileURL(join(ROOT, 'dist/daemon/lock.js')).href;
const WAIT_MS = 20_000;

let dir: string;
const children: ChildProcess[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmkeep-records-crash-'));
});

afterEach(async () => {
  // Only the processes this file started, by their PID.
  for (const child of children.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) {
      process.kill(child.pid as number, 'SIGKILL');
      await exited(child);
    }
  }
  rmSync(dir, { recursive: true, force: true });
});

/** A child node process whose stdout lines can be awaited. */
interface Child {
  proc: ChildProcess;
  lines: string[];
  stderr: () => string;
  /** Resolves with the first line (counting from the start) that satisfies `test`. */
  waitLine(what: string, test: (line: string) => boolean): Promise<string>;
}

function startChild(script: string, args: string[]): Child {
  const proc = spawn(process.execPath, [script, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(proc);
  const lines: string[] = [];
  let partial = '';
  let err = '';
  const listeners = new Set<() => void>();
  proc.stdout?.setEncoding('utf8').on('data', (chunk: string) => {
    const parts = (partial + chunk).split('\n');
    partial = parts.pop() ?? '';
    lines.push(...parts);
    for (const l of listeners) l();
  });
  proc.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    err += chunk;
  });
  proc.on('exit', () => {
    for (const l of listeners) l();
  });
  return {
    proc,
    lines,
    stderr: () => err,
    waitLine(what, test) {
      return new Promise((resolve, reject) => {
        const check = (): void => {
          const found = lines.find(test);
          if (found !== undefined) {
            done();
            resolve(found);
          } else if (proc.exitCode !== null || proc.signalCode !== null) {
            done();
            reject(new Error(`child ${proc.pid} ended (${proc.exitCode ?? proc.signalCode}) before ${what}; stderr:\n${err}`));
          }
        };
        const timer = setTimeout(() => {
          done();
          reject(new Error(`timed out after ${WAIT_MS} ms waiting for ${what} from child ${proc.pid}; stderr:\n${err}`));
        }, WAIT_MS);
        const done = (): void => {
          clearTimeout(timer);
          listeners.delete(check);
        };
        listeners.add(check);
        check();
      });
    },
  };
}

function exited(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`child ${proc.pid} did not exit within ${WAIT_MS} ms`)), WAIT_MS);
    proc.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

async function killHard(child: Child): Promise<void> {
  process.kill(child.proc.pid as number, 'SIGKILL');
  await exited(child.proc);
  expect(child.proc.signalCode).toBe('SIGKILL');
}

describe('a record rewritten in a loop and killed with SIGKILL', () => {
  // 16 disks with ~4000-character paths: about 64 KiB per record, so a torn write would show.
  function version(letter: 'a' | 'b'): VmRecord {
    const disks = Array.from({ length: 16 }, (_, i) => ({ path: `/${letter.repeat(3980)}/disk-${i}.img`, format: 'raw' }));
    return {
      schema: RECORD_SCHEMA, channel: 'default',
      name: 'web',
      uuid: '123e4567-e89b-12d3-a456-426614174000',
      spec: validateSpec({ name: 'web', disks }),
      machineType: 'pc-q35-7.2',
      installation: { name: 'system', binary: '/usr/bin/qemu-system-x86_64', firmwareDirs: [] },
      paths: { qmpSocket: '/run/vmkeep/web.qmp', serialLog: '/var/lib/vmkeep/web/serial.log', stderrLog: '/var/lib/vmkeep/web/qemu.log' },
      state: letter === 'a' ? 'running' : 'paused',
      problem: `version ${letter}`,
      createdAt: '2024-05-01T09:00:00.000Z',
      updatedAt: '2024-05-01T10:00:00.000Z',
    };
  }

  it('always leaves exactly version A or version B (20 kills)', async () => {
    const a = version('a');
    const b = version('b');
    const vms = join(dir, 'vms');
    writeFileSync(join(dir, 'a.json'), JSON.stringify(a));
    writeFileSync(join(dir, 'b.json'), JSON.stringify(b));
    const script = join(dir, 'writer.mjs');
    writeFileSync(script, `
import { readFileSync } from 'node:fs';
import { RecordStore } from ${JSON.stringify(DIST_RECORDS)};
const [vms, aFile, bFile] = process.argv.slice(2);
const versions = [JSON.parse(readFileSync(aFile, 'utf8')), JSON.parse(readFileSync(bFile, 'utf8'))];
const store = new RecordStore(vms);
const removed = await store.init();
process.stdout.write('init ' + removed.length + '\\n');
for (let n = 1; ; n++) {
  await store.put(versions[n % 2]);
  process.stdout.write(n + '\\n');
}
`);
    const store = new RecordStore(vms);
    await store.init();
    await store.put(a);
    expect(Buffer.byteLength(readFileSync(store.fileOf('web')))).toBeGreaterThan(64 * 1024);

    const outcomes = { a: 0, b: 0, tempLeft: 0, writes: 0 };
    for (let i = 0; i < 20; i++) {
      const target = 1 + i * 3;
      const child = startChild(script, [vms, join(dir, 'a.json'), join(dir, 'b.json')]);
      await child.waitLine(`${target} writes`, (l) => l === String(target));
      await killHard(child);
      outcomes.writes += Number(child.lines.filter((l) => /^\d+$/.test(l)).at(-1));

      const onDisk = parseRecord(readFileSync(store.fileOf('web'), 'utf8'), store.fileOf('web'));
      if (onDisk.problem === 'version a') {
        expect(onDisk).toEqual(a);
        outcomes.a++;
      } else {
        expect(onDisk).toEqual(b);
        outcomes.b++;
      }
      const others = readdirSync(vms).filter((f) => f !== 'web.json');
      expect(others.length).toBeLessThanOrEqual(1);
      outcomes.tempLeft += others.length;
    }
    // The store, started again, cleans up and reads the survivor.
    await store.init();
    expect(readdirSync(vms)).toEqual(['web.json']);
    expect([a, b]).toContainEqual(await store.get('web'));
    console.log(`20 SIGKILLs: ${outcomes.a} left A, ${outcomes.b} left B, ${outcomes.tempLeft} left a temp file; ${outcomes.writes} writes in total`);
  });
});

describe('the single-daemon lock', () => {
  function lockerScript(): string {
    const script = join(dir, 'locker.mjs');
    writeFileSync(script, `
import { acquireDaemonLock } from ${JSON.stringify(DIST_LOCK)};
try {
  await acquireDaemonLock(process.argv[2]);
  process.stdout.write(JSON.stringify({ ok: true, pid: process.pid }) + '\\n');
  setInterval(() => {}, 1 << 30); // hold the lock until killed
} catch (err) {
  process.stdout.write(JSON.stringify({ ok: false, code: err.code, message: err.message }) + '\\n');
  process.exitCode = 3;
}
`);
    return script;
  }

  async function tryLock(script: string, stateDir: string): Promise<{ child: Child; result: { ok: boolean; pid?: number; code?: string; message?: string } }> {
    const child = startChild(script, [stateDir]);
    const line = await child.waitLine('the lock result', (l) => l.startsWith('{'));
    return { child, result: JSON.parse(line) as { ok: boolean; pid?: number; code?: string; message?: string } };
  }

  async function inProcessError(stateDir: string): Promise<DaemonError> {
    try {
      const lock = await acquireDaemonLock(stateDir);
      await lock.release();
    } catch (err) {
      expect(err).toBeInstanceOf(DaemonError);
      return err as DaemonError;
    }
    throw new Error(`acquireDaemonLock(${stateDir}) succeeded, expected LOCKED`);
  }

  it('lets one process in; the next is told who holds it; SIGKILL frees it at once', async () => {
    const script = lockerScript();
    const state = join(dir, 'state');

    const first = await tryLock(script, state);
    expect(first.result).toEqual({ ok: true, pid: first.child.proc.pid });
    expect((await readPidFile(join(state, PID_FILE_NAME)))?.pid).toBe(first.child.proc.pid);

    const second = await tryLock(script, state);
    await exited(second.child.proc);
    expect(second.child.proc.exitCode).toBe(3);
    expect(second.result.code).toBe('LOCKED');
    expect(second.result.message).toMatch(new RegExp(`^another vmkeepd \\(pid ${first.child.proc.pid}, running since \\d{4}-.*\\) already manages state folder ${state}; stop it first \\(systemctl stop vmkeepd\\) or give this one another --state-dir`));

    // The same folder by another spelling is the same lock.
    symlinkSync(state, join(dir, 'alias'));
    const viaAlias = await inProcessError(join(dir, 'alias'));
    expect(viaAlias.code).toBe('LOCKED');
    expect(viaAlias.message).toContain(`pid ${first.child.proc.pid}`);

    await killHard(first.child);
    // The pid file is stale now; the kernel dropped the socket, so the next one gets in.
    expect((await readPidFile(join(state, PID_FILE_NAME)))?.pid).toBe(first.child.proc.pid);
    const third = await tryLock(script, state);
    expect(third.result).toEqual({ ok: true, pid: third.child.proc.pid });
    expect((await readPidFile(join(state, PID_FILE_NAME)))?.pid).toBe(third.child.proc.pid);
    await killHard(third.child);

    // In this process: acquire, release (the pid file goes), acquire again.
    const lock = await acquireDaemonLock(state);
    expect((await readPidFile(lock.pidFile))?.pid).toBe(process.pid);
    expect((await tryLock(script, state)).result.message).toContain(`pid ${process.pid}`);
    await lock.release();
    await lock.release();
    expect(existsSync(join(state, PID_FILE_NAME))).toBe(false);
    const again = await acquireDaemonLock(state);
    await again.release();
  });

  it('release() leaves a pid file that is not its own', async () => {
    const state = join(dir, 'state');
    const lock = await acquireDaemonLock(state);
    const foreign = JSON.stringify({ pid: 1, startTime: '1', startedAt: '2024-01-01T00:00:00Z' });
    writeFileSync(lock.pidFile, foreign);
    await lock.release();
    expect(readFileSync(join(state, PID_FILE_NAME), 'utf8')).toBe(foreign);
  });

  it('refuses when the pid file names a live holder it cannot see (another network namespace)', async () => {
    const state = join(dir, 'state');
    const script = join(dir, 'idle.mjs');
    writeFileSync(script, "process.stdout.write('up\\n'); setInterval(() => {}, 1 << 30);\n");
    const other = startChild(script, []);
    await other.waitLine('the idle child to start', (l) => l === 'up');
    const identity = readProcessIdentity(other.proc.pid as number);
    expect(identity).not.toBeNull();
    const lock = await acquireDaemonLock(state);
    await lock.release();
    writeFileSync(join(state, PID_FILE_NAME), JSON.stringify({ pid: identity?.pid, startTime: identity?.startTime, startedAt: '2024-01-01T00:00:00.000Z' }));
    const err = await inProcessError(state);
    expect(err.code).toBe('LOCKED');
    expect(err.message).toContain(`pid ${identity?.pid}, running since 2024-01-01T00:00:00.000Z (it runs in another network namespace)`);

    // Once that process is gone its pid file is just stale.
    await killHard(other);
    const after = await acquireDaemonLock(state);
    expect((await readPidFile(after.pidFile))?.pid).toBe(process.pid);
    await after.release();
  });
});
