// A private, real systemd (PID 1 of its own pid/mount/uts/ipc/cgroup namespaces) with a D-Bus
// system bus, for tests on machines whose PID 1 is not systemd. See boot.sh for the namespace
// and mount set-up; this file prepares its /run, starts it, waits for the bus and tears it down.
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { mkdir, readFile, readdir, rename, rm, rmdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { projectRoot } from './paths.js';

/** Host directory holding one folder (private /run, console log, pid file) and one JSON state per host. */
export const SYSTEMD_HOST_STATE_ROOT = '/run/vmkeep-testhost';

const TARGET = 'vmkeep-testhost.target';
const UNIT_DIR_INSIDE = '/run/vmkeep-units';
// Processes started with exec()/spawnInside() live here (a sibling of systemd's own cgroups):
// they must be inside the private cgroup subtree before they enter its cgroup namespace,
// or systemd could not move their children into scopes (nsdelegate forbids it).
const EXEC_CGROUP = 'vmkeep-exec';
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$/;

export interface SystemdHostOptions {
  /** Unique among running hosts; default `h<pid>-<n>`. */
  name?: string;
  /** Extra unit files written into the unit directory before boot (not started). */
  unitFiles?: Record<string, string>;
  /** Until the bus answers and the boot transaction is done; default 20 s. */
  timeoutMs?: number;
  /**
   * Host folders or files bound over paths inside the private mount namespace before systemd
   * starts (e.g. scratch folders over every path snapd writes). Both must exist.
   */
  binds?: Array<{ host: string; inside: string }>;
  /**
   * Unit folders (paths inside) appended to the unit path, e.g. a scratch /etc/systemd/system for
   * snapd's units. The distribution's unit folders are refused: their sysinit and sockets units
   * would act on the host (wipe /tmp, rename network interfaces, change /dev).
   */
  extraUnitDirs?: string[];
  /**
   * A network namespace (a path like /run/netns/NAME) the whole host runs in: its services and
   * the QEMUs they start see only that namespace's links (a test's bridge and TAPs).
   */
  netns?: string;
  /**
   * Also run a real systemd-journald (volatile, in the private /run), from units of our own
   * (never the distribution's: see extraUnitDirs); read it with exec('journalctl', ...).
   */
  journald?: boolean;
}

// Unit folders whose units must never be loaded by a private systemd sharing the host's files.
const HOST_UNIT_DIRS = /^\/(usr\/)?lib\/systemd\/system\/?$|^\/etc\/systemd\/system\/?$/;

export interface ExecOptions {
  /** Working directory inside (same file system view as the host); default process.cwd(). */
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Default 60 s; the whole process group is SIGKILLed on expiry. */
  timeoutMs?: number;
  input?: string;
}

export interface ExecResult {
  stdout: string;
  stderr: string;
  exitCode: number | null;
  signal: NodeJS.Signals | null;
}

interface HostState {
  name: string;
  baseDir: string;
  runDir: string;
  unitDir: string;
  cgroupDir: string;
  consoleLog: string;
  busAddress: string;
  pid1: number;
  pid1Start: string;
  pidNs: string;
  scriptPid: number;
  scriptStart: string | null;
  bootMs: number;
}

interface HostPaths {
  baseDir: string;
  runDir: string;
  unitDir: string;
  pidFile: string;
  consoleLog: string;
  stateFile: string;
  cgroupDir: string;
  busAddress: string;
}

let hostSeq = 0;

function pathsOf(name: string): HostPaths {
  const baseDir = join(SYSTEMD_HOST_STATE_ROOT, name);
  const runDir = join(baseDir, 'run');
  return {
    baseDir,
    runDir,
    unitDir: join(runDir, 'vmkeep-units'),
    pidFile: join(baseDir, 'pid1'),
    consoleLog: join(baseDir, 'console.log'),
    stateFile: join(SYSTEMD_HOST_STATE_ROOT, `${name}.json`),
    cgroupDir: join(cgroup2Mount() ?? '/sys/fs/cgroup', `vmkeep-testhost-${name}`),
    busAddress: `unix:path=${join(runDir, 'dbus', 'system_bus_socket')}`,
  };
}

function checkName(name: string): void {
  if (!NAME_RE.test(name)) {
    throw new Error(`systemd test host name ${JSON.stringify(name)} is invalid: use 1-40 of [A-Za-z0-9_-]`);
  }
}

/** Mount point of the host's cgroup2 hierarchy (/sys/fs/cgroup/unified in hybrid mode). */
export function cgroup2Mount(): string | null {
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const [left, right] = line.split(' - ');
    if (right?.split(' ')[0] === 'cgroup2') return left?.split(' ')[4] ?? null;
  }
  return null;
}

