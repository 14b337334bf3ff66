// A snap installed the way snapd lays it out, without snapd: /snap/vmkeep/<rev> folders (each
// with its own QEMU copy, node and this project), a `current` link, $SNAP_COMMON, a fake
// snapctl, and the service unit shaped like the one snapd generates for apps.vmkeepd. A
// "refresh" is done the way snapd does it: stop the unit, kill what remains in its cgroup,
// switch `current`, start the unit.
import { chmod, copyFile, cp, mkdir, mkdtemp, readFile, readlink, rename, symlink, writeFile } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { planSnapBuild } from '../../packaging/snap/meta.js';
import { copyQemuAsBuild, SYSTEM_FIRMWARE_DIRS, SYSTEM_MODULE_DIR } from './installations.js';
import { parse } from 'yaml';
import { projectRoot } from './paths.js';
import { SNAP_DAEMON } from './snapd-host.js';

export const SNAP_UNIT = 'snap.vmkeep.vmkeepd.service';

export interface SnapLayout {
  root: string;
  /** /snap/vmkeep in the layout */
  snapDir: string;
  common: string;
  /** The folder of a revision, i.e. its $SNAP. */
  revision(rev: string): string;
}

/**
 * A new folder for a layout, passable by everyone as / is: the snap's QEMU runs as snap_daemon
 * (snap/snapcraft.yaml, system-usernames) and passes through it to /snap/vmkeep/REV and to
 * $SNAP_COMMON/state. snapd would create that user; here test/setup.sh has.
 */
export async function makeSnapRoot(prefix: string): Promise<string> {
  if (!readFileSync('/etc/passwd', 'utf8').split('\n').some((line) => line.startsWith(`${SNAP_DAEMON.name}:x:${SNAP_DAEMON.uid}:`))) {
    throw new Error(`the system user ${SNAP_DAEMON.name} (uid ${SNAP_DAEMON.uid}), the snap's QEMU user, is missing: run bash test/setup.sh (it makes it as snapd does)`);
  }
  const root = await mkdtemp(join(tmpdir(), prefix));
  await chmod(root, 0o755);
  return root;
}

export function snapLayout(root: string): SnapLayout {
  const snapDir = join(root, 'snap', 'vmkeep');
  return { root, snapDir, common: join(root, 'var', 'snap', 'vmkeep', 'common'), revision: (rev) => join(snapDir, rev) };
}

/**
 * Installs revision `rev`: its own copy of QEMU and its modules, node, the launcher, vmkeep.
 * The QEMU is the system's, or the one unpacked at `qemuRoot` (a Debian package tree, e.g. QEMU
 * 10.0 from backportsInstallation), whose own data folder then replaces the system's.
 */
export async function installRevision(layout: SnapLayout, rev: string, qemuRoot?: string): Promise<void> {
  const snap = layout.revision(rev);
  await mkdir(join(snap, 'usr', 'bin'), { recursive: true });
  await mkdir(join(snap, 'bin'), { recursive: true });
  await mkdir(join(snap, 'lib'), { recursive: true });
  // Each revision is its own QEMU build (other bytes), as a refresh to a new revision would be.
  await copyQemuAsBuild(join(snap, 'usr', 'bin', 'qemu-system-x86_64'), `snap revision ${rev}`,
    qemuRoot === undefined ? undefined : join(qemuRoot, 'usr', 'bin', 'qemu-system-x86_64'));
  await cp(qemuRoot === undefined ? SYSTEM_MODULE_DIR : join(qemuRoot, SYSTEM_MODULE_DIR), join(snap, 'usr', 'lib', 'x86_64-linux-gnu', 'qemu'), { recursive: true });
  // Firmware is large and read-only: the revision links to the system's copies (or the package tree's own).
  for (const dir of SYSTEM_FIRMWARE_DIRS) {
    await mkdir(join(snap, dir, '..'), { recursive: true });
    const own = qemuRoot === undefined ? undefined : join(qemuRoot, dir);
    await symlink(own !== undefined && existsSync(own) ? own : dir, join(snap, dir));
  }
  await symlink(process.execPath, join(snap, 'bin', 'node'));
  // The launcher part's files (bin/vmkeepd-launch and what it sources), where the snap build puts them.
  const { launcher } = planSnapBuild(await readFile(join(projectRoot(), 'snap', 'snapcraft.yaml'), 'utf8'));
  for (const { from, to } of launcher.files) {
    await mkdir(dirname(join(snap, to)), { recursive: true });
    await copyFile(join(projectRoot(), launcher.source, from), join(snap, to));
    await chmod(join(snap, to), 0o755);
  }
  await symlink(projectRoot(), join(snap, 'lib', 'vmkeep'));
}

