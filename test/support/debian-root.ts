// A fresh Debian bookworm root booted with its own systemd as PID 1 (systemd-nspawn, no host
// systemd needed), for tests that install vmkeep's .deb with the real apt and dpkg.
//
// The root is made once with mmdebstrap and cached in test/.cache/debian-root/<recipe hash>/root
// (git-ignored; a changed recipe gives a new folder). Every boot runs on an overlay of it (a
// fresh upper folder per boot), so the cached root stays pristine and nothing is extracted.
// The QEMU 10 packages of bookworm-backports are downloaded into the root's apt cache when it is
// made: the booted root has no network (--private-network), so apt inside installs only
// what is already there.
//
// Host safety (a booted Debian would otherwise touch the host):
// - units that act on the kernel or devices (udev, sysctl, modules, binfmt, remount, kernel file
//   systems, networkd...) are masked in the root before it is ever booted;
// - nspawn runs inside `setpriv --pdeathsig KILL unshare --pid --fork --kill-child --mount
//   --mount-proc`: if the test dies, the kernel ends every process of the root; nspawn's own /run is a private
//   tmpfs (else it writes /run/systemd/nspawn on the host). /tmp is left as it is: nspawn writes there
//   only for --volatile and disk images (neither used), and the project (and so the root) may live under /tmp;
// - the wrapper moves itself into its own cgroups first, removed at shutdown deepest first.
import { createHash } from 'node:crypto';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, openSync, closeSync, readFileSync, readdirSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rename, rm, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { projectRoot } from './paths.js';
import {
  cgroup2Mount, cgroupDirsDeepestFirst, cgroupPopulated, mountsUnder, run, sameProcessAlive, startTimeOf, waitFor, type ExecResult,
} from './systemd-host.js';

const MIRROR = 'http://deb.debian.org/debian';

/** Everything that decides the root's content; its hash names the cache folder. */
const RECIPE = {
  suite: 'bookworm',
  variant: 'minbase',
  sources: [
    `deb ${MIRROR} bookworm main`,
    `deb ${MIRROR} bookworm-updates main`,
    'deb http://deb.debian.org/debian-security bookworm-security main',
    `deb ${MIRROR} bookworm-backports main`,
  ],
  include: ['systemd', 'systemd-sysv', 'dbus', 'procps', 'iproute2', 'init-system-helpers', 'qemu-system-x86', 'qemu-utils'],
  /** Downloaded (not installed) from bookworm-backports into /var/cache/apt/archives. */
  backportsDownload: ['qemu-system-x86'],
  masked: [
    'systemd-udevd.service', 'systemd-udevd-control.socket', 'systemd-udevd-kernel.socket', 'systemd-udev-trigger.service',
    'systemd-udev-settle.service', 'systemd-hwdb-update.service', 'systemd-sysctl.service', 'systemd-modules-load.service',
    'kmod-static-nodes.service', 'systemd-remount-fs.service', 'systemd-binfmt.service', 'proc-sys-fs-binfmt_misc.automount',
    'proc-sys-fs-binfmt_misc.mount', 'sys-kernel-config.mount', 'sys-kernel-debug.mount', 'sys-kernel-tracing.mount',
    'sys-fs-fuse-connections.mount', 'dev-hugepages.mount', 'systemd-networkd.service', 'systemd-networkd.socket',
    'systemd-pstore.service', 'systemd-random-seed.service', 'systemd-firstboot.service', 'getty.target',
    'console-getty.service', 'container-getty@.service', 'apt-daily.timer', 'apt-daily-upgrade.timer', 'e2scrub_all.timer',
    'e2scrub_reap.service', 'systemd-timesyncd.service', 'fstrim.timer',
  ],
  revision: 1,
};

const CACHE_ROOT = join(projectRoot(), 'test', '.cache', 'debian-root');
const CGROUP_PREFIX = 'vmkeep-debroot-';

function onPath(cmd: string): boolean {
  return (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':').some((dir) => dir !== '' && existsSync(join(dir, cmd)));
}

/** Throws naming the packages to install when this machine cannot make or boot the root. */
export function requireDebianRootPrereqs(): void {
  const missing: string[] = [];
  if (process.getuid?.() !== 0) missing.push('root privileges');
  if (!onPath('mmdebstrap')) missing.push('mmdebstrap (apt-get install mmdebstrap)');
  if (!onPath('systemd-nspawn')) missing.push('systemd-nspawn (apt-get install systemd-container)');
  if (!onPath('unshare') || !onPath('nsenter')) missing.push('unshare and nsenter (apt-get install util-linux)');
  if (cgroup2Mount() === null) missing.push('a mounted cgroup2 hierarchy');
  if (missing.length > 0) throw new Error(`cannot make or boot a Debian root for the tests; missing: ${missing.join('; ')} (bash test/setup.sh installs them)`);
}

