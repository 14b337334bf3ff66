import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { hashFile, rememberContentHash } from './content.js';
import { qemuEnvironment } from './env.js';
import { LaunchError } from './errors.js';
import { closest } from './similar.js';

/** A QEMU installation: the binary plus where it finds its modules and firmware. */
export interface Installation {
  name: string;
  binary: string;
  /** Pinned as QEMU_MODULE_DIR, so a running QEMU keeps loading its own modules after an upgrade. */
  moduleDir?: string;
  /** Passed as `-L dir`, in order. */
  firmwareDirs: string[];
}

/** Which file a binary is: a replaced file (package upgrade) differs in inode or mtime. */
export interface BinaryIdentity {
  path: string;
  dev: number;
  ino: number;
  size: number;
  mtimeMs: number;
}

export interface MachineType {
  /** The versioned type, e.g. `pc-q35-7.2`. */
  name: string;
  /** The unversioned alias pointing at it, e.g. `q35`. */
  alias?: string;
  isDefault: boolean;
}

export interface InstallationInfo {
  identity: BinaryIdentity;
  /**
   * sha256 of the binary's bytes: the same build at another inode (another container image,
   * a reinstall) is the same QEMU. Always set by probeInstallation.
   */
  sha256?: string;
  version: string;
  machines: MachineType[];
  /**
   * The build takes QEMU_SANDBOX (it has seccomp): every VM runs under it. Absent in a probe
   * cache of an older vmkeepd, which is then probed again.
   */
  sandbox?: boolean;
}

export interface RunResult {
  /** null when the process was killed by a signal or never started. */
  exitCode: number | null;
  stdout: string;
  stderr: string;
  /** Why the process did not run to an exit code (spawn error, timeout, signal). */
  failure?: string;
}

export type ProcessRunner = (
  file: string,
  args: readonly string[],
  options: { env: Record<string, string>; timeoutMs: number },
) => Promise<RunResult>;

export interface ProbeOptions {
  /** Folder for the on-disk probe cache (created if missing). */
  cacheDir: string;
  run?: ProcessRunner;
  timeoutMs?: number;
  /** Told when the cache cannot be read or written; the probe result is still returned. */
  onCacheError?: (error: Error) => void;
}

// 2: the binary's sha256 is cached too; entries of schema 1 are probed again.
// 3: whether the build has the seccomp sandbox.
const CACHE_SCHEMA = 3;
const DEFAULT_PROBE_TIMEOUT_MS = 30_000;

/** Runs a program to completion with execa, never throwing for a non-zero exit. */
export const execaRunner: ProcessRunner = async (file, args, { env, timeoutMs }) => {
  // Loaded on first probe only: probes are cached, and execa costs ~150 ms of start-up.
  const { execa } = await import('execa');
  const result = await execa(file, [...args], {
    env,
    extendEnv: false,
    reject: false,
    timeout: timeoutMs,
    stdin: 'ignore',
  });
  const run: RunResult = {
    exitCode: result.exitCode ?? null,
    stdout: String(result.stdout ?? ''),
    stderr: String(result.stderr ?? ''),
  };
  if (result.failed && result.exitCode === undefined) run.failure = result.shortMessage;
  return run;
};

export async function readBinaryIdentity(path: string): Promise<BinaryIdentity> {
  const s = await stat(path);
  return { path, dev: s.dev, ino: s.ino, size: s.size, mtimeMs: s.mtimeMs };
}

/** Same file content on disk: same device, inode, size and mtime (the path may differ). */
export function sameBinary(a: BinaryIdentity, b: BinaryIdentity): boolean {
  return a.dev === b.dev && a.ino === b.ino && a.size === b.size && a.mtimeMs === b.mtimeMs;
}

/**
 * QEMU's seccomp policy for every VM (ARCHITECTURE.md, invariant 11): no obsolete system calls,
 * no set*id, no fork or exec (a `migrate exec:` cannot run a shell), no scheduler or priority
 * changes.
 */
export const QEMU_SANDBOX = 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny';

/** The arguments and environment every run of this installation gets. */
export function installationRunContext(inst: Installation): { firmwareArgs: string[]; env: Record<string, string> } {
  return {
    firmwareArgs: inst.firmwareDirs.flatMap((dir) => ['-L', dir]),
    env: inst.moduleDir === undefined ? {} : { QEMU_MODULE_DIR: inst.moduleDir },
  };
}

// Concurrent probes of one binary share one run (keyed by cache folder and file identity).
const inFlight = new Map<string, Promise<InstallationInfo>>();

