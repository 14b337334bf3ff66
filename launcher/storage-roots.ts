// Storage roots: the folders an operator's VM may take its images from (ARCHITECTURE.md,
// invariant 11). A path is inside a root when its real path (every link resolved) is; a link
// inside the root that points out of it is therefore outside. The check that cannot be raced
// is the one on the open descriptor (/proc/self/fd/N names the file actually opened), done by
// the spawn for every passed file of a VM that lives in the roots.
import { readlinkSync } from 'node:fs';
import { realpath } from 'node:fs/promises';
import { isAbsolute, resolve, sep } from 'node:path';

/** Whether an absolute path, ".." and "." resolved as text, lies in one of the roots (pure). */
export function withinRoots(path: string, roots: readonly string[]): boolean {
  const normal = resolve(path);
  return roots.map((root) => resolve(root)).some((root) => normal === root || normal.startsWith(root === sep ? root : `${root}${sep}`));
}

/** The roots as real paths (a root that does not exist is left out: nothing is inside it). */
export async function realRoots(roots: readonly string[]): Promise<string[]> {
  const resolved = await Promise.all(roots.map((root) => realpath(root).catch(() => undefined)));
  return resolved.filter((r): r is string => r !== undefined);
}

/**
 * Where `path` really is when that is inside a root; undefined when it is outside, missing,
 * relative, or resolves through a link out of every root.
 */
export async function resolveWithinRoots(path: string, roots: readonly string[]): Promise<string | undefined> {
  if (!isAbsolute(path)) return undefined;
  const real = await realpath(path).catch(() => undefined);
  if (real === undefined) return undefined;
  return withinRoots(real, roots) ? real : undefined;
}

/** The file an open descriptor of this process is, by the kernel's own account, if inside a root. */
export function descriptorWithinRoots(fd: number, roots: readonly string[]): { inside: boolean; path: string } {
  const path = readlinkSync(`/proc/self/fd/${fd}`);
  // A deleted file reads "PATH (deleted)": not a file in the roots any more.
  return { inside: isAbsolute(path) && !path.endsWith(' (deleted)') && withinRoots(path, roots), path };
}
