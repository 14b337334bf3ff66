// vmkeepd as a systemd service inside a private systemd: the set-up of the daemon's
// integration tests and of the demo. The daemon's folders live under /tmp (shared with the
// host), so the test talks to its control socket and reads serial logs from outside.
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { ApiClient, type VmView } from '../../daemon/index.js';
import { isSameProcess, readProcessIdentity } from '../../launcher/index.js';
import { requireQemu } from './guest.js';
import { projectRoot } from './paths.js';
import { requireSystemdHostPrereqs, SystemdHost } from './systemd-host.js';

const VMKEEPD = join(projectRoot(), 'dist', 'cli', 'vmkeepd.js');
const VMKEEP_CLI = join(projectRoot(), 'dist', 'cli', 'main.js');
export const DAEMON_UNIT = 'vmkeepd.service';
const SHIPPED_UNIT = join(projectRoot(), 'snap', 'vmkeepd.service');
/** Powers every guest off when it stops (host shutdown); see snap/vmkeep-guests.service. */
export const GUESTS_UNIT = 'vmkeep-guests.service';
const SHIPPED_GUESTS_UNIT = join(projectRoot(), 'snap', GUESTS_UNIT);
export const SOCKET_UNIT = 'vmkeepd.socket';
const SHIPPED_SOCKET_UNIT = join(projectRoot(), 'snap', SOCKET_UNIT);

/**
 * The unit the packages ship, so the tests prove its settings (Type=notify, default KillMode),
 * with the test's command line. The tests restart it many times in a row: systemd's start rate
 * limit is lifted, and the unit's directories are not managed by systemd here.
 */
export function testUnit(shipped: string, execStart: string): string {
  const lines = shipped
    .split('\n')
    .filter((line) => !/^(RuntimeDirectory|RuntimeDirectoryPreserve|StateDirectory|LogsDirectory|LogsDirectoryMode|After|Wants|StartLimitIntervalSec|StartLimitBurst)=/.test(line))
    .map((line) => (line.startsWith('ExecStart=') ? `ExecStart=${execStart}` : line));
  const unitAt = lines.indexOf('[Unit]');
  lines.splice(unitAt + 1, 0, 'StartLimitIntervalSec=0');
  return lines.join('\n');
}

/**
 * Rewrites the program of each named Exec line of a shipped unit (e.g. `/usr/bin/vmkeep` into
 * `node dist/cli/main.js`), keeping its arguments, so a test runs the shipped command line.
 * Throws when the unit has no such line or it does not start with the expected program.
 */
export function rewriteExec(shipped: string, rewrites: Partial<Record<'ExecStart' | 'ExecStop', { from: string; to: string; append?: string }>>): string {
  let text = shipped;
  for (const [key, { from, to, append }] of Object.entries(rewrites)) {
    const prefix = `${key}=${from}`;
    const lines = text.split('\n');
    const at = lines.findIndex((line) => line === prefix || line.startsWith(`${prefix} `));
    if (at < 0) throw new Error(`the unit has no line starting with ${prefix}`);
    lines[at] = `${key}=${to}${lines[at]!.slice(prefix.length)}${append === undefined ? '' : ` ${append}`}`;
    text = lines.join('\n');
  }
  return text;
}

export interface DaemonHostOptions {
  name: string;
  /** false: vmkeepd --no-scope (the negative control: VMs die with the service). */
  scopes?: boolean;
  /** More vmkeepd arguments (e.g. --installations FILE). */
  args?: string[];
  /** Folder for the daemon's state and runtime (default: a new temp folder, removed at shutdown). */
  dir?: string;
  /**
   * Also install the shipped vmkeep-guests.service (its ExecStop runs this build's CLI on the
   * test's socket); installed, not started: start it with systemctl('start', GUESTS_UNIT).
   */
  guestsUnit?: boolean;
  /**
   * Also install the shipped vmkeepd.socket (its ListenStream on the test's socket), started
   * before vmkeepd: systemd holds the control socket and passes it to every vmkeepd.
   */
  socketUnit?: boolean;
  /** More unit files for the private systemd (e.g. systemd-machined's), installed, not started. */
  unitFiles?: Record<string, string>;
  /** With guestsUnit: VMKEEP_SHUTDOWN_TIMEOUT, set by a drop-in as an administrator would (default 8). */
  guestsTimeoutSec?: number;
  /** The network namespace (path) the host, so vmkeepd and its QEMUs, run in (see SystemdHost). */
  netns?: string;
  /** A real journald in the private systemd, vmkeepd's stderr connected to it (as on a real host). */
  journald?: boolean;
}

