import {
  existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { Installation, InstallationInfo } from '../../../launcher/index.js';
import { collectPinnedModules, pinModuleDir, pinnedModuleDirName, UpgradeError } from '../../../upgrade/index.js';

const MARK = '.vmkeep-pinned';

let dir: string;
let source: string;
let pinRoot: string;
let firmware: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmkeep-upgrade-modules-'));
  source = join(dir, 'lib', 'qemu');
  pinRoot = join(dir, 'state', 'modules');
  mkdirSync(source, { recursive: true });
  writeFileSync(join(source, 'hw-display-virtio-gpu.so'), 'OLD virtio-gpu build 7.2');
  writeFileSync(join(source, 'ui-gtk.so'), 'OLD ui-gtk build 7.2');
  firmware = join(dir, 'share', 'qemu');
  mkdirSync(firmware, { recursive: true });
  writeFileSync(join(firmware, 'efi-virtio.rom'), 'OLD efi-virtio rom');
});

afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

function installation(patch: Partial<Installation> = {}): Installation {
  return { name: 'system', binary: '/usr/bin/qemu-system-x86_64', moduleDir: source, firmwareDirs: [firmware], ...patch };
}

function info(patch: Partial<InstallationInfo['identity']> = {}): InstallationInfo {
  return {
    identity: { path: '/usr/bin/qemu-system-x86_64', dev: 2049, ino: 5000, size: 20_000_000, mtimeMs: 1_700_000_000_000, ...patch },
    version: '7.2.22',
    machines: [],
  };
}

/** Package-manager style replacement: write a new file next to it, rename it over the old one. */
function replaceByRename(path: string, content: string): void {
  writeFileSync(`${path}.dpkg-new`, content);
  renameSync(`${path}.dpkg-new`, path);
}

function tempLeftovers(): string[] {
  return existsSync(pinRoot) ? readdirSync(pinRoot).filter((n) => n.startsWith('.tmp-')) : [];
}

async function pinFailure(inst: Installation): Promise<UpgradeError> {
  const outcome = await pinModuleDir(inst, info(), pinRoot).then(() => undefined, (err: unknown) => err);
  expect(outcome).toBeInstanceOf(UpgradeError);
  expect((outcome as UpgradeError).code).toBe('PIN_FAILED');
  return outcome as UpgradeError;
}

