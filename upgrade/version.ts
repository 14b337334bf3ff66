import semver from 'semver';
import { UpgradeError } from './errors.js';

/** QEMU reports `7.2.22` or `8.2.2 (Debian ...)`: the first x.y[.z] is its version. */
function toSemver(version: string): semver.SemVer {
  const parsed = semver.coerce(version);
  if (parsed === null) {
    throw new UpgradeError('BAD_VERSION', `cannot read a QEMU version from ${JSON.stringify(version)}; probe the installation again (vmkeep upgrade-status)`);
  }
  return parsed;
}

/** -1, 0 or 1 as `a` is older than, the same as or newer than `b`. */
export function compareQemuVersions(a: string, b: string): -1 | 0 | 1 {
  return semver.compare(toSemver(a), toSemver(b));
}
