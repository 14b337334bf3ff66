import { constants } from 'node:fs';
import { access, open, stat } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { LaunchError, type SpecProblem } from './errors.js';
import type { QemuUser } from './spawn.js';
import { formatSpecProblems, validateSpec, type VmSpec } from './spec.js';

/**
 * Checks that the files a spec names exist and are readable (disks that are not
 * read-only must also be writable), so a start fails with our message instead of QEMU's.
 * Reports every missing file at once with LaunchError('FILE_NOT_FOUND').
 */
export async function checkSpecFiles(spec: VmSpec, qemuUser?: QemuUser): Promise<void> {
  const problems = await fileProblems(spec, qemuUser);
  if (problems.length > 0) {
    throw new LaunchError('FILE_NOT_FOUND',
      `VM "${spec.name}" cannot start, files are missing or inaccessible:\n${problems.map((p) => `  ${p.field}: ${p.message}`).join('\n')}\n` +
      'fix: create the files or correct the paths in the spec');
  }
}

/**
 * validateSpec() and checkSpecFiles() in one: the files the input names are checked even when
 * other fields are wrong, and every problem comes in one INVALID_SPEC error (files alone keep
 * FILE_NOT_FOUND), so a user fixes everything in one go.
 */
export async function validateSpecAndFiles(input: unknown, qemuUser?: QemuUser): Promise<VmSpec> {
  let spec: VmSpec | undefined;
  let invalid: LaunchError | undefined;
  try {
    spec = validateSpec(input);
  } catch (error) {
    if (!(error instanceof LaunchError) || error.code !== 'INVALID_SPEC') throw error;
    invalid = error;
  }
  if (spec !== undefined) {
    await checkSpecFiles(spec, qemuUser);
    return spec;
  }
  const problems = [...(invalid as LaunchError).problems, ...(await fileProblems(namedFiles(input), qemuUser))];
  throw new LaunchError('INVALID_SPEC', formatSpecProblems(problems), { problems });
}

interface NamedFiles {
  kernel?: string | undefined;
  initrd?: string | undefined;
  disks: ReadonlyArray<{ path: string; readOnly: boolean } | undefined>;
}

/** The absolute file paths an unvalidated spec names (others are already reported as invalid). */
function namedFiles(input: unknown): NamedFiles {
  const record = (typeof input === 'object' && input !== null ? input : {}) as Record<string, unknown>;
  const path = (value: unknown): string | undefined => (typeof value === 'string' && isAbsolute(value) ? value : undefined);
  const disks = Array.isArray(record.disks) ? record.disks : [];
  return {
    kernel: path(record.kernel),
    initrd: path(record.initrd),
    disks: disks.map((d: unknown) => {
      const disk = (typeof d === 'object' && d !== null ? d : {}) as Record<string, unknown>;
      const p = path(disk.path);
      return p === undefined ? undefined : { path: p, readOnly: disk.readOnly === true };
    }),
  };
}

async function fileProblems(spec: NamedFiles, qemuUser: QemuUser | undefined): Promise<SpecProblem[]> {
  const wanted: { field: string; path: string; write: boolean; kernel?: boolean; byQemu?: boolean }[] = [];
  if (spec.kernel !== undefined) wanted.push({ field: 'kernel', path: spec.kernel, write: false, kernel: true, byQemu: true });
  if (spec.initrd !== undefined) wanted.push({ field: 'initrd', path: spec.initrd, write: false, byQemu: true });
  spec.disks.forEach((d, i) => {
    if (d !== undefined) wanted.push({ field: `disks[${i}].path`, path: d.path, write: !d.readOnly });
  });
  const problems: SpecProblem[] = [];
  for (const { field, path, write, kernel, byQemu } of wanted) {
    const problem = (await fileProblem(path, write)) ?? (kernel ? await kernelProblem(path) : undefined);
    if (problem !== undefined) {
      problems.push({ field, message: `${path} ${problem}`, fix: 'create the file or correct the path' });
      continue;
    }
    // QEMU opens -kernel and -initrd by path itself, as its unprivileged user.
    const denied = byQemu && qemuUser !== undefined && qemuUser.uid !== 0 ? await deniedTo(path, qemuUser, 'read') : undefined;
    if (denied !== undefined) {
      const fix = `make it readable by ${qemuUser?.name} (chmod o+r ${path}, and o+x on its folders) or move it to a folder that is`;
      problems.push({ field, message: `${path} cannot be read by QEMU's user ${qemuUser?.name}: ${denied}; fix: ${fix}`, fix });
    }
  }
  return problems;
}

/**
 * Why `user` could not read `path`, or pass through it (a folder): a folder on the way it cannot
 * pass, or the file it cannot read; judged on the mode bits by its uid and primary gid (a file
 * only another of its groups may read is reported too). undefined when it can.
 */
export async function deniedTo(path: string, user: QemuUser, want: 'read' | 'pass'): Promise<string | undefined> {
  const allows = (st: { uid: number; gid: number; mode: number }, bit: number): boolean =>
    ((st.uid === user.uid ? st.mode >> 6 : st.gid === user.gid ? st.mode >> 3 : st.mode) & bit) !== 0;
  const folders: string[] = [];
  for (let dir = dirname(resolve(path)); ; dir = dirname(dir)) {
    folders.unshift(dir);
    if (dir === dirname(dir)) break;
  }
  for (const dir of folders) {
    if (!allows(await stat(dir), 0o1)) return `it cannot pass through ${dir}`;
  }
  if (want === 'pass') return allows(await stat(path), 0o1) ? undefined : `it cannot pass through ${path}`;
  return allows(await stat(path), 0o4) ? undefined : 'it may not read the file';
}

async function fileProblem(path: string, write: boolean): Promise<string | undefined> {
  try {
    const s = await stat(path);
    if (s.isDirectory()) return 'is a directory, not a file';
    // QEMU would block on a FIFO and read a device for ever: only regular files are images.
    if (!s.isFile()) return 'is not a regular file (a FIFO, socket or device)';
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'does not exist' : `cannot be read (${errText(err)})`;
  }
  try {
    await access(path, write ? constants.R_OK | constants.W_OK : constants.R_OK);
  } catch (err) {
    return `is not ${write ? 'readable and writable' : 'readable'} (${errText(err)})`;
  }
  return undefined;
}

// The x86 Linux boot protocol: "HdrS" at offset 0x202 of a bzImage.
const BZIMAGE_MAGIC_OFFSET = 0x202;
const BZIMAGE_MAGIC = 'HdrS';

/** QEMU's -kernel loads x86 Linux bzImages; anything else fails only after the VM was recorded. */
async function kernelProblem(path: string): Promise<string | undefined> {
  let magic: string;
  try {
    const fh = await open(path, 'r');
    try {
      const buffer = Buffer.alloc(BZIMAGE_MAGIC.length);
      const { bytesRead } = await fh.read(buffer, 0, buffer.length, BZIMAGE_MAGIC_OFFSET);
      magic = buffer.subarray(0, bytesRead).toString('latin1');
    } finally {
      await fh.close();
    }
  } catch (err) {
    return `cannot be read (${errText(err)})`;
  }
  return magic === BZIMAGE_MAGIC ? undefined : 'is not a Linux kernel image (no bzImage header); use a vmlinuz file';
}

function errText(err: unknown): string {
  return (err as NodeJS.ErrnoException).code ?? String(err);
}
