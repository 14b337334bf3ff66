// Option tables shared by the two parsers: yargs for `vmkeep` (help, completion) and the small
// one vmkeepd starts with (cli/small-args.ts). Plain data, in the form yargs' .option() takes,
// so each option, its default and its VMKEEP_* variable are defined once.
import { accessSync, constants, existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, dirname, isAbsolute, join, resolve } from 'node:path';
import { DEFAULT_OPERATOR_USER_NET, DEFAULT_SOCKET_PATH, LOG_LEVELS, OPERATOR_USER_NETS, REFRESH_STRATEGIES } from '../daemon/index.js';
import type { Installation } from '../launcher/index.js';
import { DEFAULT_SLICE } from '../scope-manager/index.js';
import { CliError } from './errors.js';

export interface OptionSpec {
  type: 'string' | 'boolean';
  describe: string;
  default?: string | boolean;
  defaultDescription?: string;
  choices?: readonly string[];
  /** Repeatable; the values in order. */
  array?: boolean;
  hidden?: boolean;
}

export type OptionTable = Record<string, OptionSpec>;

/** The system user vmkeepd runs QEMU as unless told otherwise (packaging and test setup create it). */
export const DEFAULT_QEMU_USER = 'vmkeep-qemu';

/** Where the QEMU comes from: `vmkeep run` and the daemon. */
export const INSTALLATION_OPTIONS = {
  qemu: {
    type: 'string',
    describe: 'QEMU binary to run (env VMKEEP_QEMU)',
    default: 'qemu-system-x86_64',
    defaultDescription: 'qemu-system-x86_64 from PATH',
  },
  'module-dir': {
    type: 'string',
    describe: "QEMU's module directory (QEMU_MODULE_DIR), for a binary outside its package's place",
  },
  'firmware-dir': {
    type: 'string',
    array: true,
    describe: 'firmware directory passed as -L (repeatable, in order)',
  },
  'cache-dir': {
    type: 'string',
    describe: 'where probed QEMU versions and machine types are cached (env VMKEEP_CACHE_DIR)',
  },
} as const satisfies OptionTable;

/** Every command's --json. */
export const JSON_OPTION = {
  type: 'boolean',
  default: false,
  describe: 'machine-readable output: one JSON document (one per line for streams)',
} as const satisfies OptionSpec;

/** The control socket a command talks to. */
export function socketOption(env: NodeJS.ProcessEnv) {
  return {
    type: 'string',
    // Read from the given env (not only yargs' process.env) so tests and embedders control it.
    default: env.VMKEEP_SOCKET ?? DEFAULT_SOCKET_PATH,
    defaultDescription: DEFAULT_SOCKET_PATH,
    describe: "vmkeepd's control socket (env VMKEEP_SOCKET)",
  } as const satisfies OptionSpec;
}

