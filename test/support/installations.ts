// Two (or more) QEMU installations made from the Debian QEMU, the way a package upgrade
// presents them to vmkeepd: a second copy of the binary at another path with its own module
// folder, and an installations file whose "current" the test switches.
import { appendFile, chmod, copyFile, cp, mkdir, rename, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { requireQemu } from './guest.js';

export const SYSTEM_MODULE_DIR = '/usr/lib/x86_64-linux-gnu/qemu';
// A copied Debian QEMU looks for firmware next to itself: these are where the packages put it.
export const SYSTEM_FIRMWARE_DIRS = ['/usr/share/qemu', '/usr/share/seabios', '/usr/lib/ipxe/qemu'];

export interface TestInstallation {
  name: string;
  binary: string;
  moduleDir?: string;
  firmwareDirs: string[];
}

/** The system QEMU as installation `name`, its modules named so that they are pinned. */
export function systemInstallation(name: string): TestInstallation {
  return { name, binary: requireQemu(), moduleDir: SYSTEM_MODULE_DIR, firmwareDirs: [] };
}

/**
 * Writes a copy of the system QEMU at `target` that is another build by content: vmkeep
 * identifies a binary by its bytes, so a plain copy would be the same QEMU. The marker goes
 * after the ELF image, which the loader never reads: the copy runs exactly like the original.
 */
export async function copyQemuAsBuild(target: string, build: string): Promise<void> {
  await copyFile(requireQemu(), target);
  await appendFile(target, `\nvmkeep test build ${build}\n`);
  await chmod(target, 0o755);
}

/** A copy of the system QEMU (another build by content) and its modules under `dir`. */
export async function copiedInstallation(name: string, dir: string): Promise<TestInstallation> {
  const root = join(dir, name);
  await mkdir(root, { recursive: true });
  const binary = join(root, 'qemu-system-x86_64');
  await copyQemuAsBuild(binary, name);
  const moduleDir = join(root, 'modules');
  await cp(SYSTEM_MODULE_DIR, moduleDir, { recursive: true });
  return { name, binary, moduleDir, firmwareDirs: SYSTEM_FIRMWARE_DIRS };
}

/**
 * An installation whose binary answers the probes (-version, -machine help) like the system
 * QEMU but fails to start a VM: a broken build. `version` and `dropMachine` fake a probe that
 * reports another version, or a build without a machine type.
 */
export async function fakeInstallation(
  name: string,
  dir: string,
  options: { failStart?: boolean; version?: string; dropMachine?: string } = {},
): Promise<TestInstallation> {
  const root = join(dir, name);
  await mkdir(root, { recursive: true });
  const binary = join(root, 'qemu-system-x86_64');
  const real = requireQemu();
  const lines = ['#!/bin/sh', 'case "$*" in'];
  lines.push(options.version === undefined
    ? `  -version) exec ${real} -version ;;`
    : `  -version) echo "QEMU emulator version ${options.version}"; exit 0 ;;`);
  lines.push(options.dropMachine === undefined
    ? `  "-machine help") exec ${real} -machine help ;;`
    : `  "-machine help") ${real} -machine help | grep -v -e '${options.dropMachine}' ; exit 0 ;;`);
  lines.push('esac');
  if (options.failStart) lines.push('echo "qemu-system-x86_64: this build is broken (simulated)" >&2', 'exit 1');
  else lines.push(`exec ${real} "$@"`);
  await writeFile(binary, `${lines.join('\n')}\n`, { mode: 0o755 });
  return { name, binary, firmwareDirs: [] };
}

/** Writes the installations file vmkeepd reads at start; `current` is the default channel's. */
export async function writeInstallations(file: string, installations: TestInstallation[], current: string): Promise<void> {
  const temp = `${file}.tmp`;
  await writeFile(temp, `${JSON.stringify({ installations, current: { default: current } }, null, 2)}\n`);
  await rename(temp, file);
}

/**
 * What a package upgrade does to module files: each is replaced by rename, here with bytes
 * that are not a module, so a QEMU that loads from this folder afterwards fails.
 */
export async function replaceModules(moduleDir: string): Promise<void> {
  for (const name of await readdir(moduleDir)) {
    if (!name.endsWith('.so')) continue;
    const temp = join(moduleDir, `.${name}.new`);
    await writeFile(temp, 'not a module: replaced by a package upgrade\n');
    await rename(temp, join(moduleDir, name));
  }
}

/** Puts the system's module files back into a folder replaceModules() spoiled (by rename too). */
export async function restoreModules(moduleDir: string): Promise<void> {
  for (const name of await readdir(SYSTEM_MODULE_DIR)) {
    const temp = join(moduleDir, `.${name}.new`);
    await copyFile(join(SYSTEM_MODULE_DIR, name), temp);
    await rename(temp, join(moduleDir, name));
  }
}
