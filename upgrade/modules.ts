import { createHash, randomBytes } from 'node:crypto';
import { cp, mkdir, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Installation, InstallationInfo } from '../launcher/index.js';
import { UpgradeError } from './errors.js';

const COMPLETE_MARK = '.vmkeep-pinned';

const FIRMWARE_SUBDIR = 'firmware';

/**
 * The folder a pinned copy of an installation's modules (and firmware) lives in: one per
 * binary build. The build is its content hash when known, so the same QEMU from another file
 * (a new container image of the same build) shares the copy.
 */
export function pinnedModuleDirName(installation: Installation, info: InstallationInfo): string {
  const id = info.identity;
  const build = info.sha256 ?? `${id.path}\0${id.dev}\0${id.ino}\0${id.size}\0${id.mtimeMs}`;
  const key = createHash('sha256')
    .update(`${installation.moduleDir ?? ''}\0${installation.firmwareDirs.join('\0')}\0${build}`)
    .digest('hex')
    .slice(0, 12);
  return `${installation.name}-${info.version}-${key}`;
}

/**
 * Copies the installation's module folder, and its firmware folders into `firmware/N` inside
 * it, into `pinRoot` (once per binary build) and returns the installation pointing at the
 * copies. A QEMU loads modules lazily (a device added later, a display) and reads firmware
 * when a device with an option ROM is added: after a package upgrade the original folders hold
 * the NEW build's files, and after a container's image is removed they hold nothing at all.
 * The pin root is in the state folder (on the host), so the copies outlive both. The copy is
 * made under a temporary name and renamed into place, so a crash never leaves a half copy that
 * looks complete. An installation without a module folder is returned as it is (the records
 * keep a pinned folder alive by its module path).
 */
export async function pinModuleDir(installation: Installation, info: InstallationInfo, pinRoot: string): Promise<Installation> {
  const source = installation.moduleDir;
  if (source === undefined) return installation;
  const target = join(pinRoot, pinnedModuleDirName(installation, info));
  const pinned = {
    ...installation,
    moduleDir: target,
    firmwareDirs: installation.firmwareDirs.map((_, i) => join(target, FIRMWARE_SUBDIR, String(i))),
  };
  if (await exists(join(target, COMPLETE_MARK))) return pinned;
  const temp = join(pinRoot, `.tmp-${randomBytes(6).toString('hex')}`);
  try {
    await mkdir(pinRoot, { recursive: true, mode: 0o700 });
    await cp(source, temp, { recursive: true, dereference: true, errorOnExist: false });
    for (const [i, dir] of installation.firmwareDirs.entries()) {
      await cp(dir, join(temp, FIRMWARE_SUBDIR, String(i)), { recursive: true, dereference: true, errorOnExist: false });
    }
    await writeFile(join(temp, COMPLETE_MARK), `${[source, ...installation.firmwareDirs].join('\n')}\n`);
    try {
      await rename(temp, target);
    } catch (error) {
      // Another start pinned the same build first: theirs is as good as ours.
      if (!(await exists(join(target, COMPLETE_MARK)))) throw error;
      await rm(temp, { recursive: true, force: true });
    }
  } catch (cause) {
    await rm(temp, { recursive: true, force: true }).catch(() => undefined);
    const what = [source, ...installation.firmwareDirs].join(', ');
    throw new UpgradeError('PIN_FAILED',
      `cannot pin the module and firmware folders (${what}) of installation "${installation.name}" into ${pinRoot}: ${(cause as Error).message}; check that they exist and that the state folder has room`,
      { cause });
  }
  return pinned;
}

/**
 * Removes pinned module folders (and left-over temporary copies) that no VM uses. `inUse`
 * holds the moduleDir paths the records name. Returns the removed folders.
 */
export async function collectPinnedModules(pinRoot: string, inUse: ReadonlySet<string>): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(pinRoot);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw error;
  }
  const removed: string[] = [];
  for (const name of names) {
    const dir = join(pinRoot, name);
    if (inUse.has(dir)) continue;
    await rm(dir, { recursive: true, force: true });
    removed.push(dir);
  }
  return removed;
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}
