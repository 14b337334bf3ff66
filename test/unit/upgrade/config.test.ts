import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  currentInstallation, DEFAULT_CHANNEL, loadInstallationsConfig, parseInstallationsConfig, singleInstallation,
  UpgradeError, type InstallationsConfig,
} from '../../../upgrade/index.js';

const FILE = '/etc/vmkeep/installations.json';

const VALID = {
  installations: [
    { name: 'system', binary: '/usr/bin/qemu-system-x86_64', moduleDir: '/usr/lib/x86_64-linux-gnu/qemu', firmwareDirs: ['/usr/share/qemu'] },
    { name: 'snap-42', binary: '/snap/qemu/42/usr/bin/qemu-system-x86_64' },
  ],
  current: { default: 'system', edge: 'snap-42' },
};

/** Parses and returns the UpgradeError it must throw (fails the test if it parses). */
function refusal(input: unknown): UpgradeError {
  const text = typeof input === 'string' ? input : JSON.stringify(input);
  try {
    parseInstallationsConfig(text, FILE);
  } catch (err) {
    expect(err).toBeInstanceOf(UpgradeError);
    expect((err as UpgradeError).code).toBe('BAD_CONFIG');
    expect((err as UpgradeError).message).toContain(FILE);
    return err as UpgradeError;
  }
  throw new Error(`expected ${text} to be refused, but it parsed`);
}

function withInstallation(patch: Record<string, unknown>): unknown {
  return { installations: [{ name: 'system', binary: '/usr/bin/qemu-system-x86_64', ...patch }], current: { default: 'system' } };
}

describe('parseInstallationsConfig', () => {
  it('parses a valid file, defaulting firmwareDirs to []', () => {
    const config = parseInstallationsConfig(JSON.stringify(VALID), FILE);
    expect(config).toEqual({
      installations: [
        { name: 'system', binary: '/usr/bin/qemu-system-x86_64', moduleDir: '/usr/lib/x86_64-linux-gnu/qemu', firmwareDirs: ['/usr/share/qemu'] },
        { name: 'snap-42', binary: '/snap/qemu/42/usr/bin/qemu-system-x86_64', firmwareDirs: [] },
      ],
      current: { default: 'system', edge: 'snap-42' },
    });
    // No moduleDir key at all when the file gives none (not moduleDir: undefined).
    expect(Object.keys(config.installations[1] ?? {})).not.toContain('moduleDir');
  });

  it('refuses text that is not JSON', () => {
    expect(refusal('{"installations": [').message).toMatch(/is not JSON/);
  });

  it('refuses JSON that is not an object', () => {
    expect(refusal('[1, 2]').message).toMatch(/must hold an object/);
    expect(refusal('null').message).toMatch(/must hold an object/);
  });

  it('refuses an unknown top-level field, naming it', () => {
    expect(refusal({ ...VALID, curent: { default: 'system' } }).message).toMatch(/unknown field "curent"/);
  });

  it('refuses an unknown field in an installation, naming where', () => {
    expect(refusal(withInstallation({ modulesDir: '/usr/lib/qemu' })).message)
      .toMatch(/installations\[0\]: unknown field "modulesDir"/);
  });

  it('refuses a missing or empty installations list', () => {
    expect(refusal({ current: { default: 'x' } }).message).toMatch(/"installations" must be a non-empty array/);
    expect(refusal({ installations: [], current: { default: 'x' } }).message).toMatch(/"installations" must be a non-empty array/);
  });

  it('refuses an installation that is not an object', () => {
    expect(refusal({ installations: ['qemu'], current: { default: 'qemu' } }).message).toMatch(/installations\[0\] must be an object/);
  });

  it('refuses a duplicate installation name', () => {
    const err = refusal({
      installations: [
        { name: 'system', binary: '/usr/bin/qemu-system-x86_64' },
        { name: 'system', binary: '/opt/qemu/bin/qemu-system-x86_64' },
      ],
      current: { default: 'system' },
    });
    expect(err.message).toMatch(/installations\[1\]\.name "system" is used twice/);
  });

  it('refuses a bad installation name', () => {
    expect(refusal(withInstallation({ name: 'System QEMU' })).message).toMatch(/installations\[0\]\.name must match/);
  });

  it('refuses relative paths in binary, moduleDir and firmwareDirs', () => {
    expect(refusal(withInstallation({ binary: 'bin/qemu-system-x86_64' })).message)
      .toMatch(/installations\[0\]\.binary must be an absolute path, got "bin\/qemu-system-x86_64"/);
    expect(refusal(withInstallation({ moduleDir: 'lib/qemu' })).message)
      .toMatch(/installations\[0\]\.moduleDir must be an absolute path, got "lib\/qemu"/);
    expect(refusal(withInstallation({ firmwareDirs: ['/usr/share/qemu', 'share/seabios'] })).message)
      .toMatch(/installations\[0\]\.firmwareDirs must be an array of absolute paths/);
    expect(refusal(withInstallation({ firmwareDirs: '/usr/share/qemu' })).message)
      .toMatch(/installations\[0\]\.firmwareDirs must be an array of absolute paths/);
  });

  it('refuses a path with a NUL byte', () => {
    expect(refusal(withInstallation({ binary: '/usr/bin/qemu\u0000x' })).message).toMatch(/installations\[0\]\.binary must be an absolute path/);
  });

  it('refuses current naming a missing installation, listing the ones there are', () => {
    const err = refusal({ ...VALID, current: { default: 'system', edge: 'snap-43' } });
    expect(err.message).toMatch(/current\.edge is "snap-43", which names no installation \(have: system, snap-42\)/);
  });

  it('refuses a current entry that is not a string', () => {
    expect(refusal({ ...VALID, current: { default: 7 } }).message).toMatch(/current\.default is 7, which names no installation/);
  });

  it('refuses a missing current.default', () => {
    const err = refusal({ ...VALID, current: { edge: 'snap-42' } });
    expect(err.message).toMatch(/current\.default is missing/);
  });

  it('refuses current that is not an object', () => {
    expect(refusal({ installations: VALID.installations }).message).toMatch(/"current" must map a channel to an installation name/);
    expect(refusal({ installations: VALID.installations, current: ['system'] }).message).toMatch(/"current" must map a channel/);
  });

  it('refuses a bad channel name', () => {
    for (const channel of ['Edge', 'my channel', '', '-x', '__proto__']) {
      const current = JSON.parse(`{"default": "system", ${JSON.stringify(channel)}: "snap-42"}`) as unknown;
      const err = refusal({ installations: VALID.installations, current });
      expect(err.message).toContain(`current: channel ${JSON.stringify(channel)} must match`);
    }
  });

  it('reports several problems at once, in one error', () => {
    const err = refusal({
      installations: [
        { name: 'system', binary: 'qemu' },
        { name: 'other', binary: '/usr/bin/qemu', colour: 'red' },
      ],
      current: { edge: 'nope' },
      extra: true,
    });
    expect(err.message).toMatch(/unknown field "extra"/);
    expect(err.message).toMatch(/installations\[0\]\.binary must be an absolute path/);
    expect(err.message).toMatch(/installations\[1\]: unknown field "colour"/);
    expect(err.message).toMatch(/current\.edge is "nope"/);
    expect(err.message).toMatch(/current\.default is missing/);
    expect(err.message).toMatch(/nothing was changed/);
  });
});