interface BootOptions {
  name: string;
  unitFiles: Record<string, string>;
  guestsTimeoutSec?: number;
  netns?: string;
  journald?: boolean;
}

export class DaemonHost {
  private constructor(
    private current: SystemdHost,
    readonly dir: string,
    readonly socket: string,
    readonly api: ApiClient,
    private readonly bootOptions: BootOptions,
  ) {}

  /** The private systemd now running (a new one after reboot()). */
  get host(): SystemdHost {
    return this.current;
  }

  private static async bootSystemd(options: BootOptions): Promise<SystemdHost> {
    const host = await SystemdHost.boot({
      name: options.name, unitFiles: options.unitFiles, journald: options.journald === true, ...(options.netns === undefined ? {} : { netns: options.netns }),
    });
    try {
      if (options.journald === true) await DaemonHost.dropIn(host, DAEMON_UNIT, 'test-journal.conf', '[Service]\nStandardError=journal\n');
      if (options.unitFiles[GUESTS_UNIT] !== undefined) {
        const timeoutSec = options.guestsTimeoutSec ?? 8;
        await DaemonHost.dropIn(host, GUESTS_UNIT, 'test-timeout.conf', `[Service]\nEnvironment=VMKEEP_SHUTDOWN_TIMEOUT=${timeoutSec}\nTimeoutStopSec=${timeoutSec + 20}\n`);
      }
      return host;
    } catch (error) {
      await host.shutdown();
      throw error;
    }
  }