function onPath(cmd: string): boolean {
  return (process.env['PATH'] ?? '/usr/sbin:/usr/bin:/sbin:/bin')
    .split(':')
    .some((dir) => dir !== '' && existsSync(join(dir, cmd)));
}

/** Throws an actionable message when this machine cannot run a private systemd. */
export function requireSystemdHostPrereqs(): void {
  const missing: string[] = [];
  const packages = new Set<string>();
  const need = (ok: boolean, what: string, pkg?: string): void => {
    if (ok) return;
    missing.push(pkg ? `${what} (apt package ${pkg})` : what);
    if (pkg) packages.add(pkg);
  };
  need(process.getuid?.() === 0, 'root privileges (namespaces, mounts and cgroups need them)');
  need(existsSync('/lib/systemd/systemd'), '/lib/systemd/systemd', 'systemd');
  need(onPath('systemctl') && onPath('busctl'), 'systemctl and busctl', 'systemd');
  need(onPath('dbus-daemon'), 'dbus-daemon', 'dbus');
  need(existsSync('/usr/share/dbus-1/system.conf'), '/usr/share/dbus-1/system.conf', 'dbus');
  need(/^messagebus:/m.test(safeRead('/etc/passwd')), "the 'messagebus' user (created by the package)", 'dbus');
  need(onPath('unshare') && onPath('nsenter'), 'unshare and nsenter', 'util-linux');
  need(onPath('script'), 'script', 'bsdutils');
  need(onPath('mount') && onPath('umount'), 'mount and umount', 'mount');
  need(cgroup2Mount() !== null, 'a mounted cgroup2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified)');
  if (missing.length > 0) {
    const install = packages.size > 0 ? ` Install with: apt-get install -y ${[...packages].join(' ')}.` : '';
    throw new Error(`cannot boot a private systemd for the tests; missing: ${missing.join('; ')}.${install}`);
  }
}

function safeRead(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

/** Field 22 of /proc/PID/stat, or null when the process is gone. Identifies a process, not just a PID. */
export function startTimeOf(pid: number): string | null {
  const stat = safeRead(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // fields[0] is field 3 (state); a zombie is already dead for our purposes.
  if (fields.length < 20 || fields[0] === 'Z') return null;
  return fields[19] ?? null;
}

export function sameProcessAlive(pid: number, start: string | null): boolean {
  return start !== null && startTimeOf(pid) === start;
}

export async function waitFor<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined> | T | undefined): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() >= deadline) throw new Error(`timed out after ${Math.round(timeoutMs)} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

export function run(cmd: string, args: string[], timeoutMs: number): Promise<ExecResult> {
  return collect(spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true }), timeoutMs, `${cmd} ${args.join(' ')}`);
}

function collect(child: ChildProcess, timeoutMs: number, label: string, input?: string): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      killGroup(child, 'SIGKILL');
      reject(new Error(`timed out after ${timeoutMs} ms: ${label}\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (exitCode, signal) => {
      clearTimeout(timer);
      resolve({ stdout, stderr, exitCode, signal });
    });
    if (child.stdin) {
      // A command that exits without reading its input makes this write fail (EPIPE); its
      // exit code is the answer, not that.
      child.stdin.on('error', () => undefined);
      child.stdin.end(input ?? '');
    }
  });
}

function killGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid === undefined) return;
  try {
    process.kill(-child.pid, signal);
  } catch {
    // already gone
  }
}

const STUB_TARGETS = [
  'sysinit', 'basic', 'sockets', 'timers', 'paths', 'slices', 'local-fs', 'remote-fs',
  'network', 'network-online', 'nss-lookup', 'multi-user', 'shutdown',
];

