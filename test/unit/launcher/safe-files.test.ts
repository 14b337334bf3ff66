import { execFileSync } from 'node:child_process';
import { chmod, chown, link, lstat, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { copyOwnFile, LaunchError, openOwnFile, openOwnFileHandle, ownVmFolder, removeStaleSocket, removeVmFolder, secureFolder } from '../../../launcher/index.js';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vk-safe-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function refusal(promise: Promise<unknown> | (() => unknown), path: string): Promise<void> {
  const error = typeof promise === 'function'
    ? (() => { try { promise(); return undefined; } catch (e) { return e; } })()
    : await promise.then(() => undefined, (e: unknown) => e);
  expect(error).toBeInstanceOf(LaunchError);
  expect((error as LaunchError).code).toBe('UNSAFE_PATH');
  expect((error as LaunchError).message).toContain(path);
}

describe('secureFolder', () => {
  it('creates a missing folder with the mode, tightens a looser one and sets the group', async () => {
    const path = join(dir, 'run');
    expect(await secureFolder(path, { mode: 0o700 })).toBeUndefined();
    expect((await lstat(path)).mode & 0o777).toBe(0o700);
    await chmod(path, 0o755);
    expect(await secureFolder(path, { mode: 0o700 })).toContain('mode 0755 -> 0700');
    expect((await lstat(path)).mode & 0o777).toBe(0o700);
    expect(await secureFolder(path, { mode: 0o750, gid: 4242 })).toContain('group');
    const st = await lstat(path);
    expect([st.mode & 0o777, st.gid]).toEqual([0o750, 4242]);
  });

  it('refuses a folder owned by another user, and a symlink, naming the path', async () => {
    const other = join(dir, 'other');
    await mkdir(other);
    await chown(other, 65534, 65534);
    await refusal(secureFolder(other, { mode: 0o700 }), other);
    const linked = join(dir, 'linked');
    await mkdir(join(dir, 'real'));
    await symlink(join(dir, 'real'), linked);
    await refusal(secureFolder(linked, { mode: 0o700 }), linked);
  });
});

describe('files in a VM folder', () => {
  it('ownVmFolder makes a new folder and accepts its own, refuses a link', async () => {
    await ownVmFolder(join(dir, 'a'));
    await ownVmFolder(join(dir, 'a'));
    await symlink(join(dir, 'a'), join(dir, 'b'));
    await refusal(ownVmFolder(join(dir, 'b')), join(dir, 'b'));
    await removeVmFolder(join(dir, 'b'));
    expect((await lstat(join(dir, 'a'))).isDirectory(), 'a link is not removed as if it were the folder').toBe(true);
  });

  it('openOwnFile refuses a symlink, a hard link, a FIFO and a file of another user, and writes nothing through them', async () => {
    const target = join(dir, 'target');
    await writeFile(target, 'precious');
    await symlink(target, join(dir, 'sym'));
    await refusal(() => openOwnFile(join(dir, 'sym'), 'truncate'), join(dir, 'sym'));
    await link(target, join(dir, 'hard'));
    await refusal(() => openOwnFile(join(dir, 'hard'), 'truncate'), join(dir, 'hard'));
    expect(await readFile(target, 'utf8')).toBe('precious');
    execFileSync('mkfifo', [join(dir, 'fifo')]);
    await refusal(() => openOwnFile(join(dir, 'fifo'), 'append'), join(dir, 'fifo'));
    await writeFile(join(dir, 'theirs'), 'x');
    await chown(join(dir, 'theirs'), 65534, 65534);
    await refusal(openOwnFileHandle(join(dir, 'theirs'), 'read'), join(dir, 'theirs'));
  });

  it('copyOwnFile refuses an existing target; removeStaleSocket refuses anything but a socket', async () => {
    await writeFile(join(dir, 'log'), 'line\n');
    await writeFile(join(dir, 'log.1'), 'older\n');
    await expect(copyOwnFile(join(dir, 'log'), join(dir, 'log.1'))).rejects.toThrow(/EEXIST/);
    await copyOwnFile(join(dir, 'log'), join(dir, 'log.2'));
    expect(await readFile(join(dir, 'log.2'), 'utf8')).toBe('line\n');
    await refusal(removeStaleSocket(join(dir, 'log')), join(dir, 'log'));
    await removeStaleSocket(join(dir, 'missing.sock'));
  });
});
