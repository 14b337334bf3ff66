import { sameBinary, type BinaryIdentity, type ExeInfo, type Installation, type InstallationInfo } from '../launcher/index.js';
import { compareQemuVersions } from './version.js';

export interface StalenessInput {
  /** What the VM's QEMU was started from, as recorded at launch. */
  launched: { installation: string; binary?: BinaryIdentity & { version: string } };
  /** `/proc/PID/exe` of the running QEMU (null: not readable, e.g. the process is gone). */
  exe: ExeInfo | null;
  /** The running QEMU's own answer to query-version, when its monitor is connected. */
  runningVersion?: string;
  current: { installation: Installation; info: InstallationInfo };
}

export interface Staleness {
  stale: boolean;
  /** Why the VM is stale (empty when it is not). */
  reasons: string[];
  runningVersion?: string;
  currentVersion: string;
  /** The current installation against the running one. */
  currentIs?: 'newer' | 'same' | 'older';
}

/**
 * Whether a running VM's binary is the current installation's binary. The running process's
 * own exe counts first (a `(deleted)` exe was replaced on disk: a package upgrade); the
 * identity recorded at launch is the fallback when the exe cannot be read. Pure.
 */
export function assessStaleness(input: StalenessInput): Staleness {
  const { launched, exe, current } = input;
  const target = current.info.identity;
  const reasons: string[] = [];
  if (exe !== null) {
    if (exe.deleted) reasons.push(`its binary ${exe.path} was replaced or removed on disk since it started (exe reads "(deleted)")`);
    else if (exe.dev !== target.dev || exe.ino !== target.ino) {
      reasons.push(`it runs ${exe.path}, not the current installation "${current.installation.name}" (${target.path})`);
    }
  } else if (launched.binary === undefined) {
    reasons.push('the binary it was started from is unknown');
  } else if (!sameBinary(launched.binary, target)) {
    reasons.push(`it was started from ${launched.binary.path} (recorded identity), which is not the current installation "${current.installation.name}" (${target.path})`);
  }
  const result: Staleness = { stale: reasons.length > 0, reasons, currentVersion: current.info.version };
  const runningVersion = input.runningVersion ?? launched.binary?.version;
  if (runningVersion !== undefined) {
    result.runningVersion = runningVersion;
    const order = compareQemuVersions(current.info.version, runningVersion);
    result.currentIs = order > 0 ? 'newer' : order < 0 ? 'older' : 'same';
  }
  return result;
}
