// Every QEMU vmkeepd starts runs as its --qemu-user (default vmkeep-qemu, made by test/setup.sh as
// by the .deb), under its seccomp sandbox, with that user's own groups and none of root's
// (ARCHITECTURE.md, invariant 11). Attacked over the admin's raw QMP: a blockdev-add of a file in
// /root (0700) fails with QEMU's own "Permission denied". Negative control: with
// `--qemu-user root --allow-qemu-root` the same blockdev-add opens the file.
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonHost } from '../support/daemon-host.js';
import { ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { credentials, qemuPidsOf } from '../support/qemu-procs.js';

const QEMU_USER = 'vmkeep-qemu';
// A file QEMU's user must not be able to open: /root is root's only.
const SECRET = `/root/vmkeep-qemu-user-test-${process.pid}`;

function qemuUserIds(): { uid: number; gid: number } {
  try {
    return { uid: Number(execFileSync('id', ['-u', QEMU_USER], { encoding: 'utf8' })), gid: Number(execFileSync('id', ['-g', QEMU_USER], { encoding: 'utf8' })) };
  } catch (error) {
    throw new Error(`the system user ${QEMU_USER} is missing: run bash test/setup.sh (useradd --system --user-group --no-create-home --shell /usr/sbin/nologin ${QEMU_USER})`, { cause: error });
  }
}

let guest: GuestImage;

beforeAll(async () => {
  qemuUserIds();
  guest = await ensureGuestImage();
  writeFileSync(SECRET, 'not for QEMU\n', { mode: 0o600 });
  expect(statSync('/root').mode & 0o077, '/root is root\'s only').toBe(0);
});

afterAll(() => {
  rmSync(SECRET, { force: true });
});

async function runningVm(host: DaemonHost, name: string): Promise<number> {
  await host.api.create({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 });
  await waitForSerial(join(host.dir, 'log', name, 'serial.log'), 'GUEST READY', 90_000);
  const pids = qemuPidsOf(name, host.dir);
  expect(pids, `one QEMU of ${name}`).toHaveLength(1);
  return pids[0] as number;
}

function openSecret(host: DaemonHost, name: string): Promise<unknown> {
  return host.api.qmp(name, 'blockdev-add', { driver: 'file', 'node-name': 'secret', filename: SECRET, 'read-only': true });
}

describe('QEMU as the unprivileged vmkeep-qemu (the default)', () => {
  let host: DaemonHost;
  beforeAll(async () => {
    host = await DaemonHost.boot({ name: `qu-${process.pid}` });
  }, 120_000);
  afterAll(async () => {
    await host?.shutdown();
  });

  it('runs as vmkeep-qemu with its own groups only, in seccomp filter mode; its folder is its group\'s', async () => {
    const { uid, gid } = qemuUserIds();
    const pid = await runningVm(host, 'qu1');
    const creds = credentials(pid);
    expect(creds.uids, 'real, effective, saved and fs uid').toEqual([uid, uid, uid, uid]);
    expect(creds.gids, 'real, effective, saved and fs gid').toEqual([gid, gid, gid, gid]);
    expect(creds.groups, 'no root group kept').not.toContain(0);
    expect(creds.seccomp).toBe('2');
    // The VM's folder (QMP socket) is root's, its group QEMU's; the serial log stays root's file,
    // written through the descriptor vmkeepd passed (GUEST READY arrived in it).
    const folder = statSync(join(host.dir, 'run', 'vms', 'qu1'));
    expect({ uid: folder.uid, gid: folder.gid, mode: folder.mode & 0o777 }).toEqual({ uid: 0, gid, mode: 0o770 });
    const serial = statSync(join(host.dir, 'log', 'qu1', 'serial.log'));
    expect({ uid: serial.uid, mode: serial.mode & 0o077 }).toEqual({ uid: 0, mode: 0 });
  });

  it('a kernel QEMU\'s user cannot read is refused at create, naming the folder and the fix', async () => {
    const hidden = mkdtempSync(join(tmpdir(), 'vk-kernel-'));
    try {
      copyFileSync(guest.kernel, join(hidden, 'vmlinuz'));
      const error = await host.api.create({ name: 'qk', kernel: join(hidden, 'vmlinuz'), initrd: guest.initrd, memoryMiB: 128 }).then(() => undefined, (e: unknown) => e);
      expect(String(error)).toContain(`cannot be read by QEMU's user ${QEMU_USER}: it cannot pass through ${hidden}`);
      expect(String(error)).toContain('chmod o+r');
      expect((await host.api.list()).map((v) => v.name)).not.toContain('qk');
    } finally {
      rmSync(hidden, { recursive: true, force: true });
    }
  });

  it('a blockdev-add of a file in /root fails with QEMU\'s own "Permission denied"', async () => {
    await runningVm(host, 'qu2');
    await expect(openSecret(host, 'qu2')).rejects.toThrow(/Permission denied/);
  });
});

describe('negative control: --qemu-user root --allow-qemu-root', () => {
  let host: DaemonHost;
  beforeAll(async () => {
    host = await DaemonHost.boot({ name: `qr-${process.pid}`, args: ['--qemu-user', 'root', '--allow-qemu-root'] });
  }, 120_000);
  afterAll(async () => {
    await host?.shutdown();
  });

  it('QEMU runs as root and the same blockdev-add opens the file', async () => {
    const pid = await runningVm(host, 'qr1');
    expect(credentials(pid).uids).toEqual([0, 0, 0, 0]);
    await openSecret(host, 'qr1');
    await host.api.qmp('qr1', 'blockdev-del', { 'node-name': 'secret' });
  });
});