function recipeKey(): string {
  return createHash('sha256').update(JSON.stringify(RECIPE)).digest('hex').slice(0, 16);
}

/**
 * The cached root folder, made with mmdebstrap when the recipe has none yet (about a minute,
 * from the Debian archive). Never booted directly: boots go through an overlay.
 */
export async function ensureDebianRoot(): Promise<string> {
  requireDebianRootPrereqs();
  const dir = join(CACHE_ROOT, recipeKey());
  const root = join(dir, 'root');
  if (existsSync(join(dir, 'complete'))) return root;
  await mkdir(dir, { recursive: true });
  const building = await mkdtemp(join(dir, 'building.'));
  const target = join(building, 'root');
  try {
    const hooks = [
      `chroot "$1" apt-get install --download-only -y -q -t ${RECIPE.suite}-backports ${RECIPE.backportsDownload.join(' ')}`,
      `for u in ${RECIPE.masked.join(' ')}; do ln -sf /dev/null "$1/etc/systemd/system/$u"; done`,
      // An empty machine-id: systemd makes a fresh one at every boot, as on a first boot.
      'truncate -s 0 "$1/etc/machine-id"',
    ];
    const args = [
      '--mount', '--pid', '--fork', '--kill-child', '--propagation', 'private',
      'mmdebstrap', '--mode=root', `--variant=${RECIPE.variant}`, `--include=${RECIPE.include.join(',')}`,
      // The backports' lists and downloaded packages stay: apt inside works offline.
      '--skip=cleanup/apt/lists', '--skip=cleanup/apt/cache',
      ...hooks.map((h) => `--customize-hook=${h}`),
      RECIPE.suite, target, ...RECIPE.sources,
    ];
    const result = await run('unshare', args, 900_000);
    if (result.exitCode !== 0) {
      throw new Error(`mmdebstrap failed (exit ${String(result.exitCode)}):\n${result.stderr.split('\n').slice(-30).join('\n')}`);
    }
    const debs = readdirSync(join(target, 'var', 'cache', 'apt', 'archives')).filter((f) => f.endsWith('.deb'));
    if (!debs.some((f) => f.startsWith('qemu-system-x86_'))) throw new Error(`the root's apt cache has no backports QEMU: ${debs.join(' ')}`);
    await rename(target, root).catch(async (error: NodeJS.ErrnoException) => {
      // Another run finished the same recipe first: use its root.
      if (!existsSync(join(dir, 'complete'))) throw error;
    });
    await writeFile(join(dir, 'complete'), `${JSON.stringify(RECIPE, null, 2)}\n`);
    // Roots of older recipes are never used again.
    for (const entry of readdirSync(CACHE_ROOT)) {
      if (/^[0-9a-f]{16}$/.test(entry) && entry !== recipeKey()) await rm(join(CACHE_ROOT, entry), { recursive: true, force: true });
    }
    return root;
  } finally {
    await rm(building, { recursive: true, force: true });
  }
}

export interface BootOptions {
  /** Short name: cgroups vmkeep-debroot-NAME. */
  name: string;
  /** Host folders bound into the root. */
  binds?: Array<{ host: string; inside: string; readOnly?: boolean }>;
}

// Positional: cgroup2 dir, v1 name=systemd dir (or ''), lowerdir, upper, overlay work, merged,
// then nspawn's arguments.
const BOOT_SCRIPT = `
set -eu
cg2=$1; cg1=$2; lower=$3; upper=$4; ovwork=$5; merged=$6; shift 6
mkdir -p "$cg2"; echo 0 > "$cg2/cgroup.procs"
if [ -n "$cg1" ]; then mkdir -p "$cg1"; echo 0 > "$cg1/cgroup.procs"; fi
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$ovwork" "$merged"
mount -t tmpfs -o mode=0755 tmpfs /run
exec systemd-nspawn --boot --register=no --keep-unit --private-network --link-journal=no --resolv-conf=off \\
  --timezone=off --console=read-only -D "$merged" "$@"
`;

export class DebianRoot {
  private constructor(
    readonly name: string,
    /** Per-boot folder (overlay upper, console log), removed at shutdown. */
    readonly workDir: string,
    private readonly wrapper: ChildProcess,
    private readonly wrapperStart: string | null,
    /** Host PID of the root's systemd (its PID 1). */
    readonly leader: number,
    private readonly cgroups: string[],
  ) {}

