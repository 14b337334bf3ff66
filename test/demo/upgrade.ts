// `npm run demo:upgrade`, the package maintainer's demo: "version A" of the vmkeep snap
// (revision 11, with QEMU 7.2) is installed and runs three VMs; the snap is refreshed to
// "version B" (revision 12, with QEMU 10.0 from bookworm-backports) the way snapd does it; the VMs are alive and stale; they are refreshed by live
// migration and are current, each with its guest downtime. Runs in a private systemd with the
// snap's own launcher and a unit shaped like snapd's. Leaves nothing behind.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ApiClient } from '../../daemon/index.js';
import { isSameProcess, readExe, readProcessIdentity } from '../../launcher/index.js';
import { ensureGuestImage, waitForSerial } from '../support/guest.js';
import { backportsQemuRoot } from '../support/installations.js';
import { installRevision, prepareSnapUnit, snapLayout, SNAP_UNIT, switchCurrent } from '../support/snap-sim.js';
import { SystemdHost } from '../support/systemd-host.js';
import { showVmkeep } from './cli.js';
const VMS = ['web', 'db', 'cache'];

function say(text: string): void {
  process.stdout.write(`\n== ${text}\n`);
}

async function main(): Promise<void> {
  const guest = await ensureGuestImage();
  const root = await mkdtemp(join(tmpdir(), 'vmkeep-upgrade-demo-'));
  const layout = snapLayout(root);
  let host: SystemdHost | undefined;
  try {
    say('installing "version A" of the vmkeep snap (revision 11, QEMU 7.2) and starting its service in a private systemd');
    await installRevision(layout, '11');
    await installRevision(layout, '12', await backportsQemuRoot());
    await switchCurrent(layout, '11');
    host = await SystemdHost.boot({ name: `updemo-${process.pid}`, unitFiles: { [SNAP_UNIT]: await prepareSnapUnit(layout) } });
    await host.systemctl('start', SNAP_UNIT);
    const socket = join(host.runDir, 'vmkeep', 'vmkeep.sock');
    const serial = (vm: string): string => join(host?.runDir ?? '', 'vmkeep', 'vms', vm, 'serial.log');
    const api = new ApiClient({ socketPath: socket, timeoutMs: 60_000 });
    const vmkeep = (...args: string[]): Promise<string> => showVmkeep(socket, ...args);
    const daemonPid = async (): Promise<string> => ((await host?.systemctl('show', '--property=MainPID', '--value', SNAP_UNIT)) ?? '').trim();
    process.stdout.write(`vmkeepd is up, pid ${await daemonPid()} (every PID shown is as seen inside the private systemd, as vmkeep list shows them)\n`);

    say(`starting ${VMS.length} VMs on version A's QEMU`);
    await Promise.all(VMS.map((name) => api.create({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 })));
    for (const name of VMS) await waitForSerial(serial(name), 'GUEST READY', 120_000);
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
    await vmkeep('refresh', '--stale', '--strategy', 'migrate', '--parallel', '2');
    await vmkeep('upgrade-status');
    for (const vm of await api.list()) {
      process.stdout.write(`${vm.name}: now pid ${vm.pid} (${vm.installation}), binary ${readExe(host.hostPidOf(vm.pid as number) as number)?.path}\n`);
    }
    say('done: the snap refresh restarted only vmkeepd; every VM kept running and moved onto version B\'s QEMU');
  } finally {
    await host?.shutdown();
    await rm(root, { recursive: true, force: true });
  }
}

await main().catch((error: unknown) => {
  process.stderr.write(`upgrade demo failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exitCode = 1;
});
