// Links and files planted where vmkeepd writes (ARCHITECTURE.md, invariant 11), replayed
// against the real daemon: a symlink at serial.log, qemu.log, the VM's folder or its log folder, a
// file at qmp.sock. Each create fails naming the path, the link's target is untouched, nothing
// stays recorded. The console of a VM whose serial.log is a link is refused, not read through.
import { lstat, mkdir, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonError } from '../../daemon/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { ensureGuestImage, type GuestImage } from '../support/guest.js';

let guest: GuestImage;
let host: DaemonHost;
/** Files outside vmkeepd's folders that the links point at: each must stay as it was. */
let outside: string;

beforeAll(async () => {
  guest = await ensureGuestImage();
  host = await DaemonHost.boot({ name: `pln-${process.pid}` });
  outside = join(host.dir, 'outside');
  await mkdir(outside, { recursive: true });
});

afterAll(async () => {
  await host?.shutdown();
});

function spec(name: string): Record<string, unknown> {
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 };
}

const vmDir = (name: string): string => join(host.dir, 'run', 'vms', name);
/** The VM's log folder (--log-dir): its console and QEMU logs. */
const logDir = (name: string): string => join(host.dir, 'log', name);

/** A file outside vmkeepd's folders with known content and mtime. */
async function victim(name: string): Promise<{ path: string; unchanged(): Promise<void> }> {
  const path = join(outside, name);
  await writeFile(path, `precious ${name}\n`);
  const before = await stat(path);
  return {
    path,
    async unchanged() {
      expect(await readFile(path, 'utf8'), `${path} was written through the planted link`).toBe(`precious ${name}\n`);
      expect((await stat(path)).mtimeMs).toBe(before.mtimeMs);
    },
  };
}

async function refusedCreate(name: string, path: string): Promise<void> {
  const error = await host.api.create(spec(name)).then(() => undefined, (e: unknown) => e);
  expect(error, `create ${name} should have been refused`).toBeInstanceOf(DaemonError);
  expect((error as DaemonError).code).toBe('UNSAFE_PATH');
  expect((error as DaemonError).message).toContain(path);
  expect((await host.api.list()).map((v) => v.name)).not.toContain(name);
}

/** The VM's log `file` is a link to a file outside: its create is refused and the file left as it was. */
async function refusedThroughLinkedLog(name: string, file: 'serial.log' | 'qemu.log'): Promise<void> {
  const target = await victim(`${name}-${file}-target`);
  await mkdir(logDir(name), { recursive: true, mode: 0o700 });
  await symlink(target.path, join(logDir(name), file));
  await refusedCreate(name, join(logDir(name), file));
  await target.unchanged();
}

/**
 * The VM's folder at `folderOf(name)` is a link to a folder outside holding `files`: its create
 * is refused, the files are left as they were and so is the link.
 */
async function refusedThroughLinkedFolder(name: string, folderOf: (name: string) => string, files: Record<string, string>): Promise<void> {
  const folder = join(outside, `${name}-target`);
  await mkdir(folder);
  for (const [file, content] of Object.entries(files)) await writeFile(join(folder, file), content);
  await mkdir(dirname(folderOf(name)), { recursive: true, mode: 0o700 });
  await symlink(folder, folderOf(name));
  await refusedCreate(name, folderOf(name));
  for (const [file, content] of Object.entries(files)) expect(await readFile(join(folder, file), 'utf8'), `${file} in the link's target`).toBe(content);
  expect((await lstat(folderOf(name))).isSymbolicLink(), 'the planted link is left for the administrator').toBe(true);
}

describe('planted links and files under the runtime folder', () => {
  it('the runtime folders are root\'s, 0711: QEMU\'s user passes through them, nobody lists or writes them', async () => {
    for (const path of [join(host.dir, 'run'), join(host.dir, 'state')]) {
      const st = await lstat(path);
      expect(st.isDirectory(), path).toBe(true);
      expect(st.uid, path).toBe(0);
      expect((st.mode & 0o777).toString(8), path).toBe('711');
    }
  });

  it('serial.log is a symlink: the create fails naming it, the target is untouched', async () => {
    await refusedThroughLinkedLog('ser', 'serial.log');
  });

  it('qemu.log is a symlink: the create fails naming it, the target is untouched', async () => {
    await refusedThroughLinkedLog('qlog', 'qemu.log');
  });

  it('the VM folder is a symlink: the create fails naming it, nothing in the target folder is removed or written', async () => {
    await refusedThroughLinkedFolder('dirlink', vmDir, { 'qmp.sock': 'not a socket\n', 'serial.log': 'precious log\n' });
  });

  it('the log folder is a symlink: the create fails naming it, nothing in the target folder is written', async () => {
    await refusedThroughLinkedFolder('loglink', logDir, { 'serial.log': 'precious log\n' });
  });

  // The failed create then removes the VM's folder with what was planted in it: rm unlinks a
  // link or a file by its name, never through it.
  it('qmp.sock is a file vmkeepd did not create: the create fails naming it', async () => {
    await mkdir(vmDir('sock'), { recursive: true, mode: 0o700 });
    await writeFile(join(vmDir('sock'), 'qmp.sock'), 'planted\n');
    await refusedCreate('sock', join(vmDir('sock'), 'qmp.sock'));
  });

  it('the console of a VM whose serial.log is a symlink is refused, not read through the link', async () => {
    const target = await victim('console-target');
    await host.api.create(spec('con'), { start: false });
    await mkdir(logDir('con'), { recursive: true, mode: 0o700 });
    await symlink(target.path, join(logDir('con'), 'serial.log'));
    const text = await readConsole('con').catch((e: unknown) => e);
    expect(text, 'the console was served through the planted link').toBeInstanceOf(DaemonError);
    expect((text as DaemonError).message).toContain(join(logDir('con'), 'serial.log'));
    await host.api.delete('con');
  });
});

async function readConsole(name: string): Promise<string> {
  return (await host.api.console(name)).toString('utf8');
}
