// Disks in the VM manager (fake QEMU host): chains recorded at create, compared before every
// QEMU start (start, migration destination), accepted by the operator; an image written by one
// VM only (ARCHITECTURE.md, "Disks and passed descriptors").
import { writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DaemonError } from '../../../daemon/index.js';
import { findImageConflict } from '../../../daemon/disks.js';
import { validateSpec, type DiskChain } from '../../../launcher/index.js';
import { openWorld, type World } from './manager-world.js';

let world: World | undefined;
afterEach(async () => {
  await world?.close();
  world = undefined;
});

async function failure(promise: Promise<unknown>): Promise<DaemonError> {
  const error = await promise.then(() => undefined, (e: unknown) => e);
  expect(error, 'expected the operation to fail').toBeInstanceOf(DaemonError);
  return error as DaemonError;
}

async function diskWorld(): Promise<{ w: World; image: string; diskSpec: (name: string, disk?: Record<string, unknown>) => Record<string, unknown> }> {
  const w = await openWorld();
  world = w;
  const image = join(dirname(w.kernel), 'web.qcow2');
  await writeFile(image, '');
  await writeFile(join(dirname(w.kernel), 'base.raw'), '');
  return { w, image, diskSpec: (name, disk = {}) => ({ ...w.spec(name), disks: [{ path: image, format: 'qcow2', ...disk }] }) };
}

function recordOf(w: World, name: string): Record<string, unknown> {
  return JSON.parse(w.fs.files.get(`${w.recordsDir}/${name}.json`)?.toString() ?? '{}') as Record<string, unknown>;
}

const chain = (top: string, topIno: number, base?: { path: string; ino: number }): DiskChain => [
  { path: top, format: 'qcow2', virtualSize: 1 << 30, dev: 1, ino: topIno },
  ...(base === undefined ? [] : [{ path: base.path, format: 'raw' as const, virtualSize: 1 << 30, dev: 1, ino: base.ino }]),
];

