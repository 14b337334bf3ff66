// packaging/snap/meta.ts: meta/snap.yaml generated from snap/snapcraft.yaml for the local build.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse, stringify } from 'yaml';
import { planSnapBuild, SnapMetaError } from '../../../packaging/snap/meta.js';
import { SNAP_DIR } from './sandbox.js';

const source = await readFile(join(SNAP_DIR, 'snapcraft.yaml'), 'utf8');

function withChange(change: (y: Record<string, any>) => void): string {
  const y = parse(source) as Record<string, any>;
  change(y);
  return stringify(y);
}

describe('snap.yaml from snapcraft.yaml', () => {
  it('carries the identity, confinement, environment and every app as snapd reads them', () => {
    const plan = planSnapBuild(source);
    // YAML 1.1 on both sides, as snapcraft and snapd read them.
    const meta = parse(plan.snapYaml, { version: '1.1' }) as Record<string, any>;
    const craft = parse(source, { version: '1.1' }) as Record<string, any>;
    for (const key of ['name', 'version', 'summary', 'description', 'base', 'grade', 'confinement', 'license', 'system-usernames', 'environment']) {
      expect(meta[key], key).toEqual(craft[key]);
    }
    expect(meta.architectures).toEqual(['amd64']);
    expect(meta.apps).toEqual(craft.apps);
    expect(meta.apps.vmkeepd).toMatchObject({ command: 'bin/vmkeepd-launch', daemon: 'notify', 'stop-mode': 'sigterm-all' });
    expect(meta.apps.guests['refresh-mode']).toBe('endure');
    // snapd creates QEMU's user from snap.yaml's system-usernames, not snapcraft.yaml's.
    expect(meta['system-usernames']).toEqual({ snap_daemon: 'shared' });
    // 0600 is octal for snapd (YAML 1.1), not decimal 600.
    expect(meta.apps.vmkeepd.sockets.control['socket-mode']).toBe(0o600);
    // Build-only keys never reach snap.yaml.
    expect(Object.keys(meta)).not.toContain('parts');
    expect(Object.keys(meta)).not.toContain('platforms');
  });

  it('overrides the version for test revisions', () => {
    expect((parse(planSnapBuild(source, { version: '0.1.0+x2' }).snapYaml) as Record<string, unknown>).version).toBe('0.1.0+x2');
  });

  it('plans the parts: the launcher files, the qemu packages and exclusions, the node release', () => {
    const plan = planSnapBuild(source);
    expect(plan.launcher).toEqual({
      source: 'snap/local',
      files: [
        { from: 'vmkeepd-launch', to: 'bin/vmkeepd-launch' },
        { from: 'vmkeep', to: 'bin/vmkeep' },
        { from: 'vmkeep-guests', to: 'bin/vmkeep-guests' },
        { from: 'vmkeepd-wake', to: 'bin/vmkeepd-wake' },
        { from: 'vmkeep-completion.bash', to: 'bin/vmkeep-completion.bash' },
        { from: 'vmkeep-strategies.bash', to: 'bin/vmkeep-strategies.bash' },
      ],
    });
    expect(plan.qemu.packages).toContain('qemu-system-x86');
    expect(plan.qemu.exclude).toContain('usr/share/doc');
    expect(plan.nodeSource).toMatch(/node-v20\.20\.2-linux-x64/);
  });

  it.each<[string, (y: Record<string, any>) => void, RegExp]>([
    ['a top-level key', (y) => (y.layout = { '/usr/share/x': { bind: '$SNAP/x' } }), /snapcraft\.yaml: layout not understood/],
    ['an app key', (y) => (y.apps.vmkeepd.aliases = ['vk']), /apps\.vmkeepd: aliases not understood/],
    ['a hook key', (y) => (y.hooks = { configure: { plugs: ['network'] } }), /hooks\.configure: plugs not understood/],
    ['a part', (y) => (y.parts.extra = { plugin: 'nil' }), /parts: extra not understood/],
    ['a part key', (y) => (y.parts.qemu['stage-snaps'] = ['x']), /parts\.qemu: stage-snaps not understood/],
    ['another plugin', (y) => (y.parts.vmkeep.plugin = 'npm'), /parts\.vmkeep\.plugin must be nil/],
    ['an inclusion in stage', (y) => (y.parts.qemu.stage = ['usr/bin']), /only exclusions/],
    ['another architecture', (y) => (y.platforms.amd64['build-for'] = ['arm64']), /amd64 only/],
  ])('refuses %s it does not understand, saying what to do', (_what, change, message) => {
    expect(() => planSnapBuild(withChange(change))).toThrow(message);
    try {
      planSnapBuild(withChange(change));
    } catch (err) {
      expect(err).toBeInstanceOf(SnapMetaError);
      expect((err as SnapMetaError).code).toBe('SNAP_META_UNSUPPORTED');
    }
  });

  it('refuses duplicate keys', () => {
    expect(() => planSnapBuild(source + '\nname: other\n')).toThrow(/does not parse/);
  });
});