/** Points `current` at `rev` atomically (a new link renamed over the old one), as snapd does. */
export async function switchCurrent(layout: SnapLayout, rev: string): Promise<void> {
  const temp = join(layout.snapDir, '.current.new');
  await symlink(rev, temp);
  await rename(temp, join(layout.snapDir, 'current'));
}

export async function currentRevision(layout: SnapLayout): Promise<string> {
  return readlink(join(layout.snapDir, 'current'));
}

/** snapctl get/set over a flat file of key=value lines in $SNAP_COMMON. */
async function writeFakeSnapctl(layout: SnapLayout): Promise<string> {
  const bin = join(layout.root, 'fakebin');
  await mkdir(bin, { recursive: true });
  const store = join(layout.common, '.snapctl');
  await writeFile(join(bin, 'snapctl'), `#!/bin/bash
# Fake snapctl of the simulated snap: get KEY / set KEY=VALUE... over ${store}.
touch '${store}'
case "$1" in
  get) grep -m1 "^$2=" '${store}' | cut -d= -f2- || true ;;
  set) shift; for kv in "$@"; do grep -v "^\${kv%%=*}=" '${store}' > '${store}.new' || true; echo "$kv" >> '${store}.new'; mv '${store}.new' '${store}'; done ;;
  *) echo "fake snapctl: $1 not supported" >&2; exit 1 ;;
esac
`, { mode: 0o755 });
  return bin;
}

/**
 * `snap run vmkeep.vmkeepd` for the unit: the revision `current` points at when the service
 * starts, with the variables snapd sets. Extra vmkeepd arguments (e.g. --no-scope) follow.
 */
async function writeSnapRun(layout: SnapLayout, fakeBin: string, extraArgs: string[]): Promise<string> {
  const path = join(layout.root, 'snap-run-vmkeepd');
  // The app's own environment, which snapd sets too (snap/snapcraft.yaml apps.vmkeepd.environment).
  const snapcraft = parse(await readFile(join(projectRoot(), 'snap', 'snapcraft.yaml'), 'utf8')) as { apps: { vmkeepd: { environment?: Record<string, string> } } };
  const appEnv = Object.entries(snapcraft.apps.vmkeepd.environment ?? {}).map(([k, v]) => `export ${k}='${v}'\n`).join('');
  await writeFile(path, `#!/bin/bash
set -euo pipefail
rev=$(readlink '${layout.snapDir}/current')
export SNAP='${layout.snapDir}'/$rev SNAP_REVISION=$rev SNAP_NAME=vmkeep SNAP_COMMON='${layout.common}'
export SNAP_DATA='${join(layout.root, 'var', 'snap', 'vmkeep')}'/$rev
export PATH=$SNAP/bin:'${fakeBin}':$PATH
${appEnv}exec "$SNAP/bin/vmkeepd-launch" ${extraArgs.map((a) => `'${a}'`).join(' ')}
`, { mode: 0o755 });
  return path;
}

/**
 * The unit snapd writes for a `daemon: notify` app with restart-condition on-failure and
 * stop-mode sigterm-all (KillMode=control-group), with the layout's `snap run`.
 */
export async function prepareSnapUnit(layout: SnapLayout, extraArgs: string[] = []): Promise<string> {
  const fakeBin = await writeFakeSnapctl(layout);
  const run = await writeSnapRun(layout, fakeBin, extraArgs);
  await mkdir(layout.common, { recursive: true });
  return `[Unit]
# Auto-generated, DO NOT EDIT (the shape snapd writes)
Description=Service for snap application vmkeep.vmkeepd
StartLimitIntervalSec=0
X-Snappy=yes

[Service]
EnvironmentFile=-/etc/environment
ExecStart=${run}
SyslogIdentifier=vmkeep.vmkeepd
Restart=on-failure
RestartSec=1
WorkingDirectory=${layout.common}
TimeoutStartSec=300
TimeoutStopSec=30
Type=notify
KillMode=control-group
KillSignal=SIGTERM

[Install]
WantedBy=multi-user.target
`;
}

/** `snap set vmkeep KEY=VALUE` through the fake snapctl. */
export async function snapSet(layout: SnapLayout, key: string, value: string): Promise<void> {
  const { execa } = await import('execa');
  await execa(join(layout.root, 'fakebin', 'snapctl'), ['set', `${key}=${value}`]);
}