describe('disk chains in the manager', () => {
  it('records the chain at create and starts from it', async () => {
    const { w, image, diskSpec } = await diskWorld();
    const base = { path: join(dirname(image), 'base.raw'), ino: 77 };
    w.host.images.set(image, chain(image, 5, base));
    await w.manager.create(diskSpec('web'));
    expect(recordOf(w, 'web').disks).toEqual([chain(image, 5, base)]);
    expect(w.host.of('web')).toHaveLength(1);
  });

  it('refuses a start whose chain changed while the VM was stopped, names the layer, starts nothing; accept lets it start', async () => {
    const { w, image, diskSpec } = await diskWorld();
    const base = join(dirname(image), 'base.raw');
    w.host.images.set(image, chain(image, 5, { path: base, ino: 77 }));
    await w.manager.create(diskSpec('web'));
    await w.manager.stop('web');
    const launched = w.host.started.length;

    // The overlay now points at another file (a header rewritten by a QEMU that ran the guest).
    w.host.images.set(image, chain(image, 5, { path: '/etc/shadow', ino: 3 }));
    const error = await failure(w.manager.start('web'));
    expect(error.code).toBe('BACKING_CHAIN_CHANGED');
    expect(error.message).toContain(`layer 1 changed since it was recorded: recorded ${base} (raw, device 1 inode 77), now /etc/shadow (raw, device 1 inode 3)`);
    expect(error.message).toContain('vmkeep disk accept web');
    expect(w.host.started.length).toBe(launched);

    const accepted = await w.manager.acceptDisks('web');
    expect(accepted.previous).toEqual([chain(image, 5, { path: base, ino: 77 })]);
    expect(accepted.disks).toEqual([chain(image, 5, { path: '/etc/shadow', ino: 3 })]);
    expect(recordOf(w, 'web').disks).toEqual(accepted.disks);
    await expect(w.manager.start('web')).resolves.toMatchObject({ state: 'running' });
  });

  it('refuses a migration destination whose chain changed; the VM keeps running on its QEMU', async () => {
    const { w, image, diskSpec } = await diskWorld();
    const before = await w.manager.create(diskSpec('web'));
    w.current = 'b';
    await w.restart();
    w.host.images.set(image, chain(image, 999));
    const error = await failure(w.manager.refresh('web', { strategy: 'migrate' }));
    expect(error.code).toBe('REFRESH_FAILED');
    expect(error.message).toMatch(/layer 0 \(the image itself\) changed since it was recorded.*vmkeep disk accept web.*keeps running on its old QEMU/s);
    expect(w.host.of('web').map((q) => q.pid)).toEqual([before.pid]);
    expect(await w.manager.get('web')).toMatchObject({ state: 'running', pid: before.pid });
  });

  it('refuses a record without chains (an older vmkeepd) until the operator accepts them', async () => {
    const { w, diskSpec } = await diskWorld();
    await w.manager.create(diskSpec('web'), { start: false });
    const path = `${w.recordsDir}/web.json`;
    const old = recordOf(w, 'web');
    delete old.disks;
    w.fs.files.set(path, Buffer.from(JSON.stringify({ ...old, schema: 3 })));
    await w.restart();
    const error = await failure(w.manager.start('web'));
    expect(error.code).toBe('BACKING_CHAIN_CHANGED');
    expect(error.message).toContain('no recorded backing chain');
    await w.manager.acceptDisks('web');
    await expect(w.manager.start('web')).resolves.toMatchObject({ state: 'running' });
  });

  it('refuses a second VM naming an image another VM writes, with both names; read-only sharing is fine', async () => {
    const { w, image, diskSpec } = await diskWorld();
    await w.manager.create(diskSpec('web'), { start: false });
    const error = await failure(w.manager.create(diskSpec('db'), { start: false }));
    expect(error.code).toBe('IMAGE_IN_USE');
    expect(error.message).toMatch(/^db would use .*web\.qcow2 read-write, but VM web uses the same file read-write/);
    // Read-only in the new VM does not help: web writes it.
    expect((await failure(w.manager.create(diskSpec('ro', { readOnly: true }), { start: false }))).code).toBe('IMAGE_IN_USE');
    expect(w.fs.names(w.recordsDir)).toEqual(['web']);
  });

  it('refuses accept for a VM without disks', async () => {
    const { w } = await diskWorld();
    await w.manager.create(w.spec('plain'), { start: false });
    expect((await failure(w.manager.acceptDisks('plain'))).code).toBe('INVALID_REQUEST');
  });
});

describe('findImageConflict', () => {
  const spec = (readOnly: boolean) => validateSpec({ name: 'x', disks: [{ path: '/vm/a.qcow2', format: 'qcow2', readOnly }] });
  const holder = (name: string, readOnly: boolean, disks: DiskChain[]) => ({ name, spec: { ...spec(readOnly), name }, disks });

  it('finds the same file under another path (same device + inode), and a writer over a backing layer', () => {
    const mine = holder('a', false, [chain('/vm/a.qcow2', 5)]);
    expect(findImageConflict(mine, [holder('b', true, [chain('/other/link.qcow2', 5)])])).toMatchObject({ theirs: { vm: 'b', path: '/other/link.qcow2' } });
    // a writes its top, which b reads as its backing layer.
    expect(findImageConflict(mine, [holder('b', false, [chain('/vm/b.qcow2', 6, { path: '/vm/a.qcow2', ino: 5 })])])).toBeDefined();
  });

  it('lets two VMs share a read-only base below their own overlays', () => {
    const base = { path: '/vm/base.raw', ino: 9 };
    expect(findImageConflict(holder('a', false, [chain('/vm/a.qcow2', 5, base)]), [holder('b', false, [chain('/vm/b.qcow2', 6, base)])])).toBeUndefined();
    expect(findImageConflict(holder('a', true, [chain('/vm/a.qcow2', 5)]), [holder('b', true, [chain('/vm/a.qcow2', 5)])])).toBeUndefined();
  });
});
