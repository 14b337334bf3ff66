// The set-up of the refresh benchmarks (6, 7, 10, 11): vmkeepd as a service in a private systemd
// with an installations file, and the "package upgrade" they repeat: another installation made
// current and the service restarted (not timed), so every VM is stale.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ApiClient } from '../../daemon/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { writeInstallations, type TestInstallation } from '../support/installations.js';
import type { Cleanup } from './common.js';

export interface UpgradeHost {
  /** The bench's own folder: the installations file, the daemon's folders, what else it makes. */
  dir: string;
  daemon: DaemonHost;
  api: ApiClient;
  /** The installation now current. */
  current: string;
  /** The package upgrade: `name` becomes current, the service restarts. */
  makeCurrent(name: string): Promise<void>;
  /** Ends the host (and with its pid namespace every QEMU made here), then removes the folder. */
  end(): Promise<void>;
}

/**
 * Boots the host of benchmark `what` (e.g. "refresh") with the installations `installationsIn`
 * returns for its folder, the first one current. The cleanup registry ends both on failure.
 */
export async function bootUpgradeHost(
  cleanup: Cleanup,
  what: string,
  installationsIn: (dir: string) => Promise<TestInstallation[]>,
  options: { netns?: string } = {},
): Promise<UpgradeHost> {
  const dir = await mkdtemp(join(tmpdir(), `vk-bench-${what}-`));
  const removeDir = cleanup.add(`${what} bench folder ${dir}`, () => rm(dir, { recursive: true, force: true }));
  const installations = await installationsIn(dir);
  const installationsFile = join(dir, 'installations.json');
  const first = installations[0]?.name;
  if (first === undefined) throw new Error(`the ${what} bench names no installation`);
  await writeInstallations(installationsFile, installations, first);
  const daemon = await DaemonHost.boot({
    name: `bench${what.charAt(0)}-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installationsFile],
    ...(options.netns === undefined ? {} : { netns: options.netns }),
  });
  const endHost = cleanup.add(`vmkeepd host ${daemon.host.name}`, () => daemon.shutdown());
  const host: UpgradeHost = {
    dir,
    daemon,
    api: daemon.api,
    current: first,
    async makeCurrent(name) {
      await writeInstallations(installationsFile, installations, name);
      await daemon.restart();
      host.current = name;
    },
    async end() {
      await endHost();
      await removeDir();
    },
  };
  return host;
}
