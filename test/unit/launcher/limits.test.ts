import { describe, expect, it } from 'vitest';
import { LaunchError, scopeLimits, validateSpec } from '../../../launcher/index.js';

describe('scope limits', () => {
  it('memory is the guest plus QEMU\'s overhead, plus the TCG buffer under tcg; tasks grow with the vCPUs', () => {
    expect(scopeLimits({ memoryMiB: 1024, vcpus: 4, accel: 'kvm' })).toEqual({ memoryMaxBytes: (1024 + 256) * 1024 * 1024, tasksMax: 136 });
    expect(scopeLimits({ memoryMiB: 128, vcpus: 1, accel: 'tcg', cpuWeight: 50 })).toEqual({ memoryMaxBytes: (128 + 256 + 1024) * 1024 * 1024, tasksMax: 130, cpuWeight: 50 });
  });

  it('cpuWeight in a spec is 1 to 10000, absent by default', () => {
    expect(validateSpec({ name: 'a', kernel: '/k' }).cpuWeight).toBeUndefined();
    expect(validateSpec({ name: 'a', kernel: '/k', cpuWeight: 500 }).cpuWeight).toBe(500);
    expect(() => validateSpec({ name: 'a', kernel: '/k', cpuWeight: 0 })).toThrow(LaunchError);
  });
});
