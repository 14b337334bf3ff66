import { LaunchError } from './errors.js';
import { SIMPLE_NAME_RE, UUID_RE } from './names.js';
import { installationRunContext, QEMU_SANDBOX, type Installation } from './installation.js';
import { memoryBackendOf, supportsCprTransfer } from './memory.js';
import { nicArgs } from './nics.js';
import { diskArguments, type DiskChain } from './disks.js';
import { inheritFd, type InheritedFd } from './inherited-fds.js';
import type { VmSpec } from './spec.js';

/** The two listening sockets of a cpr-transfer destination: the cpr state first, then the stream. */
export interface CprChannels {
  cprSocket: string;
  mainSocket: string;
}

export interface QemuCommand {
  binary: string;
  argv: string[];
  /** Only the variables vmkeep sets; spawnQemu adds a minimal base (PATH). */
  env: Record<string, string>;
  /** What spawnQemu opens and hands over at exec, at the descriptor numbers the argv names (none if absent). */
  inheritedFds?: InheritedFd[];
}

export interface BuildQemuCommandInput {
  spec: VmSpec;
  /** The VM's UUID as stored in its record (decided by the caller, stable across restarts). */
  uuid: string;
  installation: Installation;
  /** A versioned machine type from resolveMachineType(), never an alias. */
  machineType: string;
  paths: { qmpSocket: string; serialLog: string };
  /** Adds -S: QEMU waits for `cont` before running guest code. */
  startPaused: boolean;
  /**
   * `defer`: a migration destination waiting for migrate-incoming. CprChannels: a cpr-transfer
   * destination, listening on both sockets from its start (it has no monitor until the source
   * has connected the cpr channel).
   */
  incoming?: 'defer' | CprChannels;
  /** The installation's probed version: decides the options only newer QEMUs know. */
  version?: string;
  /** The TAP device of each bridge NIC (index as in spec.nics), made by the caller. */
  taps?: ReadonlyArray<string | undefined>;
  /** false: user-mode NICs start without host forwards (a migration destination gets them at hand-over). */
  withForwards?: boolean;
  /** Each disk's chain (recorded, or read just now), aligned with spec.disks. */
  diskChains?: readonly DiskChain[];
  /** The build has the seccomp sandbox (InstallationInfo.sandbox): QEMU_SANDBOX is applied. */
  sandbox?: boolean;
}

/** The -incoming JSON of one cpr-transfer channel; the same address the source's migrate names. */
export function cprChannel(type: 'cpr' | 'main', path: string): Record<string, unknown> {
  return { 'channel-type': type, addr: { transport: 'socket', type: 'unix', path } };
}


/**
 * QemuOpts escaping: inside a comma-separated option value a literal comma is written ",,".
 * Only for values QEMU parses as option lists (-add-fd, -qmp unix:); -kernel, -initrd,
 * -append and -L take their argument verbatim.
 */
export function escapeQemuOptValue(value: string): string {
  return value.replaceAll(',', ',,');
}

const RAM_ID = 'ram0';

/** Guest RAM as a shared memfd, which cpr-transfer hands over instead of copying. */
function memoryObject(spec: VmSpec): string[] {
  if (memoryBackendOf(spec) !== 'memfd-shared') return [];
  return ['-object', `memory-backend-memfd,id=${RAM_ID},size=${spec.memoryMiB}M,share=on`];
}

/**
 * aux-ram-share=on puts QEMU's other RAM (ROMs, video memory) in shared memory too, which
 * cpr-transfer needs; QEMUs older than 10.0 do not know the option (and cannot do cpr).
 */
function memoryMachineOptions(input: BuildQemuCommandInput): string {
  if (memoryBackendOf(input.spec) !== 'memfd-shared') return '';
  const aux = input.version !== undefined && supportsCprTransfer(input.version) ? ',aux-ram-share=on' : '';
  return `,memory-backend=${RAM_ID}${aux}`;
}

/**
 * The serial console: QEMU writes to a descriptor vmkeepd opened on the log (an fdset QEMU's
 * file chardev opens), never to the path, which its unprivileged user could not open.
 */
function serialArguments(serialLog: string, inherited: InheritedFd[]): string[] {
  const fd = inheritFd(inherited, { kind: 'log', path: serialLog, what: 'serial console log' });
  return [
    '-add-fd', `fd=${fd},set=${fd},opaque=serial0`,
    // Appended, not truncated: a migration's destination writes on where its source stopped
    // (the caller empties the file before a fresh start).
    '-chardev', `file,id=serial0,path=/dev/fdset/${fd},append=on`,
    '-serial', 'chardev:serial0',
  ];
}

/** The exact QEMU command line for a VM. Pure: same input, same command. */
export function buildQemuCommand(input: BuildQemuCommandInput): QemuCommand {
  const { spec, installation, machineType, paths } = input;
  if (!UUID_RE.test(input.uuid)) {
    throw new LaunchError('INVALID_SPEC', `uuid: ${JSON.stringify(input.uuid)} is not a UUID; fix: pass the UUID stored in the VM's record`);
  }
  if (!SIMPLE_NAME_RE.test(machineType)) {
    throw new LaunchError('INVALID_SPEC', `machine: ${JSON.stringify(machineType)} is not a machine type; fix: pass the result of resolveMachineType()`);
  }
  const { firmwareArgs, env } = installationRunContext(installation);
  const inheritedFds: InheritedFd[] = [];

  const argv = [
    '-name', `guest=${spec.name}`,
    '-uuid', input.uuid.toLowerCase(),
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    // A guest power-off leaves QEMU waiting in status "shutdown" instead of exiting, so a
    // shutdown that happens while the daemon is away is still seen when it comes back.
    '-no-shutdown',
    '-machine', `${machineType},accel=${spec.accel}${memoryMachineOptions(input)}`,
    ...memoryObject(spec),
    '-cpu', spec.cpu,
    '-m', String(spec.memoryMiB),
    '-smp', String(spec.vcpus),
    '-qmp', `unix:${escapeQemuOptValue(paths.qmpSocket)},server=on,wait=off`,
    ...serialArguments(paths.serialLog, inheritedFds),
    ...firmwareArgs,
  ];
  if (spec.kernel !== undefined) argv.push('-kernel', spec.kernel);
  if (spec.initrd !== undefined) argv.push('-initrd', spec.initrd);
  if (spec.append !== undefined) argv.push('-append', spec.append);
  argv.push(...diskArguments(spec.disks, input.diskChains ?? [], inheritedFds, spec.kernel === undefined));
  if (input.sandbox === true) argv.push('-sandbox', QEMU_SANDBOX);
  if (spec.nics !== undefined) argv.push(...nicArgs(spec.nics, input.taps ?? [], input.withForwards ?? true));
  if (input.startPaused) argv.push('-S');
  if (input.incoming === 'defer') argv.push('-incoming', 'defer');
  else if (input.incoming !== undefined) {
    // The cpr channel must come first: QEMU reads the cpr state before anything else.
    argv.push('-incoming', JSON.stringify(cprChannel('cpr', input.incoming.cprSocket)));
    argv.push('-incoming', JSON.stringify(cprChannel('main', input.incoming.mainSocket)));
  }

  return { binary: installation.binary, argv, env, inheritedFds };
}