describe('currentInstallation and singleInstallation', () => {
  const config: InstallationsConfig = parseInstallationsConfig(JSON.stringify(VALID), FILE);

  it('returns the installation current on a known channel', () => {
    expect(currentInstallation(config, DEFAULT_CHANNEL).name).toBe('system');
    expect(currentInstallation(config, 'edge').binary).toBe('/snap/qemu/42/usr/bin/qemu-system-x86_64');
  });

  it('refuses an unknown channel with NO_INSTALLATION, naming the channel and the known ones', () => {
    for (const channel of ['beta', 'toString', '__proto__']) {
      let caught: unknown;
      try {
        currentInstallation(config, channel);
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(UpgradeError);
      expect((caught as UpgradeError).code).toBe('NO_INSTALLATION');
      expect((caught as UpgradeError).message).toContain(`channel "${channel}"`);
      expect((caught as UpgradeError).message).toContain('channels: default, edge');
    }
  });

  it('singleInstallation makes the one installation current on the default channel', () => {
    const inst = { name: 'cli', binary: '/usr/bin/qemu-system-x86_64', firmwareDirs: [] };
    const single = singleInstallation(inst);
    expect(single).toEqual({ installations: [inst], current: { [DEFAULT_CHANNEL]: 'cli' } });
    expect(currentInstallation(single, DEFAULT_CHANNEL)).toBe(inst);
  });
});

describe('loadInstallationsConfig', () => {
  let dir: string | undefined;

  afterEach(() => {
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
    dir = undefined;
  });

  it('reads and parses a file', async () => {
    dir = mkdtempSync(join(tmpdir(), 'vmkeep-upgrade-config-'));
    const file = join(dir, 'installations.json');
    writeFileSync(file, JSON.stringify(VALID));
    const config = await loadInstallationsConfig(file);
    expect(config.current).toEqual({ default: 'system', edge: 'snap-42' });
  });

  it('refuses a missing file with BAD_CONFIG naming the file', async () => {
    dir = mkdtempSync(join(tmpdir(), 'vmkeep-upgrade-config-'));
    const file = join(dir, 'nope.json');
    const err = await loadInstallationsConfig(file).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(UpgradeError);
    expect((err as UpgradeError).code).toBe('BAD_CONFIG');
    expect((err as UpgradeError).message).toContain(`installations file ${file}: cannot be read`);
    expect((err as UpgradeError).message).toContain('ENOENT');
  });

  it('names the file when its content is bad', async () => {
    dir = mkdtempSync(join(tmpdir(), 'vmkeep-upgrade-config-'));
    const file = join(dir, 'installations.json');
    writeFileSync(file, '{');
    const err = await loadInstallationsConfig(file).then(() => undefined, (e: unknown) => e);
    expect((err as UpgradeError).code).toBe('BAD_CONFIG');
    expect((err as UpgradeError).message).toContain(`installations file ${file}: is not JSON`);
  });
});
