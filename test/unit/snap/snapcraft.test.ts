// snap/snapcraft.yaml without snapcraft: every key, hook and enum value it uses is one the
// snapcraft schema (schema/snapcraft.json of snapcraft 8, core24 project) and craft-parts know,
// the files it points at exist, and the choices the snap depends on stay made.
import { constants } from 'node:fs';
import { access, readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseDocument } from 'yaml';
import { REPO, SNAP_DIR } from './sandbox.js';

// Top-level keys of a core24 project (Core24Project in snapcraft's schema).
const TOP_LEVEL = [
  'name', 'title', 'version', 'summary', 'description', 'base', 'build-base', 'platforms', 'contact', 'issues', 'source-code',
  'license', 'adopt-info', 'parts', 'package-repositories', 'compression', 'donation', 'website', 'type', 'icon', 'confinement',
  'layout', 'grade', 'assumes', 'hooks', 'passthrough', 'apps', 'plugs', 'slots', 'lint', 'epoch', 'system-usernames',
  'environment', 'build-packages', 'build-snaps', 'ua-services', 'provenance', 'components',
];
// apps.<name> keys (App in snapcraft's schema).
const APP_KEYS = [
  'command', 'autostart', 'common-id', 'bus-name', 'desktop', 'completer', 'stop-command', 'post-stop-command', 'start-timeout',
  'stop-timeout', 'watchdog-timeout', 'reload-command', 'restart-delay', 'timer', 'daemon', 'after', 'before', 'refresh-mode',
  'stop-mode', 'restart-condition', 'install-mode', 'slots', 'plugs', 'aliases', 'environment', 'command-chain', 'sockets',
  'daemon-scope', 'activates-on', 'passthrough', 'extensions',
];
// parts.<name> keys (craft-parts' PartSpec, plus snapcraft's parse-info), and the keys of the
// plugins that have their own.
const PART_KEYS = [
  'plugin', 'source', 'source-checksum', 'source-branch', 'source-commit', 'source-depth', 'source-subdir', 'source-submodules',
  'source-tag', 'source-type', 'disable-parallel', 'after', 'overlay-packages', 'stage-snaps', 'stage-packages', 'build-snaps',
  'build-packages', 'build-environment', 'build-attributes', 'organize', 'overlay', 'stage', 'prime', 'override-pull',
  'overlay-script', 'override-build', 'override-stage', 'override-prime', 'permissions', 'parse-info',
];
const PLUGIN_KEYS: Record<string, string[]> = { npm: ['npm-include-node', 'npm-node-version'], nil: [], dump: [] };
const BUILD_ATTRIBUTES = ['enable-patchelf', 'no-patchelf', 'keep-execstack'];
// hooks.<name> keys (Hook in snapcraft's schema) and the hooks snapd runs.
const HOOK_KEYS = ['command-chain', 'environment', 'plugs', 'passthrough'];
const HOOK_NAMES = [
  'install', 'configure', 'default-configure', 'pre-refresh', 'post-refresh', 'remove', 'check-health', 'gate-auto-refresh',
  'prepare-device', 'install-device', 'fde-setup',
];
const ENUMS = {
  confinement: ['strict', 'classic', 'devmode'],
  grade: ['stable', 'devel'],
  daemon: ['simple', 'forking', 'oneshot', 'notify', 'dbus'],
  'refresh-mode': ['endure', 'restart', 'ignore-running'],
  'stop-mode': ['sigterm', 'sigterm-all', 'sighup', 'sighup-all', 'sigusr1', 'sigusr1-all', 'sigusr2', 'sigusr2-all', 'sigint', 'sigint-all'],
  'restart-condition': ['on-success', 'on-failure', 'on-abnormal', 'on-abort', 'on-watchdog', 'always', 'never'],
  'install-mode': ['enable', 'disable'],
  'daemon-scope': ['system', 'user'],
};
// snapd's timeouts: Go durations such as 30s, 5m, 1m30s.
const DURATION = /^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$/;
const DAEMON_ONLY = ['start-timeout', 'stop-timeout', 'restart-delay', 'restart-condition', 'refresh-mode', 'stop-mode', 'install-mode', 'after', 'before'];

