import { constants } from 'node:fs';
import { access, stat } from 'node:fs/promises';
import { LaunchError } from './errors.js';
import type { VmSpec } from './spec.js';

/**
 * Checks that the files a spec names exist and are readable (disks that are not
 * read-only must also be writable), so a start fails with our message instead of QEMU's.
 * Reports every missing file at once with LaunchError('FILE_NOT_FOUND').
 */
export async function checkSpecFiles(spec: VmSpec): Promise<void> {
  const wanted: { field: string; path: string; write: boolean }[] = [];
  if (spec.kernel !== undefined) wanted.push({ field: 'kernel', path: spec.kernel, write: false });
  if (spec.initrd !== undefined) wanted.push({ field: 'initrd', path: spec.initrd, write: false });
  spec.disks.forEach((d, i) => wanted.push({ field: `disks[${i}].path`, path: d.path, write: !d.readOnly }));

  const problems: string[] = [];
  for (const { field, path, write } of wanted) {
    const problem = await fileProblem(path, write);
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

function errText(err: unknown): string {
  return (err as NodeJS.ErrnoException).code ?? String(err);
}