/** A journald kept in the private /run: nothing reaches the host's kernel log, syslog or console. */
const JOURNALD_CONF = [
  '[Journal]',
  'Storage=volatile',
  'ReadKMsg=no',
  'ForwardToSyslog=no',
  'ForwardToKMsg=no',
  'ForwardToConsole=no',
  'ForwardToWall=no',
  // Tests count lines: none may be dropped by the rate limit.
  'RateLimitBurst=0',
  'RuntimeMaxUse=16M',
  '',
].join('\n');

function journaldUnits(): Record<string, string> {
  return {
    'systemd-journald.socket': [
      '[Unit]',
      'Description=journald sockets of the private test host',
      'DefaultDependencies=no',
      '[Socket]',
      'ListenStream=/run/systemd/journal/stdout',
      'ListenDatagram=/run/systemd/journal/socket',
      'SocketMode=0666',
      'PassCredentials=yes',
      'PassSecurity=yes',
      'ReceiveBuffer=8M',
      'Service=systemd-journald.service',
      '',
    ].join('\n'),
    'systemd-journald.service': [
      '[Unit]',
      'Description=journald of the private test host',
      'DefaultDependencies=no',
      'Requires=systemd-journald.socket',
      'After=systemd-journald.socket',
      '[Service]',
      'Type=notify',
      'Sockets=systemd-journald.socket',
      // Its own messages on the console log, never on the host's kernel log.
      'Environment=SYSTEMD_LOG_TARGET=console',
      'ExecStart=/lib/systemd/systemd-journald',
      '',
    ].join('\n'),
  };
}

function baseUnits(journald: boolean): Record<string, string> {
  const units: Record<string, string> = {};
  // Empty targets so that default dependencies of services, scopes and slices resolve.
  for (const t of STUB_TARGETS) {
    units[`${t}.target`] = `[Unit]\nDescription=stub ${t}.target\nDefaultDependencies=no\n`;
  }
  units[TARGET] = [
    '[Unit]',
    'Description=vmkeep private test host',
    'DefaultDependencies=no',
    `Wants=dbus.socket dbus.service${journald ? ' systemd-journald.socket systemd-journald.service' : ''}`,
    '',
  ].join('\n');
  if (journald) Object.assign(units, journaldUnits());
  units['dbus.socket'] = [
    '[Unit]',
    'Description=D-Bus system bus socket',
    'DefaultDependencies=no',
    '[Socket]',
    'ListenStream=/run/dbus/system_bus_socket',
    '',
  ].join('\n');
  units['dbus.service'] = [
    '[Unit]',
    'Description=D-Bus system bus',
    'DefaultDependencies=no',
    'Requires=dbus.socket',
    'After=dbus.socket',
    '[Service]',
    'Type=notify',
    'NotifyAccess=main',
    // --nosyslog: there is no syslog here; messages go to the console log instead.
    'ExecStart=/usr/bin/dbus-daemon --system --address=systemd: --nofork --nopidfile --systemd-activation --nosyslog',
    '',
  ].join('\n');
  // `systemctl exit` starts exit.target: stop everything (shutdown.target conflicts), then exit.
  units['exit.target'] = [
    '[Unit]',
    'Description=Exit the private systemd',
    'DefaultDependencies=no',
    'Requires=vmkeep-exit.service',
    'After=vmkeep-exit.service',
    'AllowIsolate=yes',
    '',
  ].join('\n');
  units['vmkeep-exit.service'] = [
    '[Unit]',
    'Description=Exit the private systemd',
    'DefaultDependencies=no',
    'Requires=shutdown.target',
    'After=shutdown.target',
    'SuccessAction=exit-force',
    '[Service]',
    'Type=oneshot',
    'ExecStart=/bin/true',
    '',
  ].join('\n');
  return units;
}

// Command-line options are lost on daemon-reload; settings in system.conf.d stay.
const MANAGER_CONF = [
  '[Manager]',
  'LogTarget=console',
  'LogColor=no',
  'ShowStatus=no',
  'DumpCore=no',
  'CrashShell=no',
  'DefaultStandardOutput=tty',
  'DefaultStandardError=tty',
  // Tests never wait 90 s for a stuck stop.
  'DefaultTimeoutStopSec=15s',
  '',
].join('\n');