type Obj = Record<string, unknown>;

async function loadSnapcraft(): Promise<Obj> {
  const text = await readFile(join(SNAP_DIR, 'snapcraft.yaml'), 'utf8');
  // parseDocument reports duplicate keys and syntax errors instead of keeping the last value.
  const doc = parseDocument(text, { uniqueKeys: true, prettyErrors: true });
  expect(doc.errors.map((e) => e.message), 'YAML errors in snap/snapcraft.yaml').toEqual([]);
  expect(doc.warnings.map((e) => e.message)).toEqual([]);
  return doc.toJS() as Obj;
}

function obj(value: unknown, what: string): Obj {
  expect(value, `${what} must be a mapping`).toBeTypeOf('object');
  expect(Array.isArray(value), `${what} must be a mapping`).toBe(false);
  return value as Obj;
}

function unknownKeys(value: Obj, known: string[]): string[] {
  return Object.keys(value).filter((key) => !known.includes(key));
}

async function isExecutable(file: string): Promise<boolean> {
  try {
    await access(file, constants.X_OK);
    return (await stat(file)).isFile();
  } catch {
    return false;
  }
}

/** Lines of a shell script or YAML file that are not comments. */
function code(text: string): string[] {
  return text.split('\n').filter((line) => !line.trim().startsWith('#'));
}

const yaml = await loadSnapcraft();
const apps = obj(yaml.apps, 'apps');
const parts = obj(yaml.parts, 'parts');
const hookFiles = (await readdir(join(SNAP_DIR, 'hooks'))).sort();