  /** Boots a fresh copy of the cached root; resolves once its systemd reports running. */
  static async boot(options: BootOptions): Promise<DebianRoot> {
    const lower = await ensureDebianRoot();
    if (!/^[a-z0-9-]{1,20}$/.test(options.name)) throw new Error(`bad root name ${options.name}`);
    const workDir = await mkdtemp(join(CACHE_ROOT, `boot-${options.name}.`));
    for (const sub of ['upper', 'ovwork', 'merged']) await mkdir(join(workDir, sub));
    const cg2 = join(cgroup2Mount() as string, `${CGROUP_PREFIX}${options.name}`);
    const cg1 = existsSync('/sys/fs/cgroup/systemd/cgroup.procs') && cgroup2Mount() !== '/sys/fs/cgroup' ? `/sys/fs/cgroup/systemd/${CGROUP_PREFIX}${options.name}` : '';
    const cgroups = [cg2, ...(cg1 === '' ? [] : [cg1])];
    for (const cg of cgroups) {
      if (existsSync(cg)) throw new Error(`cgroup ${cg} exists: a root named ${options.name} is running or was not cleaned up`);
    }
    const consoleLog = join(workDir, 'console.log');
    const out = openSync(consoleLog, 'a');
    const binds = (options.binds ?? []).map((b) => `--bind${b.readOnly ? '-ro' : ''}=${b.host}:${b.inside}`);
    // setpriv --pdeathsig: if this test process dies, the kernel SIGKILLs the wrapper, whose
    // --kill-child then ends the whole root.
    const wrapper = spawn('setpriv', [
      '--pdeathsig', 'KILL', 'unshare', '--pid', '--fork', '--kill-child', '--mount', '--mount-proc', '--propagation', 'private',
      'sh', '-c', BOOT_SCRIPT, 'sh', cg2, cg1, lower, join(workDir, 'upper'), join(workDir, 'ovwork'), join(workDir, 'merged'), ...binds,
    ], { stdio: ['ignore', out, out], detached: true });
    closeSync(out);
    const wrapperStart = wrapper.pid === undefined ? null : startTimeOf(wrapper.pid);
    let leader: number | undefined;
    try {
      leader = await waitFor(`the Debian root's systemd to start (console: ${consoleLog})`, 30_000, () => {
        if (wrapper.exitCode !== null) throw new Error(`systemd-nspawn exited ${wrapper.exitCode}:\n${safeRead(consoleLog)}`);
        return findLeader(wrapper.pid as number);
      });
      const root = new DebianRoot(options.name, workDir, wrapper, wrapperStart, leader, cgroups);
      await waitFor(`the Debian root to finish booting (console: ${consoleLog})`, 60_000, async () => {
        const state = (await root.exec(['systemctl', 'is-system-running'], { direct: true })).stdout.trim();
        return state === 'running' || state === 'degraded' ? state : undefined;
      });
      return root;
    } catch (error) {
      await new DebianRoot(options.name, workDir, wrapper, wrapperStart, leader ?? 0, cgroups).shutdown();
      throw error;
    }
  }

  get consoleLog(): string {
    return join(this.workDir, 'console.log');
  }

  /** A path inside the root, as the host reaches it (through the root's PID 1). */
  path(inside: string): string {
    return `/proc/${this.leader}/root${inside}`;
  }

  /**
   * Runs a command inside the root, as a transient service of its systemd (so it is in the
   * root's cgroups, not the host's), with the output piped back. `direct`: nsenter only (for
   * before its systemd answers).
   */
  async exec(argv: string[], options: { direct?: boolean; env?: Record<string, string>; cwd?: string; timeoutMs?: number } = {}): Promise<ExecResult> {
    const env = Object.entries(options.env ?? {}).flatMap(([k, v]) => ['-E', `${k}=${v}`]);
    const inner = options.direct === true
      ? argv
      // systemd-run expands ${VAR} in the command line as ExecStart= does; $$ is a plain $.
      : ['systemd-run', '--wait', '--pipe', '--collect', '--quiet', ...env, ...(options.cwd === undefined ? [] : [`--working-directory=${options.cwd}`]),
        '--', ...argv.map((arg) => arg.split('$').join('$$'))];
    return run('nsenter', ['-t', String(this.leader), '-a', ...inner], options.timeoutMs ?? 120_000);
  }

  /** exec() that throws with the output when the command fails; resolves with stdout. */
  async sh(script: string, options: { env?: Record<string, string>; cwd?: string; timeoutMs?: number } = {}): Promise<string> {
    const result = await this.exec(['/bin/sh', '-c', script], options);
    if (result.exitCode !== 0) {
      throw new Error(`in the Debian root, \`${script}\` exited ${String(result.exitCode)}:\n${result.stdout}\n${result.stderr}`);
    }
    return result.stdout;
  }

