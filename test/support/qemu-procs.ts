// The QEMU processes of a VM as the host sees them (by command line, not by what vmkeepd says),
// and their memory: what tests and the bench use to check "one QEMU per VM" and to measure the
// host memory a refresh takes.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { readExe, readProcessIdentity } from '../../launcher/index.js';

/**
 * Host PIDs of the live (not zombie) QEMUs started for VM `name` (`-name guest=NAME`) whose
 * command line names a file under `dir` (the test's own folder: other tests on the same host
 * may run VMs of the same name).
 */
export function qemuPidsOf(name: string, dir: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const args = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      const identity = readProcessIdentity(Number(entry));
      if (args.includes(`guest=${name}`) && args.some((arg) => arg.includes(`${dir}/`)) && identity !== null && identity.state !== 'Z') pids.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

/** For a failure message: each PID's cgroup and command. */
export function describePids(pids: readonly number[]): string {
  return pids.map((pid) => {
    try {
      return `${pid}: ${readFileSync(`/proc/${pid}/cgroup`, 'utf8').trim().split('\n').at(-1) ?? ''} ${readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').slice(0, 3).join(' ')}`;
    } catch {
      return `${pid}: gone`;
    }
  }).join('\n');
}

/**
 * Proportional set size in KiB: a page mapped by two processes counts half in each, so the sum
 * over both QEMUs of a cpr-transfer counts the shared memfd of guest RAM once.
 */
export function pssKiB(pid: number): number {
  try {
    return Number(/^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/**
 * Runs `work` while sampling the summed Pss of VM `name`'s QEMUs (those of `dir`, as qemuPidsOf) (every few ms, new ones
 * included as they appear); the growth is the peak over the sum before `work` began.
 */
export async function peakMemoryGrowth<T>(name: string, dir: string, work: () => Promise<T>): Promise<{ result: T; growthMiB: number; baseMiB: number }> {
  const sum = (): number => qemuPidsOf(name, dir).reduce((total, pid) => total + pssKiB(pid), 0);
  const base = sum();
  let peak = base;
  let running = true;
  const sampler = (async () => {
    while (running) {
      peak = Math.max(peak, sum());
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
  })();
  try {
    const result = await work();
    return { result, growthMiB: (peak - base) / 1024, baseMiB: base / 1024 };
  } finally {
    running = false;
    await sampler;
  }
}

/** The Uid, Gid and Groups lines of /proc/PID/status as numbers (real, effective, saved, fs), and the seccomp mode. */
export function credentials(pid: number): { uids: number[]; gids: number[]; groups: number[]; seccomp: string | undefined } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const numbers = (key: string): number[] => (status.match(new RegExp(`^${key}:\\s*(.*)$`, 'm'))?.[1] ?? '').trim().split(/\s+/).filter((s) => s !== '').map(Number);
  return { uids: numbers('Uid'), gids: numbers('Gid'), groups: numbers('Groups'), seccomp: status.match(/^Seccomp:\s+(\d+)$/m)?.[1] };
}

export interface ScopeProcess {
  pid: number;
  /** /proc/PID/exe as the process's own mount namespace names it. */
  exe: string | undefined;
  uids: number[];
  gids: number[];
}

/**
 * Every live process of every VM scope (`vmkeep-NAME.scope`, and `vmkeep-NAME:GENERATION.scope`
 * of a QEMU that came by live migration; in any slice) under a cgroup tree (a private systemd's
 * root, seen from the host: host PIDs), by VM name: what runs for the VMs, whatever vmkeepd says.
 */
export function scopeProcesses(cgroupRoot: string): Map<string, ScopeProcess[]> {
  const found = new Map<string, ScopeProcess[]>();
  const walk = (dir: string): void => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      const vm = /^vmkeep-([^:]+)(:[^:]+)?\.scope$/.exec(entry.name)?.[1];
      if (vm === undefined) {
        walk(join(dir, entry.name));
        continue;
      }
      const procs = found.get(vm) ?? [];
      let listed: string;
      try {
        listed = readFileSync(join(dir, entry.name, 'cgroup.procs'), 'utf8');
      } catch {
        // the scope went with its last process (a migration's source that quit) since readdir
        continue;
      }
      for (const line of listed.split('\n')) {
        const pid = Number(line);
        if (line === '' || readProcessIdentity(pid)?.state === 'Z') continue;
        try {
          procs.push({ pid, exe: readExe(pid)?.path, ...credentials(pid) });
        } catch {
          // exited between the two reads
        }
      }
      found.set(vm, procs);
    }
  };
  walk(cgroupRoot);
  return found;
}
