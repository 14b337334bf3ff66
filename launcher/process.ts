import { readFileSync, readlinkSync, statSync } from 'node:fs';

export interface ProcessIdentity {
  pid: number;
  /** Field 22 of /proc/PID/stat (clock ticks since boot): with the PID, names one process for good. */
  startTime: string;
  /** Field 3: R, S, D, Z (zombie), X (dead), ... */
  state: string;
}

export interface ExeInfo {
  /** The binary's path, without the kernel's " (deleted)" suffix. */
  path: string;
  /**
   * The file was removed or replaced after the process started: `mv` by a package upgrade
   * (the link reads "(deleted)"), or its container image was removed (the overlay's lower file
   * is gone: the link still reads the plain path, but the inode has no links left).
   */
  deleted: boolean;
  /**
   * The path no longer leads to that file although it still has links: its file system was
   * unmounted under the running process (e.g. a snap revision that snapd discarded: the kernel
   * then reads the path inside the detached squashfs, such as /usr/bin/qemu-system-x86_64).
   */
  unreachable?: true;
  /** Device and inode of the file the process runs, even when it was deleted. */
  dev: number;
  ino: number;
  /** sha256 of the bytes the process runs, when an adapter hashed them (hashRunningBinary). */
  sha256?: string;
}

/**
 * Parses /proc/PID/stat. The command name (field 2) is in parentheses and may itself contain
 * spaces and parentheses, so the fields after it are found from the LAST ')'.
 */
export function parseProcStat(text: string): ProcessIdentity {
  const open = text.indexOf('(');
  const close = text.lastIndexOf(')');
  const pid = Number(text.slice(0, open).trim());
  const rest = text.slice(close + 1).trim().split(/\s+/);
  // rest[0] is field 3 (state), so field N is rest[N - 3].
  const state = rest[0];
  const startTime = rest[22 - 3];
  if (open < 0 || close < open || !Number.isSafeInteger(pid) || state === undefined || startTime === undefined || !/^\d+$/.test(startTime)) {
    throw new Error(`malformed /proc stat line: ${JSON.stringify(text.slice(0, 200))}`);
  }
  return { pid, startTime, state };
}

/** The identity of a live (or zombie) process, or null when no process has this PID. */
export function readProcessIdentity(pid: number): ProcessIdentity | null {
  if (!Number.isSafeInteger(pid) || pid <= 0) return null;
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch (err) {
    if (isGone(err)) return null;
    throw err;
  }
  return parseProcStat(text);
}

/**
 * True only when `pid` is still the process that had `startTime`, and it has not exited:
 * a zombie still answers kill(0) and a recycled PID has a different start time.
 */
export function isSameProcess(pid: number, startTime: string): boolean {
  const identity = readProcessIdentity(pid);
  return identity !== null && identity.startTime === startTime && identity.state !== 'Z' && identity.state !== 'X';
}

/** Which binary a process runs; null when the process is gone (or a zombie). */
export function readExe(pid: number): ExeInfo | null {
  if (!Number.isSafeInteger(pid) || pid <= 0) return null;
  try {
    const target = readlinkSync(`/proc/${pid}/exe`);
    const s = statSync(`/proc/${pid}/exe`);
    const suffix = ' (deleted)';
    const marked = target.endsWith(suffix);
    const path = marked ? target.slice(0, -suffix.length) : target;
    const deleted = marked || s.nlink === 0;
    const info: ExeInfo = { path, deleted, dev: s.dev, ino: s.ino };
    if (!deleted && !leadsTo(path, s.dev, s.ino)) info.unreachable = true;
    return info;
  } catch (err) {
    if (isGone(err)) return null;
    throw err;
  }
}

/** Whether `path`, as this process sees it, is the file dev/ino. */
function leadsTo(path: string, dev: number, ino: number): boolean {
  try {
    const s = statSync(path);
    return s.dev === dev && s.ino === ino;
  } catch {
    return false;
  }
}

function isGone(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'ESRCH';
}
