import { describe, expect, it } from 'vitest';
import { formatVmStatus } from '../../../cli/table.js';
import type { VmView } from '../../../daemon/index.js';
import { validateSpec } from '../../../launcher/index.js';

describe('vmkeep status of a VM with NICs', () => {
  it('shows each NIC with its mode, MAC, TAP or forwards, and a restricted user-mode NIC as such', () => {
    const view: VmView = {
      name: 'web', state: 'running', uuid: '123e4567-e89b-12d3-a456-426614174000', machineType: 'pc-q35-7.2', installation: 'a', channel: 'default',
      autostart: 'last-state', createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:00Z', pid: 42, taps: ['vk525400000001b'],
      spec: validateSpec({
        name: 'web', kernel: '/k',
        nics: [
          { mode: 'bridge', bridge: 'br0', mac: '52:54:00:00:00:01' },
          { mode: 'user', mac: '52:54:00:00:00:02', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }] },
          { mode: 'user', mac: '52:54:00:00:00:03', restrict: true },
        ],
      }),
    };
    const text = formatVmStatus(view);
    expect(text).toMatch(/^nic 0: +bridge br0, mac 52:54:00:00:00:01, tap vk525400000001b$/m);
    expect(text).toMatch(/^nic 1: +user, mac 52:54:00:00:00:02, forwards tcp 127\.0\.0\.1:2222 -> 22$/m);
    expect(text).toMatch(/^nic 2: +user, mac 52:54:00:00:00:03, restricted$/m);
    expect(text).not.toContain('problem');
    const cut = formatVmStatus({
      ...view, nicProblems: [{ nic: 0, tap: 'vk525400000001b', bridge: 'br0', problem: 'tap-gone', message: 'TAP vk525400000001b was deleted', fix: 'vmkeep stop web && vmkeep start web' }],
    });
    expect(cut).toMatch(/^nic 0: +bridge br0, mac 52:54:00:00:00:01, tap vk525400000001b\nnic 0 problem: +TAP vk525400000001b was deleted; fix: vmkeep stop web && vmkeep start web$/m);
  });
});
