// The README's demo: vmkeepd as a systemd service (a private systemd when the host's PID 1 is
// not systemd), two VMs booting the tiny guest, a daemon restart and a SIGKILL of the daemon,
// and both VMs still running on the same QEMU processes, reattached. Then a real QEMU package
// upgrade, 7.2 -> 10.0: the VMs go stale, one moves live onto the new QEMU, one reboots onto it.
// Then a rebuild of 10.0 is installed: a VM created on 10.0 (RAM in a shared memfd) is handed
// over by cpr-transfer without copying its RAM, the others migrate (`--strategy auto` says why).
// Every VM has a qcow2 disk its guest writes fsynced records to; at the end every record a guest
// acknowledged is found on its disk. Leaves nothing behind.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readExe } from '../../launcher/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { backportsInstallation, copiedInstallation, systemInstallation, writeInstallations } from '../support/installations.js';
import { makeOverlayOnRaw, qemuImg, requireDiskTools } from '../support/disk-images.js';
import { countTicks, ensureGuestImage, waitForSerial } from '../support/guest.js';
import { checkImage, lastWrote } from '../support/records-check.js';
import { showVmkeep } from './cli.js';

function say(text: string): void {
  process.stdout.write(`\n== ${text}\n`);
}

function vmkeep(host: DaemonHost, ...args: string[]): Promise<string> {
  return showVmkeep(host.socket, ...args);
}

/** vmkeepd's PID as systemd reports it (MainPID), in the same pid namespace as the VMs' PIDs. */
async function daemonPid(host: DaemonHost): Promise<string> {
  return (await host.systemctl('show', '--property=MainPID', '--value', 'vmkeepd.service')).trim();
}