/**
 * Version, machine types and content hash of an installation. Served from the on-disk cache
 * while the binary file is unchanged (device, inode, size, mtime); a replaced binary is
 * probed and hashed again.
 */
export async function probeInstallation(inst: Installation, options: ProbeOptions): Promise<InstallationInfo> {
  const identity = await identify(inst);
  const key = `${options.cacheDir}\0${identityKey(identity)}`;
  let pending = inFlight.get(key);
  if (pending === undefined) {
    pending = probeOrLoad(inst, identity, options).finally(() => inFlight.delete(key));
    inFlight.set(key, pending);
  }
  return pending;
}

async function identify(inst: Installation): Promise<BinaryIdentity> {
  try {
    return await readBinaryIdentity(inst.binary);
  } catch (err) {
    throw new LaunchError('FILE_NOT_FOUND',
      `QEMU binary ${inst.binary} of installation "${inst.name}" cannot be read (${(err as NodeJS.ErrnoException).code ?? String(err)}); ` +
      'fix: install QEMU there or correct the installation\'s binary path', { cause: err });
  }
}

function identityKey(id: BinaryIdentity): string {
  return `${id.dev}-${id.ino}-${id.size}-${id.mtimeMs}`;
}

function cacheFile(cacheDir: string, id: BinaryIdentity): string {
  return join(cacheDir, `probe-${createHash('sha256').update(identityKey(id)).digest('hex').slice(0, 32)}.json`);
}

async function probeOrLoad(inst: Installation, identity: BinaryIdentity, options: ProbeOptions): Promise<InstallationInfo> {
  const report = (error: Error): void => options.onCacheError?.(error);
  const file = cacheFile(options.cacheDir, identity);
  const cached = await readCache(file, identity, report);
  if (cached !== undefined) return cached;

  const probed = await runProbe(inst, identity, options);
  // A binary replaced while it was being probed would leave the new file's answers under
  // the old identity: only cache what was probed (and hashed) from an unchanged file.
  const replaced = (): LaunchError => new LaunchError('PROBE_FAILED',
    `QEMU binary ${inst.binary} of installation "${inst.name}" was replaced while it was being probed; fix: retry once the upgrade has finished`);
  let hashed: Awaited<ReturnType<typeof hashFile>>;
  try {
    hashed = await hashFile(inst.binary);
  } catch (err) {
    throw new LaunchError('PROBE_FAILED',
      `cannot read QEMU binary ${inst.binary} of installation "${inst.name}" to hash it: ${(err as Error).message}; fix: retry once the upgrade has finished`, { cause: err });
  }
  if (!sameBinary({ path: identity.path, ...hashed.stat }, identity)) throw replaced();
  const info: InstallationInfo = { ...probed, sha256: hashed.sha256 };
  try {
    await mkdir(options.cacheDir, { recursive: true });
    await writeFileAtomic(file, `${JSON.stringify({ schema: CACHE_SCHEMA, ...info }, null, 2)}\n`);
  } catch (err) {
    report(new Error(`cannot write probe cache ${file}: ${String(err)}`, { cause: err }));
  }
  return info;
}

async function readCache(
  file: string, identity: BinaryIdentity, report: (error: Error) => void,
): Promise<InstallationInfo | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') report(new Error(`cannot read probe cache ${file}: ${String(err)}`, { cause: err }));
    return undefined;
  }
  try {
    const data = JSON.parse(text) as Record<string, unknown>;
    const id = data.identity as BinaryIdentity | undefined;
    // An older daemon's entry is simply probed again.
    if (typeof data.schema === 'number' && data.schema < CACHE_SCHEMA) return undefined;
    if (data.schema !== CACHE_SCHEMA || id === undefined || !sameBinary(id, identity)
      || typeof data.version !== 'string' || !Array.isArray(data.machines) || typeof data.sha256 !== 'string' || typeof data.sandbox !== 'boolean') {
      throw new Error('unexpected content');
    }
    rememberContentHash(identity, data.sha256);
    return { identity, sha256: data.sha256, version: data.version, machines: data.machines as MachineType[], sandbox: data.sandbox };
  } catch (err) {
    report(new Error(`ignoring unusable probe cache ${file}: ${String(err)}`, { cause: err }));
    return undefined;
  }
}

