// QEMU installations the way a package upgrade presents them to vmkeepd: the system's QEMU
// (7.2), a real newer one (10.0 from bookworm-backports, unpacked into the test cache), a copy
// of the system binary at another path (a same-version rebuild, another build by content), and
// an installations file whose "current" the test switches.
import { appendFile, chmod, copyFile, cp, mkdir, readFile, rename, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { requireQemu } from './guest.js';
import { projectRoot } from './paths.js';

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

const FETCH_BACKPORTS = join(projectRoot(), 'test', 'support', 'fetch-qemu-backports.sh');
let backportsRoot: Promise<string> | undefined;

/**
 * QEMU 10.0 from Debian's bookworm-backports, unpacked into test/.cache by
 * fetch-qemu-backports.sh (run by test/setup.sh; fetched here on first use if missing).
 * Its firmware is its own data package's, then the host's SeaBIOS and iPXE ROMs.
 */
export async function backportsInstallation(name: string): Promise<TestInstallation> {
  const root = await backportsQemuRoot();
  return {
    name,
    binary: join(root, 'usr', 'bin', 'qemu-system-x86_64'),
    moduleDir: join(root, SYSTEM_MODULE_DIR),
    firmwareDirs: [join(root, 'usr', 'share', 'qemu'), '/usr/share/seabios', '/usr/lib/ipxe/qemu'],
  };
}

/** The folder the bookworm-backports QEMU packages are unpacked in (a Debian file tree). */
export function backportsQemuRoot(): Promise<string> {
  backportsRoot ??= (async () => {
    const result = await execa('bash', [FETCH_BACKPORTS], { reject: false, stdin: 'ignore' });
    const root = result.stdout.trim().split('\n').at(-1) ?? '';
    if (result.exitCode !== 0 || !root.startsWith('/')) {
      throw new Error(`fetching QEMU from bookworm-backports with ${FETCH_BACKPORTS} failed (exit ${String(result.exitCode)}); it needs apt-get and the Debian archive (run bash test/setup.sh as root):\n${result.stderr}`);
    }
    return root;
  })().catch((error: unknown) => {
    backportsRoot = undefined;
    throw error;
  });
  return backportsRoot;
}

/**
 * Writes a copy of the system QEMU at `target` that is another build by content: vmkeep
 * identifies a binary by its bytes, so a plain copy would be the same QEMU. The marker goes
 * after the ELF image, which the loader never reads: the copy runs exactly like the original.
 */
export async function copyQemuAsBuild(target: string, build: string, source = requireQemu()): Promise<void> {
  await copyFile(source, target);
  await appendFile(target, `\nvmkeep test build ${build}\n`);
  await chmod(target, 0o755);
}

/**
 * A copy of a QEMU (default: the system's) and its modules under `dir`: another file, another
 * build by content, the same version (a same-version rebuild).
 */
export async function copiedInstallation(name: string, dir: string, from?: TestInstallation): Promise<TestInstallation> {
  const root = join(dir, name);
  await mkdir(root, { recursive: true });
  const binary = join(root, 'qemu-system-x86_64');
  await copyQemuAsBuild(binary, name, from?.binary);
  const moduleDir = join(root, 'modules');
  await cp(from?.moduleDir ?? SYSTEM_MODULE_DIR, moduleDir, { recursive: true });
  return { name, binary, moduleDir, firmwareDirs: from?.firmwareDirs ?? SYSTEM_FIRMWARE_DIRS };
}

/**
 * An installation whose binary answers the probes (-version, -machine help) like a real QEMU
 * (`base`, default the system's) and runs VMs with it, or fails to start them (`failStart`): a
 * broken build. `version` and `dropMachine` fake a probe that reports another version, or a
 * build without a machine type; `refuseIncoming`, a build that starts VMs but refuses to take one
 * by migration.
 */
export async function fakeInstallation(
  name: string,
  dir: string,
  options: { failStart?: boolean; version?: string; dropMachine?: string; base?: TestInstallation; refuseIncoming?: boolean } = {},
): Promise<TestInstallation> {
  const root = join(dir, name);
  await mkdir(root, { recursive: true });
  const binary = join(root, 'qemu-system-x86_64');
  const real = options.base?.binary ?? requireQemu();
  // Probes come with the installation's -L options first: matched by their end.
  const lines = ['#!/bin/sh', 'case "$*" in'];
  lines.push(options.version === undefined
    ? `  *-version) exec ${real} "$@" ;;`
    : `  *-version) echo "QEMU emulator version ${options.version}"; exit 0 ;;`);
  lines.push(options.dropMachine === undefined
    ? `  *"-machine help") exec ${real} "$@" ;;`
    : `  *"-machine help") ${real} "$@" | grep -v -e '${options.dropMachine}' ; exit 0 ;;`);
  lines.push('esac');
  if (options.refuseIncoming) {
    // As a migration's destination it gives the guest 64 MiB more RAM than the source has, so
    // QEMU itself refuses the stream (RAM block length mismatch) and exits; plain starts work.
    lines.push('case "$*" in', '  *"-incoming defer"*)', '    prev=', '    for a do', '      shift',
      '      if [ "$prev" = -m ]; then set -- "$@" "$((a + 64))"; else set -- "$@" "$a"; fi', '      prev=$a', '    done ;;', 'esac');
  }
  if (options.failStart) lines.push('echo "qemu-system-x86_64: this build is broken (simulated)" >&2', 'exit 1');
  else lines.push(`exec ${real} "$@"`);
  await writeFile(binary, `${lines.join('\n')}\n`, { mode: 0o755 });
  const base = options.base;
  return { name, binary, ...(base?.moduleDir === undefined ? {} : { moduleDir: base.moduleDir }), firmwareDirs: base?.firmwareDirs ?? [] };
}

/**
 * Like `base` for the probes, but what it starts as a cpr-transfer destination is not QEMU: a
 * process that listens on the cpr socket, accepts the source's connection and hangs up on it
 * (the cpr channel breaks), then waits without ever creating a monitor.
 */
export async function brokenChannelInstallation(name: string, dir: string, base: TestInstallation): Promise<TestInstallation> {
  const inst = await fakeInstallation(name, dir, { base });
  // Double quotes only: the program goes into a single-quoted shell word.
  const hangUp = [
    'const net = require("node:net");',
    'const cpr = process.argv.map((a) => { try { return JSON.parse(a); } catch { return null; } })',
    '  .find((j) => j !== null && j["channel-type"] === "cpr");',
    'if (!cpr) { console.error("not started as a cpr-transfer destination"); process.exit(1); }',
    'net.createServer((socket) => socket.destroy()).listen(cpr.addr.path);',
    'setInterval(() => undefined, 60000);',
  ].join(' ');
  const script = (await readFile(inst.binary, 'utf8')).replace(/^esac$/m,
    `esac\ncase "$*" in\n  *channel-type*) exec ${process.execPath} -e '${hangUp}' -- "$@" ;;\nesac`);
  await writeFile(inst.binary, script, { mode: 0o755 });
  return inst;
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
