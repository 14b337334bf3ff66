// The hooks most daemon tests share: the guest image made once per file, and every DaemonHost a
// test boots shut down after it, pass or fail.
import { afterEach, beforeAll } from 'vitest';
import type { DaemonHost } from './daemon-host.js';
import { ensureGuestImage, type GuestImage } from './guest.js';

export interface DaemonHostsOfFile {
  /** The guest image (ready once beforeAll ran). */
  guest(): GuestImage;
  /** Shut down after the test that pushed them. */
  hosts: DaemonHost[];
  /** The spec of a VM booting the guest image (128 MiB). */
  spec(name: string): Record<string, unknown>;
}

export function daemonHostsOfFile(): DaemonHostsOfFile {
  let image: GuestImage | undefined;
  const hosts: DaemonHost[] = [];
  beforeAll(async () => {
    image = await ensureGuestImage();
  });
  afterEach(async () => {
    for (const host of hosts.splice(0)) await host.shutdown();
  });
  const guest = (): GuestImage => {
    if (image === undefined) throw new Error('the guest image is made in beforeAll: use it inside a test');
    return image;
  };
  return {
    guest,
    hosts,
    spec: (name) => ({ name, kernel: guest().kernel, initrd: guest().initrd, append: guest().append, memoryMiB: 128 }),
  };
}
