export { LaunchError, type LaunchErrorCode, type SpecProblem } from './errors.js';
export { isValidVmName, vmNameProblem, machineNameProblem, describeValue, VM_NAME_RULE, SIMPLE_NAME_RE, UUID_RE, isLowercaseUuid } from './names.js';
export {
  validateSpec, formatSpecProblems, SPEC_DEFAULTS, SPEC_LIMITS,
  MEMORY_BACKENDS, DISK_CACHES, type VmSpec, type DiskSpec, type DiskFormat, type DiskCache, type Accel, type MemoryBackend,
} from './spec.js';
export { supportsCprTransfer, withMemoryDefault, memoryBackendOf } from './memory.js';
export { checkSpecFiles, validateSpecAndFiles, deniedTo } from './files.js';
export {
  secureFolder, ownVmFolder, qemuFolderModes, removeVmFolder, removeStaleSocket, ignoreMissing, openOwnFile, openOwnFileHandle, readOwnFile, copyOwnFile, type OwnFileUse,
} from './safe-files.js';
export { withinRoots, realRoots, resolveWithinRoots } from './storage-roots.js';
export {
  probeInstallation, readBinaryIdentity, sameBinary, parseQemuVersion, parseMachineHelp, resolveMachineType, QEMU_SANDBOX,
  execaRunner,
  type Installation, type BinaryIdentity, type MachineType, type InstallationInfo, type ProbeOptions,
  type ProcessRunner, type RunResult,
} from './installation.js';
export { buildQemuCommand, escapeQemuOptValue, cprChannel, type QemuCommand, type BuildQemuCommandInput, type CprChannels } from './argv.js';
export { parseProcStat, readProcessIdentity, isSameProcess, readExe, type ProcessIdentity, type ExeInfo } from './process.js';
export {
  hashFile, hashRunningBinary, readRunningExe, cachedContentHash, rememberContentHash, type FileStatKey,
} from './content.js';
export { spawnQemu, commandAs, type SpawnOptions, type SpawnedQemu, type QemuUser } from './spawn.js';
export { launchVm, launchCprDestination, waitForProcessExit, QUIT_EXIT_TIMEOUT_MS, type LaunchVmOptions, type LaunchedVm, type PendingVm } from './launch.js';
export {
  NIC_MODES, NIC_LIMITS, MAC_PREFIX, TAP_NAME_RE, IFNAME_RE, withMacs, generateMac, tapName, tapsFor, freeTapSlot, netdevId,
  hostfwdRule, forwardHost, forwardKey, nicArgs, parseNetdevHelp, probeNetdevs, nicsForForegroundRun,
  type NicSpec, type NicMode, type BridgeNic, type UserNic, type HostForward, type TapSlot,
} from './nics.js';
export {
  readDiskChains, parseBackingChain, compareChains, chainChangedError, diskArguments, formatNodeName,
  type DiskLayer, type DiskChain, type ChainDifference, type ChainReadOptions,
} from './disks.js';
export {
  FIRST_INHERITED_FD, inheritFd, openInheritedFds, closeFds, stdioWithInherited,
  type InheritedFd, type InheritedFile, type InheritedSource,
} from './inherited-fds.js';
export { scopeLimits, QEMU_MEMORY_OVERHEAD_MIB, TCG_CODE_BUFFER_MIB, TASKS_BASE, type ScopeLimits } from './limits.js';
