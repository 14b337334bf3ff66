// vmkeepd as a podman container under systemd (packaging/oci/vmkeepd.service), upgraded by
// replacing the container: the QEMUs live in host scopes and survive; a new image with the
// same QEMU build leaves them current, one with another QEMU makes them stale, and even with
// the old images removed they still load their modules (pinned copies on the host) and move
// live onto the new QEMU. Negative controls: no --pid=host is refused; QEMUs left in the
// container die with it.
import { execFile } from 'node:child_process';
import { appendFile, copyFile, mkdir, readFile, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ApiClient, VmView } from '../../daemon/index.js';
import { isSameProcess, readExe, readProcessIdentity } from '../../launcher/index.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { projectRoot } from '../support/paths.js';
import { PodmanHost, type DaemonDirs } from '../support/podman-host.js';

const run = promisify(execFile);
const UNIT = 'vmkeepd.service';
const VMS = ['c1', 'c2', 'c3'];
const QEMU = '/usr/bin/qemu-system-x86_64';
const CLI = join(projectRoot(), 'dist', 'cli', 'main.js');

let guest: GuestImage;
let oci: PodmanHost;
let dirs: DaemonDirs;
let api: ApiClient;
/** Host PID and start time of each VM's QEMU started under v1. */
const v1Qemu = new Map<string, { pid: number; startTime: string }>();
let v1Root = '';
/** How long each `systemctl restart` of a unit took (old container stopped, new one started). */
const restartMs: number[] = [];

beforeAll(async () => {
  guest = await ensureGuestImage();
  oci = await PodmanHost.boot(`oci-${process.pid}`);
  v1Root = await oci.rootTar();
  await oci.buildImage('localhost/vmkeep:v1', { note: 'v1' });
  // The same root (the same QEMU build), another vmkeep file: what a vmkeep-only release is.
  await oci.buildImage('localhost/vmkeep:v2', { note: 'v2' });
}, 1_200_000);

afterAll(async () => {
  if (!oci) return;
  const left = await oci.podmanLeftovers().catch((e: Error) => [`cannot list: ${e.message}`]);
  await oci.shutdown();
  process.stderr.write(`container-upgrade: systemctl restart took ${restartMs.join(', ')} ms\n`);
  expect(oci.leftovers()).toEqual([]);
  // Shutdown removed what the test had at its end; the test's own steps must not leave more.
  expect(left.filter((l) => !/^(container vmkeepd(-noscope)?|image localhost\/vmkeep(-base)?:\S+)$/.test(l))).toEqual([]);
});

