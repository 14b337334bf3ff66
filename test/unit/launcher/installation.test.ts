import { createHash } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  LaunchError, parseMachineHelp, parseQemuVersion, probeInstallation, QEMU_SANDBOX, resolveMachineType,
  type Installation, type ProcessRunner, type RunResult,
} from '../../../launcher/index.js';

// Captured from `qemu-system-x86_64 -machine help` of Debian bookworm's QEMU 7.2.22.
const MACHINE_HELP = `Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-7.0        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-6.2        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-6.1        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-6.0        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-5.2        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-5.1        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-5.0        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-4.2        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-4.1        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-4.0        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-3.1        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-3.0        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.9        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.8        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.7        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.6        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.5        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.4        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.3        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.2        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.12       Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.11       Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.10       Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.1        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-2.0        Standard PC (i440FX + PIIX, 1996)
pc-i440fx-1.7        Standard PC (i440FX + PIIX, 1996) (deprecated)
pc-i440fx-1.6        Standard PC (i440FX + PIIX, 1996) (deprecated)
pc-i440fx-1.5        Standard PC (i440FX + PIIX, 1996) (deprecated)
pc-i440fx-1.4        Standard PC (i440FX + PIIX, 1996) (deprecated)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-7.1           Standard PC (Q35 + ICH9, 2009)
pc-q35-7.0           Standard PC (Q35 + ICH9, 2009)
pc-q35-6.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-6.1           Standard PC (Q35 + ICH9, 2009)
pc-q35-6.0           Standard PC (Q35 + ICH9, 2009)
pc-q35-5.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-5.1           Standard PC (Q35 + ICH9, 2009)
pc-q35-5.0           Standard PC (Q35 + ICH9, 2009)
pc-q35-4.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-4.1           Standard PC (Q35 + ICH9, 2009)
pc-q35-4.0.1         Standard PC (Q35 + ICH9, 2009)
pc-q35-4.0           Standard PC (Q35 + ICH9, 2009)
pc-q35-3.1           Standard PC (Q35 + ICH9, 2009)
pc-q35-3.0           Standard PC (Q35 + ICH9, 2009)
pc-q35-2.9           Standard PC (Q35 + ICH9, 2009)
pc-q35-2.8           Standard PC (Q35 + ICH9, 2009)
pc-q35-2.7           Standard PC (Q35 + ICH9, 2009)
pc-q35-2.6           Standard PC (Q35 + ICH9, 2009)
pc-q35-2.5           Standard PC (Q35 + ICH9, 2009)
pc-q35-2.4           Standard PC (Q35 + ICH9, 2009)
pc-q35-2.12          Standard PC (Q35 + ICH9, 2009)
pc-q35-2.11          Standard PC (Q35 + ICH9, 2009)
pc-q35-2.10          Standard PC (Q35 + ICH9, 2009)
isapc                ISA-only PC
none                 empty machine
x-remote             Experimental remote machine
`;
const VERSION_OUTPUT = `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)
Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers
`;

/** Runs of the binary per probe: -version, -machine help, the sandbox check. */
const PROBE_RUNS = 3;

interface Call {
  file: string;
  args: readonly string[];
  env: Record<string, string>;
}

/** A runner that answers like QEMU 7.2 and records what it was asked. */
function fakeRunner(calls: Call[], answer: (args: readonly string[]) => RunResult = qemuAnswer): ProcessRunner {
  return async (file, args, { env }) => {
    calls.push({ file, args, env });
    return answer(args);
  };
}

function qemuAnswer(args: readonly string[]): RunResult {
  if (args.includes('-version')) return { exitCode: 0, stdout: VERSION_OUTPUT, stderr: '' };
  if (args.includes('help')) return { exitCode: 0, stdout: MACHINE_HELP, stderr: '' };
  return { exitCode: 1, stdout: '', stderr: `unexpected ${args.join(' ')}` };
}

const refuse: ProcessRunner = async (_file, args) => {
  throw new Error(`the binary must not be run again (asked: ${args.join(' ')})`);
};

