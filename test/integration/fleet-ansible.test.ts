// The fleet example (examples/ansible/rolling-upgrade.yml) run by a real ansible-playbook
// (Debian's ansible-core) against two simulated hosts: two private systemd hosts, each with its
// own vmkeepd and a VM, reached with connection local and per-host socket paths. The "upgrade"
// is the installation switch a package upgrade makes (another QEMU build becomes current, the
// service restarts). Negative control: a host whose VM cannot move fails its batch, and the
// next host is not upgraded at all.
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonHost } from '../support/daemon-host.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { copiedInstallation, fakeInstallation, systemInstallation, writeInstallations, type TestInstallation } from '../support/installations.js';
import { projectRoot } from '../support/paths.js';

const ROOT = projectRoot();
const PLAYBOOK = join(ROOT, 'examples', 'ansible', 'rolling-upgrade.yml');
const CLI = join(ROOT, 'dist', 'cli', 'main.js');
const HOST_CLI = join(ROOT, 'dist', 'test', 'support', 'systemd-host-cli.js');

interface FleetHost {
  inventoryName: string;
  vm: string;
  daemon: DaemonHost;
  installationsFile: string;
}

let guest: GuestImage;
let dir: string;
let all: TestInstallation[];
const hosts: FleetHost[] = [];

function requireAnsible(): void {
  const found = ['/usr/bin/ansible-playbook', '/usr/local/bin/ansible-playbook'].some((p) => existsSync(p));
  if (!found) throw new Error('ansible-playbook not found: apt-get install --no-install-recommends ansible-core');
}

beforeAll(async () => {
  requireAnsible();
  guest = await ensureGuestImage();
  dir = await mkdtemp(join(tmpdir(), 'vk-fleet-'));
  all = [systemInstallation('a'), await copiedInstallation('c', dir), await fakeInstallation('broken', dir, { failStart: true })];
  for (const [i, inventoryName] of ['hv1', 'hv2'].entries()) {
    const hostDir = join(dir, inventoryName);
    await mkdir(hostDir);
    const installationsFile = join(hostDir, 'installations.json');
    await writeInstallations(installationsFile, all, 'a');
    const daemon = await DaemonHost.boot({ name: `fleet${i + 1}-${process.pid}`, dir: join(hostDir, 'daemon'), args: ['--installations', installationsFile] });
    hosts.push({ inventoryName, vm: `vm${i + 1}`, daemon, installationsFile });
  }
  await Promise.all(hosts.map((h) => h.daemon.api.create({ name: h.vm, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 })));
  for (const h of hosts) await waitForSerial(h.daemon.serialLog(h.vm), 'GUEST READY', 120_000);
});

afterAll(async () => {
  for (const h of hosts) await h.daemon.shutdown();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/**
 * An inventory whose hosts upgrade to `next` (per host): the installations file switched as a
 * package upgrade would, vmkeepd restarted inside its host, and a marker that the upgrade ran.
 */
async function inventory(run: string, next: Record<string, string>): Promise<string> {
  const lines = ['[vmkeep_hosts]'];
  for (const h of hosts) {
    const nextFile = join(dir, `${h.inventoryName}-${run}.json`);
    await writeInstallations(nextFile, all, next[h.inventoryName] as string);
    const marker = join(dir, `${h.inventoryName}-${run}.upgraded`);
    const upgrade = `cp ${nextFile} ${h.installationsFile} && ${process.execPath} ${HOST_CLI} exec ${h.daemon.host.name} -- systemctl --no-pager restart vmkeepd.service && touch ${marker}`;
    lines.push([
      h.inventoryName, 'ansible_connection=local', 'ansible_python_interpreter=/usr/bin/python3',
      `vmkeep_cli="${process.execPath} ${CLI}"`, `vmkeep_socket=${h.daemon.socket}`, `vmkeep_upgrade_command="${upgrade}"`,
    ].join(' '));
  }
  const file = join(dir, `inventory-${run}.ini`);
  await writeFile(file, `${lines.join('\n')}\n`);
  return file;
}

function upgraded(run: string, h: FleetHost): boolean {
  return existsSync(join(dir, `${h.inventoryName}-${run}.upgraded`));
}

async function playbook(inventoryFile: string): Promise<{ exitCode: number | undefined; output: string }> {
  const home = join(dir, 'home');
  await mkdir(home, { recursive: true });
  const run = await execa('ansible-playbook', ['-i', inventoryFile, PLAYBOOK, '-e', 'vmkeep_batch=1', '-e', 'vmkeep_refresh_batch_interval=1'], {
    reject: false,
    timeout: 600_000,
    // Ansible's own files (~/.ansible, its temp folders) stay in the test's folder.
    env: { HOME: home, ANSIBLE_LOCAL_TEMP: join(home, 'tmp'), ANSIBLE_NOCOLOR: '1', ANSIBLE_RETRY_FILES_ENABLED: '0', ANSIBLE_CONFIG: join(home, 'none.cfg') },
  });
  return { exitCode: run.exitCode, output: `${run.stdout}\n${run.stderr}` };
}

describe('examples/ansible/rolling-upgrade.yml', () => {
  it('upgrades both hosts one at a time and moves each VM live onto the new QEMU; stale before 1, after 0', async () => {
    const before = await Promise.all(hosts.map((h) => h.daemon.api.get(h.vm)));
    const ticks = hosts.map((h) => countTicks(h.daemon.serialLog(h.vm)));
    const { exitCode, output } = await playbook(await inventory('ok', { hv1: 'c', hv2: 'c' }));
    expect(exitCode, output).toBe(0);
    for (const h of hosts) {
      expect(upgraded('ok', h)).toBe(true);
      expect(output).toContain(`"msg": "${h.inventoryName}: stale before 1, after 0"`);
    }
    // serial 1: hv1's whole batch (upgrade, refresh) ran before hv2's upgrade began.
    expect(output.indexOf('hv1: stale before 1, after 0')).toBeLessThan(output.search(/changed: \[hv2\]/));
    for (const [i, h] of hosts.entries()) {
      const vm = await h.daemon.api.get(h.vm);
      expect(vm).toMatchObject({ state: 'running', installation: 'c' });
      expect(vm.pid).not.toBe(before[i]?.pid);
      // Moved live, not rebooted: the guest's ticks go on from where they were.
      await waitForSerial(h.daemon.serialLog(h.vm), new RegExp(`GUEST TICK ${(ticks[i] as number) + 2}\\b`), 30_000);
    }
  });

  it('a host whose VM cannot move fails its batch with the VM named, and the next host is not upgraded', async () => {
    const { exitCode, output } = await playbook(await inventory('bad', { hv1: 'broken', hv2: 'broken' }));
    expect(exitCode, output).not.toBe(0);
    expect(output).toMatch(/hv1: VM\(s\) not refreshed: vm1 \(.*No reboot either/);
    expect(output).toContain('"msg": "hv1: stale before 1, after 1"');
    expect(upgraded('bad', hosts[0] as FleetHost)).toBe(true);
    expect(upgraded('bad', hosts[1] as FleetHost)).toBe(false);
    expect(output).not.toMatch(/hv2: stale before/);
    for (const h of hosts) expect(await h.daemon.api.get(h.vm)).toMatchObject({ state: 'running', installation: 'c' });
  });
});