/** Waits until a vmkeepd other than `notPid` answers on the socket (the unit is Type=exec). */
async function waitForDaemon(client: ApiClient, notPid: number | undefined, what: string, timeoutMs = 60_000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  for (;;) {
    try {
      const { pid } = await client.info();
      if (pid !== notPid) return pid;
      last = `still the old daemon (pid ${pid})`;
    } catch (error) {
      last = (error as Error).message;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${last}\n${await oci.host.consoleTail(30)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function hostPid(vm: VmView): number {
  const pid = vm.pid === undefined ? null : oci.host.hostPidOf(vm.pid);
  if (pid === null) throw new Error(`no host PID for ${vm.name} (pid ${String(vm.pid)}, state ${vm.state})`);
  return pid;
}

/** The guest's kernel and initrd, read-only at the same path in the container. */
function guestMount(): string {
  const dir = dirname(guest.kernel);
  return `--volume=${dir}:${dir}:ro`;
}

function serialLog(d: DaemonDirs, name: string): string {
  return join(d.log, name, 'serial.log');
}

/** "Switch the image tag, systemctl restart": the unit's container is replaced by one of `image`. */
async function restartOn(unit: string, image: string, client: ApiClient): Promise<void> {
  const before = (await client.info()).pid;
  await oci.setUnitImage(unit, image);
  const began = Date.now();
  await oci.run('systemctl', ['restart', unit], 150_000).catch(async (error: Error) => {
    throw new Error(`${error.message}\n--- console ---\n${await oci.host.consoleTail(60)}`, { cause: error });
  });
  restartMs.push(Date.now() - began);
  // conmon, which adopted the QEMUs, must not hold the restart up (KillSignal=SIGKILL in the unit).
  expect(Date.now() - began, 'systemctl restart took longer than its stop timeout would').toBeLessThan(30_000);
  await waitForDaemon(client, before, `vmkeepd from ${image} (${unit})`);
  const name = unit.replace(/\.service$/, '');
  expect((await oci.podman('ps', '--filter', `name=^${name}$`, '--format', '{{.Names}} {{.Image}}')).trim()).toBe(`${name} ${image}`);
}

async function expectSurvivedAndTicking(): Promise<void> {
  for (const name of VMS) {
    const old = v1Qemu.get(name) as { pid: number; startTime: string };
    expect(isSameProcess(old.pid, old.startTime), `${name}'s QEMU survived`).toBe(true);
    const vm = await api.get(name);
    expect(vm).toMatchObject({ state: 'running', scope: `vmkeep-${name}.scope` });
    expect(hostPid(vm)).toBe(old.pid);
    const ticks = countTicks(serialLog(dirs, name));
    await waitForSerial(serialLog(dirs, name), new RegExp(`GUEST TICK ${ticks + 1}\\b`), 20_000);
  }
}

describe.sequential('vmkeepd as a container, upgraded by replacing the container', () => {
  it('1. image v1 as a unit: three VMs run, their QEMU from the image, each in its host scope', async () => {
    ({ dirs, api } = await oci.installUnit(UNIT, { image: 'localhost/vmkeep:v1', podmanOpts: [guestMount()] }));
    await oci.host.systemctl('start', UNIT);
    await waitForDaemon(api, undefined, 'vmkeepd from v1');
    await Promise.all(VMS.map((name) => api.create({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 })));
    for (const name of VMS) {
      await waitForSerial(serialLog(dirs, name), 'GUEST READY', 120_000);
      const vm = await api.get(name);
      const pid = hostPid(vm);
      v1Qemu.set(name, { pid, startTime: readProcessIdentity(pid)?.startTime ?? '' });
      // The image's QEMU: its root is the container's, not the host's.
      expect(readExe(pid)).toMatchObject({ path: QEMU, deleted: false });
      expect(await readFile(`/proc/${pid}/root/opt/vmkeep/build-info.json`, 'utf8')).toContain('"note":"v1"');
      expect(await oci.host.systemctl('show', '--property=ControlGroup', '--value', `vmkeep-${name}.scope`)).toContain(`/vmkeep.slice/vmkeep-${name}.scope`);
    }
  }, 300_000);

  it('2. v2 (same QEMU build, other vmkeep): restart; the QEMUs keep their PIDs and ticks, v2 reattaches, nothing is stale', async () => {
    await restartOn(UNIT, 'localhost/vmkeep:v2', api);
    await expectSurvivedAndTicking();
    const status = await api.upgradeStatus();
    for (const name of VMS) {
      const row = status.vms.find((v) => v.name === name);
      expect(row, JSON.stringify(row)).toMatchObject({ stale: false, reasons: [] });
      expect(row?.warnings).toBeUndefined();
      // The old container's conmon is gone with its unit: the QEMUs went to the host's PID 1.
      const ppid = Number(/^PPid:\s+(\d+)$/m.exec(await readFile(`/proc/${v1Qemu.get(name)?.pid}/status`, 'utf8'))?.[1]);
      expect(ppid).toBe(oci.host.pid1);
    }
  }, 180_000);

  it('2b. vmkeepd crashes in its container: the unit (Restart=on-failure) starts a new one; the VMs run on', async () => {
    const { pid } = await api.info();
    const daemon = oci.host.hostPidOf(pid);
    expect(daemon, 'vmkeepd\'s host PID').not.toBeNull();
    process.kill(daemon as number, 'SIGKILL');
    await waitForDaemon(api, pid, 'a new vmkeepd after the crash');
    expect(await oci.host.systemctl('show', '--property=NRestarts', '--value', UNIT)).toBe('1\n');
    await expectSurvivedAndTicking();
  }, 120_000);

  it('3. v3 (other QEMU bytes): stale; v1 and v2 removed; a stale QEMU still loads a module; refresh by migration moves them', async () => {
    // v3's root: v1's with another build of the QEMU binary (bytes after the ELF image).
    const v3Root = join(oci.dir, 'root-v3.tar');
    const extract = join(oci.dir, 'qemu-v3');
    await mkdir(extract);
    await copyFile(v1Root, v3Root);
    await run('tar', ['-xf', v3Root, '-C', extract, `.${QEMU}`]);
    await appendFile(join(extract, QEMU), '\nvmkeep test build v3\n');
    await run('tar', ['--delete', '-f', v3Root, `.${QEMU}`]);
    await run('tar', ['-rf', v3Root, '-C', extract, `.${QEMU}`]);
    await oci.buildImage('localhost/vmkeep:v3', { rootTar: v3Root, note: 'v3' });

    await restartOn(UNIT, 'localhost/vmkeep:v3', api);
    await expectSurvivedAndTicking();
    let status = await api.upgradeStatus();
    for (const name of VMS) {
      const row = status.vms.find((v) => v.name === name);
      expect(row?.stale, JSON.stringify(row)).toBe(true);
      expect(row?.reasons.join(' ')).toContain('another build');
    }

    // The old images go, and with them the only layer holding the old QEMU and its modules.
    const v1Base = `localhost/vmkeep-base:${(await run('sha256sum', [v1Root])).stdout.slice(0, 16)}`;
    await oci.podman('rmi', 'localhost/vmkeep:v1', 'localhost/vmkeep:v2', v1Base);
    const c1 = v1Qemu.get('c1') as { pid: number; startTime: string };
    expect(readExe(c1.pid), 'the old QEMU file has no links left (its overlay layer is removed)').toMatchObject({ path: QEMU, deleted: true });
    // The module file of the old image is unlinked from the disk too. (It may still be readable
    // for a while through the old overlay's cached entries: vmkeepd read it there to pin it.)
    const original = `/proc/${c1.pid}/root/usr/lib/x86_64-linux-gnu/qemu/hw-display-virtio-gpu-pci.so`;
    expect((await stat(original)).nlink, 'the module in the old image has no links left').toBe(0);
    // The module QEMU loads now can only come from the pinned copy in the host's state folder.
    // (virtio-gpu needs no library the QEMU has not loaded yet: those went with the image.)
    const environ = (await readFile(`/proc/${c1.pid}/environ`, 'utf8')).split('\0');
    expect(environ.find((e) => e.startsWith('QEMU_MODULE_DIR='))).toContain(join(dirs.state, 'modules'));
    const props = await api.qmp('c1', 'device-list-properties', { typename: 'virtio-gpu-pci' });
    expect(Array.isArray(props) && props.length > 0).toBe(true);
    status = await api.upgradeStatus();
    expect(status.vms.find((v) => v.name === 'c1')?.warnings?.join(' ')).toMatch(/gone from disk/);

    const ticks = new Map(VMS.map((n) => [n, countTicks(serialLog(dirs, n))]));
    const refresh = await run(process.execPath, [CLI, '--socket', dirs.socket, 'refresh', '--stale', '--strategy', 'migrate', '--json'], { timeout: 240_000 });
    expect(refresh.stdout).toContain('"migrated"');
    status = await api.upgradeStatus();
    for (const name of VMS) {
      const vm = await api.get(name);
      expect(vm.state).toBe('running');
      expect(hostPid(vm)).not.toBe(v1Qemu.get(name)?.pid);
      expect(isSameProcess(v1Qemu.get(name)?.pid ?? 0, v1Qemu.get(name)?.startTime ?? '')).toBe(false);
      expect(await readFile(`/proc/${hostPid(vm)}/root/opt/vmkeep/build-info.json`, 'utf8')).toContain('"note":"v3"');
      expect(status.vms.find((v) => v.name === name)).toMatchObject({ stale: false });
      await waitForSerial(serialLog(dirs, name), new RegExp(`GUEST TICK ${(ticks.get(name) ?? 0) + 1}\\b`), 20_000);
      expect((await readFile(serialLog(dirs, name), 'utf8')).match(/GUEST READY/g), `${name} did not reboot`).toHaveLength(1);
    }
  }, 1_200_000);

  it('4a. negative control: a container without --pid=host is refused, naming the flag', async () => {
    const d = oci.daemonDirs('nopid');
    await mkdir(d.state, { recursive: true });
    await mkdir(d.run, { recursive: true });
    const r = await oci.exec('podman', ['run', '--rm', '--name', 'vmkeepd-nopid', '--network=host', '--cgroupns=host', '--privileged', '--pids-limit=0',
      '-v', '/run/dbus/system_bus_socket:/run/dbus/system_bus_socket', '-v', `${d.state}:${d.state}`, '-v', `${d.run}:${d.run}`,
      'localhost/vmkeep:v3', '--state-dir', d.state, '--runtime-dir', d.run, '--socket', d.socket]);
    expect(r.exitCode).not.toBe(0);
    expect(`${r.stdout}${r.stderr}`).toMatch(/PID_NAMESPACE.*--pid=host/s);
  }, 120_000);

  it('4b. negative control: QEMUs left in the container (--no-scope) die when it is replaced', async () => {
    const unit = 'vmkeepd-noscope.service';
    const noscope = await oci.installUnit(unit, { image: 'localhost/vmkeep:v3', podmanOpts: [guestMount()], daemonArgs: ['--no-scope'] });
    await oci.host.systemctl('start', unit);
    await waitForDaemon(noscope.api, undefined, 'vmkeepd --no-scope from v3');
    await noscope.api.create({ name: 'n1', kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 });
    await waitForSerial(serialLog(noscope.dirs, 'n1'), 'GUEST READY', 120_000);
    const vm = await noscope.api.get('n1');
    const pid = hostPid(vm);
    const startTime = readProcessIdentity(pid)?.startTime ?? '';
    expect(vm.scope).toBeUndefined();

    await oci.podman('tag', 'localhost/vmkeep:v3', 'localhost/vmkeep:v4');
    await restartOn(unit, 'localhost/vmkeep:v4', noscope.api);
    expect(isSameProcess(pid, startTime), 'the QEMU in the container died with it').toBe(false);
    expect((await noscope.api.get('n1')).state).toBe('exited');
    await oci.host.systemctl('stop', unit);
    // The scoped VMs of the other unit were never touched by any of this.
    for (const name of VMS) expect((await api.get(name)).state).toBe('running');
  }, 300_000);
});
