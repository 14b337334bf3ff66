// Disks: each image's backing chain, read once and recorded, compared before every QEMU start,
// and attached as -blockdev nodes over descriptors the daemon opened (ARCHITECTURE.md, "Disks
// and passed descriptors"). The record, not the image header, says which files a VM uses.
import { stat } from 'node:fs/promises';
import { escapeQemuOptValue } from './argv.js';
import { LaunchError } from './errors.js';
import { inheritFd, type InheritedFd } from './inherited-fds.js';
import { execaRunner, type ProcessRunner } from './installation.js';
import type { DiskFormat, DiskSpec } from './spec.js';

/** One image of a chain, as recorded. */
export interface DiskLayer {
  path: string;
  format: DiskFormat;
  /** The guest-visible size in bytes (informative: a resize of the top is not a chain change). */
  virtualSize: number;
  /** The file's identity: a file replaced at the same path is another file. */
  dev: number;
  ino: number;
}

/** A disk's chain, top image first; every layer below the top is only ever opened read-only. */
export type DiskChain = DiskLayer[];

/** The first difference between a recorded chain and the one there now. */
export interface ChainDifference {
  disk: number;
  layer: number;
  recorded: DiskLayer | undefined;
  now: DiskLayer | undefined;
}

const QEMU_IMG_TIMEOUT_MS = 30_000;

/** What `qemu-img info --output=json --backing-chain` says of one image (the fields used). */
interface ImageInfo {
  filename?: unknown;
  format?: unknown;
  'virtual-size'?: unknown;
  'backing-filename'?: unknown;
  'full-backing-filename'?: unknown;
  'backing-filename-format'?: unknown;
}

/**
 * The chain of `disk` from qemu-img's JSON (pure; identities are 0, filled in by the caller).
 * Refuses a backing file whose format the overlay does not state (QEMU would probe it: a guest
 * that wrote a qcow2 header into a raw image would then read any host file it names) and a
 * backing that is not an absolute file path (json:, nbd:, ... would let the header pick a protocol).
 */
export function parseBackingChain(json: string, disk: DiskSpec, field: string): DiskChain {
  let parsed: unknown;
  try {
    parsed = JSON.parse(json);
  } catch (cause) {
    throw new LaunchError('DISK_REFUSED', `${field}: qemu-img's answer for ${disk.path} is not JSON; fix: check the installation's qemu-img`, { cause });
  }
  const infos: ImageInfo[] = Array.isArray(parsed) ? parsed as ImageInfo[] : [parsed as ImageInfo];
  const chain: DiskChain = [];
  let expectedPath = disk.path;
  let expectedFormat: string = disk.format;
  for (let i = 0; i < infos.length; i++) {
    const info = infos[i] as ImageInfo;
    const where = i === 0 ? `${field} (${disk.path})` : `${field} layer ${i} (${expectedPath})`;
    if (info.format !== expectedFormat) {
      throw new LaunchError('DISK_REFUSED', `${where} is ${String(info.format)}, but ${i === 0 ? 'the spec says' : 'its overlay states'} ${expectedFormat}; fix: state the image's real format`);
    }
    const virtualSize = typeof info['virtual-size'] === 'number' ? info['virtual-size'] : 0;
    chain.push({ path: expectedPath, format: expectedFormat as DiskFormat, virtualSize, dev: 0, ino: 0 });
    if (info['backing-filename'] === undefined) {
      if (i !== infos.length - 1) throw new LaunchError('DISK_REFUSED', `${where}: qemu-img listed layers below an image without a backing file; fix: check the image`);
      return chain;
    }
    const format = info['backing-filename-format'];
    const backing = info['full-backing-filename'] ?? info['backing-filename'];
    if (format !== 'raw' && format !== 'qcow2') {
      throw new LaunchError('DISK_REFUSED',
        `${where} has the backing file ${String(backing)} ${format === undefined ? 'without a stated format' : `of format ${String(format)}, which vmkeep does not use`}; ` +
        'QEMU would have to guess it, and a guessed format lets a guest read host files. ' +
        `fix: state it: qemu-img rebase -u -b ${String(backing)} -F raw|qcow2 ${expectedPath}`);
    }
    if (typeof backing !== 'string' || !backing.startsWith('/')) {
      throw new LaunchError('DISK_REFUSED', `${where} has the backing ${JSON.stringify(backing)}, which is not a file path; fix: rebase it onto a local file (qemu-img rebase -u -b /path -F ${format} ${expectedPath})`);
    }
    if (i === infos.length - 1) {
      throw new LaunchError('DISK_REFUSED', `${where} names the backing file ${backing}, which qemu-img could not open; fix: restore it or rebase the image`);
    }
    expectedPath = backing;
    expectedFormat = format;
  }
  return chain;
}

/** The first place two sets of chains differ (path, format or file identity), or undefined. Pure. */
export function compareChains(recorded: readonly DiskChain[], now: readonly DiskChain[]): ChainDifference | undefined {
  const disks = Math.max(recorded.length, now.length);
  for (let disk = 0; disk < disks; disk++) {
    const a = recorded[disk] ?? [];
    const b = now[disk] ?? [];
    for (let layer = 0; layer < Math.max(a.length, b.length); layer++) {
      const r = a[layer];
      const n = b[layer];
      if (r === undefined || n === undefined || r.path !== n.path || r.format !== n.format || r.dev !== n.dev || r.ino !== n.ino) {
        return { disk, layer, recorded: r, now: n };
      }
    }
  }
  return undefined;
}

function describeLayer(layer: DiskLayer | undefined): string {
  return layer === undefined ? 'nothing' : `${layer.path} (${layer.format}, device ${layer.dev} inode ${layer.ino})`;
}

