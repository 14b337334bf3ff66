// A real snapd (Debian's package) running inside a private systemd, fully offline, writing only
// scratch folders: every host path snapd writes is bound over by a folder of this host's own, in
// the private mount namespace alone. snapd's units go into a scratch /etc/systemd/system that is
// the last folder of the private unit path; the host's unit folders are never loaded. udevadm is a
// stub (no udevd here; a real `udevadm trigger` would replay the host's devices). Squashfs mounts
// and their loop devices live in the private mount namespace and go with it.
import { chmod, cp, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { SystemdHost, waitFor, type ExecOptions, type ExecResult } from './systemd-host.js';

/**
 * A snap install or refresh waits for snapd's whole change (mounts, hooks, the daemon's READY):
 * seconds on a quiet machine, minutes on a loaded one.
 */
const SNAP_COMMAND_TIMEOUT_MS = 240_000;

// Host paths snapd writes (classic snaps, no interfaces), each replaced by a scratch folder.
// /etc comes first, a copy of the host's (the others inside it are bound over that copy): a snap
// that declares system-usernames makes snapd run groupadd and useradd, which replace
// /etc/{passwd,group,shadow,gshadow} by rename (a bind over the file alone would fail with
// EBUSY) and write /var/log/{lastlog,faillog} at the new uid's offset.
const SNAPD_WRITES = [
  '/etc', '/var/log', '/var/lib/snapd', '/snap', '/var/snap', '/var/cache/snapd', '/etc/systemd/system', '/etc/udev/rules.d',
  '/etc/modules-load.d', '/root', '/usr/share/bash-completion/completions',
];
// What the package installs in /var/lib/snapd, copied into the scratch one as snapd's skeleton.
const SNAPD_SKELETON = '/var/lib/snapd';
/** The system user snapd creates for a snap that declares `system-usernames: snap_daemon: shared`. */
export const SNAP_DAEMON = { name: 'snap_daemon', uid: 584788, gid: 584788 };
// The account files the scratch /etc starts from without snap_daemon, so snapd itself must make it.
const ACCOUNT_FILES = ['passwd', 'group', 'shadow', 'gshadow'];

export function requireSnapd(): void {
  const missing = ['/usr/lib/snapd/snapd', '/usr/bin/snap', '/usr/bin/mksquashfs', '/usr/bin/unsquashfs', '/lib/systemd/system/snapd.service']
    .filter((f) => !existsSync(f));
  if (missing.length > 0) {
    throw new Error(`snapd is not installed (${missing.join(', ')} missing): run bash test/setup.sh as root (apt-get install --no-install-recommends snapd squashfs-tools, with no service started)`);
  }
  if (existsSync('/usr/bin/squashfuse')) {
    throw new Error('squashfuse is installed: snapd then believes it runs in a container and mounts snaps with fuse; apt-get remove squashfuse');
  }
}

/** A copy of the host's /etc (modes and owners kept) whose account files name no snap_daemon. */
async function copyEtcWithoutSnapDaemon(dir: string): Promise<void> {
  await execa('cp', ['-a', '--', '/etc/.', dir]);
  for (const file of ACCOUNT_FILES) {
    const path = join(dir, file);
    if (!existsSync(path)) continue;
    const lines = (await readFile(path, 'utf8')).split('\n');
    const kept = lines.filter((line) => !line.startsWith(`${SNAP_DAEMON.name}:`));
    // writeFile keeps the copy's mode and owner (shadow stays 0640 root:shadow).
    if (kept.length !== lines.length) await writeFile(path, kept.join('\n'));
  }
}

export class SnapdHost {
  private constructor(
    readonly host: SystemdHost,
    readonly scratch: string,
    /** snapd's own output (SNAPD_DEBUG). */
    readonly snapdLog: string,
  ) {}

  static async boot(name: string): Promise<SnapdHost> {
    requireSnapd();
    const scratch = await mkdtemp(join(tmpdir(), 'vmkeep-snapd-'));
    try {
      const binds: Array<{ host: string; inside: string }> = [];
      for (const inside of SNAPD_WRITES) {
        if (!existsSync(inside)) throw new Error(`${inside} does not exist on this host; snapd's package makes it: reinstall snapd`);
        const dir = join(scratch, 'fs', inside.slice(1).replaceAll('/', '_'));
        await mkdir(dir, { recursive: true });
        if (inside === SNAPD_SKELETON) await cp(SNAPD_SKELETON, dir, { recursive: true });
        if (inside === '/etc') await copyEtcWithoutSnapDaemon(dir);
        binds.push({ host: dir, inside });
      }
      const stub = join(scratch, 'udevadm');
      const stubLog = join(scratch, 'udevadm.log');
      await writeFile(stub, `#!/bin/sh\n# udevadm stand-in: no udevd runs here, and a real trigger would replay the host's devices.\necho "udevadm $*" >>'${stubLog}'\nexit 0\n`);
      await chmod(stub, 0o755);
      binds.push({ host: stub, inside: '/usr/bin/udevadm' });

      const snapdLog = join(scratch, 'snapd.log');
      const unitFiles: Record<string, string> = {
        'snapd.socket': await readFile('/lib/systemd/system/snapd.socket', 'utf8'),
        // No journald and no OnFailure unit here; the output goes to a file.
        'snapd.service': (await readFile('/lib/systemd/system/snapd.service', 'utf8'))
          .replace(/^OnFailure=.*$/m, '')
          .replace('[Service]', `[Service]\nEnvironment=SNAPD_DEBUG=1\nStandardOutput=append:${snapdLog}\nStandardError=append:${snapdLog}`),
      };
      const host = await SystemdHost.boot({ name, unitFiles, binds, extraUnitDirs: ['/etc/systemd/system'], timeoutMs: 30_000 });
      const snapd = new SnapdHost(host, scratch, snapdLog);
      try {
        await host.systemctl('start', 'snapd.socket', 'snapd.service');
        await snapd.snap(['wait', 'system', 'seed.loaded'], { timeoutMs: 60_000 });
        return snapd;
      } catch (err) {
        await snapd.shutdown();
        throw err;
      }
    } catch (err) {
      await rm(scratch, { recursive: true, force: true });
      throw err;
    }
  }

  /** A command inside; throws with its output and snapd's log tail on a non-zero exit. */
  async run(cmd: string, args: string[], opts: ExecOptions = {}): Promise<ExecResult> {
    const r = await this.host.exec(cmd, args, { timeoutMs: SNAP_COMMAND_TIMEOUT_MS, ...opts });
    if (r.exitCode !== 0) {
      throw new Error(`${cmd} ${args.join(' ')} failed inside (exit ${r.exitCode ?? r.signal}):\n${r.stdout}${r.stderr}\n--- snapd log tail ---\n${await this.logTail(12)}\n--- console tail ---\n${await this.host.consoleTail(25)}`);
    }
    return r;
  }

  snap(args: string[], opts: ExecOptions = {}): Promise<ExecResult> {
    return this.run('snap', args, opts);
  }

  async logTail(lines = 30): Promise<string> {
    const text = await readFile(this.snapdLog, 'utf8').catch(() => '(no snapd log)');
    return text.split('\n').slice(-lines).join('\n');
  }

  /** Packs and installs the stand-ins of the store's base and snapd snaps (offline). */
  async installStandIns(base: string): Promise<void> {
    const dir = join(this.scratch, 'standins');
    const baseDir = join(dir, base);
    await mkdir(join(baseDir, 'meta'), { recursive: true });
    for (const d of ['bin', 'boot', 'dev', 'etc', 'home', 'lib', 'lib64', 'media', 'mnt', 'opt', 'proc', 'root', 'run', 'sbin', 'snap', 'srv', 'sys', 'tmp', 'usr', 'var']) {
      await mkdir(join(baseDir, d), { recursive: true });
    }
    await writeFile(join(baseDir, 'meta', 'snap.yaml'), `name: ${base}\nversion: '0'\ntype: base\nsummary: stand-in base for tests\ndescription: empty\n`);
    // snapd 2.57 wants the snapd snap with any base other than core. This one holds only snapd's
    // info file with the host's version, so snapd never re-executes into it.
    const snapdDir = join(dir, 'snapd');
    await mkdir(join(snapdDir, 'meta'), { recursive: true });
    await mkdir(join(snapdDir, 'usr', 'lib', 'snapd'), { recursive: true });
    await cp('/usr/lib/snapd/info', join(snapdDir, 'usr', 'lib', 'snapd', 'info'));
    await writeFile(join(snapdDir, 'meta', 'snap.yaml'), `name: snapd\nversion: '0'\ntype: snapd\nsummary: stand-in snapd snap for tests\ndescription: empty\n`);
    for (const [n, d] of [['snapd', snapdDir], [base, baseDir]] as const) {
      await execa('snap', ['pack', d, dir, `--filename=${n}.snap`]);
      await this.installRetrying(join(dir, `${n}.snap`), ['--dangerous']);
    }
  }

  /**
   * snap install; the first install of the snapd snap makes snapd restart itself, which can cut
   * the client's connection: then the change is waited for instead.
   */
  async installRetrying(file: string, flags: string[]): Promise<void> {
    const r = await this.host.exec('snap', ['install', ...flags, file], { timeoutMs: SNAP_COMMAND_TIMEOUT_MS });
    if (r.exitCode === 0) return;
    if (!/restart|connection|EOF/i.test(r.stderr)) {
      throw new Error(`snap install ${file} failed (exit ${r.exitCode ?? r.signal}):\n${r.stdout}${r.stderr}\n--- snapd log tail ---\n${await this.logTail()}`);
    }
    await waitFor(`snapd to finish installing ${file} after restarting itself`, 60_000, async () => {
      const c = await this.host.exec('snap', ['changes'], { timeoutMs: 10_000 });
      return c.exitCode === 0 && !/\b(Doing|Do|Undoing)\b/.test(c.stdout) ? true : undefined;
    });
  }

  /** Stops the private systemd (and with it snapd, its mounts and loop devices), removes the scratch folders. */
  async shutdown(): Promise<void> {
    await this.host.shutdown();
    await rm(this.scratch, { recursive: true, force: true });
  }
}
