import { describe, expect, it } from 'vitest';
import type { BinaryIdentity, ExeInfo, InstallationInfo } from '../../../launcher/index.js';
import { assessStaleness, type StalenessInput } from '../../../upgrade/index.js';

const CURRENT_ID: BinaryIdentity = { path: '/usr/bin/qemu-system-x86_64', dev: 2049, ino: 5000, size: 20_000_000, mtimeMs: 1_700_000_000_000 };
const CURRENT_INFO: InstallationInfo = { identity: CURRENT_ID, version: '8.2.2', machines: [] };
const CURRENT = { installation: { name: 'system', binary: CURRENT_ID.path, firmwareDirs: [] }, info: CURRENT_INFO };

function input(patch: Partial<StalenessInput>): StalenessInput {
  return {
    launched: { installation: 'system', binary: { ...CURRENT_ID, version: '8.2.2' } },
    exe: { path: CURRENT_ID.path, deleted: false, dev: CURRENT_ID.dev, ino: CURRENT_ID.ino },
    current: CURRENT,
    ...patch,
  };
}

describe('assessStaleness: the running exe', () => {
  it('is stale when the exe reads (deleted)', () => {
    // A package upgrade renamed a new file over the path: same path, the old inode runs on.
    const exe: ExeInfo = { path: CURRENT_ID.path, deleted: true, dev: 2049, ino: 4000 };
    const s = assessStaleness(input({ exe }));
    expect(s.stale).toBe(true);
    expect(s.reasons).toHaveLength(1);
    expect(s.reasons[0]).toContain('(deleted)');
    expect(s.reasons[0]).toContain(CURRENT_ID.path);
  });

  it('is stale when the exe is another file (other inode or device)', () => {
    for (const exe of [
      { path: '/snap/qemu/41/usr/bin/qemu-system-x86_64', deleted: false, dev: 2049, ino: 4000 },
      { path: CURRENT_ID.path, deleted: false, dev: 2050, ino: CURRENT_ID.ino },
    ]) {
      const s = assessStaleness(input({ exe }));
      expect(s.stale).toBe(true);
      expect(s.reasons[0]).toContain(`it runs ${exe.path}`);
      expect(s.reasons[0]).toContain('"system"');
    }
  });

  it('names the binary it was started from when its path no longer leads to it (a discarded snap revision)', () => {
    // snapd unmounted /snap/vmkeep/x1 under the running QEMU: the kernel reads the path inside the
    // detached squashfs, which on the host is the system's QEMU path.
    const started = '/snap/vmkeep/x1/usr/bin/qemu-system-x86_64';
    const exe: ExeInfo = { path: '/usr/bin/qemu-system-x86_64', deleted: false, unreachable: true, dev: 7, ino: 12 };
    const s = assessStaleness(input({ exe, launched: { installation: 'rev-x1', binary: { ...CURRENT_ID, path: started, dev: 7, ino: 12, version: '7.2.22' } } }));
    expect(s.stale).toBe(true);
    expect(s.reasons).toEqual([expect.stringContaining(`it runs ${started}, which is no longer at that path`)]);
    expect(s.reasons[0]).toContain('snap revision snapd discarded');
    expect(s.reasons[0]).not.toContain('it runs /usr/bin/qemu-system-x86_64');
  });

  it('is not stale when the exe is the current binary', () => {
    const s = assessStaleness(input({}));
    expect(s).toEqual({ stale: false, reasons: [], runningVersion: '8.2.2', currentVersion: '8.2.2', currentIs: 'same' });
  });

  it('trusts the exe over the recorded identity', () => {
    // Recorded identity differs (e.g. size), but the process runs the current file: not stale.
    const s = assessStaleness(input({ launched: { installation: 'system', binary: { ...CURRENT_ID, size: 1, version: '8.2.2' } } }));
    expect(s.stale).toBe(false);
  });
});

describe('assessStaleness: exe not readable, recorded identity as fallback', () => {
  it('is not stale when the recorded identity equals the current binary', () => {
    const s = assessStaleness(input({ exe: null }));
    expect(s.stale).toBe(false);
    expect(s.reasons).toEqual([]);
  });

  it('is stale when any part of the recorded identity differs', () => {
    for (const diff of [{ dev: 1 }, { ino: 1 }, { size: 1 }, { mtimeMs: 1 }]) {
      const s = assessStaleness(input({ exe: null, launched: { installation: 'system', binary: { ...CURRENT_ID, ...diff, version: '8.2.2' } } }));
      expect(s.stale, JSON.stringify(diff)).toBe(true);
      expect(s.reasons[0]).toContain('recorded identity');
    }
  });

  it('is stale when no binary was recorded, and then has no running version', () => {
    const s = assessStaleness(input({ exe: null, launched: { installation: 'system' } }));
    expect(s.stale).toBe(true);
    expect(s.reasons).toEqual(['the binary it was started from is unknown']);
    expect(s.runningVersion).toBeUndefined();
    expect(s.currentIs).toBeUndefined();
    expect(s.currentVersion).toBe('8.2.2');
  });
});