// Moves the shell into the private cgroup subtree, then becomes nsenter (which forks the
// command inside the pid namespace). Positional: cgroup.procs file, PID 1, working dir, argv.
const ENTER_SCRIPT = 'cg=$1 pid=$2 wd=$3; shift 3; echo $$ >"$cg" && exec nsenter -t "$pid" -a --wd="$wd" -- "$@"';

export class SystemdHost {
  private shutdownPromise: Promise<void> | null = null;

  private constructor(private readonly state: HostState) {}

  get name(): string {
    return this.state.name;
  }
  /** Host directory mounted as /run inside. */
  get runDir(): string {
    return this.state.runDir;
  }
  /** Host directory of the unit files (/run/vmkeep-units inside). */
  get unitDir(): string {
    return this.state.unitDir;
  }
  /** unix:path=<runDir>/dbus/system_bus_socket, usable from the host. */
  get busAddress(): string {
    return this.state.busAddress;
  }
  /** Host PID of the private systemd. */
  get pid1(): number {
    return this.state.pid1;
  }
  /** File with everything written to the private console (systemd and all services). */
  get consoleLog(): string {
    return this.state.consoleLog;
  }
  /** Host cgroup2 directory that is the private cgroup root. */
  get cgroupDir(): string {
    return this.state.cgroupDir;
  }
  /** From spawn until the boot transaction finished and systemd answered on the bus. */
  get bootMs(): number {
    return this.state.bootMs;
  }

