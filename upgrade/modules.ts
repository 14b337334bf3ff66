import { createHash, randomBytes } from 'node:crypto';
import { cp, mkdir, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Installation, InstallationInfo } from '../launcher/index.js';
import { UpgradeError } from './errors.js';

const COMPLETE_MARK = '.vmkeep-pinned';

/** The folder a pinned copy of an installation's modules lives in: one per binary build. */
export function pinnedModuleDirName(installation: Installation, info: InstallationInfo): string {
  const id = info.identity;
  const key = createHash('sha256')
    .update(`${installation.moduleDir ?? ''}\0${id.path}\0${id.dev}\0${id.ino}\0${id.size}\0${id.mtimeMs}`)
    .digest('hex')
    .slice(0, 12);
  return `${installation.name}-${info.version}-${key}`;
}

/**
 * Copies the installation's module folder into `pinRoot` (once per binary build) and returns
 * the installation with moduleDir pointing at the copy. A QEMU loads modules lazily (a device
 * added later, a display): after a package upgrade the original folder holds the NEW build's
 * modules, which an old QEMU cannot load. The copy is made under a temporary name and renamed
 * into place, so a crash never leaves a half copy that looks complete. An installation without
 * a module folder is returned as it is.
 */
export async function pinModuleDir(installation: Installation, info: InstallationInfo, pinRoot: string): Promise<Installation> {
  const source = installation.moduleDir;
  if (source === undefined) return installation;
  const target = join(pinRoot, pinnedModuleDirName(installation, info));
  if (await exists(join(target, COMPLETE_MARK))) return { ...installation, moduleDir: target };
  const temp = join(pinRoot, `.tmp-${randomBytes(6).toString('hex')}`);
  try {
    await mkdir(pinRoot, { recursive: true, mode: 0o700 });
    await cp(source, temp, { recursive: true, dereference: true, errorOnExist: false });
    await writeFile(join(temp, COMPLETE_MARK), `${source}\n`);
    try {
      await rename(temp, target);
    } catch (error) {
      // Another start pinned the same build first: theirs is as good as ours.
      if (!(await exists(join(target, COMPLETE_MARK)))) throw error;
      await rm(temp, { recursive: true, force: true });
    }
  } catch (cause) {
    await rm(temp, { recursive: true, force: true }).catch(() => undefined);
    throw new UpgradeError('PIN_FAILED',
      `cannot pin the module folder ${source} of installation "${installation.name}" into ${pinRoot}: ${(cause as Error).message}; check that both exist and that the state folder has room`,
      { cause });
  }
  return { ...installation, moduleDir: target };
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
