// Backing chains: what qemu-img reports is turned into a recorded chain, unsafe chains are
// refused, and a changed chain is told apart from the recorded one (pure logic).
import { describe, expect, it } from 'vitest';
import {
  chainChangedError, compareChains, diskArguments, LaunchError, parseBackingChain, validateSpec,
  type DiskChain, type DiskLayer, type InheritedFd,
} from '../../../launcher/index.js';

const [overlay, plain] = validateSpec({
  name: 'a', disks: [{ path: '/vm/top.qcow2', format: 'qcow2' }, { path: '/vm/data.raw', format: 'raw', cache: 'none', discard: true }],
}).disks as [NonNullable<ReturnType<typeof validateSpec>['disks'][0]>, NonNullable<ReturnType<typeof validateSpec>['disks'][0]>];

function info(filename: string, format: string, backing?: { file: string; format?: string }): Record<string, unknown> {
  const out: Record<string, unknown> = { filename, format, 'virtual-size': 1024 };
  if (backing !== undefined) {
    out['backing-filename'] = backing.file;
    out['full-backing-filename'] = backing.file;
    if (backing.format !== undefined) out['backing-filename-format'] = backing.format;
  }
  return out;
}

function refusal(fn: () => unknown): LaunchError {
  try {
    fn();
  } catch (error) {
    return error as LaunchError;
  }
  throw new Error('expected a refusal');
}

describe('parseBackingChain', () => {
  it('records each layer, top first, with its stated format', () => {
    const json = JSON.stringify([
      info('/vm/top.qcow2', 'qcow2', { file: '/vm/mid.qcow2', format: 'qcow2' }),
      info('/vm/mid.qcow2', 'qcow2', { file: '/vm/base.raw', format: 'raw' }),
      info('/vm/base.raw', 'raw'),
    ]);
    expect(parseBackingChain(json, overlay, 'disks[0]').map((l) => [l.path, l.format, l.virtualSize]))
      .toEqual([['/vm/top.qcow2', 'qcow2', 1024], ['/vm/mid.qcow2', 'qcow2', 1024], ['/vm/base.raw', 'raw', 1024]]);
  });

  it('takes a single image (qemu-img answers an object, not a list, for raw)', () => {
    expect(parseBackingChain(JSON.stringify(info('/vm/data.raw', 'raw')), plain, 'disks[1]')).toHaveLength(1);
  });

  it('refuses a backing file whose format the overlay does not state, with the rebase that fixes it', () => {
    const json = JSON.stringify([info('/vm/top.qcow2', 'qcow2', { file: '/vm/base.raw' }), info('/vm/base.raw', 'raw')]);
    const error = refusal(() => parseBackingChain(json, overlay, 'disks[0]'));
    expect(error.code).toBe('DISK_REFUSED');
    expect(error.message).toContain('without a stated format');
    expect(error.message).toContain('qemu-img rebase -u -b /vm/base.raw -F raw|qcow2 /vm/top.qcow2');
  });

  it('refuses a backing that is not a local file (json:, nbd:)', () => {
    for (const file of ['json:{"file":{"driver":"file","filename":"/etc/shadow"}}', 'nbd://host/x']) {
      const json = JSON.stringify([info('/vm/top.qcow2', 'qcow2', { file, format: 'raw' }), info(file, 'raw')]);
      expect(refusal(() => parseBackingChain(json, overlay, 'disks[0]')).message).toContain('is not a file path');
    }
  });

  it('refuses an image whose format is not the stated one, and a backing qemu-img could not open', () => {
    expect(refusal(() => parseBackingChain(JSON.stringify(info('/vm/top.qcow2', 'raw')), overlay, 'disks[0]')).message)
      .toContain('is raw, but the spec says qcow2');
    const missing = JSON.stringify([info('/vm/top.qcow2', 'qcow2', { file: '/vm/gone.raw', format: 'raw' })]);
    expect(refusal(() => parseBackingChain(missing, overlay, 'disks[0]')).message).toContain('which qemu-img could not open');
  });
});

const layer = (path: string, ino: number, format: 'raw' | 'qcow2' = 'qcow2'): DiskLayer => ({ path, format, virtualSize: 1, dev: 7, ino });