  static async boot(options: SystemdHostOptions = {}): Promise<SystemdHost> {
    requireSystemdHostPrereqs();
    const name = options.name ?? `h${process.pid}-${++hostSeq}`;
    checkName(name);
    const timeoutMs = options.timeoutMs ?? 20_000;
    const p = pathsOf(name);
    const binds = options.binds ?? [];
    for (const b of binds) {
      if (/[\t\n]/.test(b.host + b.inside) || !b.inside.startsWith('/')) throw new Error(`bind ${JSON.stringify(b)}: paths must be absolute, without tabs or newlines`);
      if (!existsSync(b.host) || !existsSync(b.inside)) throw new Error(`bind ${b.host} over ${b.inside}: both must exist`);
    }
    const extraUnitDirs = options.extraUnitDirs ?? [];
    for (const dir of extraUnitDirs) {
      // /etc/systemd/system only when a scratch folder is bound over it.
      if (HOST_UNIT_DIRS.test(dir) && !binds.some((b) => b.inside.replace(/\/$/, '') === dir.replace(/\/$/, ''))) {
        throw new Error(`refusing unit folder ${dir} in a private systemd: the host's units would act on the host (bind a scratch folder over it first)`);
      }
      if (/[:\n]/.test(dir)) throw new Error(`unit folder ${JSON.stringify(dir)} cannot go in a unit path`);
    }
    if (options.journald === true && (!existsSync('/lib/systemd/systemd-journald') || !onPath('journalctl'))) {
      throw new Error('a private systemd with journald needs /lib/systemd/systemd-journald and journalctl; install with: apt-get install -y systemd');
    }
    // A host of the same name left behind by a crashed run is removed first.
    await SystemdHost.cleanup(name);

    await mkdir(p.unitDir, { recursive: true });
    await mkdir(join(p.runDir, 'vmkeep-empty'));
    await writeFile(join(p.runDir, 'vmkeep-boot-id'), `${randomUUID()}\n`);
    await mkdir(join(p.runDir, 'systemd', 'system.conf.d'), { recursive: true });
    await writeFile(join(p.runDir, 'systemd', 'system.conf.d', 'vmkeep-testhost.conf'), MANAGER_CONF);
    if (options.journald === true) {
      await mkdir(join(p.runDir, 'systemd', 'journald.conf.d'), { recursive: true });
      await writeFile(join(p.runDir, 'systemd', 'journald.conf.d', 'vmkeep-testhost.conf'), JOURNALD_CONF);
    }
    for (const [unit, text] of Object.entries({ ...baseUnits(options.journald === true), ...options.unitFiles })) {
      checkUnitName(unit);
      await writeFile(join(p.unitDir, unit), text);
    }
    await mkdir(join(p.cgroupDir, EXEC_CGROUP), { recursive: true });

    const bootScript = join(projectRoot(), 'test', 'support', 'systemd-host', 'boot.sh');
    const started = performance.now();
    // `script` gives the private systemd a pty for /dev/console and copies it into consoleLog.
    const scriptArgs = ['-qfec', `'${bootScript}' start`, p.consoleLog];
    if (options.netns !== undefined && !existsSync(options.netns)) throw new Error(`network namespace ${options.netns} does not exist`);
    // nsenter only switches the network namespace and then execs script (no fork): the PID is script's.
    const script = spawn(options.netns === undefined ? 'script' : 'nsenter', options.netns === undefined ? scriptArgs : [`--net=${options.netns}`, '--', 'script', ...scriptArgs], {
      cwd: '/',
      detached: true,
      stdio: 'ignore',
      env: {
        ...process.env, VMKEEP_TH_RUN: p.runDir, VMKEEP_TH_CGROUP: p.cgroupDir, VMKEEP_TH_PIDFILE: p.pidFile,
        VMKEEP_TH_BINDS: binds.map((b) => `${b.host}\t${b.inside}`).join('\n'),
        VMKEEP_TH_UNIT_PATH_TAIL: extraUnitDirs.map((d) => `:${d}`).join(''),
      },
    });
    // The host outlives this process when the CLI boots it; shutdown() never relies on `script`.
    script.unref();
    let ended: string | null = null;
    script.once('error', (err) => (ended = `could not run script: ${err.message}`));
    script.once('exit', (code, signal) => (ended = `boot process exited (code ${code}, signal ${signal})`));

    let state: HostState | null = null;
    try {
      const pid1 = await waitFor('the private PID 1 to write its host PID', timeoutMs, async () => {
        if (ended) throw new Error(ended);
        const text = await readFile(p.pidFile, 'utf8').catch(() => '');
        return /^\d+\n$/.test(text) ? Number(text) : undefined;
      });
      state = {
        name,
        baseDir: p.baseDir,
        runDir: p.runDir,
        unitDir: p.unitDir,
        cgroupDir: p.cgroupDir,
        consoleLog: p.consoleLog,
        busAddress: p.busAddress,
        pid1,
        pid1Start: startTimeOf(pid1) ?? '',
        pidNs: readlinkSync(`/proc/${pid1}/ns/pid`),
        scriptPid: script.pid ?? 0,
        scriptStart: script.pid === undefined ? null : startTimeOf(script.pid),
        bootMs: 0,
      };
      await writeState(p.stateFile, state);
      const host = new SystemdHost(state);
      const remaining = (): number => timeoutMs - (performance.now() - started);
      // The private socket answers without D-Bus, so a failed boot (e.g. of dbus) shows at once.
      const checkBootState = async (): Promise<string> => {
        if (ended) throw new Error(ended);
        const r = await host.exec('systemctl', ['is-system-running'], { timeoutMs: 5_000 });
        const systemState = r.stdout.trim();
        if (systemState === 'degraded' || systemState === 'maintenance') {
          const failed = await host.exec('systemctl', ['--no-pager', '--failed', '--plain', '--no-legend'], { timeoutMs: 5_000 });
          throw new Error(`boot ended in state ${systemState}; failed units:\n${failed.stdout}`);
        }
        return systemState;
      };
      await waitFor('the boot transaction to finish (systemctl is-system-running)', remaining(), async () =>
        (await checkBootState()) === 'running' ? true : undefined,
      );
      await waitFor('systemd to answer on the system bus', remaining(), async () => {
        const r = await run('busctl', [
          `--address=${p.busAddress}`, '--timeout=2',
          'get-property', 'org.freedesktop.systemd1', '/org/freedesktop/systemd1',
          'org.freedesktop.systemd1.Manager', 'SystemState',
        ], 5_000);
        if (r.stdout.trim() === 's "running"') return true;
        await checkBootState();
        return undefined;
      });
      state.bootMs = Math.round(performance.now() - started);
      await writeState(p.stateFile, state);
      return host;
    } catch (err) {
      killGroup(script, 'SIGKILL');
      const tail = await consoleTail(p.consoleLog);
      await (state ? teardown(state) : SystemdHost.cleanup(name));
      throw new Error(
        `private systemd "${name}" did not come up: ${(err as Error).message}\n--- console log tail ---\n${tail}`,
        { cause: err },
      );
    }
  }

