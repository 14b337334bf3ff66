import { LaunchError } from './errors.js';
import { SIMPLE_NAME_RE, UUID_RE } from './names.js';
import { installationRunContext, type Installation } from './installation.js';
import type { VmSpec } from './spec.js';

export interface QemuCommand {
  binary: string;
  argv: string[];
  /** Only the variables vmkeep sets; spawnQemu adds a minimal base (PATH). */
  env: Record<string, string>;
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
  /** Adds -incoming defer: a migration destination waiting for migrate-incoming. */
  incoming?: 'defer';
}


/**
 * QemuOpts escaping: inside a comma-separated option value a literal comma is written ",,".
 * Only for values QEMU parses as option lists (-drive, -qmp unix:); -kernel, -initrd,
 * -append and -L take their argument verbatim.
 */
export function escapeQemuOptValue(value: string): string {
  return value.replaceAll(',', ',,');
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

  const argv = [
    '-name', `guest=${spec.name}`,
    '-uuid', input.uuid.toLowerCase(),
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    // A guest power-off leaves QEMU waiting in status "shutdown" instead of exiting, so a
    // shutdown that happens while the daemon is away is still seen when it comes back.
    '-no-shutdown',
    '-machine', `${machineType},accel=${spec.accel}`,
    '-cpu', spec.cpu,
    '-m', String(spec.memoryMiB),
    '-smp', String(spec.vcpus),
    '-qmp', `unix:${escapeQemuOptValue(paths.qmpSocket)},server=on,wait=off`,
    // Appended, not truncated: a migration's destination writes on where its source stopped
    // (the caller empties the file before a fresh start).
    '-chardev', `file,id=serial0,path=${escapeQemuOptValue(paths.serialLog)},append=on`,
    '-serial', 'chardev:serial0',
    ...firmwareArgs,
  ];
  if (spec.kernel !== undefined) argv.push('-kernel', spec.kernel);
  if (spec.initrd !== undefined) argv.push('-initrd', spec.initrd);
  if (spec.append !== undefined) argv.push('-append', spec.append);
  for (const disk of spec.disks) {
    const readOnly = disk.readOnly ? ',readonly=on' : '';
    argv.push('-drive', `file=${escapeQemuOptValue(disk.path)},format=${disk.format},if=virtio${readOnly}`);
  }
  if (input.startPaused) argv.push('-S');
  if (input.incoming === 'defer') argv.push('-incoming', 'defer');

  return { binary: installation.binary, argv, env };
}