describe('compareChains', () => {
  const recorded: DiskChain[] = [[layer('/vm/top.qcow2', 1), layer('/vm/base.raw', 2, 'raw')], [layer('/vm/data.raw', 3, 'raw')]];

  it('finds no difference in the same chains (a resize of the top included)', () => {
    const resized = structuredClone(recorded);
    (resized[0] as DiskChain)[0] = { ...(recorded[0] as DiskChain)[0] as DiskLayer, virtualSize: 99 };
    expect(compareChains(recorded, resized)).toBeUndefined();
  });

  it('names the first layer that points elsewhere, was replaced, added or removed', () => {
    const elsewhere = structuredClone(recorded);
    (elsewhere[0] as DiskChain)[1] = layer('/etc/shadow', 2, 'raw');
    expect(compareChains(recorded, elsewhere)).toMatchObject({ disk: 0, layer: 1, now: { path: '/etc/shadow' } });

    const replaced = structuredClone(recorded);
    (replaced[1] as DiskChain)[0] = layer('/vm/data.raw', 4, 'raw');
    expect(compareChains(recorded, replaced)).toMatchObject({ disk: 1, layer: 0, recorded: { ino: 3 }, now: { ino: 4 } });

    const added = structuredClone(recorded);
    (added[0] as DiskChain).push(layer('/vm/older.qcow2', 5));
    expect(compareChains(recorded, added)).toEqual({ disk: 0, layer: 2, recorded: undefined, now: layer('/vm/older.qcow2', 5) });

    const removed = [[layer('/vm/top.qcow2', 1)], recorded[1] as DiskChain];
    expect(compareChains(recorded, removed)).toMatchObject({ disk: 0, layer: 1, now: undefined });

    const format = structuredClone(recorded);
    (format[0] as DiskChain)[1] = layer('/vm/base.raw', 2, 'qcow2');
    expect(compareChains(recorded, format)).toMatchObject({ disk: 0, layer: 1 });
  });

  it('words BACKING_CHAIN_CHANGED with the layer, both sides and the accept command', () => {
    const error = chainChangedError('web', { disk: 0, layer: 1, recorded: layer('/vm/base.raw', 2, 'raw'), now: layer('/etc/shadow', 9, 'raw') });
    expect(error.code).toBe('BACKING_CHAIN_CHANGED');
    expect(error.message).toContain('disks[0] of web: layer 1 changed');
    expect(error.message).toContain('recorded /vm/base.raw (raw, device 7 inode 2), now /etc/shadow (raw, device 7 inode 9)');
    expect(error.message).toContain('vmkeep disk accept web');
  });
});

describe('diskArguments', () => {
  it('opens a cache "none" disk with O_DIRECT and passes discards when asked', () => {
    const inherited: InheritedFd[] = [];
    const argv = diskArguments([plain], [[layer('/vm/data.raw', 3, 'raw')]], inherited, false);
    expect(inherited).toEqual([{ childFd: 3, source: expect.objectContaining({ access: 'read-write', direct: true }) }]);
    expect(JSON.parse(argv[argv.indexOf('-blockdev') + 1] as string)).toMatchObject({ cache: { direct: true }, discard: 'unmap' });
  });

  it('numbers descriptors after ones already taken (another device passed some first)', () => {
    const inherited: InheritedFd[] = [{ childFd: 3, source: { kind: 'file', path: '/x', access: 'read-only', direct: false, what: 'x' } }];
    const argv = diskArguments([plain], [[layer('/vm/data.raw', 3, 'raw')]], inherited, false);
    expect(argv.slice(0, 2)).toEqual(['-add-fd', 'fd=4,set=4,opaque=disk0:/vm/data.raw']);
  });

  it('refuses chains that do not match the disks', () => {
    expect(() => diskArguments([plain], [], [], false)).toThrow(/1 disks but 0 recorded chains/);
    expect(() => diskArguments([plain], [[layer('/vm/other.raw', 3, 'raw')]], [], false)).toThrow(/starts at \/vm\/other.raw/);
  });
});