  /**
   * Powers the root off (SIGRTMIN+4 to its systemd), then makes sure: SIGKILL of the wrapper
   * (--kill-child ends the whole pid namespace), cgroup.kill, cgroups removed deepest first, the
   * boot folder removed. Never throws; what could not be removed is reported on stderr.
   */
  async shutdown(): Promise<void> {
    const problems: string[] = [];
    const step = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
      try {
        await fn();
      } catch (error) {
        problems.push(`${what}: ${(error as Error).message}`);
      }
    };
    const wrapperAlive = (): boolean => this.wrapper.pid !== undefined && sameProcessAlive(this.wrapper.pid, this.wrapperStart);
    if (this.leader > 0 && wrapperAlive()) {
      await step('power off', async () => {
        await run('kill', ['-s', 'SIGRTMIN+4', String(this.leader)], 5_000);
        await waitFor('the Debian root to power off', 20_000, () => (wrapperAlive() ? undefined : true));
      });
    }
    if (wrapperAlive()) await step('SIGKILL the wrapper', async () => process.kill(this.wrapper.pid as number, 'SIGKILL'));
    for (const cg of this.cgroups) {
      if (cgroupPopulated(cg) === true && existsSync(join(cg, 'cgroup.kill'))) await step(`cgroup.kill ${cg}`, () => writeFile(join(cg, 'cgroup.kill'), '1'));
    }
    await step('wait for the processes to end', () =>
      waitFor(`the processes of the Debian root ${this.name} to end`, 15_000, () =>
        wrapperAlive() || this.cgroups.some((cg) => cgroupHasProcesses(cg)) ? undefined : true));
    for (const cg of this.cgroups) {
      await step(`remove cgroup ${cg}`, () =>
        waitFor(`removal of cgroup ${cg}`, 5_000, async () => {
          for (const dir of await cgroupDirsDeepestFirst(cg)) {
            await rmdir(dir).catch((err: NodeJS.ErrnoException) => {
              if (err.code !== 'ENOENT' && err.code !== 'EBUSY') throw err;
            });
          }
          return existsSync(cg) ? undefined : true;
        }));
    }
    // The overlay lived in the wrapper's private mount namespace; be sure nothing leaked.
    for (const m of mountsUnder(this.workDir).reverse()) await step(`unmount ${m}`, () => run('umount', ['-l', m], 10_000));
    await step('remove the boot folder', () => rm(this.workDir, { recursive: true, force: true }));
    if (problems.length > 0) process.stderr.write(`debian-root ${this.name}: teardown incomplete: ${problems.join('; ')}\n`);
  }

  /** What is left of this root on the machine; empty after shutdown(). */
  leftovers(): string[] {
    const found: string[] = [];
    if (this.wrapper.pid !== undefined && sameProcessAlive(this.wrapper.pid, this.wrapperStart)) found.push(`wrapper PID ${this.wrapper.pid}`);
    if (this.leader > 0 && existsSync(`/proc/${this.leader}`) && readNsPid(this.leader).length > 1) found.push(`root PID 1 (host ${this.leader})`);
    for (const cg of this.cgroups) if (existsSync(cg)) found.push(`cgroup ${cg}`);
    for (const m of mountsUnder(this.workDir)) found.push(`mount ${m}`);
    if (existsSync(this.workDir)) found.push(`folder ${this.workDir}`);
    return found;
  }

  async consoleTail(lines = 40): Promise<string> {
    return (await readFile(this.consoleLog, 'utf8').catch(() => '')).split('\n').slice(-lines).join('\n');
  }
}

function safeRead(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

function readNsPid(pid: number): string[] {
  return /^NSpid:\s*(.*)$/m.exec(safeRead(`/proc/${pid}/status`))?.[1]?.trim().split(/\s+/) ?? [];
}

function cgroupHasProcesses(dir: string): boolean {
  // v1 hierarchies have no cgroup.events: look for any PID in the subtree.
  const populated = cgroupPopulated(dir);
  if (populated !== null) return populated;
  if (!existsSync(dir)) return false;
  const walk = (d: string): boolean =>
    safeRead(join(d, 'cgroup.procs')).trim() !== '' ||
    readdirSync(d, { withFileTypes: true }).some((e) => e.isDirectory() && walk(join(d, e.name)));
  return walk(dir);
}

/**
 * The host PID of the root's systemd: a descendant of the wrapper that is PID 1 of a pid
 * namespace two levels below ours (the wrapper's namespace, then the container's).
 */
function findLeader(wrapperPid: number): number | undefined {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const ppid = Number(/^PPid:\s*(\d+)/m.exec(safeRead(`/proc/${entry}/status`))?.[1] ?? 0);
    const list = children.get(ppid) ?? [];
    list.push(Number(entry));
    children.set(ppid, list);
  }
  const queue = [...(children.get(wrapperPid) ?? [])];
  while (queue.length > 0) {
    const pid = queue.shift() as number;
    const nspid = readNsPid(pid);
    if (nspid.length === 3 && nspid[2] === '1' && safeRead(`/proc/${pid}/comm`).trim() === 'systemd') return pid;
    queue.push(...(children.get(pid) ?? []));
  }
  return undefined;
}