/** vmkeepd's own options (besides the installation ones); defaults read the environment. */
export function vmkeepdOptions(env: NodeJS.ProcessEnv) {
  return {
    ...INSTALLATION_OPTIONS,
    'state-dir': {
      type: 'string',
      default: env.VMKEEP_STATE_DIR ?? (env.SNAP_COMMON ? join(env.SNAP_COMMON, 'state') : '/var/lib/vmkeep'),
      defaultDescription: '$SNAP_COMMON/state under a snap, else /var/lib/vmkeep',
      describe: 'durable records of the VMs (env VMKEEP_STATE_DIR)',
    },
    'runtime-dir': {
      type: 'string',
      default: env.VMKEEP_RUNTIME_DIR ?? '/run/vmkeep',
      describe: 'QMP sockets, consoles and QEMU logs (env VMKEEP_RUNTIME_DIR)',
    },
    socket: {
      type: 'string',
      default: env.VMKEEP_SOCKET ?? DEFAULT_SOCKET_PATH,
      describe: 'control socket to serve (env VMKEEP_SOCKET)',
    },
    'socket-group': { type: 'string', describe: 'group allowed to use the control socket (mode 0660): root-equivalent, see --operator-group' },
    'operator-group': {
      type: 'string',
      describe: 'group allowed to use the operator socket: create, start, stop, refresh and read; disks only under --storage-root, bridges only --operator-bridge, read-only QMP queries',
    },
    'operator-socket': { type: 'string', describe: 'path of the operator socket (default: vmkeep-operator.sock next to --socket)' },
    'qemu-user': {
      type: 'string',
      default: DEFAULT_QEMU_USER,
      describe: 'system user every QEMU runs as, with its own groups (kvm for /dev/kvm); root only with --allow-qemu-root (env VMKEEP_QEMU_USER)',
    },
    'allow-qemu-root': {
      type: 'boolean',
      default: false,
      describe: 'let --qemu-user be root: a QEMU escape is then a root shell (env VMKEEP_ALLOW_QEMU_ROOT=true)',
    },
    'storage-root': {
      type: 'string',
      array: true,
      describe: 'folder the operators\' disk images must be in (repeatable); a path is resolved without following links out of it',
    },
    'operator-bridge': {
      type: 'string',
      array: true,
      describe: 'Linux bridge the operators\' VMs may join (repeatable; default: none, user-mode NICs only)',
    },
    'operator-user-net': {
      type: 'string',
      choices: OPERATOR_USER_NETS,
      default: DEFAULT_OPERATOR_USER_NET,
      describe: 'what the guest on an operator\'s user-mode NIC reaches: restricted, only its host forwards (QEMU\'s restrict=on); open, the host\'s loopback services at 10.0.2.2 and fec0::2 and every network the host reaches, as the admin\'s NICs do',
    },
    slice: { type: 'string', default: DEFAULT_SLICE, describe: 'systemd slice of the VM scopes, e.g. machine.slice' },
    scope: {
      type: 'boolean',
      default: true,
      describe: "put each QEMU in its own systemd scope; --no-scope keeps them in the daemon's cgroup, where they DIE with the daemon service",
    },
    'tap-repair': {
      type: 'boolean',
      default: true,
      describe: "put a running VM's TAP back on its bridge when the host's network was reconfigured (bridge made again, port detached); --no-tap-repair only reports it",
    },
    'bus-address': { type: 'string', describe: 'D-Bus address of the system bus (default DBUS_SYSTEM_BUS_ADDRESS or the standard socket)' },
    installations: {
      type: 'string',
      describe: 'JSON file of QEMU installations and the current one per channel (env VMKEEP_INSTALLATIONS); without it, --qemu names the only one',
    },
    'refresh-at-start': {
      type: 'boolean',
      default: false,
      describe: "once reattached, refresh every stale VM whose policy is not manual (for a package's post-upgrade restart)",
    },
    'guests-unit': {
      type: 'string',
      describe: 'the unit whose stop powers every guest off at host shutdown; each VM scope is ordered Before= it',
      defaultDescription: 'vmkeep-guests.service',
    },
    'autostart-parallel': {
      type: 'string',
      default: '2',
      describe: 'at a host boot, how many VMs (autostart always, or last-state and running at shutdown) start at once',
    },
    'autostart-delay': { type: 'string', default: '0', describe: 'at a host boot, seconds between two VM starts' },
    'idle-exit': {
      type: 'string',
      describe: 'with vmkeepd.socket: exit after SECONDS with no VM running, no operation and no client; the socket starts vmkeepd again at the next connection (default: never)',
    },
    'log-dir': {
      type: 'string',
      default: env.VMKEEP_LOG_DIR ?? (env.SNAP_COMMON ? join(env.SNAP_COMMON, 'log') : '/var/log/vmkeep'),
      defaultDescription: '$SNAP_COMMON/log under a snap, else /var/log/vmkeep',
      describe: "each VM's serial console log and QEMU log, in LOG_DIR/NAME/, kept across reboots (env VMKEEP_LOG_DIR)",
    },
    'log-max-kib': { type: 'string', default: '2048', describe: "each VM's serial console log and QEMU log is rotated above this size (KiB)" },
    'log-keep': { type: 'string', default: '3', describe: 'rotated files kept per log (NAME.1 ... NAME.N); vmkeep logs reads across them' },
    // Hidden test hook (env VMKEEP_TEST_CRASH_AT): vmkeepd SIGKILLs itself at this refresh step.
    'test-crash-at': { type: 'string', hidden: true, describe: 'test hook: SIGKILL self at this refresh step' },
    'refresh-policy': {
      type: 'string',
      choices: REFRESH_STRATEGIES,
      default: 'manual',
      describe: 'how stale VMs move onto the current installation unless a VM has its own policy; manual only reports',
    },
    'log-level': { type: 'string', default: 'info', choices: LOG_LEVELS, describe: 'least severe log lines written' },
  } as const satisfies OptionTable;
}

/** Finds a program the way a shell would; an absolute or relative path is taken as it is. */
export function findProgram(name: string, env: NodeJS.ProcessEnv): string {
  if (name.includes('/')) return resolve(name);
  for (const dir of (env.PATH ?? '/usr/bin:/bin').split(delimiter)) {
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this folder
    }
  }
  throw new CliError(
    'USAGE',
    `${name} not found in PATH: install QEMU (apt-get install qemu-system-x86) or name the binary with --qemu /path/to/qemu-system-x86_64`,
  );
}

export function defaultCacheDir(env: NodeJS.ProcessEnv): string {
  if (env.VMKEEP_CACHE_DIR) return env.VMKEEP_CACHE_DIR;
  const base = env.XDG_CACHE_HOME && isAbsolute(env.XDG_CACHE_HOME) ? env.XDG_CACHE_HOME : join(homedir(), '.cache');
  return join(base, 'vmkeep');
}

// Where distributions put the modules of the QEMU in /usr/bin: named, so that they are pinned
// per build and a package upgrade cannot swap them under a running QEMU.
const SYSTEM_MODULE_DIRS = ['/usr/lib/x86_64-linux-gnu/qemu', '/usr/lib/aarch64-linux-gnu/qemu', '/usr/lib64/qemu', '/usr/lib/qemu'];

/** The installation named by --qemu, --module-dir and --firmware-dir. */
export function installationFrom(
  a: { qemu: string; moduleDir?: string | undefined; firmwareDir?: string[] | undefined },
  env: NodeJS.ProcessEnv,
): Installation {
  const binary = findProgram(a.qemu, env);
  const moduleDir = a.moduleDir ?? (dirname(binary) === '/usr/bin' ? SYSTEM_MODULE_DIRS.find((dir) => existsSync(dir)) : undefined);
  return {
    name: 'default',
    binary,
    firmwareDirs: a.firmwareDir ?? [],
    ...(moduleDir === undefined ? {} : { moduleDir }),
  };
}

/** The rule for --timeout of run, stop and refresh; a returned message is a usage error to yargs. */
export function checkTimeout(seconds: number | undefined): true | string {
  return seconds === undefined || (Number.isFinite(seconds) && seconds > 0) ? true : '--timeout must be a positive number of seconds';
}