describe('pinModuleDir', () => {
  it('copies the module folder into pinRoot and points the installation at the copy', async () => {
    const inst = installation();
    const pinned = await pinModuleDir(inst, info(), pinRoot);
    const expected = join(pinRoot, pinnedModuleDirName(inst, info()));
    expect(pinned).toEqual({ ...inst, moduleDir: expected, firmwareDirs: [join(expected, 'firmware', '0')] });
    expect(inst.moduleDir).toBe(source); // the input is not changed
    expect(readFileSync(join(expected, 'hw-display-virtio-gpu.so'), 'utf8')).toBe('OLD virtio-gpu build 7.2');
    expect(readFileSync(join(expected, 'ui-gtk.so'), 'utf8')).toBe('OLD ui-gtk build 7.2');
    expect(readFileSync(join(expected, 'firmware', '0', 'efi-virtio.rom'), 'utf8')).toBe('OLD efi-virtio rom');
    expect(readFileSync(join(expected, MARK), 'utf8')).toBe(`${source}\n${firmware}\n`);
    expect(statSync(pinRoot).mode & 0o777).toBe(0o700);
    expect(tempLeftovers()).toEqual([]);
  });

  it('names the folder after the installation, its version and its build', () => {
    const name = pinnedModuleDirName(installation(), info());
    expect(name).toMatch(/^system-7\.2\.22-[0-9a-f]{12}$/);
    expect(pinnedModuleDirName(installation(), info({ ino: 5001 }))).not.toBe(name);
    expect(pinnedModuleDirName(installation(), info({ mtimeMs: 1 }))).not.toBe(name);
    expect(pinnedModuleDirName(installation({ moduleDir: '/other' }), info())).not.toBe(name);
    expect(pinnedModuleDirName(installation({ firmwareDirs: [] }), info())).not.toBe(name);
  });

  it('names the folder after the build\'s content when its hash is known: the same build from another file shares it', () => {
    const a = { ...info(), sha256: 'a'.repeat(64) };
    const name = pinnedModuleDirName(installation(), a);
    // Another image's file of the same build: other device, inode and mtime, same bytes.
    expect(pinnedModuleDirName(installation(), { ...a, identity: { ...a.identity, dev: 77, ino: 9, mtimeMs: 5 } })).toBe(name);
    expect(pinnedModuleDirName(installation(), { ...a, sha256: 'b'.repeat(64) })).not.toBe(name);
  });

  it('keeps the old firmware after the firmware folder is emptied (its container image removed)', async () => {
    const pinned = await pinModuleDir(installation(), info(), pinRoot);
    rmSync(firmware, { recursive: true });
    expect(readFileSync(join(pinned.firmwareDirs[0] as string, 'efi-virtio.rom'), 'utf8')).toBe('OLD efi-virtio rom');
  });

  it('keeps the old bytes after the source files are replaced by rename', async () => {
    const pinned = await pinModuleDir(installation(), info(), pinRoot);
    replaceByRename(join(source, 'hw-display-virtio-gpu.so'), 'NEW virtio-gpu build 8.2');
    replaceByRename(join(source, 'ui-gtk.so'), 'NEW ui-gtk build 8.2');
    expect(readFileSync(join(source, 'ui-gtk.so'), 'utf8')).toBe('NEW ui-gtk build 8.2');
    expect(readFileSync(join(pinned.moduleDir as string, 'hw-display-virtio-gpu.so'), 'utf8')).toBe('OLD virtio-gpu build 7.2');
    expect(readFileSync(join(pinned.moduleDir as string, 'ui-gtk.so'), 'utf8')).toBe('OLD ui-gtk build 7.2');
  });

  it('keeps the old bytes after a source file is overwritten in place', async () => {
    // A copy, not a hard link: truncating and rewriting the source leaves the pin alone.
    const pinned = await pinModuleDir(installation(), info(), pinRoot);
    writeFileSync(join(source, 'ui-gtk.so'), 'NEW ui-gtk build 8.2');
    expect(readFileSync(join(pinned.moduleDir as string, 'ui-gtk.so'), 'utf8')).toBe('OLD ui-gtk build 7.2');
  });

  it('reuses the pinned folder for a second pin of the same build, without copying again', async () => {
    const first = await pinModuleDir(installation(), info(), pinRoot);
    const mark = statSync(join(first.moduleDir as string, MARK), { bigint: true });
    const module = statSync(join(first.moduleDir as string, 'ui-gtk.so'), { bigint: true });
    // Had it copied again, the copy would hold the new bytes.
    replaceByRename(join(source, 'ui-gtk.so'), 'NEW ui-gtk build 8.2');

    const second = await pinModuleDir(installation(), info(), pinRoot);
    expect(second.moduleDir).toBe(first.moduleDir);
    const markAgain = statSync(join(second.moduleDir as string, MARK), { bigint: true });
    const moduleAgain = statSync(join(second.moduleDir as string, 'ui-gtk.so'), { bigint: true });
    expect(markAgain.ino).toBe(mark.ino);
    expect(markAgain.mtimeNs).toBe(mark.mtimeNs);
    expect(moduleAgain.ino).toBe(module.ino);
    expect(readFileSync(join(second.moduleDir as string, 'ui-gtk.so'), 'utf8')).toBe('OLD ui-gtk build 7.2');
    expect(readdirSync(pinRoot)).toEqual([pinnedModuleDirName(installation(), info())]);
  });

  it('pins a new build into a folder of its own', async () => {
    const old = await pinModuleDir(installation(), info(), pinRoot);
    replaceByRename(join(source, 'ui-gtk.so'), 'NEW ui-gtk build 8.2');
    const fresh = await pinModuleDir(installation(), { ...info({ ino: 6000 }), version: '8.2.2' }, pinRoot);
    expect(fresh.moduleDir).not.toBe(old.moduleDir);
    expect(readFileSync(join(fresh.moduleDir as string, 'ui-gtk.so'), 'utf8')).toBe('NEW ui-gtk build 8.2');
    expect(readFileSync(join(old.moduleDir as string, 'ui-gtk.so'), 'utf8')).toBe('OLD ui-gtk build 7.2');
  });

  it('copies the files behind symbolic links, not the links', async () => {
    const real = join(dir, 'real-modules');
    mkdirSync(real);
    writeFileSync(join(real, 'audio-pa.so'), 'OLD audio-pa');
    symlinkSync(join(real, 'audio-pa.so'), join(source, 'audio-pa.so'));
    const pinned = await pinModuleDir(installation(), info(), pinRoot);
    const copy = join(pinned.moduleDir as string, 'audio-pa.so');
    replaceByRename(join(real, 'audio-pa.so'), 'NEW audio-pa');
    expect(readFileSync(copy, 'utf8')).toBe('OLD audio-pa');
  });

  it('returns an installation without a module folder as it is, touching nothing', async () => {
    const inst: Installation = { name: 'system', binary: '/usr/bin/qemu-system-x86_64', firmwareDirs: [] };
    const result = await pinModuleDir(inst, info(), pinRoot);
    expect(result).toBe(inst);
    expect(existsSync(pinRoot)).toBe(false);
  });

  it('fails with PIN_FAILED and leaves no temporary folder when the source is missing', async () => {
    const missing = join(dir, 'no-such-modules');
    const err = await pinFailure(installation({ moduleDir: missing }));
    expect(err.message).toContain(missing);
    expect(err.message).toContain('"system"');
    expect(err.message).toContain(pinRoot);
    expect(tempLeftovers()).toEqual([]);
  });

  it('fails with PIN_FAILED and removes its partial copy when the copy breaks half way', async () => {
    // The good files are copied first, then a dangling link (dereferenced) cannot be.
    symlinkSync(join(dir, 'gone.so'), join(source, 'zz-dangling.so'));
    await pinFailure(installation());
    expect(tempLeftovers()).toEqual([]);
    expect(readdirSync(pinRoot)).toEqual([]);
  });

  it('fails with PIN_FAILED and leaves nothing when the source is a file, not a folder', async () => {
    const file = join(dir, 'modules.so');
    writeFileSync(file, 'not a folder');
    await pinFailure(installation({ moduleDir: file }));
    expect(tempLeftovers()).toEqual([]);
    expect(readdirSync(pinRoot)).toEqual([]);
  });

  it('fails with PIN_FAILED when pinRoot cannot be created', async () => {
    const blocker = join(dir, 'state-file');
    writeFileSync(blocker, '');
    const outcome = await pinModuleDir(installation(), info(), join(blocker, 'modules')).then(() => undefined, (e: unknown) => e);
    expect((outcome as UpgradeError).code).toBe('PIN_FAILED');
  });
});

