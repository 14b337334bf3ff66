import { describe, expect, it } from 'vitest';
import { kernelCrashed, kernelTrouble } from '../../support/guest.js';

describe('kernelTrouble', () => {
  it('picks the kernel crash lines out of a console, nothing else', () => {
    const text = [
      'GUEST READY', 'GUEST WROTE 246',
      '[    7.764497] kernel BUG at mm/slub.c:419!',
      '[    7.776570] CPU: 0 PID: 0 Comm: swapper/0 Not tainted 6.1.0-57-cloud-amd64 #1',
      '[    7.777129] RIP: 0010:__kmem_cache_free+0x284/0x2a0',
      '[    7.888515] Kernel panic - not syncing: Fatal exception in interrupt',
      'GUEST READY', 'GUEST WRITER FROM 248',
    ].join('\r\n');
    expect(kernelTrouble(text)).toBe('guest kernel: [    7.764497] kernel BUG at mm/slub.c:419! | [    7.777129] RIP: 0010:__kmem_cache_free+0x284/0x2a0 | [    7.888515] Kernel panic - not syncing: Fatal exception in interrupt');
    expect(kernelCrashed(text)).toBe(true);
  });

  it('says so when the console shows no crash, and keeps at most `max` lines', () => {
    expect(kernelTrouble('GUEST READY\nGUEST WROTE 1\n')).toBe('no kernel BUG, Oops or panic on the console');
    expect(kernelCrashed('GUEST READY\nGUEST WROTE 1\n')).toBe(false);
    expect(kernelTrouble('BUG: a\nBUG: b\nBUG: c\n', 2)).toBe('guest kernel: BUG: a | BUG: b');
  });
});
