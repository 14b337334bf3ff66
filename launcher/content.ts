// Binary identity by content. Two files (two containers of two images, a deb reinstall of the
// same version) can hold the same QEMU build at different inodes: only their bytes say so.
// Hashing 20 MB costs tens of milliseconds, so each file is hashed once per process, cached by
// what changes when its bytes can change (device, inode, size, mtime).
import { createHash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { isSameProcess, readExe, type ExeInfo } from './process.js';

/** The key a content hash is cached under: a file whose bytes change gets another one. */
export interface FileStatKey {
  dev: number;
  ino: number;
  size: number;
  mtimeMs: number;
}

const MAX_CACHED = 256;
const hashes = new Map<string, string>();
const inFlight = new Map<string, Promise<string>>();

function keyOf(s: FileStatKey): string {
  return `${s.dev}-${s.ino}-${s.size}-${s.mtimeMs}`;
}

/** Tells the cache a hash already known (e.g. read from the probe cache on disk). */
export function rememberContentHash(s: FileStatKey, sha256: string): void {
  if (hashes.size >= MAX_CACHED) hashes.delete(hashes.keys().next().value as string);
  hashes.set(keyOf(s), sha256);
}

/** The cached hash of a file with this device, inode, size and mtime, if one was computed. */
export function cachedContentHash(s: FileStatKey): string | undefined {
  return hashes.get(keyOf(s));
}

/**
 * sha256 (hex) of the file at `path` with its stat key. The open file is what is hashed and
 * stat'ed, so a rename over the path meanwhile cannot mix two files; a file written while it
 * is hashed (its size or mtime changed) is refused.
 */
export async function hashFile(path: string): Promise<{ stat: FileStatKey; sha256: string }> {
  const handle = await open(path, 'r');
  try {
    return await hashOpen(handle, path);
  } finally {
    await handle.close();
  }
}

/**
 * sha256 of the binary a running process executes, through /proc/PID/exe: that opens the very
 * inode the process runs, even when the file was deleted, replaced by rename, or lived on an
 * overlay whose image was removed. Null when the process (PID + start time) is gone, also
 * when it ended while the file was being opened (a recycled PID is never hashed for it).
 */
export async function hashRunningBinary(pid: number, startTime: string): Promise<{ stat: FileStatKey; sha256: string } | null> {
  if (!isSameProcess(pid, startTime)) return null;
  let handle: FileHandle;
  try {
    handle = await open(`/proc/${pid}/exe`, 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ESRCH') return null;
    throw err;
  }
  try {
    // Opened first, checked second: if the PID is still that process, the file is its binary.
    if (!isSameProcess(pid, startTime)) return null;
    return await hashOpen(handle, `/proc/${pid}/exe`);
  } finally {
    await handle.close();
  }
}

async function hashOpen(handle: FileHandle, label: string): Promise<{ stat: FileStatKey; sha256: string }> {
  const before = await handle.stat();
  const stat: FileStatKey = { dev: before.dev, ino: before.ino, size: before.size, mtimeMs: before.mtimeMs };
  const key = keyOf(stat);
  const known = hashes.get(key);
  if (known !== undefined) return { stat, sha256: known };
  let pending = inFlight.get(key);
  if (pending === undefined) {
    pending = digest(handle, stat, label).finally(() => inFlight.delete(key));
    inFlight.set(key, pending);
  }
  return { stat, sha256: await pending };
}

async function digest(handle: FileHandle, stat: FileStatKey, label: string): Promise<string> {
  const hash = createHash('sha256');
  const buffer = Buffer.allocUnsafe(1 << 20);
  let position = 0;
  for (;;) {
    const { bytesRead } = await handle.read(buffer, 0, buffer.length, position);
    if (bytesRead === 0) break;
    hash.update(buffer.subarray(0, bytesRead));
    position += bytesRead;
  }
  const after = await handle.stat();
  if (after.size !== stat.size || after.mtimeMs !== stat.mtimeMs || position !== stat.size) {
    throw new Error(`${label} changed while it was being hashed (size ${stat.size} -> ${after.size}); retry once it is written`);
  }
  const sha256 = hash.digest('hex');
  rememberContentHash(stat, sha256);
  return sha256;
}

/**
 * The binary a process (PID + start time) runs, with its content hash unless it is the file
 * `current` names (same device and inode, not deleted): that cheap answer needs no hashing.
 * Null when the process is gone. A binary that cannot be hashed is returned without a hash.
 */
export async function readRunningExe(
  pid: number, startTime: string, current?: { dev: number; ino: number },
): Promise<ExeInfo | null> {
  if (!isSameProcess(pid, startTime)) return null;
  const exe = readExe(pid);
  if (exe === null || !isSameProcess(pid, startTime)) return null;
  if (current !== undefined && !exe.deleted && exe.dev === current.dev && exe.ino === current.ino) return exe;
  try {
    const hashed = await hashRunningBinary(pid, startTime);
    if (hashed === null) return null;
    // The inode opened for hashing must be the one readExe saw.
    if (hashed.stat.dev !== exe.dev || hashed.stat.ino !== exe.ino) return exe;
    return { ...exe, sha256: hashed.sha256 };
  } catch {
    return exe;
  }
}