describe('assessStaleness: versions', () => {
  it('prefers the running QEMU\'s own version over the recorded one', () => {
    const s = assessStaleness(input({ runningVersion: '7.2.22', launched: { installation: 'system', binary: { ...CURRENT_ID, version: '9.0.0' } } }));
    expect(s.runningVersion).toBe('7.2.22');
    expect(s.currentIs).toBe('newer');
  });

  it('falls back to the recorded version', () => {
    const s = assessStaleness(input({ launched: { installation: 'system', binary: { ...CURRENT_ID, version: '9.0.0' } } }));
    expect(s.runningVersion).toBe('9.0.0');
    expect(s.currentIs).toBe('older');
  });

  it('says whether the current installation is newer, the same or older', () => {
    expect(assessStaleness(input({ runningVersion: '7.2.22' })).currentIs).toBe('newer');
    expect(assessStaleness(input({ runningVersion: '8.2.2 (Debian 1:8.2.2+ds)' })).currentIs).toBe('same');
    expect(assessStaleness(input({ runningVersion: '9.1.0' })).currentIs).toBe('older');
  });

  it('keeps a version comparison apart from staleness: a stale VM may run the same version', () => {
    const exe: ExeInfo = { path: CURRENT_ID.path, deleted: true, dev: 2049, ino: 4000 };
    const s = assessStaleness(input({ exe, runningVersion: '8.2.2' }));
    expect(s.stale).toBe(true);
    expect(s.currentIs).toBe('same');
  });
});

describe('assessStaleness: binary identity by content', () => {
  const SAME = 'c'.repeat(64);
  const OTHER = 'd'.repeat(64);
  const current = (sha256: string | undefined): StalenessInput['current'] => ({ ...CURRENT, info: { ...CURRENT_INFO, ...(sha256 === undefined ? {} : { sha256 }) } });

  it('same build at another inode (a new container image of the same QEMU): not stale', () => {
    const exe: ExeInfo = { path: CURRENT_ID.path, deleted: false, dev: 77, ino: 4000, sha256: SAME };
    const s = assessStaleness(input({ exe, current: current(SAME), runningVersion: '8.2.2' }));
    expect(s).toMatchObject({ stale: false, reasons: [], currentIs: 'same' });
  });

  it('changed build (other bytes), even of the same version: stale, both hashes named', () => {
    const exe: ExeInfo = { path: CURRENT_ID.path, deleted: false, dev: 77, ino: 4000, sha256: OTHER };
    const s = assessStaleness(input({ exe, current: current(SAME), runningVersion: '8.2.2' }));
    expect(s.stale).toBe(true);
    expect(s.currentIs).toBe('same');
    expect(s.reasons[0]).toContain('another build');
    expect(s.reasons[0]).toContain(OTHER.slice(0, 12));
    expect(s.reasons[0]).toContain(SAME.slice(0, 12));
  });

  it('deleted file (a reinstall of the same package version renamed over it): not stale when the bytes are the same', () => {
    const exe: ExeInfo = { path: CURRENT_ID.path, deleted: true, dev: CURRENT_ID.dev, ino: 4000, sha256: SAME };
    expect(assessStaleness(input({ exe, current: current(SAME) })).stale).toBe(false);
    const upgraded = assessStaleness(input({ exe: { ...exe, sha256: OTHER }, current: current(SAME) }));
    expect(upgraded.stale).toBe(true);
    expect(upgraded.reasons[0]).toContain('replaced or removed on disk');
  });

  it('removed overlay (the image is gone: plain path, no links left, another device): decided by content', () => {
    // readExe reports a file with no links left as deleted, although the link has no "(deleted)".
    const exe: ExeInfo = { path: CURRENT_ID.path, deleted: true, dev: 88, ino: CURRENT_ID.ino, sha256: SAME };
    expect(assessStaleness(input({ exe, current: current(SAME) })).stale).toBe(false);
    const v3 = assessStaleness(input({ exe: { ...exe, sha256: OTHER }, current: current(SAME) }));
    expect(v3.stale).toBe(true);
    expect(v3.reasons[0]).toContain('no links left');
  });

  it('same bytes but a running QEMU that reports another version: stale (identity is content plus version)', () => {
    const exe: ExeInfo = { path: CURRENT_ID.path, deleted: false, dev: 77, ino: 4000, sha256: SAME };
    const s = assessStaleness(input({ exe, current: current(SAME), runningVersion: '8.2.1' }));
    expect(s.stale).toBe(true);
    expect(s.reasons[0]).toContain('8.2.1');
  });

  it('keeps the cheap path: the current file itself is current without any hash', () => {
    const exe: ExeInfo = { path: CURRENT_ID.path, deleted: false, dev: CURRENT_ID.dev, ino: CURRENT_ID.ino };
    expect(assessStaleness(input({ exe, current: current(SAME) })).stale).toBe(false);
  });

  it('without a hash of the running binary, another file is stale as before', () => {
    const exe: ExeInfo = { path: CURRENT_ID.path, deleted: false, dev: 77, ino: 4000 };
    const s = assessStaleness(input({ exe, current: current(SAME) }));
    expect(s.stale).toBe(true);
    expect(s.reasons[0]).not.toContain('sha256');
  });
});
