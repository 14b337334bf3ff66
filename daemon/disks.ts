// The daemon's side of disks (ARCHITECTURE.md, "Disks and passed descriptors"): the recorded
// chains are the authority, compared before every QEMU start; an image is written by one VM only.
import { chainChangedError, compareChains, LaunchError, type DiskChain, type VmSpec } from '../launcher/index.js';
import { DaemonError } from './errors.js';

/** What a VM holds: its name, its disks' access, its recorded chains. */
export interface DiskHolder {
  name: string;
  spec: VmSpec;
  disks: readonly DiskChain[] | undefined;
}

/** One file's use by a VM: read-write only for a disk's top layer that is not readOnly. */
interface ImageUse {
  vm: string;
  path: string;
  dev: number;
  ino: number;
  writes: boolean;
}

function usesOf(holder: DiskHolder): ImageUse[] {
  return (holder.disks ?? []).flatMap((chain, d) => chain.map((layer, l) => ({
    vm: holder.name, path: layer.path, dev: layer.dev, ino: layer.ino,
    writes: l === 0 && holder.spec.disks[d]?.readOnly !== true,
  })));
}

/**
 * The first image `candidate` would share with another VM where either of them writes it
 * (same device + inode, so another path to the same file counts), or undefined. Pure.
 */
export function findImageConflict(candidate: DiskHolder, others: readonly DiskHolder[]): { mine: ImageUse; theirs: ImageUse } | undefined {
  const mine = usesOf(candidate);
  for (const other of others) {
    if (other.name === candidate.name) continue;
    for (const theirs of usesOf(other)) {
      const same = mine.find((m) => m.dev === theirs.dev && m.ino === theirs.ino && (m.writes || theirs.writes));
      if (same !== undefined) return { mine: same, theirs };
    }
  }
  return undefined;
}

/** IMAGE_IN_USE naming both VMs, or nothing. */
export function refuseSharedImages(candidate: DiskHolder, others: readonly DiskHolder[]): void {
  const conflict = findImageConflict(candidate, others);
  if (conflict === undefined) return;
  const { mine, theirs } = conflict;
  const how = (use: ImageUse): string => (use.writes ? 'read-write' : 'read-only (as a disk or a backing layer)');
  throw new DaemonError('IMAGE_IN_USE',
    `${candidate.name} would use ${mine.path} ${how(mine)}, but VM ${theirs.vm} uses the same file${theirs.path === mine.path ? '' : ` (as ${theirs.path})`} ${how(theirs)}; ` +
    'two QEMUs writing one image (or one writing another\'s backing file) corrupt it. ' +
    `fix: give ${candidate.name} its own image, e.g. a qcow2 overlay: qemu-img create -f qcow2 -b ${mine.path} -F raw|qcow2 NEW.qcow2 (only over an image no VM writes)`);
}

/**
 * The chains to start a QEMU from: the recorded ones, if the files still are what was recorded.
 * `now` is read just before (after any earlier QEMU of the VM ran). Throws BACKING_CHAIN_CHANGED.
 */
export function chainsForStart(vm: string, spec: VmSpec, recorded: readonly DiskChain[] | undefined, now: readonly DiskChain[]): readonly DiskChain[] {
  if (spec.disks.length === 0) return [];
  if (recorded === undefined) {
    throw new DaemonError('BACKING_CHAIN_CHANGED',
      `${vm} has disks but no recorded backing chain (its record comes from a vmkeepd that did not record chains), so nothing was started; ` +
      `fix: check the chain (qemu-img info --backing-chain ${spec.disks[0]?.path ?? ''}), then run vmkeep disk accept ${vm}`);
  }
  const difference = compareChains(recorded, now);
  if (difference !== undefined) throw asDaemonDiskError(chainChangedError(vm, difference));
  return recorded;
}

/** A launcher's disk refusal as the API's error, with its own code. */
export function asDaemonDiskError(error: unknown): unknown {
  if (!(error instanceof LaunchError)) return error;
  if (error.code === 'BACKING_CHAIN_CHANGED' || error.code === 'FILE_CHANGED') return new DaemonError('BACKING_CHAIN_CHANGED', error.message, { cause: error });
  if (error.code === 'DISK_REFUSED') return new DaemonError('DISK_REFUSED', error.message, { cause: error });
  return error;
}