describe('snap/snapcraft.yaml against the snapcraft schema', () => {
  it('uses only top-level keys of a core24 project, with the required ones', () => {
    expect(unknownKeys(yaml, TOP_LEVEL)).toEqual([]);
    for (const key of ['name', 'base', 'confinement', 'parts', 'version', 'summary', 'description']) expect(yaml, key).toHaveProperty([key]);
    // core24 replaced architectures with platforms.
    expect(yaml).not.toHaveProperty(['architectures']);
  });

  it('has a valid name, version, summary, base and enums', async () => {
    expect(yaml.name).toMatch(/^(?=.*[a-z])[a-z0-9](?:-?[a-z0-9])*$/);
    expect(String(yaml.name).length).toBeLessThanOrEqual(40);
    expect(yaml.version).toBeTypeOf('string');
    expect(String(yaml.version).length).toBeLessThanOrEqual(32);
    const pkg = JSON.parse(await readFile(join(REPO, 'package.json'), 'utf8')) as { version: string };
    expect(yaml.version, 'the snap carries the version of package.json').toBe(pkg.version);
    expect(String(yaml.summary).length).toBeLessThanOrEqual(78);
    expect(yaml.base).toBe('core24');
    expect(ENUMS.confinement).toContain(yaml.confinement);
    expect(ENUMS.grade).toContain(yaml.grade);
  });

  it('names platforms with build-on and build-for only', () => {
    const platforms = obj(yaml.platforms, 'platforms');
    expect(Object.keys(platforms)).toEqual(['amd64']);
    for (const [name, platform] of Object.entries(platforms)) expect(unknownKeys(obj(platform, name), ['build-on', 'build-for'])).toEqual([]);
  });

  it('gives the environment string values only', () => {
    for (const [key, value] of Object.entries(obj(yaml.environment, 'environment'))) expect(value, key).toBeTypeOf('string');
  });

  describe.each(Object.keys(apps))('app %s', (name) => {
    const app = obj(apps[name], `apps.${name}`);

    it('uses only app keys and valid values', () => {
      expect(name).toMatch(/^[a-zA-Z0-9](?:-?[a-zA-Z0-9])*$/);
      expect(unknownKeys(app, APP_KEYS)).toEqual([]);
      for (const [key, values] of Object.entries(ENUMS)) {
        if (key in app) expect(values, `apps.${name}.${key}`).toContain(app[key]);
      }
      for (const key of ['start-timeout', 'stop-timeout', 'restart-delay', 'watchdog-timeout']) {
        if (key in app) expect(app[key], `apps.${name}.${key}`).toMatch(DURATION);
      }
      for (const key of ['plugs', 'slots', 'after', 'before', 'command-chain']) {
        if (!(key in app)) continue;
        const list = app[key] as unknown[];
        expect(Array.isArray(list) && list.every((v) => typeof v === 'string'), `apps.${name}.${key} is a list of strings`).toBe(true);
        expect(new Set(list).size).toBe(list.length);
      }
      if (!('daemon' in app)) for (const key of DAEMON_ONLY) expect(app, `${key} needs daemon`).not.toHaveProperty([key]);
      for (const other of [...((app.after as string[] | undefined) ?? []), ...((app.before as string[] | undefined) ?? [])]) {
        expect(obj(apps[other], `apps.${other}`), `apps.${name} orders itself against a daemon of this snap`).toHaveProperty(['daemon']);
      }
    });

    it('runs a bash script of the repo that a dump part puts at the command path', async () => {
      const [program] = String(app.command).split(/\s+/);
      expect(program, 'a relative path inside the snap').toMatch(/^[^/$]/);
      const source = sourceOf(program ?? '');
      expect(source, `a dump part organizes a file to ${program}`).toBeDefined();
      const file = join(REPO, source ?? '');
      expect(await isExecutable(file), `${source} is executable`).toBe(true);
      expect((await readFile(file, 'utf8')).split('\n')[0]).toBe('#!/bin/bash');
    });
  });

  describe.each(Object.keys(parts))('part %s', (name) => {
    const part = obj(parts[name], `parts.${name}`);

    it('uses only part keys and its plugin keys', () => {
      const plugin = String(part.plugin);
      expect(Object.keys(PLUGIN_KEYS)).toContain(plugin);
      expect(unknownKeys(part, [...PART_KEYS, ...(PLUGIN_KEYS[plugin] ?? [])])).toEqual([]);
      for (const attr of (part['build-attributes'] as string[] | undefined) ?? []) expect(BUILD_ATTRIBUTES).toContain(attr);
      for (const dep of (part.after as string[] | undefined) ?? []) expect(Object.keys(parts), `parts.${name}.after`).toContain(dep);
      for (const key of ['stage-packages', 'build-packages', 'stage', 'prime']) {
        if (key in part) expect((part[key] as unknown[]).every((v) => typeof v === 'string'), `parts.${name}.${key}`).toBe(true);
      }
    });

    it('takes a local source that exists, and organizes files it has', async () => {
      const source = part.source as string | undefined;
      if (source === undefined || /^[a-z+]+:\/\//.test(source)) return;
      const dir = join(REPO, source);
      expect((await stat(dir)).isDirectory(), `${source} is a folder of the repo`).toBe(true);
      for (const from of Object.keys((part.organize as Obj | undefined) ?? {})) {
        expect(await isExecutable(join(dir, from)), `${source}/${from} exists and is executable`).toBe(true);
      }
    });
  });

  it('declares hooks only for hook files, with hook keys only', () => {
    const hooks = (yaml.hooks as Obj | undefined) ?? {};
    for (const [name, hook] of Object.entries(hooks)) {
      expect(hookFiles, `hooks.${name} has a file in snap/hooks`).toContain(name);
      expect(unknownKeys(obj(hook ?? {}, `hooks.${name}`), HOOK_KEYS)).toEqual([]);
    }
  });

  it('lets classic confinement stand alone: no plugs that would not be enforced, but network-bind where snapd requires it (sockets)', () => {
    expect(yaml.confinement).toBe('classic');
    expect(yaml).not.toHaveProperty(['plugs']);
    for (const [name, app] of Object.entries(apps)) {
      const a = obj(app, name);
      if (a.sockets === undefined) expect(a, `apps.${name}`).not.toHaveProperty(['plugs']);
      else expect(a.plugs, `apps.${name}`).toEqual(['network-bind']);
    }
  });

  it("has snapd hold the control socket where the snap's CLI, launcher and hooks look for it", async () => {
    const sockets = obj(obj(apps.vmkeepd, 'apps.vmkeepd').sockets, 'apps.vmkeepd.sockets');
    expect(Object.keys(sockets)).toEqual(['control']);
    const control = obj(sockets.control, 'sockets.control');
    expect(control['listen-stream']).toBe('$SNAP_COMMON/vmkeep.sock');
    const files = ['snap/local/vmkeep', 'snap/local/vmkeepd-launch', 'snap/local/vmkeep-guests', 'snap/hooks/remove'];
    for (const file of files) expect(await readFile(join(REPO, file), 'utf8'), file).toContain('$SNAP_COMMON/vmkeep.sock');
  });
});

describe('the choices the snap depends on', () => {
  const daemon = obj(apps.vmkeepd, 'apps.vmkeepd');

  it('runs vmkeepd as a notify daemon like the distro unit (snap/vmkeepd.service: Type=notify)', async () => {
    expect(daemon.daemon).toBe('notify');
    expect(await readFile(join(SNAP_DIR, 'vmkeepd.service'), 'utf8')).toMatch(/^Type=notify$/m);
  });

  it("runs every QEMU as snap_daemon, the system user it asks snapd for (system-usernames), never as root", () => {
    const env = obj(daemon.environment, 'apps.vmkeepd.environment');
    expect(env.VMKEEP_QEMU_USER).toBe('snap_daemon');
    expect(env).not.toHaveProperty(['VMKEEP_ALLOW_QEMU_ROOT']);
    // shared: the only scope snapd supports; snap_daemon: one of the names it creates for any snap.
    expect(yaml['system-usernames']).toEqual({ snap_daemon: 'shared' });
  });

  it('restarts vmkeepd on refresh so the new revision runs (never endure)', () => {
    expect(daemon['refresh-mode'] ?? 'restart').toBe('restart');
  });

  it('stops the whole service cgroup with SIGTERM, as the distro unit does (KillMode=control-group)', () => {
    // Plain sigterm would be KillMode=process in snapd's unit.
    expect(daemon['stop-mode']).toBe('sigterm-all');
    expect(daemon['stop-timeout']).toMatch(DURATION);
  });

  it('keeps state in $SNAP_COMMON: no script or YAML line outside comments uses $SNAP_DATA', async () => {
    const files = [
      'snapcraft.yaml',
      ...hookFiles.map((f) => `hooks/${f}`),
      ...(await readdir(join(SNAP_DIR, 'local'))).map((f) => `local/${f}`),
    ];
    for (const file of files) {
      const lines = code(await readFile(join(SNAP_DIR, file), 'utf8'));
      expect(lines.filter((line) => line.includes('SNAP_DATA')), `snap/${file}`).toEqual([]);
    }
    const launcher = await readFile(join(SNAP_DIR, 'local/vmkeepd-launch'), 'utf8');
    expect(launcher).toContain('STATE_DIR=$SNAP_COMMON/state');
  });
});

describe('snap/hooks', () => {
  it('holds the four hooks the snap needs', () => {
    expect(hookFiles).toEqual(['configure', 'install', 'post-refresh', 'remove']);
  });

  it.each(hookFiles)('%s is a snapd hook, an executable bash script with strict mode', async (name) => {
    expect(HOOK_NAMES).toContain(name);
    const file = join(SNAP_DIR, 'hooks', name);
    expect(await isExecutable(file), `snap/hooks/${name} is executable`).toBe(true);
    const text = await readFile(file, 'utf8');
    expect(text.split('\n')[0]).toBe('#!/bin/bash');
    expect(code(text)).toContain('set -euo pipefail');
  });
});

/** The repo file a dump part installs at `path` (through organize), relative to the repo. */
function sourceOf(path: string): string | undefined {
  for (const part of Object.values(parts) as Obj[]) {
    if (part.plugin !== 'dump' || typeof part.source !== 'string') continue;
    for (const [from, to] of Object.entries((part.organize as Record<string, string> | undefined) ?? {})) {
      if (to === path) return join(part.source, from);
    }
  }
  return undefined;
}