describe('parseQemuVersion', () => {
  it.each([
    [VERSION_OUTPUT, '7.2.22'],
    ['QEMU emulator version 8.1.0 (v8.1.0)\n', '8.1.0'],
    ['QEMU emulator version 2.11.1(Debian 1:2.11+dfsg-1ubuntu7.42)\n', '2.11.1'],
    ['QEMU emulator version 9.0\n', '9.0.0'],
  ])('reads %j', (output, version) => {
    expect(parseQemuVersion(output)).toBe(version);
  });

  it('fails with PROBE_FAILED on other output', () => {
    expect(() => parseQemuVersion('qemu-system-x86_64: invalid option')).toThrow(
      expect.objectContaining({ code: 'PROBE_FAILED', message: expect.stringContaining('invalid option') }),
    );
  });
});

describe('parseMachineHelp', () => {
  const machines = parseMachineHelp(MACHINE_HELP);

  it('lists every machine type once, with aliases folded into their targets', () => {
    expect(machines).toHaveLength(59);
    expect(machines.find((m) => m.name === 'pc-q35-7.2')).toEqual({ name: 'pc-q35-7.2', alias: 'q35', isDefault: false });
    expect(machines.find((m) => m.name === 'pc-i440fx-7.2')).toEqual({ name: 'pc-i440fx-7.2', alias: 'pc', isDefault: true });
    expect(machines.find((m) => m.name === 'microvm')).toEqual({ name: 'microvm', isDefault: false });
    expect(machines.some((m) => m.name === 'q35' || m.name === 'pc')).toBe(false);
    expect(machines.filter((m) => m.isDefault)).toHaveLength(1);
    expect(machines.map((m) => m.name)).toContain('pc-q35-4.0.1');
  });

  it('also folds an alias listed after its target', () => {
    expect(parseMachineHelp('Supported machines are:\nfoo-2.0   Foo\nfoo       Foo (alias of foo-2.0)\n'))
      .toEqual([{ name: 'foo-2.0', alias: 'foo', isDefault: false }]);
  });
});

describe('resolveMachineType', () => {
  const machines = parseMachineHelp(MACHINE_HELP);

  it('pins aliases to their versioned type and keeps versioned names', () => {
    expect(resolveMachineType('q35', machines)).toBe('pc-q35-7.2');
    expect(resolveMachineType('pc', machines)).toBe('pc-i440fx-7.2');
    expect(resolveMachineType('pc-q35-6.2', machines)).toBe('pc-q35-6.2');
    expect(resolveMachineType('microvm', machines)).toBe('microvm');
  });

  it('never returns an alias', () => {
    const aliases = new Set(machines.flatMap((m) => (m.alias === undefined ? [] : [m.alias])));
    for (const m of machines) {
      for (const requested of [m.name, m.alias ?? m.name]) expect(aliases.has(resolveMachineType(requested, machines))).toBe(false);
    }
  });

  it('rejects an unknown type with close candidates', () => {
    const error = (() => {
      try {
        resolveMachineType('q36', machines);
      } catch (err) {
        return err as LaunchError;
      }
      return undefined;
    })();
    expect(error?.code).toBe('UNKNOWN_MACHINE');
    expect(error?.message).toContain('machine type "q36" is not offered');
    expect(error?.message).toContain('q35 (alias of pc-q35-7.2)');
    expect(() => resolveMachineType('pc-q35-9.9', machines)).toThrow(/pc-q35-/);
    expect(() => resolveMachineType('virt', machines)).toThrow(/aliases offered: pc \(alias of pc-i440fx-7.2\), q35/);
  });
});

