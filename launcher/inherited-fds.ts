// Files QEMU gets as open descriptors at exec instead of opening paths itself (ARCHITECTURE.md,
// "Disks and passed descriptors"). Node cannot send a descriptor over a socket, so the daemon
// opens each one and spawn's stdio array maps it into the child: entry N becomes fd N there.
import { closeSync, constants, fstatSync, openSync } from 'node:fs';
import { LaunchError } from './errors.js';
import { openOwnFile } from './safe-files.js';

/** The first descriptor number after stdin, stdout and stderr. */
export const FIRST_INHERITED_FD = 3;

/** A file the daemon opens for QEMU. Other kinds (a NIC's TAP device) join this union. */
export interface InheritedFile {
  kind: 'file';
  path: string;
  access: 'read-only' | 'read-write';
  /** O_DIRECT (a disk with cache "none"). */
  direct: boolean;
  /** The file must still be this one (device + inode recorded earlier); checked on the open descriptor. */
  identity?: { dev: number; ino: number };
  /** What it is for, in errors: `disks[0] layer 1`. */
  what: string;
}

/**
 * A log of vmkeepd's own QEMU appends to (the serial console): opened like every file vmkeepd
 * writes (safe-files.ts), so QEMU's unprivileged user needs no access to the file or its folder.
 */
export interface InheritedLog {
  kind: 'log';
  path: string;
  what: string;
}

export type InheritedSource = InheritedFile | InheritedLog;

export interface InheritedFd {
  /** The descriptor's number inside QEMU. */
  childFd: number;
  source: InheritedSource;
}

/**
 * Appends `source` to `list` and returns the descriptor number it will have in the child: the
 * one rule that numbers passed descriptors, shared by every kind of them.
 */
export function inheritFd(list: InheritedFd[], source: InheritedSource): number {
  const childFd = FIRST_INHERITED_FD + list.length;
  list.push({ childFd, source });
  return childFd;
}

/** Opens what `list` names, in order; on any failure closes what was opened and throws. */
export function openInheritedFds(list: readonly InheritedFd[]): number[] {
  const opened: number[] = [];
  try {
    for (const { source } of list) opened.push(openSource(source));
  } catch (error) {
    closeFds(opened);
    throw error;
  }
  return opened;
}

export function closeFds(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      closeSync(fd);
    } catch {
      // already closed: nothing is left to release
    }
  }
}

/**
 * spawn's stdio array: 0-2 as given, then each opened descriptor at its child number (gaps,
 * which inheritFd never makes, stay closed).
 */
export function stdioWithInherited(base: Array<'ignore' | number>, list: readonly InheritedFd[], opened: readonly number[]): Array<'ignore' | number> {
  const stdio = [...base];
  list.forEach(({ childFd }, i) => {
    while (stdio.length < childFd) stdio.push('ignore');
    stdio[childFd] = opened[i] as number;
  });
  return stdio;
}

function openSource(source: InheritedSource): number {
  if (source.kind === 'log') return openOwnFile(source.path, 'append', 0o640);
  const flags = (source.access === 'read-write' ? constants.O_RDWR : constants.O_RDONLY)
    | (source.direct ? constants.O_DIRECT : 0)
    // A planted device or FIFO must not block or act on open.
    | constants.O_NONBLOCK | constants.O_NOCTTY;
  let fd: number;
  try {
    fd = openSync(source.path, flags);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const fix = code === 'EINVAL' && source.direct
      ? `its filesystem refuses O_DIRECT (tmpfs before Linux 6.6, some network and FUSE filesystems): use "cache": "writeback", or keep the image on a filesystem that supports direct I/O (ext4, xfs)`
      : code === 'EACCES' || code === 'EROFS' || code === 'EPERM'
        ? `give vmkeepd ${source.access === 'read-write' ? 'read and write' : 'read'} access to it${source.access === 'read-write' ? ', or mark the disk "readOnly"' : ''}`
        : 'check that the file exists and the path is right';
    throw new LaunchError('FILE_NOT_FOUND', `cannot open ${source.what} ${source.path} ${source.access}${source.direct ? ' with O_DIRECT' : ''}: ${(error as Error).message}; fix: ${fix}`, { cause: error });
  }
  const st = fstatSync(fd);
  const expected = source.identity;
  if (expected !== undefined && (st.dev !== expected.dev || st.ino !== expected.ino)) {
    closeSync(fd);
    throw new LaunchError('FILE_CHANGED',
      `${source.what} ${source.path} is no longer the file that was recorded (device ${expected.dev} inode ${expected.ino}, now device ${st.dev} inode ${st.ino}); ` +
      'fix: check the file, then accept it (vmkeep disk accept NAME)');
  }
  if (!st.isFile() && !st.isBlockDevice()) {
    closeSync(fd);
    throw new LaunchError('FILE_NOT_FOUND', `${source.what} ${source.path} is neither a regular file nor a block device; fix: name the image file itself`);
  }
  return fd;
}
