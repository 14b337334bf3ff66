// Disk images for tests: a qcow2 overlay over a raw or qcow2 base, made with the real qemu-img,
// and what a running QEMU has open (from /proc). Tools missing fail with the package to install.
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';

/** qemu-img, mkfs.ext4, debugfs and e2fsck: the test fails (never skips) without them. */
export function requireDiskTools(): void {
  for (const [tool, pkg] of [['qemu-img', 'qemu-utils'], ['mkfs.ext4', 'e2fsprogs'], ['debugfs', 'e2fsprogs'], ['e2fsck', 'e2fsprogs']] as const) {
    try {
      execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore', env: { PATH: `${process.env.PATH ?? ''}:/usr/sbin:/sbin` } });
    } catch {
      throw new Error(`${tool} not found: apt-get install ${pkg}`);
    }
  }
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

/** A raw base of `sizeMiB` holding an empty ext4 filesystem, and a qcow2 overlay on it. Returns the overlay's path. */
export function makeOverlayOnRaw(dir: string, sizeMiB = 64, name = 'disk'): { overlay: string; base: string } {
  const base = join(dir, `${name}-base.raw`);
  qemuImg('create', '-q', '-f', 'raw', base, `${sizeMiB}M`);
  execFileSync('mkfs.ext4', ['-q', '-F', '-L', 'vmkeepdata', base], { env: { PATH: `${process.env.PATH ?? ''}:/usr/sbin:/sbin` } });
  const overlay = join(dir, `${name}.qcow2`);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay);
  return { overlay, base };
}

export interface OpenImage {
  fd: number;
  path: string;
  /** The open flags from /proc/PID/fdinfo (octal there). */
  flags: number;
}

/** The files under `dir` that process `pid` has open, with their open flags. */
export function openFilesUnder(pid: number, dir: string): OpenImage[] {
  const out: OpenImage[] = [];
  for (const entry of readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${entry}`);
    } catch {
      continue;
    }
    if (!target.startsWith(`${dir}/`)) continue;
    const info = readFileSync(`/proc/${pid}/fdinfo/${entry}`, 'utf8');
    out.push({ fd: Number(entry), path: target, flags: Number.parseInt(/flags:\s+(\d+)/.exec(info)?.[1] ?? '0', 8) });
  }
  return out;
}

// Linux open flags (fs.constants lacks O_ACCMODE).
export const O_ACCMODE = 3;
