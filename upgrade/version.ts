import { createRequire } from 'node:module';
import type { SemVer } from 'semver';
import { UpgradeError } from './errors.js';

// semver is loaded on the first comparison (the CLI imports this component for its strategy
// names only, and every import counts in a command's start-up time), and only the two functions
// used: its index loads all of its ~50 files.
const require = createRequire(import.meta.url);
let semver: { coerce: typeof import('semver').coerce; compare: typeof import('semver').compare } | undefined;
function lib(): NonNullable<typeof semver> {
  semver ??= {
    coerce: require('semver/functions/coerce') as typeof import('semver').coerce,
    compare: require('semver/functions/compare') as typeof import('semver').compare,
  };
  return semver;
}

/** QEMU reports `7.2.22` or `8.2.2 (Debian ...)`: the first x.y[.z] is its version. */
function toSemver(version: string): SemVer {
  const parsed = lib().coerce(version);
  if (parsed === null) {
    throw new UpgradeError('BAD_VERSION', `cannot read a QEMU version from ${JSON.stringify(version)}; probe the installation again (vmkeep upgrade-status)`);
  }
  return parsed;
}

/** -1, 0 or 1 as `a` is older than, the same as or newer than `b`. */
export function compareQemuVersions(a: string, b: string): -1 | 0 | 1 {
  return lib().compare(toSemver(a), toSemver(b));
}