  /** A host booted earlier (e.g. by the CLI in another process), from its state file. */
  static async attach(name: string): Promise<SystemdHost> {
    checkName(name);
    const state = await readState(pathsOf(name).stateFile);
    if (!state) throw new Error(`no private systemd named "${name}" (no ${pathsOf(name).stateFile})`);
    if (!sameProcessAlive(state.pid1, state.pid1Start)) {
      throw new Error(`private systemd "${name}" is not running any more (PID ${state.pid1} gone); shut it down to clean up`);
    }
    return new SystemdHost(state);
  }

  /** Tears down whatever is left of a host of that name, running or not. Never throws. */
  static async cleanup(name: string): Promise<void> {
    checkName(name);
    const p = pathsOf(name);
    const state = await readState(p.stateFile);
    await teardown(
      state ?? {
        name,
        baseDir: p.baseDir,
        runDir: p.runDir,
        unitDir: p.unitDir,
        cgroupDir: p.cgroupDir,
        consoleLog: p.consoleLog,
        busAddress: p.busAddress,
        pid1: 0,
        pid1Start: '',
        pidNs: '',
        scriptPid: 0,
        scriptStart: null,
        bootMs: 0,
      },
    );
  }

  /** Starts a process inside all namespaces of the private systemd (detached: kill it by process group). */
  spawnInside(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; stdio?: StdioOptions } = {}): ChildProcess {
    return spawn('sh', ['-c', ENTER_SCRIPT, 'sh', join(this.state.cgroupDir, EXEC_CGROUP, 'cgroup.procs'),
      String(this.state.pid1), opts.cwd ?? process.cwd(), cmd, ...args], {
      detached: true,
      stdio: opts.stdio ?? ['pipe', 'pipe', 'pipe'],
      // The default system bus inside is the private one; never inherit the host's address.
      env: { ...process.env, DBUS_SYSTEM_BUS_ADDRESS: 'unix:path=/run/dbus/system_bus_socket', ...opts.env },
    });
  }

  exec(cmd: string, args: string[], opts: ExecOptions = {}): Promise<ExecResult> {
    const child = this.spawnInside(cmd, args, { cwd: opts.cwd, env: opts.env });
    return collect(child, opts.timeoutMs ?? 60_000, `${cmd} ${args.join(' ')} (inside ${this.name})`, opts.input);
  }

  /** systemctl inside; resolves with stdout, throws with the whole output on a non-zero exit. */
  async systemctl(...args: string[]): Promise<string> {
    const r = await this.exec('systemctl', ['--no-pager', ...args]);
    if (r.exitCode !== 0) {
      throw new Error(`systemctl ${args.join(' ')} in ${this.name} failed (exit ${r.exitCode ?? r.signal}):\n${r.stdout}${r.stderr}`);
    }
    return r.stdout;
  }

  async writeUnit(unit: string, text: string): Promise<void> {
    checkUnitName(unit);
    await writeFile(join(this.state.unitDir, unit), text);
    await this.systemctl('daemon-reload');
  }

  /** Host PID of a process known inside by `insidePid`, or null. */
  hostPidOf(insidePid: number): number | null {
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      const nspid = /^NSpid:\s+(.*)$/m.exec(safeRead(`/proc/${entry}/status`))?.[1]?.split(/\s+/);
      if (!nspid || nspid.length < 2 || Number(nspid[nspid.length - 1]) !== insidePid) continue;
      if (readlinkOrNull(`/proc/${entry}/ns/pid`) === this.state.pidNs) return Number(entry);
    }
    return null;
  }

  async consoleTail(lines = 40): Promise<string> {
    return consoleTail(this.state.consoleLog, lines);
  }

  /** What remains of this host on the machine (processes, cgroups, mounts, files); empty after shutdown. */
  leftovers(): string[] {
    return leftoversOf(this.state);
  }

  /**
   * The host's own orderly shutdown: `systemctl exit` inside (every unit stopped in dependency
   * order, then PID 1 exits), resolved once PID 1 is gone. Unlike shutdown({graceful}), it
   * throws when the exit takes longer than `timeoutMs`, and it tears nothing down: the console
   * log stays readable until shutdown().
   */
  async exit(timeoutMs = 30_000): Promise<void> {
    if (!sameProcessAlive(this.state.pid1, this.state.pid1Start)) throw new Error(`private systemd "${this.name}" is not running`);
    const began = Date.now();
    // systemctl may be cut off while the manager goes down; PID 1's end is the answer.
    const request = await this.exec('systemctl', ['exit'], { timeoutMs }).catch((err: Error) => err);
    if (!(request instanceof Error) && request.exitCode !== 0 && sameProcessAlive(this.state.pid1, this.state.pid1Start)) {
      throw new Error(`systemctl exit in ${this.name} failed (exit ${request.exitCode ?? request.signal}):\n${request.stdout}${request.stderr}`);
    }
    // Then `script` too, so the console log holds everything PID 1's console got.
    await waitFor(`private systemd "${this.name}" (PID ${this.state.pid1}) to exit after systemctl exit`, Math.max(0, timeoutMs - (Date.now() - began)), () =>
      sameProcessAlive(this.state.pid1, this.state.pid1Start) || sameProcessAlive(this.state.scriptPid, this.state.scriptStart) ? undefined : true,
    );
  }

  /**
   * SIGKILLs PID 1 (the kernel then kills its whole pid namespace), waits until every process is
   * gone, removes the cgroups deepest first and the private /run. `graceful` first tries
   * `systemctl exit` inside. Idempotent; never throws.
   */
  shutdown(options: { graceful?: boolean } = {}): Promise<void> {
    this.shutdownPromise ??= (async () => {
      if (options.graceful && sameProcessAlive(this.state.pid1, this.state.pid1Start)) {
        await this.exec('systemctl', ['exit'], { timeoutMs: 10_000 }).catch(() => undefined);
        await waitFor('graceful exit', 15_000, () => (sameProcessAlive(this.state.pid1, this.state.pid1Start) ? undefined : true)).catch(
          () => undefined,
        );
      }
      await teardown(this.state);
    })();
    return this.shutdownPromise;
  }
}

