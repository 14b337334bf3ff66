// Rotation of a VM's logs: the renames, a rotation on real files, and reading them in order.
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { rotateIfLarge, rotatedFiles, rotationSteps } from '../../../daemon/log-rotation.js';

let dir: string | undefined;
afterEach(async () => {
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  dir = undefined;
});

describe('log rotation', () => {
  it('shifts the rotated files up, oldest first, dropping the last', () => {
    expect(rotationSteps('/l/serial.log', 3)).toEqual({
      drop: '/l/serial.log.3',
      renames: [['/l/serial.log.2', '/l/serial.log.3'], ['/l/serial.log.1', '/l/serial.log.2']],
    });
    expect(rotationSteps('/l/serial.log', 0)).toBeUndefined();
  });

  it('rotates only above the limit, keeps KEEP files, and the whole log reads in order', async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmkeep-rotate-'));
    const log = join(dir, 'serial.log');
    const limits = { maxBytes: 10, keep: 2 };
    await writeFile(log, 'aaaaaaaaaa');
    expect(await rotateIfLarge(log, limits)).toBe(false);
    for (const text of ['first line\n', 'second line\n', 'third line\n']) {
      await writeFile(log, text);
      expect(await rotateIfLarge(log, limits)).toBe(true);
      expect(await readFile(log, 'utf8')).toBe('');
    }
    await writeFile(log, 'live\n');
    expect(await rotatedFiles(log)).toEqual([`${log}.2`, `${log}.1`]);
    const all = await Promise.all([...(await rotatedFiles(log)), log].map((f) => readFile(f, 'utf8')));
    expect(all.join('')).toBe('second line\nthird line\nlive\n');
  });

  it('keep 0 only truncates', async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmkeep-rotate-'));
    const log = join(dir, 'qemu.log');
    await writeFile(log, 'x'.repeat(20));
    expect(await rotateIfLarge(log, { maxBytes: 10, keep: 0 })).toBe(true);
    expect(await rotatedFiles(log)).toEqual([]);
  });
});
