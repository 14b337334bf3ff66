import { describe, expect, it } from 'vitest';
import { validateSpec, type NicSpec } from '../../../launcher/index.js';
import { nicHostProblems, orphanTaps, TapKeeper, tapsForNewQemu, tapsReleased, type NetPort } from '../../../daemon/taps.js';
import { createLogger } from '../../../daemon/log.js';

const other = validateSpec({
  name: 'db', kernel: '/k',
  nics: [{ mode: 'bridge', bridge: 'br0', mac: '52:54:00:00:00:01' }, { mode: 'user', mac: '52:54:00:00:00:02', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }] }],
});

describe('nicHostProblems', () => {
  const host = { bridges: new Set(['br0']), netdevs: ['tap', 'user'] };

  it('refuses a missing bridge, a MAC or host port another VM has, with the field and the fix', () => {
    const nics: NicSpec[] = [
      { mode: 'bridge', bridge: 'br9', mac: '52:54:00:00:00:01' },
      { mode: 'user', hostForward: [{ protocol: 'tcp', host: '0.0.0.0:2222', guest: 80 }, { protocol: 'udp', host: ':2222', guest: 80 }] },
    ];
    expect(nicHostProblems(nics, [other], host).map((p) => [p.field, p.message, p.fix.slice(0, 24)])).toEqual([
      ['nics[0].mac', '52:54:00:00:00:01 is taken by VM db', 'give another MAC, or lea'],
      ['nics[0].bridge', 'no Linux bridge named br9 on this host', 'create it first (e.g. `i'],
      ['nics[1].hostForward[0].host', 'tcp port 0.0.0.0:2222 is already forwarded by VM db', 'forward another host por'],
    ]);
  });

  it('says where the QEMU has no user-mode network', () => {
    const problems = nicHostProblems([{ mode: 'user', hostForward: [] }], [], { ...host, netdevs: ['tap'] });
    expect(problems.map((p) => p.field)).toEqual(['nics[0].mode']);
    expect(problems[0]?.message).toContain('built without libslirp');
  });

  it('accepts NICs that collide with nothing', () => {
    expect(nicHostProblems([{ mode: 'bridge', bridge: 'br0' }], [other], host)).toEqual([]);
  });
});

describe('TAP bookkeeping', () => {
  const proc = { pid: 1, startTime: '1', scope: null };
  const spec = validateSpec({ name: 'web', kernel: '/k', nics: [{ mode: 'bridge', bridge: 'br0', mac: '52:54:00:aa:bb:cc' }] });

  it('gives a migration destination the slot its source does not hold', () => {
    expect(tapsForNewQemu({ spec })).toEqual(['vk525400aabbcca']);
    expect(tapsForNewQemu({ spec, process: { ...proc, taps: ['vk525400aabbcca'] } })).toEqual(['vk525400aabbccb']);
    expect(tapsForNewQemu({ spec, retired: { ...proc, qmpSocket: '/q', taps: ['vk525400aabbccb'] } })).toEqual(['vk525400aabbcca']);
  });

  it('releases exactly the TAPs a record stops naming: a switch to the destination keeps both, the end of the source frees its own', () => {
    const source = { ...proc, taps: ['vk525400aabbcca'] };
    const destination = { ...proc, pid: 2, qmpSocket: '/q', taps: ['vk525400aabbccb'] };
    const migrating = { process: source, refresh: { strategy: 'migrate' as const, target: { name: 'x', binary: '/x', firmwareDirs: [] }, startedAt: '', destination } };
    const switched = { process: { ...destination }, retired: { ...source, qmpSocket: '/q' } };
    expect(tapsReleased(migrating, switched)).toEqual([]);
    expect(tapsReleased(switched, { process: switched.process })).toEqual(['vk525400aabbcca']);
    expect(tapsReleased(migrating, { process: source })).toEqual(['vk525400aabbccb']);
    expect(tapsReleased({ process: source }, {})).toEqual(['vk525400aabbcca']);
  });

  it('reports TAPs of vmkeep\'s pattern no record claims, and nothing else', () => {
    expect(orphanTaps(['eth0', 'br0', 'vk525400aabbcca', 'vk525400aabbccb', 'vkfoo'], new Set(['vk525400aabbcca']))).toEqual(['vk525400aabbccb']);
  });

  it('makes TAPs on their bridges, undoes the ones made when one fails, and runs changes one at a time', async () => {
    const log: string[] = [];
    const net: NetPort = {
      links: async () => [{ name: 'br0', kind: 'bridge' }, { name: 'br1', kind: 'bridge' }, { name: 'eth0', kind: undefined }],
      addTap: async (name, bridge) => {
        log.push(`add ${name} ${bridge}`);
        if (bridge === 'br1') throw new Error('boom');
      },
      attachTap: async () => { throw new Error('not used'); },
      removeTap: async (name) => { log.push(`del ${name}`); },
      watchLinks: () => ({ close: async () => undefined }),
    };
    const keeper = new TapKeeper(net, createLogger({ name: 'test', level: 'fatal', write: () => undefined }));
    const nics: NicSpec[] = [{ mode: 'bridge', bridge: 'br0', mac: '52:54:00:00:00:01' }, { mode: 'bridge', bridge: 'br1', mac: '52:54:00:00:00:02' }];
    await expect(keeper.make('web', nics, ['vk525400000001a', 'vk525400000002a'])).rejects.toThrow('boom');
    expect(log).toEqual(['add vk525400000001a br0', 'add vk525400000002a br1', 'del vk525400000001a', 'del vk525400000002a']);
    log.length = 0;
    await expect(keeper.make('web', [{ mode: 'bridge', bridge: 'gone', mac: '52:54:00:00:00:03' }], ['vk525400000003a'])).rejects.toThrow(/bridge gone of web's nics\[0\] does not exist/);
    const released = keeper.release('web', ['vk525400000009a']);
    const made = keeper.make('web', [nics[0] as NicSpec], ['vk525400000009a']);
    await Promise.all([released, made]);
    expect(log).toEqual(['del vk525400000009a', 'add vk525400000009a br0']);
  });
});
