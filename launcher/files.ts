import { constants } from 'node:fs';
import { access, open, stat } from 'node:fs/promises';
import { LaunchError } from './errors.js';
import type { VmSpec } from './spec.js';

/**
 * Checks that the files a spec names exist and are readable (disks that are not
 * read-only must also be writable), so a start fails with our message instead of QEMU's.
 * Reports every missing file at once with LaunchError('FILE_NOT_FOUND').
 */
export async function checkSpecFiles(spec: VmSpec): Promise<void> {
  const wanted: { field: string; path: string; write: boolean; kernel?: boolean }[] = [];
  if (spec.kernel !== undefined) wanted.push({ field: 'kernel', path: spec.kernel, write: false, kernel: true });
  if (spec.initrd !== undefined) wanted.push({ field: 'initrd', path: spec.initrd, write: false });
  spec.disks.forEach((d, i) => wanted.push({ field: `disks[${i}].path`, path: d.path, write: !d.readOnly }));

  const problems: string[] = [];
  for (const { field, path, write, kernel } of wanted) {
    const problem = (await fileProblem(path, write)) ?? (kernel ? await kernelProblem(path) : undefined);
    if (problem !== undefined) problems.push(`  ${field}: ${path} ${problem}`);
  }
  if (problems.length > 0) {
    throw new LaunchError('FILE_NOT_FOUND',
      `VM "${spec.name}" cannot start, files are missing or inaccessible:\n${problems.join('\n')}\n` +
      'fix: create the files or correct the paths in the spec');
  }
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
