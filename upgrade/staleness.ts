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
 * Whether a running VM's binary is the current installation's binary. Pure.
 *
 * The running process's own exe counts first. The same file (device and inode, not deleted)
 * is current without more ado. Otherwise the bytes decide when both hashes are known: the
 * same build at another inode (a new container image, a reinstall of the same package
 * version) is current, even when the file it runs was deleted or its image removed; other
 * bytes are stale. Without hashes, another or a deleted file is stale. The identity recorded
 * at launch is the fallback when the exe cannot be read.
 */
export function assessStaleness(input: StalenessInput): Staleness {
  const { launched, exe, current } = input;
  const target = current.info.identity;
  const reasons: string[] = [];
  if (exe !== null) {
    const sameFile = !exe.deleted && exe.dev === target.dev && exe.ino === target.ino;
    const bytesKnown = exe.sha256 !== undefined && current.info.sha256 !== undefined;
    if (sameFile) {
      // the current file itself
    } else if (bytesKnown && exe.sha256 === current.info.sha256) {
      const running = input.runningVersion ?? launched.binary?.version;
      if (running !== undefined && compareQemuVersions(running, current.info.version) !== 0) {
        reasons.push(`it reports version ${running}, the current installation "${current.installation.name}" ${current.info.version}, although their binaries have the same content`);
      }
    } else if (exe.deleted) {
      reasons.push(`its binary ${exe.path} was replaced or removed on disk since it started (exe reads "(deleted)" or has no links left)` +
        (bytesKnown ? `, and the current installation "${current.installation.name}" (${target.path}) is another build (sha256 ${short(exe.sha256)} running, ${short(current.info.sha256)} current)` : ''));
    } else if (exe.unreachable === true) {
      const started = launched.binary?.path ?? `installation "${launched.installation}"`;
      reasons.push(`it runs ${started}, which is no longer at that path (its file system was unmounted, e.g. a snap revision snapd discarded, or another file took its place): the QEMU keeps running from the file it opened, its modules from vmkeep's pinned copies; the current installation is "${current.installation.name}" (${target.path})` +
        (bytesKnown ? `, another build (sha256 ${short(exe.sha256)} running, ${short(current.info.sha256)} current)` : ''));
    } else {
      reasons.push(`it runs ${exe.path}, not the current installation "${current.installation.name}" (${target.path})` +
        (bytesKnown ? `: another build (sha256 ${short(exe.sha256)} running, ${short(current.info.sha256)} current)` : ''));
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

function short(sha256: string | undefined): string {
  return (sha256 ?? '').slice(0, 12);
}