describe('probeInstallation', () => {
  let dir: string;
  let binary: string;
  let cacheDir: string;
  let inst: Installation;
  const watchers: FSWatcher[] = [];

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmkeep-probe-'));
    binary = join(dir, 'qemu-system-x86_64');
    cacheDir = join(dir, 'cache');
    await writeFile(binary, 'not really qemu');
    inst = { name: 'test', binary, moduleDir: '/opt/qemu/lib', firmwareDirs: ['/opt/qemu/share', '/usr/share/seabios'] };
  });

  afterEach(async () => {
    for (const w of watchers.splice(0)) w.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('runs the binary with its module dir and firmware dirs and reads version and machines', async () => {
    const calls: Call[] = [];
    const info = await probeInstallation(inst, { cacheDir, run: fakeRunner(calls) });
    expect(info.version).toBe('7.2.22');
    expect(info.identity).toEqual(expect.objectContaining({ path: binary, size: 'not really qemu'.length }));
    expect(resolveMachineType('q35', info.machines)).toBe('pc-q35-7.2');
    expect(calls.map((c) => [c.file, ...c.args])).toEqual([
      [binary, '-L', '/opt/qemu/share', '-L', '/usr/share/seabios', '-version'],
      [binary, '-L', '/opt/qemu/share', '-L', '/usr/share/seabios', '-machine', 'help'],
      [binary, '-sandbox', QEMU_SANDBOX, '-version'],
    ]);
    expect(info.sandbox).toBe(true);
    expect(calls[0]?.env.QEMU_MODULE_DIR).toBe('/opt/qemu/lib');
  });

  it('hashes the binary\'s content once, keeps the hash in the cache, and an older cache entry is probed again', async () => {
    const info = await probeInstallation(inst, { cacheDir, run: fakeRunner([]) });
    expect(info.sha256).toBe(createHash('sha256').update('not really qemu').digest('hex'));
    // From the disk cache (no run allowed): the same hash, without hashing again.
    expect((await probeInstallation(inst, { cacheDir, run: refuse })).sha256).toBe(info.sha256);

    // An entry written by a daemon before content hashes: silently probed and hashed again.
    const [file] = (await readdir(cacheDir)).filter((f) => f.endsWith('.json'));
    const old = JSON.parse(await readFile(join(cacheDir, file ?? ''), 'utf8')) as Record<string, unknown>;
    delete old.sha256;
    await writeFile(join(cacheDir, file ?? ''), JSON.stringify({ ...old, schema: 1 }));
    const problems: Error[] = [];
    const calls: Call[] = [];
    const again = await probeInstallation(inst, { cacheDir, run: fakeRunner(calls), onCacheError: (e) => problems.push(e) });
    expect(calls).toHaveLength(PROBE_RUNS);
    expect(problems).toEqual([]);
    expect(again.sha256).toBe(info.sha256);
  });

  it('does not pass a QEMU_MODULE_DIR of the caller\'s environment to a probe', async () => {
    const calls: Call[] = [];
    const saved = process.env.QEMU_MODULE_DIR;
    process.env.QEMU_MODULE_DIR = '/somewhere/else';
    try {
      await probeInstallation({ ...inst, moduleDir: undefined }, { cacheDir, run: fakeRunner(calls) });
    } finally {
      if (saved === undefined) delete process.env.QEMU_MODULE_DIR;
      else process.env.QEMU_MODULE_DIR = saved;
    }
    expect(calls[0]?.env).not.toHaveProperty('QEMU_MODULE_DIR');
  });

  it('serves an unchanged binary from the disk cache without running it', async () => {
    const first = await probeInstallation(inst, { cacheDir, run: fakeRunner([]) });
    const second = await probeInstallation(inst, { cacheDir, run: refuse });
    expect(second).toEqual(first);
  });

  it('probes again when the binary\'s mtime changes, or it is replaced', async () => {
    const calls: Call[] = [];
    await probeInstallation(inst, { cacheDir, run: fakeRunner(calls) });
    await utimes(binary, new Date(), new Date(Date.now() + 60_000));
    const after = await probeInstallation(inst, { cacheDir, run: fakeRunner(calls, (args) =>
      args.includes('-version') ? { exitCode: 0, stdout: 'QEMU emulator version 8.2.1\n', stderr: '' } : qemuAnswer(args)) });
    expect(after.version).toBe('8.2.1');
    expect(calls).toHaveLength(2 * PROBE_RUNS);

    // What a package manager does: write a new file and rename it over the old one. Same
    // size and mtime here, so only the inode tells the files apart.
    const old = await stat(binary);
    await writeFile(`${binary}.new`, 'not really qemu');
    await utimes(`${binary}.new`, old.atime, old.mtime);
    await rename(`${binary}.new`, binary);
    expect((await stat(binary)).mtimeMs).toBe(old.mtimeMs);
    const replaced = await probeInstallation(inst, { cacheDir, run: fakeRunner(calls) });
    expect(replaced.version).toBe('7.2.22');
    expect(calls).toHaveLength(3 * PROBE_RUNS);
    // Each identity has its own cache entry: the old ones are still served.
    expect((await readdir(cacheDir)).filter((f) => f.endsWith('.json'))).toHaveLength(3);
  });

  it('runs one probe for concurrent requests of one binary', async () => {
    const calls: Call[] = [];
    const run = fakeRunner(calls);
    const infos = await Promise.all([1, 2, 3].map(() => probeInstallation(inst, { cacheDir, run })));
    expect(calls).toHaveLength(PROBE_RUNS);
    expect(infos[1]).toBe(infos[0]);
  });

  it('writes the cache atomically: the file appears by rename, complete, and no temp file stays', async () => {
    await mkdir(cacheDir);
    const events: { type: string; file: string }[] = [];
    watchers.push(watch(cacheDir, (type, file) => events.push({ type, file: String(file) })));

    const info = await probeInstallation(inst, { cacheDir, run: fakeRunner([]) });

    const files = await readdir(cacheDir);
    const cacheFiles = files.filter((f) => f.endsWith('.json'));
    expect(files).toEqual(cacheFiles);
    expect(cacheFiles).toHaveLength(1);
    const name = cacheFiles[0] ?? '';
    expect(JSON.parse(await readFile(join(cacheDir, name), 'utf8'))).toEqual({ schema: 3, ...info });

    // inotify delivers in order: once the marker's event is in, every earlier one is too.
    await writeFile(join(cacheDir, 'marker'), '');
    await waitFor(() => events.some((e) => e.file === 'marker'), 'the watch event of the marker file');
    const own = events.filter((e) => e.file === name);
    expect(own.length).toBeGreaterThan(0);
    // Written in place, the final name would also see 'change' (modify) events.
    expect(own.every((e) => e.type === 'rename')).toBe(true);
  });

  it('ignores and replaces a torn cache file, and leftover temp files', async () => {
    await probeInstallation(inst, { cacheDir, run: fakeRunner([]) });
    const [name = ''] = await readdir(cacheDir);
    const full = await readFile(join(cacheDir, name), 'utf8');
    await writeFile(join(cacheDir, name), full.slice(0, full.length / 2));
    await writeFile(join(cacheDir, `.${name}.999.dead.tmp`), full.slice(0, 10));

    const reported: Error[] = [];
    const calls: Call[] = [];
    const info = await probeInstallation(inst, { cacheDir, run: fakeRunner(calls), onCacheError: (e) => reported.push(e) });
    expect(info.version).toBe('7.2.22');
    expect(calls).toHaveLength(PROBE_RUNS);
    expect(reported[0]?.message).toContain('ignoring unusable probe cache');
    expect(await readFile(join(cacheDir, name), 'utf8')).toBe(full);
  });

  it('still answers when the cache cannot be written, and says so', async () => {
    const reported: Error[] = [];
    const blocked = join(dir, 'a-file');
    await writeFile(blocked, '');
    const info = await probeInstallation(inst, { cacheDir: join(blocked, 'cache'), run: fakeRunner([]), onCacheError: (e) => reported.push(e) });
    expect(info.version).toBe('7.2.22');
    expect(reported.map((e) => e.message)).toContainEqual(expect.stringContaining('cannot write probe cache'));
  });

  it('fails with PROBE_FAILED quoting QEMU, and caches nothing', async () => {
    const broken = fakeRunner([], () => ({ exitCode: 1, stdout: '', stderr: 'error while loading shared libraries: libfoo.so.1' }));
    await expect(probeInstallation(inst, { cacheDir, run: broken })).rejects.toThrow(
      expect.objectContaining({ code: 'PROBE_FAILED', message: expect.stringContaining('libfoo.so.1') }),
    );
    const calls: Call[] = [];
    await probeInstallation(inst, { cacheDir, run: fakeRunner(calls) });
    expect(calls).toHaveLength(PROBE_RUNS);
  });

  it('a build without seccomp (-sandbox refused) is probed as having no sandbox, not as broken', async () => {
    const noSeccomp = fakeRunner([], (args) => (args.includes('-sandbox')
      ? { exitCode: 1, stdout: '', stderr: "qemu-system-x86_64: -sandbox on: There is no option group 'sandbox'" }
      : qemuAnswer(args)));
    expect((await probeInstallation(inst, { cacheDir, run: noSeccomp })).sandbox).toBe(false);
  });

  it('fails with FILE_NOT_FOUND for a missing binary', async () => {
    await expect(probeInstallation({ ...inst, binary: join(dir, 'missing') }, { cacheDir, run: refuse })).rejects.toThrow(
      expect.objectContaining({ code: 'FILE_NOT_FOUND', message: expect.stringContaining(join(dir, 'missing')) }),
    );
  });
});

async function waitFor(condition: () => boolean, what: string, timeoutMs = 2000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
