// A guest's serial console log and its QEMU's stderr log are bounded: above a size they are
// rotated (copy to NAME.1, older ones shifted up to NAME.KEEP, then the live file truncated in
// place). QEMU keeps its file open and writes with O_APPEND (the serial chardev's append=on,
// the stderr log opened "a"), so after the truncation it writes at the start again, without a
// hole. What QEMU writes between the copy and the truncation is lost (copytruncate's known gap).
// The copy and the truncation never follow a link planted in the VM's folder (invariant 11).
import { lstat, readdir, rename, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { copyOwnFile, ignoreMissing, openOwnFileHandle } from '../launcher/index.js';

export const DEFAULT_LOG_MAX_BYTES = 2 * 1024 * 1024;
export const DEFAULT_LOG_KEEP = 3;
/** How often the running VMs' logs are measured. */
export const LOG_CHECK_INTERVAL_MS = 250;

export interface LogLimits {
  /** Size above which a log is rotated. */
  maxBytes: number;
  /** Rotated files kept (NAME.1 newest ... NAME.KEEP oldest); 0: the log is only truncated. */
  keep: number;
}

/**
 * The renames a rotation does (pure), oldest first so nothing is overwritten before it moved:
 * NAME.KEEP is dropped, NAME.(i) becomes NAME.(i+1); then the live file is copied to NAME.1.
 */
export function rotationSteps(path: string, keep: number): { drop: string; renames: Array<[string, string]> } | undefined {
  if (keep < 1) return undefined;
  const renames: Array<[string, string]> = [];
  for (let i = keep - 1; i >= 1; i--) renames.push([`${path}.${i}`, `${path}.${i + 1}`]);
  return { drop: `${path}.${keep}`, renames };
}

/** Rotates `path` when it is larger than the limit; resolves to whether it did. */
export async function rotateIfLarge(path: string, limits: LogLimits): Promise<boolean> {
  const size = await lstat(path).then((s) => s.size, () => 0);
  if (size <= limits.maxBytes) return false;
  const steps = rotationSteps(path, limits.keep);
  if (steps !== undefined) {
    await unlink(steps.drop).catch(ignoreMissing);
    for (const [from, to] of steps.renames) await rename(from, to).catch(ignoreMissing);
    await copyOwnFile(path, `${path}.1`);
  }
  await (await openOwnFileHandle(path, 'truncate')).close();
  return true;
}

/** The rotated files of `path` that exist, oldest first (for reading the whole log in order). */
export async function rotatedFiles(path: string): Promise<string[]> {
  const base = basename(path);
  const names = await readdir(dirname(path)).catch(() => [] as string[]);
  return names
    .map((name) => (name.startsWith(`${base}.`) && /^\d+$/.test(name.slice(base.length + 1)) ? Number(name.slice(base.length + 1)) : undefined))
    .filter((n): n is number => n !== undefined && n >= 1)
    .sort((a, b) => b - a)
    .map((n) => join(dirname(path), `${base}.${n}`));
}

/**
 * Measures the logs `paths()` names every LOG_CHECK_INTERVAL_MS and rotates those over the
 * limit. One pass at a time; a failure is reported and the next pass tries again.
 */
export function startLogRotation(paths: () => string[], limits: LogLimits, onError: (path: string, error: Error) => void): () => void {
  let busy = false;
  const timer = setInterval(() => {
    if (busy) return;
    busy = true;
    void (async () => {
      for (const path of paths()) {
        await rotateIfLarge(path, limits).catch((error: Error) => onError(path, error));
      }
    })().finally(() => {
      busy = false;
    });
  }, LOG_CHECK_INTERVAL_MS);
  timer.unref();
  return () => clearInterval(timer);
}
