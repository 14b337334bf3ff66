// The upgrade path of a distribution package (deb, rpm): the new files are put in place by
// rename over the old ones (so a running QEMU's /proc/PID/exe reads "(deleted)"), then the
// maintainer script runs `systemctl try-restart vmkeepd.service`. VMs survive, reattach, and are
// stale until refreshed; a stale QEMU still loads its own (pinned) modules.
import { chmod, copyFile, cp, mkdir, mkdtemp, rename, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isSameProcess, readExe, readProcessIdentity } from '../../launcher/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { countTicks, ensureGuestImage, requireQemu, waitForSerial, type GuestImage } from '../support/guest.js';
import {
  copyQemuAsBuild, replaceModules, restoreModules, SYSTEM_FIRMWARE_DIRS, SYSTEM_MODULE_DIR, writeInstallations, type TestInstallation,
} from '../support/installations.js';

const VMS = ['deb1', 'deb2'];

let guest: GuestImage;
let dir: string;
let host: DaemonHost;
let pkg: TestInstallation;
const before = new Map<string, { pid: number; startTime: string }>();

beforeAll(async () => {
  guest = await ensureGuestImage();
  dir = await mkdtemp(join(tmpdir(), 'vk-deb-'));
  // The "package": its binary and modules at fixed paths under a prefix of its own.
  pkg = {
    name: 'distro',
    binary: join(dir, 'usr', 'bin', 'qemu-system-x86_64'),
    moduleDir: join(dir, 'usr', 'lib', 'qemu'),
    firmwareDirs: SYSTEM_FIRMWARE_DIRS,
  };
  await mkdir(join(dir, 'usr', 'bin'), { recursive: true });
  await copyFile(requireQemu(), pkg.binary);
  await chmod(pkg.binary, 0o755);
  await cp(SYSTEM_MODULE_DIR, pkg.moduleDir as string, { recursive: true });
  const installations = join(dir, 'installations.json');
  await writeInstallations(installations, [pkg], pkg.name);
  host = await DaemonHost.boot({ name: `deb-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installations] });
  await Promise.all(VMS.map((name) => host.api.create({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 })));
  for (const name of VMS) await waitForSerial(host.serialLog(name), 'GUEST READY', 120_000);
});

afterAll(async () => {
  await host?.shutdown();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** What dpkg does with each file of the new version: write beside it, rename over it. */
async function upgradePackageFiles(): Promise<void> {
  const staged = `${pkg.binary}.dpkg-new`;
  // The new version is another build: vmkeep tells binaries apart by their bytes.
  await copyQemuAsBuild(staged, 'deb 2');
  await rename(staged, pkg.binary);
  await replaceModules(pkg.moduleDir as string);
}

describe('a deb-style package upgrade', () => {
  it('files replaced by rename, then try-restart: the VMs survive, reattach and are stale (exe deleted)', async () => {
    for (const vm of await host.api.list()) {
      const pid = host.hostPid(vm);
      before.set(vm.name, { pid, startTime: readProcessIdentity(pid)?.startTime ?? '' });
    }
    const daemonBefore = (await host.api.info()).pid;
    await upgradePackageFiles();
    await host.systemctl('try-restart', 'vmkeepd.service');
    expect((await host.api.info()).pid, 'try-restart started a new vmkeepd').not.toBe(daemonBefore);

    const status = await host.api.upgradeStatus();
    for (const name of VMS) {
      const old = before.get(name) as { pid: number; startTime: string };
      expect(isSameProcess(old.pid, old.startTime), `${name} survived`).toBe(true);
      const vm = await host.api.get(name);
      expect(vm.state).toBe('running');
      expect(host.hostPid(vm)).toBe(old.pid);
      expect(readExe(old.pid)).toMatchObject({ path: pkg.binary, deleted: true });
      const row = status.vms.find((v) => v.name === name);
      expect(row).toMatchObject({ stale: true, installation: 'distro', currentInstallation: 'distro' });
      expect(row?.reasons.join(' ')).toMatch(/\(deleted\)/);
      expect(row?.warnings?.join(' ')).toMatch(/gone from disk/);
    }
  });

  it('a stale QEMU still loads its own modules after the package replaced them', async () => {
    // The replaced module files are not a module at all: only the pinned copy can serve this.
    const props = await host.api.qmp('deb1', 'device-list-properties', { typename: 'qxl-vga' });
    expect(Array.isArray(props) && props.length > 0).toBe(true);
  });

  it('a refresh moves each VM onto the new files; nothing is stale afterwards', async () => {
    // The new version's modules are good modules again (the test stood them in with junk).
    await restoreModules(pkg.moduleDir as string);
    for (const name of VMS) {
      const ticks = countTicks(host.serialLog(name));
      const outcome = await host.api.refresh(name, { strategy: 'migrate' });
      expect(outcome.result).toBe('migrated');
      const vm = await host.api.get(name);
      expect(readExe(host.hostPid(vm))).toMatchObject({ path: pkg.binary, deleted: false });
      await waitForSerial(host.serialLog(name), new RegExp(`GUEST TICK ${ticks + 1}\\b`), 20_000);
    }
    const status = await host.api.upgradeStatus();
    expect(status.vms.filter((v) => v.stale || v.warnings)).toEqual([]);
  });
});
