// The resource limits of a VM's scope, set in the same StartTransientUnit call that creates it
// (ARCHITECTURE.md, invariant 11): a QEMU that goes beyond them is contained by systemd.
import type { VmSpec } from './spec.js';

const MIB = 1024 * 1024;
/**
 * Memory QEMU itself needs beyond the guest's RAM: 88 MiB was measured above a 128 MiB guest
 * (QEMU 7.2, TCG, the test guest booted); 256 MiB leaves room for devices and migration buffers.
 */
export const QEMU_MEMORY_OVERHEAD_MIB = 256;
/** TCG's translation buffer may grow to 1 GiB (QEMU's default tb-size) under a busy guest. */
export const TCG_CODE_BUFFER_MIB = 1024;
/**
 * QEMU's threads: main, RCU, one per vCPU, the block layer's worker pool (up to 64), migration
 * and I/O threads; 128 + 2 per vCPU is well above what it uses and far below a fork bomb.
 */
export const TASKS_BASE = 128;

export interface ScopeLimits {
  memoryMaxBytes: number;
  tasksMax: number;
  cpuWeight?: number;
}

/** The scope limits of a VM (pure). */
export function scopeLimits(spec: Pick<VmSpec, 'memoryMiB' | 'vcpus' | 'accel' | 'cpuWeight'>): ScopeLimits {
  const overheadMiB = QEMU_MEMORY_OVERHEAD_MIB + (spec.accel === 'tcg' ? TCG_CODE_BUFFER_MIB : 0);
  return {
    memoryMaxBytes: (spec.memoryMiB + overheadMiB) * MIB,
    tasksMax: TASKS_BASE + 2 * spec.vcpus,
    ...(spec.cpuWeight === undefined ? {} : { cpuWeight: spec.cpuWeight }),
  };
}
