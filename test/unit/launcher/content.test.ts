// Content hashes of real files and of real running processes' binaries (/proc/PID/exe).
import { spawn, type ChildProcess } from 'node:child_process';
import { appendFileSync, copyFileSync, mkdtempSync, renameSync, rmSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  cachedContentHash, hashFile, hashRunningBinary, readExe, readProcessIdentity, readRunningExe,
} from '../../../launcher/index.js';

const SLEEP = '/bin/sleep';

let dir: string;
const children: ChildProcess[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmkeep-content-'));
});

afterEach(() => {
  for (const child of children.splice(0)) child.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

/** Starts a copy of sleep at `path` (its "QEMU"); resolves with its PID and start time. */
function run(path: string): { pid: number; startTime: string } {
  const child = spawn(path, ['60'], { stdio: 'ignore' });
  children.push(child);
  const pid = child.pid as number;
  // spawn returns after exec: /proc/PID/exe is already the copy.
  return { pid, startTime: readProcessIdentity(pid)?.startTime ?? '' };
}

function copy(name: string, extra?: string): string {
  const path = join(dir, name);
  copyFileSync(SLEEP, path);
  if (extra !== undefined) appendFileSync(path, extra);
  return path;
}

describe('hashFile and hashRunningBinary', () => {
  it('same build at two paths (two images): two inodes, one hash; the running one hashes the same', async () => {
    const a = copy('a');
    const b = copy('b');
    expect(statSync(a).ino).not.toBe(statSync(b).ino);
    const ha = await hashFile(a);
    const hb = await hashFile(b);
    expect(ha.sha256).toMatch(/^[0-9a-f]{64}$/);
    expect(hb.sha256).toBe(ha.sha256);
    const proc = run(a);
    expect((await hashRunningBinary(proc.pid, proc.startTime))?.sha256).toBe(ha.sha256);
  });

  it('changed build: other bytes, other hash', async () => {
    const a = copy('a');
    const b = copy('b', '\nanother build\n');
    expect((await hashFile(b)).sha256).not.toBe((await hashFile(a)).sha256);
  });

  it('deleted file: the running process\'s binary is still hashed, through /proc/PID/exe', async () => {
    const a = copy('a');
    const original = (await hashFile(a)).sha256;
    const proc = run(a);
    // What a package upgrade does: a new file renamed over the path; then the path goes too.
    writeFileSync(`${a}.new`, 'new version');
    renameSync(`${a}.new`, a);
    unlinkSync(a);
    const exe = await readRunningExe(proc.pid, proc.startTime);
    expect(exe).toMatchObject({ path: a, deleted: true, sha256: original });
  });

  it('keeps the cheap path: the current file itself is not hashed', async () => {
    const a = copy('a', '\nnever hashed\n');
    const proc = run(a);
    const s = statSync(a);
    const exe = await readRunningExe(proc.pid, proc.startTime, { dev: s.dev, ino: s.ino });
    expect(exe?.sha256).toBeUndefined();
    expect(cachedContentHash({ dev: s.dev, ino: s.ino, size: s.size, mtimeMs: s.mtimeMs })).toBeUndefined();
  });

  it('hashes once per file: a second call is served from the cache by device, inode, size and mtime', async () => {
    const a = copy('a', '\ncached\n');
    const first = await hashFile(a);
    expect(cachedContentHash(first.stat)).toBe(first.sha256);
    const s = statSync(a);
    expect((await hashFile(a)).sha256).toBe(first.sha256);
    expect(first.stat).toEqual({ dev: s.dev, ino: s.ino, size: s.size, mtimeMs: s.mtimeMs });
  });

  it('a gone or recycled process is not hashed', async () => {
    const a = copy('a');
    const proc = run(a);
    expect(await hashRunningBinary(proc.pid, `${proc.startTime}0`)).toBeNull();
    expect(await readRunningExe(proc.pid, `${proc.startTime}0`)).toBeNull();
    expect(readExe(proc.pid)?.path).toBe(a);
  });
});
