import type { InstallationInfo } from './installation.js';
import type { VmSpec } from './spec.js';

// cpr-transfer (hand guest RAM over to a new QEMU through a shared memfd, with the machine
// option aux-ram-share) first shipped in QEMU 10.0.
const CPR_TRANSFER_SINCE_MAJOR = 10;

/** Whether a QEMU of this (probed) version can take part in a cpr-transfer, on either side. */
export function supportsCprTransfer(version: string): boolean {
  const major = Number(/^(\d+)\./.exec(version)?.[1]);
  return Number.isInteger(major) && major >= CPR_TRANSFER_SINCE_MAJOR;
}

/**
 * The spec with its memory backend decided, to be recorded at create: what the spec says, else
 * `memfd-shared` where the installation can do cpr-transfer (so the VM can later be refreshed
 * without copying its RAM), else `anonymous`.
 */
export function withMemoryDefault(spec: VmSpec, info: Pick<InstallationInfo, 'version'>): VmSpec {
  if (spec.memory !== undefined) return spec;
  return { ...spec, memory: { backend: supportsCprTransfer(info.version) ? 'memfd-shared' : 'anonymous' } };
}

/** The backend of a recorded spec; records made before the choice existed are anonymous. */
export function memoryBackendOf(spec: VmSpec): NonNullable<VmSpec['memory']>['backend'] {
  return spec.memory?.backend ?? 'anonymous';
}