describe('collectPinnedModules', () => {
  it('removes the folders no VM uses (and temporary left-overs) and returns them', async () => {
    const a = await pinModuleDir(installation(), info(), pinRoot);
    const b = await pinModuleDir(installation(), { ...info({ ino: 6000 }), version: '8.2.2' }, pinRoot);
    const c = await pinModuleDir(installation(), { ...info({ ino: 7000 }), version: '9.0.0' }, pinRoot);
    const leftover = join(pinRoot, '.tmp-0123456789ab');
    mkdirSync(leftover);
    writeFileSync(join(leftover, 'ui-gtk.so'), 'half');

    const removed = await collectPinnedModules(pinRoot, new Set([b.moduleDir as string]));
    expect(removed.sort()).toEqual([a.moduleDir, c.moduleDir, leftover].sort());
    expect(readdirSync(pinRoot)).toEqual([pinnedModuleDirName(installation(), { ...info({ ino: 6000 }), version: '8.2.2' })]);
    expect(readFileSync(join(b.moduleDir as string, 'ui-gtk.so'), 'utf8')).toBe('OLD ui-gtk build 7.2');
  });

  it('removes nothing when every folder is in use', async () => {
    const a = await pinModuleDir(installation(), info(), pinRoot);
    expect(await collectPinnedModules(pinRoot, new Set([a.moduleDir as string]))).toEqual([]);
    expect(existsSync(a.moduleDir as string)).toBe(true);
  });

  it('returns [] when pinRoot does not exist', async () => {
    expect(await collectPinnedModules(join(dir, 'never-made'), new Set())).toEqual([]);
  });
});