function checkUnitName(unit: string): void {
  if (!/^[A-Za-z0-9:_.@\\-]+\.[a-z]+$/.test(unit)) throw new Error(`invalid unit file name ${JSON.stringify(unit)}`);
}

function readlinkOrNull(path: string): string | null {
  try {
    return readlinkSync(path);
  } catch {
    return null;
  }
}

async function consoleTail(file: string, lines = 40): Promise<string> {
  const text = await readFile(file, 'utf8').catch(() => '(no console log)');
  return text.split('\n').slice(-lines).join('\n');
}

async function writeState(file: string, state: HostState): Promise<void> {
  await writeFile(`${file}.tmp`, JSON.stringify(state, null, 2));
  await rename(`${file}.tmp`, file);
}

async function readState(file: string): Promise<HostState | null> {
  try {
    return JSON.parse(await readFile(file, 'utf8')) as HostState;
  } catch {
    return null;
  }
}

export function cgroupPopulated(dir: string): boolean | null {
  const events = safeRead(join(dir, 'cgroup.events'));
  if (events === '') return null;
  return /^populated 1$/m.test(events);
}

export function mountsUnder(dir: string): string[] {
  return safeRead('/proc/self/mountinfo')
    .split('\n')
    .map((line) => line.split(' ')[4]?.replace(/\\040/g, ' '))
    .filter((m): m is string => m !== undefined && (m === dir || m.startsWith(`${dir}/`)));
}

function processesInNs(pidNs: string): number[] {
  if (pidNs === '') return [];
  return readdirSync('/proc')
    .filter((e) => /^\d+$/.test(e) && readlinkOrNull(`/proc/${e}/ns/pid`) === pidNs)
    .map(Number);
}

