// The tiny test guest (see test/guest/build-guest.sh) and helpers to watch its serial console.
import { execFileSync } from 'node:child_process';
import { accessSync, constants, readFileSync } from 'node:fs';
import { readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { execa } from 'execa';
import { projectRoot } from './paths.js';

export interface GuestImage {
  kernel: string;
  initrd: string;
  /** Kernel command line: console on the first serial port, reboot at once on panic. */
  append: string;
}

export const GUEST_APPEND = 'console=ttyS0 quiet panic=-1';

const BUILD_SCRIPT = join(projectRoot(), 'test', 'guest', 'build-guest.sh');
const POLL_MS = 25;

let image: Promise<GuestImage> | undefined;

/** Builds the guest on first use (cached on disk by kernel version); once per process. */
export function ensureGuestImage(): Promise<GuestImage> {
  image ??= buildGuest().catch((err: unknown) => {
    image = undefined;
    throw err;
  });
  return image;
}

async function buildGuest(): Promise<GuestImage> {
  const result = await execa('bash', [BUILD_SCRIPT], { reject: false, stdin: 'ignore' });
  const dir = result.stdout.trim().split('\n').at(-1) ?? '';
  if (result.exitCode !== 0 || !dir.startsWith('/')) {
    throw new Error(`building the test guest with ${BUILD_SCRIPT} failed (exit ${String(result.exitCode)}):\n${result.stderr}`);
  }
  return { kernel: join(dir, 'vmlinuz'), initrd: join(dir, 'initramfs.gz'), append: GUEST_APPEND };
}

/**
 * A raw disk image at `path` that boots the tiny guest by itself (SYSLINUX on a FAT file
 * system holding the kernel and initrd), with `append` as its kernel command line: for VMs
 * without a kernel path, such as an operator's. Fails (never skips) without the tools.
 */
export async function makeBootDisk(path: string, image: GuestImage, append: string): Promise<void> {
  for (const [tool, pkg] of [['syslinux', 'syslinux'], ['mformat', 'mtools'], ['mcopy', 'mtools']] as const) {
    try {
      execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    } catch {
      throw new Error(`${tool} is missing: apt-get install ${pkg}`);
    }
  }
  // Room for the kernel (~14 MiB) and the initrd; sparse.
  await writeFile(path, '');
  await truncate(path, 48 * 1024 * 1024);
  execFileSync('mformat', ['-i', path, '::']);
  execFileSync('syslinux', ['--install', path]);
  const config = `${path}.syslinux.cfg`;
  await writeFile(config, ['DEFAULT guest', 'PROMPT 0', 'TIMEOUT 0', 'LABEL guest', '  KERNEL vmlinuz', '  INITRD initrd.gz', `  APPEND ${append}`, ''].join('\n'));
  try {
    execFileSync('mcopy', ['-i', path, config, '::syslinux.cfg']);
  } finally {
    await rm(config, { force: true });
  }
  execFileSync('mcopy', ['-i', path, image.kernel, '::vmlinuz']);
  execFileSync('mcopy', ['-i', path, image.initrd, '::initrd.gz']);
}

/** One of the guest's attempts ("vmkeep.connect"): its number, the target, what it got ("FAILED" or "GOT line"). */
export interface ConnectAttempt {
  n: number;
  target: string;
  got: string;
}

/** The guest's connection attempts in its serial log so far, in order. */
export async function connectAttempts(logPath: string): Promise<ConnectAttempt[]> {
  const text = await readFile(logPath, 'utf8');
  return [...text.matchAll(/GUEST CONNECT (\d+) (\S+) (.*)/g)].map((m) => ({ n: Number(m[1]), target: m[2] ?? '', got: (m[3] ?? '').trim() }));
}

/** The absolute path of qemu-system-x86_64; integration tests fail (never skip) without it. */
export function requireQemu(): string {
  const dirs = (process.env.PATH ?? '').split(delimiter).concat(['/usr/bin', '/usr/local/bin']);
  for (const dir of dirs) {
    if (dir === '') continue;
    const candidate = join(dir, 'qemu-system-x86_64');
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this folder
    }
  }
  throw new Error('qemu-system-x86_64 not found: apt-get install qemu-system-x86');
}

/**
 * Waits until the serial log contains `pattern`; resolves with the matched text.
 * Rejects after `timeoutMs` naming the file, the pattern and the last lines seen.
 */
export async function waitForSerial(logPath: string, pattern: RegExp | string, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  // A /g or /y pattern would resume from its lastIndex on every poll.
  const re = typeof pattern === 'string' ? undefined : new RegExp(pattern.source, pattern.flags.replace(/[gy]/g, ''));
  let lastSize = -1;
  let text = '';
  for (;;) {
    const size = await stat(logPath).then((s) => s.size, () => -1);
    if (size !== lastSize) {
      lastSize = size;
      text = size < 0 ? '' : await readFile(logPath, 'utf8').catch(() => '');
      const found = re === undefined ? (text.includes(pattern as string) ? (pattern as string) : undefined) : re.exec(text)?.[0];
      if (found !== undefined) return found;
    }
    if (Date.now() >= deadline) {
      const seen = lastSize < 0 ? '(the file does not exist)' : text.trimEnd().split('\n').slice(-10).join('\n') || '(the file is empty)';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${String(pattern)} in serial log ${logPath}; last lines:\n${seen}`);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

/** The highest `GUEST TICK n` in the serial log (0 when there is none yet). */
export function countTicks(logPath: string): number {
  let text: string;
  try {
    text = readFileSync(logPath, 'utf8');
  } catch {
    return 0;
  }
  let highest = 0;
  for (const m of text.matchAll(/GUEST TICK (\d+)/g)) highest = Math.max(highest, Number(m[1]));
  return highest;
}

// The guest kernel's own account of a crash (BUG, Oops, panic, NULL dereference) and where it was.
const KERNEL_TROUBLE_RE = /(?:\bBUG\b|Oops|Kernel panic|RIP:|general protection fault)/;

/** The guest's kernel printed a BUG, an Oops or a panic (pure). */
export function kernelCrashed(text: string): boolean {
  return text.split(/\r?\n/).some((line) => KERNEL_TROUBLE_RE.test(line));
}

/**
 * The guest kernel's crash lines in a serial console text (pure), at most `max`: put into an
 * assertion's message, a second boot or a stalled writer says why (a crash and a reboot by
 * panic=-1, or an oops that left the writer stuck) instead of only that it happened.
 */
export function kernelTrouble(text: string, max = 8): string {
  const lines = text.split(/\r?\n/).filter((line) => KERNEL_TROUBLE_RE.test(line));
  return lines.length === 0 ? 'no kernel BUG, Oops or panic on the console' : `guest kernel: ${lines.slice(0, max).join(' | ')}`;
}
