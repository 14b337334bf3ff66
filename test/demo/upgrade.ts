// `npm run demo:upgrade`, the package maintainer's demo: "version A" of the vmkeep snap
// (revision 11, with QEMU 7.2) is installed and runs three VMs; the snap is refreshed to
// "version B" (revision 12, with QEMU 10.0 from bookworm-backports) the way snapd does it; the VMs are alive and stale; they are refreshed by live
// migration and are current, each with its guest downtime. Each VM has a NIC on a bridge; one
// TCP connection to a guest's echo service carries a line every 10 ms through the snap refresh
// and the live refresh, and none is lost. Runs in a private systemd (in a network namespace of
// its own) with the snap's own launcher and a unit shaped like snapd's. Leaves nothing behind.
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { ApiClient } from '../../daemon/index.js';
import { isSameProcess, readExe, readProcessIdentity } from '../../launcher/index.js';
import { ensureGuestImage, waitForSerial } from '../support/guest.js';
import { backportsQemuRoot } from '../support/installations.js';
import { EchoSession, LAB_BRIDGE, NetLab } from '../support/net-lab.js';
import { installRevision, makeSnapRoot, prepareSnapUnit, snapLayout, SNAP_UNIT, switchCurrent } from '../support/snap-sim.js';
import { SystemdHost } from '../support/systemd-host.js';
import { showVmkeep } from './cli.js';
const VMS = ['web', 'db', 'cache'];
const IPS: Record<string, string> = { web: '10.77.0.11', db: '10.77.0.12', cache: '10.77.0.13' };

function say(text: string): void {
  process.stdout.write(`\n== ${text}\n`);
}

async function main(): Promise<void> {
  const guest = await ensureGuestImage();
  const root = await makeSnapRoot('vmkeep-upgrade-demo-');
  const layout = snapLayout(root);
  let host: SystemdHost | undefined;
  let lab: NetLab | undefined;
  let session: EchoSession | undefined;
  try {
    say('installing "version A" of the vmkeep snap (revision 11, QEMU 7.2) and starting its service in a private systemd');
    await installRevision(layout, '11');
    await installRevision(layout, '12', await backportsQemuRoot());
    await switchCurrent(layout, '11');
    lab = await NetLab.create(`vk-updemo-${process.pid}`);
    host = await SystemdHost.boot({ name: `updemo-${process.pid}`, unitFiles: { [SNAP_UNIT]: await prepareSnapUnit(layout) }, netns: lab.path });
    await host.systemctl('start', SNAP_UNIT);
    // The snap's control socket, $SNAP_COMMON/vmkeep.sock (snap/local/vmkeepd-launch).
    const socket = join(layout.common, 'vmkeep.sock');
    // The launcher's --log-dir: $SNAP_COMMON/log/NAME/.
    const serial = (vm: string): string => join(layout.common, 'log', vm, 'serial.log');
    const api = new ApiClient({ socketPath: socket, timeoutMs: 60_000 });
    const vmkeep = (...args: string[]): Promise<string> => showVmkeep(socket, ...args);
    const daemonPid = async (): Promise<string> => ((await host?.systemctl('show', '--property=MainPID', '--value', SNAP_UNIT)) ?? '').trim();
    process.stdout.write(`vmkeepd is up, pid ${await daemonPid()} (every PID shown is as seen inside the private systemd, as vmkeep list shows them)\n`);

    say(`starting ${VMS.length} VMs on version A's QEMU, each with a NIC on bridge ${LAB_BRIDGE}`);
    await Promise.all(VMS.map((name) => api.create({
      name, kernel: guest.kernel, initrd: guest.initrd, append: `${guest.append} vmkeep_ip=${IPS[name] ?? ''}/24`, memoryMiB: 128,
      nics: [{ mode: 'bridge', bridge: LAB_BRIDGE }],
    })));
    for (const name of VMS) await waitForSerial(serial(name), 'GUEST READY', 120_000);
    session = EchoSession.open(lab, IPS.web ?? '', 7);
    await session.waitForEchoes(20, 30_000, 'echoes from web');
    process.stdout.write(`a TCP connection to web (${IPS.web ?? ''}:7, its echo service) now sends a numbered line every 10 ms and checks each echo\n`);
    // The host PID identifies the process for the checks; the demo prints the daemon's view.
    const before = new Map<string, { pid: number; hostPid: number; startTime: string }>();
    for (const vm of await api.list()) {
      const hostPid = host.hostPidOf(vm.pid as number) as number;
      before.set(vm.name, { pid: vm.pid as number, hostPid, startTime: readProcessIdentity(hostPid)?.startTime ?? '' });
    }
    await vmkeep('list');

    say('snap refresh to "version B" (revision 12, QEMU 10.0), as snapd does it: stop the service, kill what is left in its cgroup, switch current, start');
    const pidA = await daemonPid();
    await host.systemctl('stop', SNAP_UNIT);
    await host.systemctl('kill', '--signal=SIGKILL', SNAP_UNIT).catch(() => undefined);
    await switchCurrent(layout, '12');
    await host.systemctl('start', SNAP_UNIT);
    process.stdout.write(`vmkeepd pid ${pidA} (version A) -> ${await daemonPid()} (version B)\n`);
    process.stdout.write('(revision 12 carries a copy of the same QEMU build as revision 11: the versions match, the binaries differ;\n the real 7.2 -> 10.0 upgrade with apt is in test/integration/deb-apt.test.ts)\n');
    for (const [name, old] of before) {
      const alive = isSameProcess(old.hostPid, old.startTime);
      process.stdout.write(`${name}: QEMU pid ${old.pid} ${alive ? 'still running' : 'GONE'}, binary ${readExe(old.hostPid)?.path ?? '?'}\n`);
      if (!alive) throw new Error(`${name} did not survive the refresh`);
    }
    await vmkeep('upgrade-status');

    say('refreshing every stale VM by live migration, two at a time');
    session.mark('refresh');
    await vmkeep('refresh', '--stale', '--strategy', 'migrate', '--parallel', '2');
    await session.waitForEchoes(30, 30_000, 'echoes from web after the live refresh');
    const report = await session.stop();
    process.stdout.write(`the connection to web: ${report.closed ? 'CLOSED' : 'still open'}, ${report.sent} lines sent, ${report.echoed} echoed, ` +
      `${report.wrong.length} out of order; longest gap between echoes during the live refresh ${(report.gaps.get('refresh') ?? 0).toFixed(0)} ms\n`);
    if (report.closed || report.echoed !== report.sent || report.wrong.length > 0) throw new Error('the connection to web did not survive intact');
    await vmkeep('upgrade-status');
    for (const vm of await api.list()) {
      process.stdout.write(`${vm.name}: now pid ${vm.pid} (${vm.installation}), binary ${readExe(host.hostPidOf(vm.pid as number) as number)?.path}\n`);
    }
    say('done: the snap refresh restarted only vmkeepd; every VM kept running and moved onto version B\'s QEMU');
  } finally {
    await session?.stop();
    await host?.shutdown();
    await lab?.destroy();
    await rm(root, { recursive: true, force: true });
  }
}

await main().catch((error: unknown) => {
  process.stderr.write(`upgrade demo failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exitCode = 1;
});