  /** Writes a drop-in for a unit of the private systemd and reloads it. */
  static async dropIn(host: SystemdHost, unit: string, file: string, text: string): Promise<void> {
    const dir = join(host.unitDir, `${unit}.d`);
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, file), text);
    await host.systemctl('daemon-reload');
  }

  /**
   * A host reboot: the orderly shutdown (`systemctl exit`, the guests unit powering the guests
   * off), the old namespaces removed, then a new private systemd (a new boot ID) on the same
   * state folder, where what an enabled install starts at boot is started: vmkeepd and the
   * guests unit. Resolves with the old host's console.
   */
  async reboot(timeoutMs = 60_000): Promise<string> {
    const log = await this.exitHost(timeoutMs);
    await this.current.shutdown();
    this.current = await DaemonHost.bootSystemd(this.bootOptions);
    if (this.bootOptions.unitFiles[SOCKET_UNIT] !== undefined) await this.systemctl('start', SOCKET_UNIT);
    await this.systemctl('start', DAEMON_UNIT);
    if (this.bootOptions.unitFiles[GUESTS_UNIT] !== undefined) await this.systemctl('start', GUESTS_UNIT);
    await this.reattached();
    return log;
  }

  static async boot(options: DaemonHostOptions): Promise<DaemonHost> {
    requireQemu();
    requireSystemdHostPrereqs();
    const dir = options.dir ?? (await mkdtemp(join(tmpdir(), 'vk-')));
    // QEMU's user passes through (never lists) the test's folders to its VM's folder and pinned
    // modules, as it does through / and /var on a real host.
    await mkdir(dir, { recursive: true });
    for (let d = dir; dirname(d) !== d && d.startsWith(`${tmpdir()}/`); d = dirname(d)) await chmod(d, 0o711);
    const socket = join(dir, 'run', 'vmkeep.sock');
    const args = [
      VMKEEPD,
      '--state-dir', join(dir, 'state'),
      '--runtime-dir', join(dir, 'run'),
      // Never the host's /var/log/vmkeep.
      '--log-dir', join(dir, 'log'),
      '--socket', socket,
      ...(options.scopes === false ? ['--no-scope'] : []),
      ...(options.args ?? []),
    ];
    const unit = testUnit(await readFile(SHIPPED_UNIT, 'utf8'), `${process.execPath} ${args.join(' ')}`);
    let host: SystemdHost | undefined;
    try {
      const guests = options.guestsUnit === true
        ? rewriteExec(await readFile(SHIPPED_GUESTS_UNIT, 'utf8'), {
          ExecStop: { from: '/usr/bin/vmkeep', to: `${process.execPath} ${VMKEEP_CLI}`, append: `--socket ${socket}` },
        }).replace('--state-dir /var/lib/vmkeep', `--state-dir ${join(dir, 'state')}`)
        : undefined;
      let socketUnit: string | undefined;
      if (options.socketUnit === true) {
        const shipped = await readFile(SHIPPED_SOCKET_UNIT, 'utf8');
        if (!/^ListenStream=\/run\/vmkeep\/vmkeep\.sock$/m.test(shipped)) throw new Error(`${SHIPPED_SOCKET_UNIT} has no ListenStream=/run/vmkeep/vmkeep.sock line`);
        socketUnit = shipped.replace(/^ListenStream=.*$/m, `ListenStream=${socket}`);
      }
      const bootOptions = {
        name: options.name,
        unitFiles: {
          ...options.unitFiles,
          [DAEMON_UNIT]: unit,
          ...(guests === undefined ? {} : { [GUESTS_UNIT]: guests }),
          ...(socketUnit === undefined ? {} : { [SOCKET_UNIT]: socketUnit }),
        },
        ...(options.guestsTimeoutSec === undefined ? {} : { guestsTimeoutSec: options.guestsTimeoutSec }),
        ...(options.netns === undefined ? {} : { netns: options.netns }),
        journald: options.journald === true,
      };
      host = await DaemonHost.bootSystemd(bootOptions);
      const daemon = new DaemonHost(host, dir, socket, new ApiClient({ socketPath: socket, timeoutMs: 60_000 }), bootOptions);
      if (socketUnit !== undefined) await daemon.systemctl('start', SOCKET_UNIT);
      await daemon.systemctl('start', DAEMON_UNIT);
      return daemon;
    } catch (error) {
      await host?.shutdown();
      await rm(dir, { recursive: true, force: true });
      throw error;
    }
  }

  /** systemctl inside; a failure carries the tail of the daemon's log. */
  async systemctl(...args: string[]): Promise<string> {
    try {
      return await this.host.systemctl(...args);
    } catch (error) {
      throw new Error(`${(error as Error).message}\n--- console (vmkeepd log) ---\n${await this.consoleTail(40)}`, { cause: error });
    }
  }

  /** Type=notify: systemctl returns once the new daemon serves; then every reattach is awaited. */
  async restart(): Promise<string> {
    const out = await this.systemctl('restart', DAEMON_UNIT);
    await this.reattached();
    return out;
  }

  /**
   * vmkeepd reports ready after a bounded wait: a VM whose monitor is slow goes on reattaching
   * in the background. Tests that look at states right after a start wait for that to end.
   */
  async reattached(timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      // A daemon that Restart= replaced meanwhile may not listen yet: that is waited for too.
      const vms = await this.api.list().catch((error: unknown) => {
        if ((error as { code?: string }).code === 'DAEMON_DOWN' && Date.now() <= deadline) return undefined;
        throw error;
      });
      const busy = vms === undefined ? ['(vmkeepd not answering yet)'] : vms.filter((vm) => vm.operation?.kind === 'reattach').map((vm) => vm.name);
      if (busy.length === 0) return;
      if (Date.now() > deadline) throw new Error(`still reattaching after ${timeoutMs} ms: ${busy.join(', ')}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** SIGKILL of everything in the service's cgroup, then a start (Restart= may have begun one). */
  async killAndStart(): Promise<void> {
    const mainPid = Number((await this.systemctl('show', '--property=MainPID', '--value', DAEMON_UNIT)).trim());
    const hostPid = this.host.hostPidOf(mainPid);
    const identity = hostPid === null ? null : readProcessIdentity(hostPid);
    await this.systemctl('kill', '--signal=SIGKILL', DAEMON_UNIT);
    const deadline = Date.now() + 20_000;
    while (identity !== null && isSameProcess(identity.pid, identity.startTime)) {
      if (Date.now() > deadline) throw new Error(`vmkeepd (pid ${identity.pid}) still alive 20 s after SIGKILL`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await this.systemctl('start', DAEMON_UNIT);
    await this.reattached();
  }

  async stop(): Promise<void> {
    await this.systemctl('stop', DAEMON_UNIT);
  }

  async start(): Promise<void> {
    await this.systemctl('start', DAEMON_UNIT);
    await this.reattached();
  }

  /** Sets (or with undefined, removes) a variable the daemon gets from its next start on. */
  async setDaemonEnv(name: string, value: string | undefined): Promise<void> {
    if (value === undefined) await this.systemctl('unset-environment', name);
    else await this.systemctl('set-environment', `${name}=${value}`);
  }

  /**
   * A crash at one step of a refresh: vmkeepd restarted with VMKEEP_TEST_CRASH_AT=step SIGKILLs
   * itself there during a refresh of `vm`, then a clean vmkeepd starts (and settles it). Resolves
   * with what the refresh request got (an error when the daemon died as asked).
   */
  async crashDuringRefresh(vm: string, step: string, strategy: 'migrate' | 'reboot'): Promise<unknown> {
    let outcome: unknown;
    await this.setDaemonEnv('VMKEEP_TEST_CRASH_AT', step);
    try {
      await this.restart();
      outcome = await this.api.refresh(vm, { strategy }).then((ok) => ok, (e: unknown) => e);
    } finally {
      await this.setDaemonEnv('VMKEEP_TEST_CRASH_AT', undefined);
    }
    await this.restart();
    return outcome;
  }

  /** The VM's record as the daemon last wrote it. */
  async record(name: string): Promise<Record<string, any>> {
    return JSON.parse(await readFile(this.recordFile(name), 'utf8')) as Record<string, any>;
  }

  /** The host PID of a QEMU the daemon reports (the daemon sees PIDs of the private namespace). */
  hostPid(vm: VmView): number {
    if (vm.pid === undefined) throw new Error(`${vm.name} has no pid (state ${vm.state})`);
    const pid = this.host.hostPidOf(vm.pid);
    if (pid === null) throw new Error(`no host PID for ${vm.name}'s pid ${vm.pid}`);
    return pid;
  }

  serialLog(name: string): string {
    return join(this.dir, 'log', name, 'serial.log');
  }

  /** QEMU's own stderr (e.g. "terminating on signal 15"). */
  qemuLog(name: string): string {
    return join(this.dir, 'log', name, 'qemu.log');
  }

  qmpSocket(name: string): string {
    return join(this.dir, 'run', 'vms', name, 'qmp.sock');
  }

  /** VM names whose record files are in the state folder. */
  async recordNames(): Promise<string[]> {
    return (await readdir(join(this.dir, 'state', 'vms'))).filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5));
  }

  recordFile(name: string): string {
    return join(this.dir, 'state', 'vms', `${name}.json`);
  }

  /** The service's console output (vmkeepd's JSON logs), for failure messages. */
  consoleTail(lines = 60): Promise<string> {
    return this.host.consoleTail(lines);
  }

  /**
   * The private host's orderly shutdown (`systemctl exit`: every unit stopped in dependency order,
   * as at a host shutdown); resolves with its whole console output, read before anything is
   * removed. shutdown() still has to follow, to remove what is left.
   */
  async exitHost(timeoutMs = 60_000): Promise<string> {
    await this.host.exit(timeoutMs);
    return readFile(this.host.consoleLog, 'utf8');
  }

  /** Kills the private systemd's whole pid namespace (every QEMU in it) and removes the folders. */
  async shutdown(): Promise<void> {
    await this.host.shutdown();
    await rm(this.dir, { recursive: true, force: true });
  }
}
