// The files and folders vmkeepd writes under its state and runtime folders are never reached
// through a link someone else planted (ARCHITECTURE.md, invariant 11): folders are checked with
// lstat (a real folder, owned by us), files opened with O_NOFOLLOW and checked on the open
// descriptor (a regular file of ours with one link) before anything is written or truncated,
// and only sockets are unlinked. What fails a check is refused with its path, never "fixed".
import { closeSync, constants, fstatSync, ftruncateSync, openSync, type Stats } from 'node:fs';
import { chmod, chown, lstat, mkdir, open, rm, unlink, type FileHandle } from 'node:fs/promises';
import { LaunchError } from './errors.js';

function unsafe(path: string, what: string, fix: string, cause?: unknown): LaunchError {
  return new LaunchError('UNSAFE_PATH', `${path} ${what}: vmkeepd did not create it and refuses to write through it; fix: ${fix}`,
    cause === undefined ? undefined : { cause });
}

const ourUid = (): number => process.geteuid?.() ?? 0;

/** Why `st` (from lstat) is not a folder of ours, or undefined when it is. */
function folderProblem(st: Stats): string | undefined {
  if (st.isSymbolicLink()) return 'is a symbolic link';
  if (!st.isDirectory()) return 'is not a folder';
  if (st.uid !== ourUid()) return `is owned by uid ${st.uid}, not by vmkeepd (uid ${ourUid()})`;
  return undefined;
}

/**
 * A folder only vmkeepd (and `gid`, with a group mode) may change: created with `mode` when
 * missing; an existing one must be a real folder owned by us, and a looser or other mode or
 * group is set to the wanted one. Resolves to what was tightened (for the log), if anything.
 */
export async function secureFolder(path: string, options: { mode: number; gid?: number }): Promise<string | undefined> {
  await mkdir(path, { recursive: true, mode: options.mode });
  const st = await lstat(path);
  const problem = folderProblem(st);
  if (problem !== undefined) throw unsafe(path, problem, `remove it or make it a folder owned by uid ${ourUid()} (chown ${ourUid()} ${path}), then start vmkeepd again`);
  const changes: string[] = [];
  if (options.gid !== undefined && st.gid !== options.gid) {
    await chown(path, st.uid, options.gid);
    changes.push(`group ${st.gid} -> ${options.gid}`);
  }
  if ((st.mode & 0o7777) !== options.mode) {
    await chmod(path, options.mode);
    changes.push(`mode ${octal(st.mode & 0o7777)} -> ${octal(options.mode)}`);
  }
  return changes.length === 0 ? undefined : `${path}: ${changes.join(', ')}`;
}

function octal(mode: number): string {
  return `0${mode.toString(8).padStart(3, '0')}`;
}

/**
 * How a folder QEMU needs is kept when QEMU runs as `user` (ARCHITECTURE.md, invariant 11):
 * `pass` (the VMs' folder, the pinned modules) only lets the user's group through, `own` (a
 * VM's folder) also lets it make its sockets there. As root, or as vmkeepd's user, root's only.
 */
export function qemuFolderModes(user: { uid: number; gid: number } | undefined): { pass: { mode: number; gid?: number }; own: { mode: number; gid?: number } } {
  if (user === undefined || user.uid === ourUid()) return { pass: { mode: 0o700 }, own: { mode: 0o700 } };
  return { pass: { mode: 0o710, gid: user.gid }, own: { mode: 0o770, gid: user.gid } };
}

/**
 * A VM's own folder: made with an exclusive mkdir; one that exists must be a real folder of
 * ours (a stopped VM's folder from its last run), never a link.
 */
export async function ownVmFolder(path: string, access: { mode: number; gid?: number } = { mode: 0o700 }): Promise<void> {
  let made = true;
  try {
    await mkdir(path, { mode: access.mode });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    made = false;
  }
  if (!made) {
    const problem = folderProblem(await lstat(path));
    if (problem !== undefined) throw unsafe(path, problem, `remove ${path} (it is not vmkeepd's), then try again`);
  }
  // Checked above to be a real folder of ours: the group (QEMU's) and mode are set on it, not through a link.
  if (access.gid !== undefined) await chown(path, ourUid(), access.gid);
  if (access.gid !== undefined || !made) await chmod(path, access.mode);
}

/** Removes a VM's folder, unless it is not ours (then it is left for the administrator). */
export async function removeVmFolder(path: string): Promise<void> {
  const st = await lstat(path).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return undefined;
    throw error;
  });
  if (st === undefined || folderProblem(st) !== undefined) return;
  // rm never follows a link inside the folder: it unlinks the link itself.
  await rm(path, { recursive: true, force: true });
}