async function runProbe(inst: Installation, identity: BinaryIdentity, options: ProbeOptions): Promise<InstallationInfo> {
  const run = options.run ?? execaRunner;
  const { firmwareArgs, env } = installationRunContext(inst);
  const timeoutMs = options.timeoutMs ?? DEFAULT_PROBE_TIMEOUT_MS;
  const call = async (args: string[]): Promise<string> => {
    const result = await run(inst.binary, [...firmwareArgs, ...args], { env: qemuEnvironment(env), timeoutMs });
    if (result.exitCode !== 0) {
      const why = result.failure ?? `exit code ${String(result.exitCode)}`;
      throw new LaunchError('PROBE_FAILED',
        `probing installation "${inst.name}" failed: \`${inst.binary} ${args.join(' ')}\` ended with ${why}` +
        `${result.stderr.trim() === '' ? '' : `: ${lastLines(result.stderr, 10)}`}; fix: check that the binary runs on this host`);
    }
    return result.stdout;
  };
  const version = parseQemuVersion(await call(['-version']));
  const machines = parseMachineHelp(await call(['-machine', 'help']));
  if (machines.length === 0) {
    throw new LaunchError('PROBE_FAILED', `installation "${inst.name}" (${inst.binary}) lists no machine types in \`-machine help\``);
  }
  // -sandbox is parsed before -version acts: a build without seccomp (or one that does not know
  // a policy) fails here, without running anything.
  const sandboxed = await run(inst.binary, ['-sandbox', QEMU_SANDBOX, '-version'], { env: qemuEnvironment(env), timeoutMs });
  return { identity, version, machines, sandbox: sandboxed.exitCode === 0 };
}

/** `QEMU emulator version 7.2.22 (Debian ...)` -> `7.2.22` (a missing patch level becomes 0). */
export function parseQemuVersion(output: string): string {
  const m = /QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?/.exec(output);
  if (m === null) {
    throw new LaunchError('PROBE_FAILED', `cannot find a version in \`-version\` output: ${JSON.stringify(output.slice(0, 200))}`);
  }
  return `${m[1]}.${m[2]}.${m[3] ?? '0'}`;
}

/**
 * Parses `-machine help`. Alias lines (`q35 ... (alias of pc-q35-7.2)`) are folded into
 * their target, as QMP's query-machines reports them.
 */
export function parseMachineHelp(output: string): MachineType[] {
  const machines: MachineType[] = [];
  const aliases = new Map<string, string>();
  for (const line of output.split('\n')) {
    const m = /^(\S+)\s+(.*)$/.exec(line.trimEnd());
    if (m === null || line.startsWith('Supported machines')) continue;
    const [, name = '', description = ''] = m;
    const aliasOf = /\(alias of ([^)\s]+)\)/.exec(description)?.[1];
    if (aliasOf !== undefined) {
      aliases.set(aliasOf, name);
    } else {
      machines.push({ name, isDefault: description.includes('(default)') });
    }
  }
  for (const machine of machines) {
    const alias = aliases.get(machine.name);
    if (alias !== undefined) machine.alias = alias;
  }
  return machines;
}

/**
 * The versioned machine type to pin for `requested`: an alias (`q35`) becomes its target
 * (`pc-q35-7.2`), because migration between different machine types fails and an alias
 * moves with every QEMU release. Never returns an alias.
 */
export function resolveMachineType(requested: string, machines: readonly MachineType[]): string {
  const byAlias = machines.find((m) => m.alias === requested);
  if (byAlias !== undefined) return byAlias.name;
  if (machines.some((m) => m.name === requested)) return requested;

  const names = machines.flatMap((m) => (m.alias === undefined ? [m.name] : [m.alias, m.name]));
  const label = (n: string): string => {
    const target = machines.find((m) => m.alias === n);
    return target === undefined ? n : `${n} (alias of ${target.name})`;
  };
  const near = closest(requested, names, 6);
  const offer = near.length > 0 ? near : machines.filter((m) => m.alias !== undefined).map((m) => m.alias as string);
  throw new LaunchError('UNKNOWN_MACHINE',
    `machine type "${requested}" is not offered by this QEMU; ${near.length > 0 ? 'close candidates' : 'aliases offered'}: ` +
    `${offer.map(label).join(', ')}; fix: use one of those (\`-machine help\` lists all)`);
}

function lastLines(text: string, count: number): string {
  return text.trimEnd().split('\n').slice(-count).join('\n');
}

/** Writes `data` so a reader sees the old file or the new one, never a torn one. */
async function writeFileAtomic(path: string, data: string): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  const handle = await open(tmp, 'wx', 0o644);
  try {
    await handle.writeFile(data);
    await handle.sync();
  } catch (err) {
    await handle.close();
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  await handle.close();
  try {
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
