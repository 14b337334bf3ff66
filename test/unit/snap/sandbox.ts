// A fake snap environment for the snap's shell scripts: SNAP, SNAP_COMMON and the revision folders
// in a temp folder, the launcher part's files in $SNAP as the snap build puts them, and fakes of
// `snapctl`, `node`, `systemctl` and the account tools (`getent`, `id`, `usermod`) first on PATH.
import { chmod, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { execa } from 'execa';
import { planSnapBuild } from '../../../packaging/snap/meta.js';
import { projectRoot } from '../../support/paths.js';

export const REPO = projectRoot();
export const SNAP_DIR = join(REPO, 'snap');

// snapctl: options in a key=value file; every call logged; `services` reports FAKE_SERVICE_STATE.
const FAKE_SNAPCTL = `#!/bin/bash
store=\${FAKE_SNAPCTL_STORE:?}
printf '%s\\n' "$*" >>"$store.calls"
if [[ -n \${FAKE_SNAPCTL_FAIL:-} ]]; then echo "snapctl: fake failure" >&2; exit 1; fi
touch "$store"
case $1 in
  get) awk -v k="$2" 'index($0, k "=") == 1 { print substr($0, length(k) + 2); exit }' "$store" ;;
  set)
    shift
    for kv in "$@"; do
      awk -v k="\${kv%%=*}" 'index($0, k "=") != 1' "$store" >"$store.tmp"
      printf '%s\\n' "$kv" >>"$store.tmp"
      mv "$store.tmp" "$store"
    done ;;
  services) printf 'Service  Startup  Current  Notes\\n%s  enabled  %s  -\\n' "$2" "\${FAKE_SERVICE_STATE:-inactive}" ;;
  restart) ;;
  *) echo "fake snapctl: unknown command $1" >&2; exit 2 ;;
esac
`;

// node: logs each invocation's argv as one line (fields split by \\x1f). vmkeepd.js exits with
// FAKE_DAEMON_STATUS; main.js `stop` exits with FAKE_STOP_STATUS.
const FAKE_NODE = `#!/bin/bash
dir=\${FAKE_DIR:?}
(IFS=$'\\x1f'; printf '%s\\n' "$*") >>"$dir/node.log"
case \${1##*/} in
  vmkeepd.js) exit "\${FAKE_DAEMON_STATUS:-0}" ;;
  main.js)
    case $2 in
      stop) exit "\${FAKE_STOP_STATUS:-0}" ;;
    esac ;;
esac
exit 0
`;

// systemctl: every call logged; `is-active` answers FAKE_SOCKET_STATE (default active).
const FAKE_SYSTEMCTL = `#!/bin/bash
dir=\${FAKE_DIR:?}
printf '%s\\n' "$*" >>"$dir/systemctl.log"
case $1 in
  is-active) [[ \${FAKE_SOCKET_STATE:-active} == active ]] ;;
  start) exit "\${FAKE_SYSTEMCTL_STATUS:-0}" ;;
  *) echo "fake systemctl: unknown command $1" >&2; exit 2 ;;
esac
`;

// The host's accounts, as the configure hook sees them: a kvm group unless FAKE_KVM_GROUP=no,
// snap_daemon's groups FAKE_SNAP_DAEMON_GROUPS (default: already in kvm); usermod logs its
// arguments and exits FAKE_USERMOD_STATUS. No script of the sandbox may change the host's accounts.
const FAKE_GETENT = `#!/bin/bash
[[ $1 == group && $2 == kvm && \${FAKE_KVM_GROUP:-yes} == yes ]] && echo 'kvm:x:108:'
`;
const FAKE_ID = `#!/bin/bash
[[ $* == '-nG snap_daemon' ]] || { echo "fake id: $*" >&2; exit 2; }
echo "\${FAKE_SNAP_DAEMON_GROUPS-snap_daemon kvm}"
`;
const FAKE_USERMOD = `#!/bin/bash
printf '%s\\n' "$*" >>"\${FAKE_DIR:?}/usermod.log"
exit "\${FAKE_USERMOD_STATUS:-0}"
`;

export interface Sandbox {
  root: string;
  /** Folder of the revisions: $SNAP is revisions/<revision>. */
  revisions: string;
  snap: string;
  common: string;
  revision: string;
  fakeDir: string;
  /** Runs a script of the repo (path under snap/) as snapd would: no arguments, the snap's env. */
  run(script: string, env?: Record<string, string>): Promise<{ exitCode: number; stdout: string; stderr: string }>;
  setOptions(options: Record<string, string>): Promise<void>;
  options(): Promise<Record<string, string>>;
  snapctlCalls(): Promise<string[]>;
  systemctlCalls(): Promise<string[]>;
  usermodCalls(): Promise<string[]>;
  /** argv of every node invocation, in order. */
  nodeCalls(): Promise<string[][]>;
  /** Makes revisions/<rev> an installed revision with its QEMU binary. */
  addRevision(rev: string): Promise<string>;
  cleanup(): Promise<void>;
}

export async function makeSandbox(revision = '12'): Promise<Sandbox> {
  const root = await mkdtemp(join(tmpdir(), 'vmkeep-snap-'));
  const revisions = join(root, 'snap', 'vmkeep');
  const snap = join(revisions, revision);
  const common = join(root, 'common');
  const fakeDir = join(root, 'fake');
  const bin = join(fakeDir, 'bin');
  await Promise.all([mkdir(snap, { recursive: true }), mkdir(common, { recursive: true }), mkdir(bin, { recursive: true })]);
  // The snap's own files the scripts source or call from $SNAP/bin are the repo's.
  const { launcher } = planSnapBuild(await readFile(join(SNAP_DIR, 'snapcraft.yaml'), 'utf8'));
  for (const { from, to } of launcher.files) {
    await mkdir(dirname(join(snap, to)), { recursive: true });
    await symlink(join(REPO, launcher.source, from), join(snap, to));
  }
  await writeFile(join(bin, 'snapctl'), FAKE_SNAPCTL, { mode: 0o755 });
  await writeFile(join(bin, 'node'), FAKE_NODE, { mode: 0o755 });
  await writeFile(join(bin, 'systemctl'), FAKE_SYSTEMCTL, { mode: 0o755 });
  await writeFile(join(bin, 'getent'), FAKE_GETENT, { mode: 0o755 });
  await writeFile(join(bin, 'id'), FAKE_ID, { mode: 0o755 });
  await writeFile(join(bin, 'usermod'), FAKE_USERMOD, { mode: 0o755 });
  const store = join(fakeDir, 'options');

  const readLines = async (file: string): Promise<string[]> => {
    try {
      return (await readFile(file, 'utf8')).split('\n').filter((line) => line !== '');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw error;
    }
  };

  const box: Sandbox = {
    root,
    revisions,
    snap,
    common,
    revision,
    fakeDir,
    async run(script, env = {}) {
      // extendEnv false: the host's VMKEEP_* or SNAP* variables must not leak into the scripts.
      const result = await execa(join(SNAP_DIR, script), [], {
        reject: false,
        extendEnv: false,
        timeout: 8000,
        env: {
          PATH: `${bin}:${process.env.PATH ?? '/usr/bin:/bin'}`,
          SNAP: snap,
          SNAP_COMMON: common,
          SNAP_REVISION: revision,
          SNAP_NAME: 'vmkeep',
          FAKE_SNAPCTL_STORE: store,
          FAKE_DIR: fakeDir,
          ...env,
        },
      });
      return { exitCode: result.exitCode ?? -1, stdout: String(result.stdout), stderr: String(result.stderr) };
    },
    async setOptions(options) {
      await writeFile(store, Object.entries(options).map(([k, v]) => `${k}=${v}\n`).join(''));
    },
    async options() {
      return Object.fromEntries((await readLines(store)).map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]));
    },
    snapctlCalls: () => readLines(`${store}.calls`),
    systemctlCalls: () => readLines(join(fakeDir, 'systemctl.log')),
    usermodCalls: () => readLines(join(fakeDir, 'usermod.log')),
    async nodeCalls() {
      return (await readLines(join(fakeDir, 'node.log'))).map((line) => line.split('\x1f'));
    },
    async addRevision(rev) {
      const dir = join(revisions, rev);
      await mkdir(join(dir, 'usr', 'bin'), { recursive: true });
      const binary = join(dir, 'usr', 'bin', 'qemu-system-x86_64');
      await writeFile(binary, '#!/bin/sh\n');
      await chmod(binary, 0o755);
      return dir;
    },
    cleanup: () => rm(root, { recursive: true, force: true }),
  };
  return box;
}
