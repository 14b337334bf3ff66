export { LaunchError, type LaunchErrorCode, type SpecProblem } from './errors.js';
export {
  validateSpec, isValidVmName, formatSpecProblems, SPEC_DEFAULTS, SPEC_LIMITS,
  type VmSpec, type DiskSpec, type DiskFormat, type Accel,
} from './spec.js';
export { checkSpecFiles } from './files.js';
export {
  probeInstallation, readBinaryIdentity, sameBinary, parseQemuVersion, parseMachineHelp, resolveMachineType,
  execaRunner,
  type Installation, type BinaryIdentity, type MachineType, type InstallationInfo, type ProbeOptions,
  type ProcessRunner, type RunResult,
} from './installation.js';
export { buildQemuCommand, escapeQemuOptValue, type QemuCommand, type BuildQemuCommandInput } from './argv.js';
export { parseProcStat, readProcessIdentity, isSameProcess, readExe, type ProcessIdentity, type ExeInfo } from './process.js';
export {
  hashFile, hashRunningBinary, readRunningExe, cachedContentHash, rememberContentHash, type FileStatKey,
} from './content.js';
export { spawnQemu, type SpawnOptions, type SpawnedQemu } from './spawn.js';
export { launchVm, waitForProcessExit, type LaunchVmOptions, type LaunchedVm } from './launch.js';
