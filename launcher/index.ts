export { LaunchError, type LaunchErrorCode, type SpecProblem } from './errors.js';
export {
  validateSpec, isValidVmName, formatSpecProblems, SPEC_DEFAULTS, SPEC_LIMITS,
  MEMORY_BACKENDS, type VmSpec, type DiskSpec, type DiskFormat, type Accel, type MemoryBackend,
} from './spec.js';
export { supportsCprTransfer, withMemoryDefault, memoryBackendOf } from './memory.js';
export { checkSpecFiles } from './files.js';
export {
  probeInstallation, readBinaryIdentity, sameBinary, parseQemuVersion, parseMachineHelp, resolveMachineType,
  execaRunner,
  type Installation, type BinaryIdentity, type MachineType, type InstallationInfo, type ProbeOptions,
  type ProcessRunner, type RunResult,
} from './installation.js';
export { buildQemuCommand, escapeQemuOptValue, cprChannel, type QemuCommand, type BuildQemuCommandInput, type CprChannels } from './argv.js';
export { parseProcStat, readProcessIdentity, isSameProcess, readExe, type ProcessIdentity, type ExeInfo } from './process.js';
export { spawnQemu, type SpawnOptions, type SpawnedQemu } from './spawn.js';
export { launchVm, launchCprDestination, waitForProcessExit, type LaunchVmOptions, type LaunchedVm, type PendingVm } from './launch.js';