/** BACKING_CHAIN_CHANGED for a difference, naming the layer, both sides and the accept command. */
export function chainChangedError(vm: string, difference: ChainDifference): LaunchError {
  const { disk, layer } = difference;
  return new LaunchError('BACKING_CHAIN_CHANGED',
    `disks[${disk}] of ${vm}: layer ${layer}${layer === 0 ? ' (the image itself)' : ''} changed since it was recorded: ` +
    `recorded ${describeLayer(difference.recorded)}, now ${describeLayer(difference.now)}. ` +
    'A QEMU that ran the guest may have rewritten the image header, so nothing was started; ' +
    `fix: check the chain (qemu-img info --backing-chain ${difference.now?.path ?? difference.recorded?.path ?? ''}), then run vmkeep disk accept ${vm}`);
}

export interface ChainReadOptions {
  run?: ProcessRunner;
  /** qemu-img (default: found on PATH). */
  qemuImg?: string;
}

/**
 * Reads every disk's chain now, with qemu-img (-U: the image may be in use by the VM's running
 * QEMU, a refresh reads it while the guest writes) and stat for each layer's identity.
 */
export async function readDiskChains(disks: readonly DiskSpec[], options: ChainReadOptions = {}): Promise<DiskChain[]> {
  const run = options.run ?? execaRunner;
  const qemuImg = options.qemuImg ?? 'qemu-img';
  const chains: DiskChain[] = [];
  for (const [i, disk] of disks.entries()) {
    const field = `disks[${i}]`;
    const result = await run(qemuImg, ['info', '-U', '--backing-chain', '--output=json', '-f', disk.format, disk.path], {
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', LC_ALL: 'C' },
      timeoutMs: QEMU_IMG_TIMEOUT_MS,
    });
    if (result.exitCode !== 0) {
      throw new LaunchError('DISK_REFUSED',
        `${field}: qemu-img could not read ${disk.path}: ${(result.stderr || result.failure || `exit code ${String(result.exitCode)}`).trim()}; fix: check the image (qemu-img check ${disk.path})`);
    }
    const chain = parseBackingChain(result.stdout, disk, field);
    for (const layer of chain) {
      const st = await stat(layer.path);
      layer.dev = st.dev;
      layer.ino = st.ino;
    }
    chains.push(chain);
  }
  return chains;
}

// Stable node names: the same disk has the same nodes in every QEMU of the VM (migration pairs).
export function formatNodeName(disk: number, layer: number): string {
  return layer === 0 ? `disk${disk}` : `disk${disk}-layer${layer}`;
}

function fileNodeName(disk: number, layer: number): string {
  return `${formatNodeName(disk, layer)}-file`;
}

/**
 * The -add-fd, -blockdev and -device arguments of every disk (pure). Each layer's file is one
 * descriptor in its own fdset, its number taken from `inherited`; QEMU opens /dev/fdset/N, never a
 * path. Layers below the top are read-only; the top follows the spec.
 */
export function diskArguments(disks: readonly DiskSpec[], chains: readonly DiskChain[], inherited: InheritedFd[], bootFromDisk: boolean): string[] {
  if (chains.length !== disks.length) {
    throw new LaunchError('INVALID_SPEC', `disks: ${disks.length} disks but ${chains.length} recorded chains; fix: record the chains (vmkeep disk accept NAME)`);
  }
  const argv: string[] = [];
  disks.forEach((disk, d) => {
    const chain = chains[d] as DiskChain;
    if (chain[0]?.path !== disk.path || chain[0].format !== disk.format) {
      throw new LaunchError('INVALID_SPEC', `disks[${d}]: the recorded chain starts at ${chain[0]?.path ?? 'nothing'}, not ${disk.path}; fix: vmkeep disk accept NAME`);
    }
    const direct = disk.cache === 'none';
    // Bottom first: a format node can only name a backing node that already exists.
    [...chain.entries()].reverse().forEach(([l, layer]) => {
      const readOnly = l > 0 || disk.readOnly;
      const childFd = inheritFd(inherited, {
        kind: 'file', path: layer.path, access: readOnly ? 'read-only' : 'read-write', direct,
        identity: { dev: layer.dev, ino: layer.ino }, what: l === 0 ? `disks[${d}]` : `disks[${d}] layer ${l}`,
      });
      // One fdset per file, numbered like the descriptor: unique within the QEMU.
      argv.push('-add-fd', `fd=${childFd},set=${childFd},opaque=${escapeQemuOptValue(`${formatNodeName(d, l)}:${layer.path}`)}`);
      const cache = { direct, 'no-flush': false };
      const discard = disk.discard ? 'unmap' : 'ignore';
      argv.push('-blockdev', JSON.stringify({
        driver: 'file', 'node-name': fileNodeName(d, l), filename: `/dev/fdset/${childFd}`,
        'read-only': readOnly, cache, discard,
      }));
      const format: Record<string, unknown> = {
        driver: layer.format, 'node-name': formatNodeName(d, l), file: fileNodeName(d, l), 'read-only': readOnly, cache, discard,
      };
      // The next layer is named explicitly (null below the last): QEMU never follows a header.
      if (layer.format === 'qcow2') format.backing = l + 1 < chain.length ? formatNodeName(d, l + 1) : null;
      argv.push('-blockdev', JSON.stringify(format));
    });
    const boot = bootFromDisk ? `,bootindex=${d}` : '';
    argv.push('-device', `virtio-blk-pci,id=virtio-disk${d},drive=${formatNodeName(d, 0)}${boot}`);
  });
  return argv;
}
