// A running guest keeps its network when the host's network is reconfigured: in a network
// namespace of the test's own, the bridge is deleted and made again (as a network restart does)
// and the TAP is taken off it; vmkeepd sees the change (`ip monitor link`), puts the TAP back
// and one TCP connection through the bridge resumes. A daemon restart while the TAP is off puts
// it back at reattach. Negative control: with --no-tap-repair the guest stays cut off. A TAP
// deleted under the QEMU is reported with its fix (a restart), and that fix works.
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DaemonEvent } from '../../daemon/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { systemInstallation, writeInstallations } from '../support/installations.js';
import { EchoSession, LAB_BRIDGE, NetLab } from '../support/net-lab.js';
import { projectRoot } from '../support/paths.js';
import { qemuPidsOf } from '../support/qemu-procs.js';
import { waitFor } from '../support/systemd-host.js';
import { subscribeEvents, waitForVm } from '../support/vm-wait.js';

const VM = 'net1';
const IP = '10.77.0.21';
const ECHO_PORT = 7;
const IP_MONITOR = ['ip', 'monitor', 'link'];
const CLI = join(projectRoot(), 'dist', 'cli', 'main.js');

let guest: GuestImage;
let dir: string;
let lab: NetLab;
let host: DaemonHost;

beforeAll(async () => {
  guest = await ensureGuestImage();
  dir = await mkdtemp(join(tmpdir(), 'vk-nicfix-'));
  lab = await NetLab.create(`vk-nicfix-${process.pid}`);
  const installations = join(dir, 'installations.json');
  await writeInstallations(installations, [systemInstallation('a')], 'a');
  host = await DaemonHost.boot({ name: `nicfix-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installations], netns: lab.path });
  await host.api.create({
    name: VM, kernel: guest.kernel, initrd: guest.initrd, append: `${guest.append} vmkeep_ip=${IP}/24`, memoryMiB: 128,
    nics: [{ mode: 'bridge', bridge: LAB_BRIDGE }],
  });
  await waitForSerial(host.serialLog(VM), 'GUEST READY', 120_000);
}, 300_000);

afterAll(async () => {
  await host?.setDaemonEnv('VMKEEP_TAP_REPAIR', undefined).catch(() => undefined);
  await host?.shutdown();
  // After the host: its QEMU held the namespace's TAP.
  await lab?.destroy();
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function tap(): Promise<string> {
  const taps = (await host.record(VM)).process?.taps as string[] | undefined;
  if (taps?.length !== 1) throw new Error(`${VM}'s record names ${JSON.stringify(taps)}, not one TAP`);
  return taps[0] as string;
}

async function masterOf(name: string): Promise<string | undefined> {
  return (await lab.links()).find((l) => l.name === name)?.master;
}

/** The connection carries echoes now, then `cut` happens, then it carries echoes again (nothing lost or reordered). */
async function survives(cut: (events: Awaited<ReturnType<typeof subscribeEvents>>) => Promise<void>, what: string): Promise<void> {
  const session = EchoSession.open(lab, IP, ECHO_PORT);
  const events = await subscribeEvents(host.api, { type: ['vm-network'], vm: [VM] });
  try {
    await session.waitForEchoes(10, 30_000, `echoes before ${what}`);
    session.mark(what);
    await cut(events);
    await session.waitForEchoes(20, 30_000, `echoes after ${what}`);
    const report = await session.stop();
    console.log(`NIC repair: ${what}: longest gap between echoes ${(report.gaps.get(what) ?? -1).toFixed(0)} ms`);
    expect(report.closed).toBe(false);
    expect(report.wrong).toEqual([]);
    expect(report.echoed).toBe(report.sent);
  } finally {
    events.close();
    await session.stop();
  }
  expect(await masterOf(await tap())).toBe(LAB_BRIDGE);
  expect((await host.api.get(VM)).nicProblems).toBeUndefined();
}

const putBack = (t: string) => (e: DaemonEvent): boolean => e.message?.startsWith(`TAP ${t} of nics[0] was on no bridge: put back on bridge ${LAB_BRIDGE}`) === true;

describe('a running VM\'s TAP', () => {
  it('is put back when the bridge is deleted and made again (a network restart): the TCP connection resumes', async () => {
    const t = await tap();
    expect(lab.processes(IP_MONITOR), 'vmkeepd watches the links of its own namespace').toHaveLength(1);
    await survives(async (events) => {
      await lab.deleteBridge();
      await events.until((e) => e.message?.startsWith(`bridge ${LAB_BRIDGE} does not exist`) === true, 'bridge missing', 30_000);
      const vm = await host.api.get(VM);
      expect(vm.nicProblems?.map((p) => [p.problem, p.tap])).toEqual([['bridge-missing', t]]);
      await lab.addBridge();
      await events.until(putBack(t), 'TAP put back', 30_000);
    }, 'bridge made again');
  });

  it('is put back after `ip link set dev TAP nomaster`, also by an `ip monitor` started again after it died', async () => {
    const t = await tap();
    await survives(async (events) => {
      await lab.ip('link', 'set', 'dev', t, 'nomaster');
      await events.until(putBack(t), 'TAP put back', 30_000);
    }, 'nomaster');
    const [monitor] = lab.processes(IP_MONITOR);
    process.kill(monitor as number, 'SIGKILL');
    await waitFor('vmkeepd to start ip monitor again', 30_000, () => {
      const now = lab.processes(IP_MONITOR);
      return now.length === 1 && now[0] !== monitor ? true : undefined;
    });
    await survives(async (events) => {
      await lab.ip('link', 'set', 'dev', t, 'nomaster');
      await events.until(putBack(t), 'TAP put back by the new monitor', 30_000);
    }, 'nomaster, new monitor');
  });

  it('is put back at reattach when it was taken off while vmkeepd was stopped; a stopped vmkeepd leaves no ip monitor', async () => {
    const t = await tap();
    const session = EchoSession.open(lab, IP, ECHO_PORT);
    try {
      await session.waitForEchoes(10, 30_000, 'echoes before the stop');
      await host.stop();
      expect(lab.processes(IP_MONITOR), 'the link watch ends with vmkeepd').toEqual([]);
      await lab.ip('link', 'set', 'dev', t, 'nomaster');
      await host.start();
      await waitFor(`${t} back on ${LAB_BRIDGE} after the reattach`, 30_000, async () => ((await masterOf(t)) === LAB_BRIDGE ? true : undefined));
      await session.waitForEchoes(20, 30_000, 'echoes after the restart');
      expect((await session.stop()).wrong).toEqual([]);
    } finally {
      await session.stop();
    }
  });
});

describe('negative control', () => {
  it('with --no-tap-repair, a TAP taken off the bridge stays off, the guest is cut off, and status says so with the fix', async () => {
    const t = await tap();
    await host.setDaemonEnv('VMKEEP_TAP_REPAIR', 'false');
    await host.restart();
    const session = EchoSession.open(lab, IP, ECHO_PORT);
    const events = await subscribeEvents(host.api, { type: ['vm-network'], vm: [VM] });
    try {
      await session.waitForEchoes(10, 30_000, 'echoes before');
      await lab.ip('link', 'set', 'dev', t, 'nomaster');
      await events.until((e) => e.message?.startsWith(`TAP ${t} is on no bridge, not on ${LAB_BRIDGE}: the guest's NIC is cut off`) === true, 'cut off reported', 30_000);
      await expect(session.waitForEchoes(10, 5_000, 'echoes with the TAP off the bridge')).rejects.toThrow(/not seen within 5000 ms/);
      expect(await masterOf(t)).toBeUndefined();
      const vm = await host.api.get(VM);
      expect(vm.nicProblems).toEqual([expect.objectContaining({ nic: 0, tap: t, bridge: LAB_BRIDGE, problem: 'detached', fix: `ip link set dev ${t} master ${LAB_BRIDGE} up` })]);
      const status = await execa(process.execPath, [CLI, 'status', VM, '--socket', host.socket], { reject: false });
      expect(status.stdout).toMatch(new RegExp(`^nic 0 problem: +TAP ${t} is on no bridge, not on ${LAB_BRIDGE}: .*; fix: ip link set dev ${t} master ${LAB_BRIDGE} up$`, 'm'));
    } finally {
      events.close();
      await session.stop();
      await host.setDaemonEnv('VMKEEP_TAP_REPAIR', undefined);
    }
    // Repair on again: the restart's reattach puts it back.
    await host.restart();
    await waitFor(`${t} back on ${LAB_BRIDGE}`, 30_000, async () => ((await masterOf(t)) === LAB_BRIDGE ? true : undefined));
  });
});

describe('a TAP deleted under the running QEMU', () => {
  it('is reported with its fix, and that fix (a restart of the VM: a new TAP) brings the network back', async () => {
    const t = await tap();
    const [pid] = qemuPidsOf(VM, host.dir);
    const cpuSeconds = (): number => {
      const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
      return (Number(fields[11]) + Number(fields[12])) / 100; // utime + stime, in clock ticks of 1/100 s
    };
    /** QEMU's share of one CPU over a measurement window (not a synchronisation). */
    const cpuShare = async (windowMs: number): Promise<number> => {
      const c0 = cpuSeconds();
      const t0 = performance.now();
      await new Promise((resolve) => setTimeout(resolve, windowMs));
      return (cpuSeconds() - c0) / ((performance.now() - t0) / 1000);
    };
    const before = await cpuShare(3_000);
    const events = await subscribeEvents(host.api, { type: ['vm-network'], vm: [VM] });
    try {
      await lab.ip('link', 'del', 'dev', t);
      await events.until((e) => e.message?.startsWith(`TAP ${t} was deleted under the running QEMU`) === true, 'TAP gone reported', 30_000);
    } finally {
      events.close();
    }
    const vm = await host.api.get(VM);
    expect(vm.nicProblems).toEqual([expect.objectContaining({ problem: 'tap-gone', tap: t, fix: `vmkeep stop ${VM} && vmkeep start ${VM} (the guest restarts; its new QEMU gets a new TAP)` })]);
    const json = JSON.parse((await execa(process.execPath, [CLI, 'status', VM, '--json', '--socket', host.socket])).stdout) as { nicProblems?: unknown };
    expect(json.nicProblems).toEqual(vm.nicProblems);
    const cutOff = EchoSession.open(lab, IP, ECHO_PORT);
    try {
      await expect(cutOff.waitForEchoes(1, 3_000, 'an echo with the TAP gone')).rejects.toThrow(/not seen within|closed/);
    } finally {
      await cutOff.stop(100);
    }
    const after = await cpuShare(3_000);
    console.log(`NIC repair: QEMU used ${(before * 100).toFixed(0)}% of a CPU with its TAP, ${(after * 100).toFixed(0)}% once the TAP was deleted under it`);
    await host.api.stop(VM);
    await host.api.start(VM);
    await waitForSerial(host.serialLog(VM), `GUEST NET ${IP}/24`, 120_000);
    const now = await tap();
    expect(await masterOf(now)).toBe(LAB_BRIDGE);
    expect((await host.api.get(VM)).nicProblems).toBeUndefined();
    const again = EchoSession.open(lab, IP, ECHO_PORT);
    try {
      await again.waitForEchoes(10, 30_000, 'echoes on a new connection after the restart');
    } finally {
      expect((await again.stop()).wrong).toEqual([]);
    }
  });
});
