// Pure decisions about /proc/PID/cgroup contents.

/**
 * The cgroup path systemd manages for a process: the cgroup2 line (`0::PATH`), except on a
 * legacy-mode host where that line stays `/` and the `name=systemd` hierarchy is the real one.
 * Null when neither line is present.
 */
export function systemdCgroupPath(procCgroup: string): string | null {
  let unified: string | null = null;
  let legacy: string | null = null;
  for (const line of procCgroup.split('\n')) {
    const first = line.indexOf(':');
    const second = line.indexOf(':', first + 1);
    if (first < 0 || second < 0) continue;
    const controllers = line.slice(first + 1, second);
    const path = line.slice(second + 1);
    if (line.slice(0, first) === '0' && controllers === '') unified = path;
    if (controllers === 'name=systemd') legacy = path;
  }
  if (unified !== null && (unified !== '/' || legacy === null)) return unified;
  return legacy;
}

/** True when the cgroup path is the scope's own cgroup inside the slice (slices nest: a-b.slice under a.slice). */
export function cgroupIsScope(cgroupPath: string, slice: string, unit: string): boolean {
  return cgroupPath.endsWith(`/${slice}/${unit}`);
}

/**
 * The unit whose own cgroup this is (its last component, when that is a unit name: systemd
 * maps a cgroup to its unit by that name); undefined for a cgroup no unit is named after (a
 * sub-cgroup a process made itself, the root), where only systemd can say.
 */
export function unitOfCgroupPath(cgroupPath: string): string | undefined {
  const last = cgroupPath.slice(cgroupPath.lastIndexOf('/') + 1);
  return /^[^/]+\.(scope|service)$/.test(last) ? last : undefined;
}