/** For `.catch()` of a removal or rename: a file already gone is fine, any other error is not. */
export function ignoreMissing(error: NodeJS.ErrnoException): void {
  if (error.code !== 'ENOENT') throw error;
}

/** Removes a socket left by an earlier QEMU; anything else at `path` is refused. */
export async function removeStaleSocket(path: string): Promise<void> {
  const st = await lstat(path).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return undefined;
    throw error;
  });
  if (st === undefined) return;
  if (!st.isSocket()) throw unsafe(path, st.isSymbolicLink() ? 'is a symbolic link' : 'is not a socket', `remove ${path}, then try again`);
  await unlink(path).catch(ignoreMissing);
}

export type OwnFileUse = 'truncate' | 'append' | 'read' | 'create-new';

const FLAGS: Record<OwnFileUse, number> = {
  truncate: constants.O_WRONLY | constants.O_CREAT,
  append: constants.O_WRONLY | constants.O_CREAT | constants.O_APPEND,
  read: constants.O_RDONLY,
  'create-new': constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL,
};

// libuv adds O_CLOEXEC itself.
const OPEN_SAFELY = constants.O_NOFOLLOW | constants.O_NONBLOCK;

function openFailed(path: string, error: unknown): unknown {
  const code = (error as NodeJS.ErrnoException).code;
  if (code === 'ELOOP') return unsafe(path, 'is a symbolic link', `remove ${path}, then try again`, error);
  // A FIFO without a reader (O_NONBLOCK) or a socket.
  if (code === 'ENXIO') return unsafe(path, 'is not a regular file', `remove ${path}, then try again`, error);
  return error;
}

function ownFileProblem(path: string, st: Stats): LaunchError | undefined {
  const problem = !st.isFile() ? 'is not a regular file'
    : st.uid !== ourUid() ? `is owned by uid ${st.uid}, not by vmkeepd`
      : st.nlink !== 1 ? `has ${st.nlink} hard links` : undefined;
  return problem === undefined ? undefined : unsafe(path, problem, `remove ${path}, then try again`);
}

/**
 * Opens a file of vmkeepd's own without following a link: O_NOFOLLOW (and O_NONBLOCK, so a
 * planted FIFO cannot hang the open), then the descriptor must be a regular file owned by us
 * with a single link (a hard link to another file is refused too). 'truncate' empties it only
 * after the checks, through the checked descriptor. Returns the descriptor.
 */
export function openOwnFile(path: string, use: OwnFileUse, mode = 0o600): number {
  let fd: number;
  try {
    fd = openSync(path, FLAGS[use] | OPEN_SAFELY, mode);
  } catch (error) {
    throw openFailed(path, error);
  }
  try {
    const problem = ownFileProblem(path, fstatSync(fd));
    if (problem !== undefined) throw problem;
    if (use === 'truncate') ftruncateSync(fd, 0);
    return fd;
  } catch (error) {
    closeSync(fd);
    throw error;
  }
}

/** openOwnFile() as a FileHandle (closed by the caller). */
export async function openOwnFileHandle(path: string, use: OwnFileUse, mode = 0o600): Promise<FileHandle> {
  let handle: FileHandle;
  try {
    handle = await open(path, FLAGS[use] | OPEN_SAFELY, mode);
  } catch (error) {
    throw openFailed(path, error);
  }
  try {
    const problem = ownFileProblem(path, await handle.stat());
    if (problem !== undefined) throw problem;
    if (use === 'truncate') await handle.truncate(0);
    return handle;
  } catch (error) {
    await handle.close();
    throw error;
  }
}

const COPY_CHUNK_BYTES = 1024 * 1024;

/** Copies `from` to a new file `to`, both opened by openOwnFileHandle (the log rotation's copy). */
export async function copyOwnFile(from: string, to: string): Promise<void> {
  const source = await openOwnFileHandle(from, 'read');
  try {
    const target = await openOwnFileHandle(to, 'create-new', 0o600);
    try {
      const buffer = Buffer.alloc(COPY_CHUNK_BYTES);
      for (let position = 0; ;) {
        const { bytesRead } = await source.read(buffer, 0, buffer.length, position);
        if (bytesRead === 0) break;
        await target.write(buffer, 0, bytesRead);
        position += bytesRead;
      }
    } finally {
      await target.close();
    }
  } finally {
    await source.close();
  }
}

/** The whole content of a file of ours, read through openOwnFileHandle (a rotated log). */
export async function readOwnFile(path: string): Promise<Buffer> {
  const handle = await openOwnFileHandle(path, 'read');
  try {
    return await handle.readFile();
  } finally {
    await handle.close();
  }
}