async function main(): Promise<void> {
  requireDiskTools();
  const guest = await ensureGuestImage();
  const dir = await mkdtemp(join(tmpdir(), 'vmkeep-demo-'));
  // One raw base holding an empty ext4, shared read-only below each VM's own qcow2 overlay.
  const { base, overlay: webDisk } = makeOverlayOnRaw(dir, 64, 'web');
  const disks = new Map([['web', webDisk]]);
  for (const name of ['db', 'app']) {
    disks.set(name, join(dir, `${name}.qcow2`));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', join(dir, `${name}.qcow2`));
  }
  const disk = (name: string) => [{ path: disks.get(name) as string, format: 'qcow2' }];
  const a = systemInstallation('qemu-a');
  const installations = join(dir, 'installations.json');
  await writeInstallations(installations, [a], a.name);
  say('booting a private systemd (PID 1 of its own namespaces) with vmkeepd.service inside');
  const host = await DaemonHost.boot({ name: `demo-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installations] });
  try {
    process.stdout.write(`vmkeepd is up, pid ${await daemonPid(host)}; control socket ${host.socket}\n`);
    process.stdout.write('(every PID shown is as seen inside the private systemd\'s pid namespace, as vmkeep list shows them)\n');
    say('creating two VMs, each with a qcow2 overlay over a shared raw base; each QEMU goes into its own scope, outside the daemon\'s cgroup');
    for (const name of ['web', 'db']) {
      await host.api.create({ name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128, disks: disk(name) });
    }
    for (const name of ['web', 'db']) await waitForSerial(host.serialLog(name), 'GUEST TICK 2', 90_000);
    await vmkeep(host, 'list');
    const nodes = await host.api.qmp('web', 'query-named-block-nodes', { flat: true }) as Array<{ 'node-name': string; file: string; ro: boolean }>;
    process.stdout.write('web\'s disk as QEMU sees it (vmkeepd opened every file and passed it as a descriptor; the base read-only):\n');
    for (const n of nodes.filter((x) => x['node-name'].endsWith('-file'))) process.stdout.write(`  ${n['node-name']}: ${n.file}${n.ro ? ' (read-only)' : ''}\n`);
    process.stdout.write(`the guests write fsynced records to their disks: web has acknowledged ${lastWrote(host.serialLog('web'))} so far\n`);
    const before = await host.api.list();
    const ticks = before.map((vm) => countTicks(host.serialLog(vm.name)));

    say('systemctl restart vmkeepd.service (what a package upgrade does)');
    let pid = await daemonPid(host);
    await host.restart();
    process.stdout.write(`vmkeepd pid ${pid} -> ${await daemonPid(host)}\n`);
    await vmkeep(host, 'list');

    say('systemctl kill --signal=SIGKILL vmkeepd.service, then start it again (a crash)');
    pid = await daemonPid(host);
    await host.killAndStart();
    process.stdout.write(`vmkeepd pid ${pid} (SIGKILLed) -> ${await daemonPid(host)}\n`);
    await vmkeep(host, 'list');

    const after = await host.api.list();
    for (const [i, vm] of after.entries()) {
      const old = before[i]!;
      await waitForSerial(host.serialLog(vm.name), `GUEST TICK ${ticks[i]! + 3}`, 30_000);
      const same = vm.pid === old.pid && vm.state === 'running';
      process.stdout.write(
        `${vm.name}: pid ${old.pid} -> ${vm.pid}, ${vm.state}, guest ticks ${ticks[i]} -> ${countTicks(host.serialLog(vm.name))}: ${same ? 'kept running, reattached' : 'NOT KEPT'}\n`,
      );
      if (!same) throw new Error(`${vm.name} did not survive the daemon restart`);
    }

    say('"upgrading the QEMU package" from 7.2 to 10.0: installation qemu-b (QEMU 10.0 from bookworm-backports) becomes current, vmkeepd restarts');
    const b = await backportsInstallation('qemu-b');
    await writeInstallations(installations, [a, b], b.name);
    process.stdout.write(
      'qemu-b is a copy of this machine\'s QEMU build at another path, with its own modules: both report the same version\n' +
      '(this machine has one QEMU version; the real 7.2 -> 10.0 upgrade with apt is in test/integration/deb-apt.test.ts)\n',
    );
    await host.restart();
    await vmkeep(host, 'upgrade-status');

    say('refresh web by live migration (the guest keeps running), db by an ACPI reboot');
    const webTicks = countTicks(host.serialLog('web'));
    await vmkeep(host, 'refresh', 'web', '--strategy', 'migrate');
    await vmkeep(host, 'refresh', 'db', '--strategy', 'reboot');
    await waitForSerial(host.serialLog('web'), `GUEST TICK ${webTicks + 2}`, 30_000);
    await waitForSerial(host.serialLog('db'), 'GUEST READY', 60_000);
    const boots = (await readFile(host.serialLog('web'), 'utf8')).match(/GUEST READY/g)?.length ?? 0;
    for (const vm of await host.api.list()) {
      process.stdout.write(`${vm.name}: pid ${vm.pid} runs ${readExe(host.hostPid(vm))?.path}\n`);
    }
    process.stdout.write(`web: guest ticks ${webTicks} -> ${countTicks(host.serialLog('web'))}, booted ${boots} time(s): ${boots === 1 ? 'moved without a reboot' : 'REBOOTED'}\n`);
    if (boots !== 1) throw new Error('web rebooted during its live migration');
    await vmkeep(host, 'upgrade-status');

    say('a VM created on QEMU 10.0 gets its RAM in a shared memfd (memory.backend memfd-shared, the default where cpr-transfer works)');
    await host.api.create({ name: 'app', kernel: guest.kernel, initrd: guest.initrd, append: `${guest.append} vmkeep.fill_mib=64`, memoryMiB: 256, disks: disk('app') });
    await waitForSerial(host.serialLog('app'), 'GUEST READY', 90_000);
    process.stdout.write(`app: memory ${JSON.stringify((await host.api.get('app')).spec.memory)}; web: memory ${JSON.stringify((await host.api.get('web')).spec.memory)} (created on 7.2)\n`);

    say('a rebuild of QEMU 10.0 (qemu-b2, another file) becomes current; refresh --stale --strategy auto: cpr where it can work, else migrate');
    const b2 = await copiedInstallation('qemu-b2', dir, b);
    await writeInstallations(installations, [a, b, b2], b2.name);
    await host.restart();
    const appTicks = countTicks(host.serialLog('app'));
    await vmkeep(host, 'refresh', '--stale', '--strategy', 'auto');
    await waitForSerial(host.serialLog('app'), `GUEST TICK ${appTicks + 2}`, 30_000);
    const appBoots = (await readFile(host.serialLog('app'), 'utf8')).match(/GUEST READY/g)?.length ?? 0;
    process.stdout.write(`app: guest ticks ${appTicks} -> ${countTicks(host.serialLog('app'))}, booted ${appBoots} time(s): ${appBoots === 1 ? 'handed over without a reboot or a copy of its RAM' : 'REBOOTED'}\n`);
    if (appBoots !== 1) throw new Error('app rebooted during its cpr refresh');
    await vmkeep(host, 'list');

    say('stopping the VMs gracefully (ACPI power-off), then checking each disk: every record its guest acknowledged must be there');
    await vmkeep(host, 'stop', '--all');
    await vmkeep(host, 'list');
    for (const [name, image] of disks) {
      const printed = lastWrote(host.serialLog(name));
      const verdict = checkImage(image, 'qcow2', printed);
      process.stdout.write(`${name}: ${printed} records acknowledged${verdict.ok ? ', all on its disk, e2fsck clean' : `: ${verdict.problems.join('; ')}`}\n`);
      if (!verdict.ok) throw new Error(`${name} lost acknowledged writes`);
    }
    say('done: every VM survived a restart and a SIGKILL of vmkeepd, moved from QEMU 7.2 onto 10.0, and onto its rebuild (app by cpr-transfer), without losing a write');
  } finally {
    await host.shutdown();
    await rm(dir, { recursive: true, force: true });
  }
}

await main().catch((error: unknown) => {
  process.stderr.write(`demo failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exitCode = 1;
});
