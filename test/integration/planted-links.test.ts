// Links and files planted where vmkeepd writes (ARCHITECTURE.md, invariant 11), replayed
// against the real daemon: a symlink at serial.log, qemu.log, the VM's folder or its log folder, a
// file at qmp.sock. Each create fails naming the path, the link's target is untouched, nothing
// stays recorded. The console of a VM whose serial.log is a link is refused, not read through.
import { lstat, mkdir, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
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
    const target = await victim('serial-target');
    await mkdir(logDir('ser'), { recursive: true, mode: 0o700 });
    await symlink(target.path, join(logDir('ser'), 'serial.log'));
    await refusedCreate('ser', join(logDir('ser'), 'serial.log'));
    await target.unchanged();
  });

  it('qemu.log is a symlink: the create fails naming it, the target is untouched', async () => {
    const target = await victim('qemulog-target');
    await mkdir(logDir('qlog'), { recursive: true, mode: 0o700 });
    await symlink(target.path, join(logDir('qlog'), 'qemu.log'));
    await refusedCreate('qlog', join(logDir('qlog'), 'qemu.log'));
    await target.unchanged();
  });

  it('the VM folder is a symlink: the create fails naming it, nothing in the target folder is removed or written', async () => {
    const folder = join(outside, 'folder-target');
    await mkdir(folder);
    await writeFile(join(folder, 'qmp.sock'), 'not a socket\n');
    await writeFile(join(folder, 'serial.log'), 'precious log\n');
    await mkdir(join(host.dir, 'run', 'vms'), { recursive: true, mode: 0o700 });
    await symlink(folder, vmDir('dirlink'));
    await refusedCreate('dirlink', vmDir('dirlink'));
    expect(await readFile(join(folder, 'qmp.sock'), 'utf8')).toBe('not a socket\n');
    expect(await readFile(join(folder, 'serial.log'), 'utf8')).toBe('precious log\n');
    expect((await lstat(vmDir('dirlink'))).isSymbolicLink(), 'the planted link is left for the administrator').toBe(true);
  });

  it('the log folder is a symlink: the create fails naming it, nothing in the target folder is written', async () => {
    const folder = join(outside, 'log-folder-target');
    await mkdir(folder);
    await writeFile(join(folder, 'serial.log'), 'precious log\n');
    await mkdir(join(host.dir, 'log'), { recursive: true, mode: 0o700 });
    await symlink(folder, logDir('loglink'));
    await refusedCreate('loglink', logDir('loglink'));
    expect(await readFile(join(folder, 'serial.log'), 'utf8')).toBe('precious log\n');
    expect((await lstat(logDir('loglink'))).isSymbolicLink(), 'the planted link is left for the administrator').toBe(true);
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
