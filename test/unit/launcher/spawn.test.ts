// spawnQemu's guard of ARCHITECTURE.md invariant 1, checked before anything is spawned.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { LaunchError, spawnQemu } from '../../../launcher/index.js';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmkeep-spawn-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function refusal(argv: string[]): Promise<LaunchError | undefined> {
  const placed: number[] = [];
  const error = await spawnQemu(
    // A binary that does not exist: reaching the spawn would fail differently.
    { binary: join(dir, 'no-such-qemu'), argv, env: {} },
    { stderrLog: join(dir, 'qemu.log'), placeInScope: async (pid) => void placed.push(pid) },
  ).then(() => undefined, (e: unknown) => e as LaunchError);
  expect(placed).toEqual([]);
  return error;
}

describe('spawnQemu refuses a QEMU that could run guest code before it is in its scope', () => {
  it.each([
    ['no -S', ['-machine', 'q35']],
    ['an -incoming that listens at once', ['-incoming', 'tcp:127.0.0.1:4444']],
    ['"defer" not as the -incoming value', ['-incoming', 'unix:/x', '-name', 'defer']],
  ])('%s', async (_label, argv) => {
    const error = await refusal(argv);
    expect(error).toBeInstanceOf(LaunchError);
    expect(error?.code).toBe('SPAWN_FAILED');
    expect(error?.message).toMatch(/refusing to start QEMU without -S/);
  });

  it.each([
    ['-S', ['-S']],
    ['-incoming defer', ['-incoming', 'defer']],
  ])('lets %s through to the spawn', async (_label, argv) => {
    const error = await refusal(argv);
    expect(error?.message ?? '').not.toMatch(/refusing to start QEMU without -S/);
  });
});
