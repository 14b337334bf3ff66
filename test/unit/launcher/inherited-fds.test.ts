// Descriptors the daemon opens for QEMU: the access asked for, the recorded file only, and
// each one at its number in the child (a real child process reads them).
import { fstatSync, linkSync, readdirSync, readFileSync, readlinkSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { closeFds, inheritFd, openInheritedFds, spawnQemu, stdioWithInherited, waitForProcessExit, type InheritedFd } from '../../../launcher/index.js';

// O_ACCMODE (Linux): fs.constants does not export it.
const ACCESS_MODE_BITS = 3;

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmkeep-fds-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

const file = (path: string, access: 'read-only' | 'read-write', identity?: { dev: number; ino: number }) => ({
  kind: 'file' as const, path, access, direct: false, what: 'disks[0]', ...(identity === undefined ? {} : { identity }),
});

describe('inherited descriptors', () => {
  it('numbers them from 3 and opens each with the access asked for', () => {
    const a = join(dir, 'a');
    writeFileSync(a, 'a');
    const list: InheritedFd[] = [];
    expect(inheritFd(list, file(a, 'read-only'))).toBe(3);
    expect(inheritFd(list, file(a, 'read-write'))).toBe(4);
    const fds = openInheritedFds(list);
    try {
      expect(stdioWithInherited(['ignore', 1, 2], list, fds)).toEqual(['ignore', 1, 2, fds[0], fds[1]]);
      expect(fstatSync(fds[0] as number).ino).toBe(statSync(a).ino);
      const flags = (fd: number): number => {
        const text = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
        const value = Number.parseInt(/flags:\s+(\d+)/.exec(text)?.[1] ?? '', 8);
        if (Number.isNaN(value)) throw new Error(`no flags in ${text}`);
        return value;
      };
      expect(flags(fds[0] as number) & ACCESS_MODE_BITS).toBe(0); // O_RDONLY
      expect(flags(fds[1] as number) & ACCESS_MODE_BITS).toBe(2); // O_RDWR
    } finally {
      closeFds(fds);
    }
  });

  it('refuses a file replaced since it was recorded, and closes what it had opened', () => {
    const a = join(dir, 'a');
    const b = join(dir, 'b');
    writeFileSync(a, 'a');
    writeFileSync(b, 'b');
    const recorded = statSync(a);
    linkSync(b, join(dir, 'b2'));
    renameSync(b, a);
    const list: InheritedFd[] = [];
    inheritFd(list, file(b + '2', 'read-only'));
    inheritFd(list, file(a, 'read-write', { dev: recorded.dev, ino: recorded.ino }));
    expect(() => openInheritedFds(list)).toThrow(/is no longer the file that was recorded.*vmkeep disk accept/s);
  });

  it('says what to do when a file cannot be opened for writing', () => {
    const list: InheritedFd[] = [];
    inheritFd(list, file(join(dir, 'missing'), 'read-write'));
    expect(() => openInheritedFds(list)).toThrow(/cannot open disks\[0\] .*missing read-write.*fix: check that the file exists/);
  });

  it('says what to do when the filesystem refuses O_DIRECT (cache "none")', () => {
    // procfs refuses O_DIRECT like tmpfs did before Linux 6.6.
    const list: InheritedFd[] = [];
    inheritFd(list, { ...file('/proc/self/status', 'read-only'), direct: true });
    expect(() => openInheritedFds(list)).toThrow(/with O_DIRECT: .*its filesystem refuses O_DIRECT .*use "cache": "writeback"/);
  });

  it('hands each descriptor to the child at its number and closes it in the parent', async () => {
    const a = join(dir, 'a');
    const out = join(dir, 'out');
    writeFileSync(a, 'hello');
    const list: InheritedFd[] = [];
    inheritFd(list, file(a, 'read-only'));
    inheritFd(list, file(a, 'read-write'));
    const child = await spawnQemu(
      { binary: '/bin/sh', argv: ['-c', `cat <&3 > ${out}.tmp; readlink /proc/self/fd/4 >> ${out}.tmp; mv ${out}.tmp ${out}`], env: {}, inheritedFds: list },
      { stderrLog: join(dir, 'log') },
    );
    await waitForProcessExit(child.pid, child.startTime, 10_000);
    expect(readFileSync(out, 'utf8')).toBe(`hello${a}\n`);
    expect(openHere(a)).toEqual([]);
  });
});

/** This process's descriptors open on `path`. */
function openHere(path: string): string[] {
  return readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) === path;
    } catch {
      return false;
    }
  });
}
