// podman inside a private systemd (test/support/systemd-host.ts), so a container's --pid=host,
// --cgroupns=host and system bus are that systemd's. podman's storage, its configuration and
// the daemon's state live in one scratch folder of the test; everything podman mounts stays in
// the private mount namespace and goes with it.
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, rmdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { ApiClient } from '../../daemon/index.js';
import { projectRoot } from './paths.js';
import { requireSystemdHostPrereqs, SystemdHost, type ExecResult } from './systemd-host.js';

export const OCI_DIR = join(projectRoot(), 'packaging', 'oci');
const BUILD_SCRIPT = join(OCI_DIR, 'build-image.sh');
const SHIPPED_UNIT = join(OCI_DIR, 'vmkeepd.service');
/** podman writes its blob-info cache here whatever its storage settings say. */
const PODMAN_SYSTEM_CACHE = '/var/lib/containers';

function onPath(cmd: string): boolean {
  return (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(delimiter).some((dir) => dir !== '' && existsSync(join(dir, cmd)));
}

/** Integration tests never skip: a missing tool fails with the package to install. */
export function requirePodmanPrereqs(): void {
  requireSystemdHostPrereqs();
  const missing = [['podman', 'podman'], ['mmdebstrap', 'mmdebstrap'], ['newuidmap', 'uidmap'], ['openssl', 'openssl']]
    .filter(([cmd]) => !onPath(cmd as string))
    .map(([, pkg]) => pkg as string);
  if (missing.length > 0) {
    throw new Error(`the container tests need: ${missing.join(', ')}. Install with: apt-get install -y --no-install-recommends ${missing.join(' ')} (test/setup.sh does)`);
  }
}

/** One vmkeepd unit's host folders (the same paths inside its container). */
export interface DaemonDirs {
  state: string;
  run: string;
  /** The VMs' console and QEMU logs (the unit's /var/log/vmkeep). */
  log: string;
  socket: string;
}

export class PodmanHost {
  private constructor(
    readonly host: SystemdHost,
    /** Scratch folder: podman storage and configuration, the daemons' folders. */
    readonly dir: string,
    private readonly createdSystemCache: boolean,
  ) {}

  static async boot(name: string): Promise<PodmanHost> {
    requirePodmanPrereqs();
    const dir = await mkdtemp(join(tmpdir(), 'vk-oci-'));
    let host: SystemdHost | undefined;
    // The mount point must exist on the host; an empty folder we made is removed at shutdown.
    const createdSystemCache = !existsSync(PODMAN_SYSTEM_CACHE);
    try {
      for (const sub of ['storage', 'tmp', 'system-cache']) await mkdir(join(dir, sub));
      await writeFile(join(dir, 'storage.conf'), [
        '[storage]', 'driver = "overlay"', `graphroot = "${join(dir, 'storage')}"`,
        // Inside the private /run: gone with the host.
        'runroot = "/run/containers/storage"', '',
      ].join('\n'));
      await writeFile(join(dir, 'containers.conf'), [
        // No journald in the private systemd: container output and podman events go to files.
        '[containers]', 'log_driver = "k8s-file"',
        '[engine]', 'cgroup_manager = "systemd"', 'events_logger = "file"',
        `events_logfile_path = "${join(dir, 'events.log')}"`, `image_copy_tmp_dir = "${join(dir, 'tmp')}"`, '',
      ].join('\n'));
      if (createdSystemCache) await mkdir(PODMAN_SYSTEM_CACHE);
      host = await SystemdHost.boot({ name });
      const podman = new PodmanHost(host, dir, createdSystemCache);
      await podman.run('mount', ['--bind', join(dir, 'system-cache'), PODMAN_SYSTEM_CACHE]);
      return podman;
    } catch (error) {
      await host?.shutdown();
      if (createdSystemCache) await rmdir(PODMAN_SYSTEM_CACHE).catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
      throw error;
    }
  }

  /** What podman and the build script need in their environment. */
  get env(): NodeJS.ProcessEnv {
    return {
      CONTAINERS_STORAGE_CONF: join(this.dir, 'storage.conf'),
      CONTAINERS_CONF: join(this.dir, 'containers.conf'),
      TMPDIR: join(this.dir, 'tmp'),
    };
  }

  /** A command inside the private systemd; throws with its output on a non-zero exit. */
  async run(cmd: string, args: string[], timeoutMs = 120_000): Promise<string> {
    const r = await this.exec(cmd, args, timeoutMs);
    if (r.exitCode !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (exit ${r.exitCode ?? r.signal}):\n${r.stdout}${r.stderr}`);
    return r.stdout;
  }

  exec(cmd: string, args: string[], timeoutMs = 120_000): Promise<ExecResult> {
    return this.host.exec(cmd, args, { env: this.env, timeoutMs, cwd: projectRoot() });
  }

  podman(...args: string[]): Promise<string> {
    return this.run('podman', args);
  }

  /** packaging/oci/build-image.sh inside (the app is already built by the test set-up). */
  async buildImage(tag: string, options: { rootTar?: string; note?: string } = {}): Promise<void> {
    await this.run('bash', [BUILD_SCRIPT, '--tag', tag, '--no-app-build',
      ...(options.rootTar === undefined ? [] : ['--root-tar', options.rootTar]),
      ...(options.note === undefined ? [] : ['--note', options.note])], 900_000);
  }

  /** The cached Debian root the script builds images on (made now if it is not cached). */
  async rootTar(): Promise<string> {
    return (await this.run('bash', [BUILD_SCRIPT, '--print-root-tar'], 900_000)).trim().split('\n').at(-1) ?? '';
  }

  daemonDirs(unit: string): DaemonDirs {
    const base = join(this.dir, unit.replace(/\.service$/, ''));
    return { state: join(base, 'state'), run: join(base, 'run'), log: join(base, 'log'), socket: join(base, 'run', 'vmkeep.sock') };
  }

  /**
   * Installs the shipped unit as `unit`, its folders moved to the scratch folder and its
   * container named after the unit, with a drop-in for podman's settings, the image and more
   * `podman run` options (e.g. the guest's folder). Not started.
   */
  async installUnit(unit: string, options: { image: string; podmanOpts?: string[]; daemonArgs?: string[] }): Promise<{ dirs: DaemonDirs; api: ApiClient }> {
    const dirs = this.daemonDirs(unit);
    await mkdir(dirs.state, { recursive: true });
    await mkdir(dirs.run, { recursive: true });
    await mkdir(dirs.log, { recursive: true });
    const shipped = await readFile(SHIPPED_UNIT, 'utf8');
    const text = shipped
      .split('\n')
      // The folders are the test's (made above), not systemd-managed ones under /var/lib and /run.
      .filter((line) => !/^(StateDirectory|RuntimeDirectory|RuntimeDirectoryPreserve|LogsDirectory|LogsDirectoryMode)=/.test(line))
      .join('\n')
      .replaceAll('/var/lib/vmkeep', dirs.state)
      .replaceAll('/var/log/vmkeep', dirs.log)
      .replace(/\/run\/vmkeep(?=[\s:/]|$)/gm, dirs.run)
      .replace('--name vmkeepd ', `--name ${unit.replace(/\.service$/, '')} `)
      .replace('    --socket ', `    ${(options.daemonArgs ?? []).map((a) => `${a} `).join('')}--socket `);
    if (!text.includes(`--state-dir ${dirs.state}`) || !text.includes(`-v ${dirs.run}:${dirs.run}`) || !text.includes(`--log-dir ${dirs.log}`)) {
      throw new Error(`the shipped unit ${SHIPPED_UNIT} no longer has the folder options this test rewrites`);
    }
    await writeFile(join(this.host.unitDir, unit), text);
    await this.setUnitImage(unit, options.image, options.podmanOpts ?? []);
    return { dirs, api: new ApiClient({ socketPath: dirs.socket, timeoutMs: 60_000 }) };
  }

  /** What an operator's `systemctl edit` does: a drop-in naming the image (then daemon-reload). */
  async setUnitImage(unit: string, image: string, podmanOpts?: string[]): Promise<void> {
    const dropIns = join(this.host.unitDir, `${unit}.d`);
    await mkdir(dropIns, { recursive: true });
    const env = this.env;
    const lines = ['[Service]', ...Object.entries(env).map(([k, v]) => `Environment=${k}=${v}`), `Environment=VMKEEP_IMAGE=${image}`];
    if (podmanOpts !== undefined) {
      await writeFile(join(dropIns, 'test-opts.conf'), `[Service]\nEnvironment="VMKEEP_PODMAN_OPTS=${podmanOpts.join(' ')}"\n`);
    }
    await writeFile(join(dropIns, 'test-image.conf'), `${lines.join('\n')}\n`);
    await this.host.systemctl('daemon-reload');
  }

  /** Images, containers and podman mounts left in the scratch storage (by podman's account). */
  async podmanLeftovers(): Promise<string[]> {
    const containers = (await this.podman('ps', '-a', '--format', '{{.Names}}')).split('\n').filter(Boolean);
    const images = (await this.podman('images', '--format', '{{.Repository}}:{{.Tag}}')).split('\n').filter(Boolean);
    return [...containers.map((c) => `container ${c}`), ...images.map((i) => `image ${i}`)];
  }

  /** Removes every container and image, then the private systemd and the scratch folder. Never throws. */
  async shutdown(): Promise<void> {
    await this.exec('podman', ['rm', '--all', '--force', '--time', '5']).catch(() => undefined);
    await this.exec('podman', ['rmi', '--all', '--force']).catch(() => undefined);
    await this.host.shutdown();
    await rm(this.dir, { recursive: true, force: true }).catch(() => undefined);
    if (this.createdSystemCache) await rmdir(PODMAN_SYSTEM_CACHE).catch(() => undefined);
  }

  /** What is left on the machine: the private host's leftovers, mounts of the scratch folder, files. */
  leftovers(): string[] {
    const found = this.host.leftovers();
    const mounts = readFileSync('/proc/self/mountinfo', 'utf8').split('\n')
      .map((line) => line.split(' ')[4] ?? '')
      .filter((m) => m.startsWith(this.dir) || m === PODMAN_SYSTEM_CACHE);
    found.push(...mounts.map((m) => `mount ${m}`));
    if (existsSync(this.dir)) found.push(`folder ${this.dir}`);
    if (this.createdSystemCache && existsSync(PODMAN_SYSTEM_CACHE)) found.push(`folder ${PODMAN_SYSTEM_CACHE}`);
    return found;
  }
}