function leftoversOf(state: HostState): string[] {
  const found: string[] = [];
  if (sameProcessAlive(state.pid1, state.pid1Start)) found.push(`PID 1 (host PID ${state.pid1}) is alive`);
  if (sameProcessAlive(state.scriptPid, state.scriptStart)) found.push(`script (PID ${state.scriptPid}) is alive`);
  const inNs = processesInNs(state.pidNs);
  if (inNs.length > 0) found.push(`processes in its pid namespace: ${inNs.join(' ')}`);
  if (existsSync(state.cgroupDir)) found.push(`cgroup ${state.cgroupDir}`);
  for (const m of mountsUnder(state.baseDir)) found.push(`mount ${m}`);
  if (existsSync(state.baseDir)) found.push(`directory ${state.baseDir}`);
  if (existsSync(pathsOf(state.name).stateFile)) found.push(`state file ${pathsOf(state.name).stateFile}`);
  return found;
}

export async function cgroupDirsDeepestFirst(dir: string): Promise<string[]> {
  const out: string[] = [];
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
  for (const e of entries) {
    if (e.isDirectory()) out.push(...(await cgroupDirsDeepestFirst(join(dir, e.name))));
  }
  out.push(dir);
  return out;
}

async function teardown(state: HostState): Promise<void> {
  const problems: string[] = [];
  const step = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
    try {
      await fn();
    } catch (err) {
      problems.push(`${what}: ${(err as Error).message}`);
    }
  };
  if (sameProcessAlive(state.pid1, state.pid1Start)) {
    await step('kill PID 1', async () => process.kill(state.pid1, 'SIGKILL'));
  }
  // Anything still in the private cgroup subtree (e.g. a host booted by a crashed run whose
  // state file is lost) is ours by construction.
  if (cgroupPopulated(state.cgroupDir)) {
    await step('cgroup.kill', () => writeFile(join(state.cgroupDir, 'cgroup.kill'), '1'));
  }
  await step('wait for the processes to end', () =>
    waitFor(`the processes of private systemd "${state.name}" to end`, 10_000, () =>
      cgroupPopulated(state.cgroupDir) === true ||
      sameProcessAlive(state.pid1, state.pid1Start) ||
      sameProcessAlive(state.scriptPid, state.scriptStart) ||
      processesInNs(state.pidNs).length > 0
        ? undefined
        : true,
    ),
  );
  await step('remove cgroups', () =>
    waitFor(`removal of cgroup ${state.cgroupDir}`, 5_000, async () => {
      for (const dir of await cgroupDirsDeepestFirst(state.cgroupDir)) {
        await rmdir(dir).catch((err: NodeJS.ErrnoException) => {
          if (err.code !== 'ENOENT' && err.code !== 'EBUSY') throw err;
        });
      }
      return existsSync(state.cgroupDir) ? undefined : true;
    }),
  );
  // Propagation is private, so nothing should be mounted here on the host; be sure anyway.
  for (const m of mountsUnder(state.baseDir).reverse()) {
    await step(`unmount ${m}`, () => run('umount', ['-l', m], 10_000));
  }
  await step('remove private /run', () => rm(state.baseDir, { recursive: true, force: true }));
  await step('remove state file', () => rm(pathsOf(state.name).stateFile, { force: true }));
  if (problems.length > 0) {
    process.stderr.write(`systemd-host ${state.name}: teardown incomplete: ${problems.join('; ')}\n`);
  }
}

/** What is left on the machine of a host of that name that is not running (files, cgroup, mounts). */
export function systemdHostLeftovers(name: string): string[] {
  checkName(name);
  const p = pathsOf(name);
  const found: string[] = [];
  if (existsSync(p.cgroupDir)) found.push(`cgroup ${p.cgroupDir}`);
  for (const m of mountsUnder(p.baseDir)) found.push(`mount ${m}`);
  if (existsSync(p.baseDir)) found.push(`directory ${p.baseDir}`);
  if (existsSync(p.stateFile)) found.push(`state file ${p.stateFile}`);
  return found;
}
