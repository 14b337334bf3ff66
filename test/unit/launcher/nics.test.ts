import { describe, expect, it } from 'vitest';
import {
  buildQemuCommand, freeTapSlot, LaunchError, nicsForForegroundRun, parseNetdevHelp, tapName, tapsFor, TAP_NAME_RE, validateSpec, withMacs,
  type Installation, type NicSpec,
} from '../../../launcher/index.js';

const base = { name: 'web', kernel: '/boot/vmlinuz' };

function problemsOf(input: unknown): Array<[string, string]> {
  try {
    validateSpec(input);
  } catch (error) {
    if (error instanceof LaunchError) return error.problems.map((p) => [p.field, p.message]);
    throw error;
  }
  return [];
}

describe('nics in the spec', () => {
  it('accepts both modes, lowercases MACs, and leaves nics out when none are given', () => {
    const spec = validateSpec({
      ...base,
      nics: [
        { mode: 'bridge', bridge: 'br0', mac: '52:54:00:AB:CD:EF' },
        { mode: 'user', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }, { protocol: 'udp', host: ':5353', guest: 53 }] },
      ],
    });
    expect(spec.nics).toEqual([
      { mode: 'bridge', bridge: 'br0', mac: '52:54:00:ab:cd:ef' },
      { mode: 'user', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }, { protocol: 'udp', host: ':5353', guest: 53 }] },
    ]);
    expect(validateSpec(base).nics).toBeUndefined();
    expect(validateSpec({ ...base, nics: [] }).nics).toBeUndefined();
  });

  it('keeps a user-mode NIC\'s restrict as given, absent when not given', () => {
    const spec = validateSpec({ ...base, nics: [{ mode: 'user', restrict: true }, { mode: 'user', restrict: false }, { mode: 'user' }] });
    expect(spec.nics).toEqual([{ mode: 'user', hostForward: [], restrict: true }, { mode: 'user', hostForward: [], restrict: false }, { mode: 'user', hostForward: [] }]);
  });

  it('names every bad field with its fix', () => {
    const problems = problemsOf({
      ...base,
      nics: [
        { mode: 'bridge' },
        { mode: 'bridge', bridge: 'a-name-longer-than-15' },
        { mode: 'bridge', bridge: 'br0', mac: '01:00:5e:00:00:01' },
        { mode: 'bridge', bridge: 'br0', mac: '52:54:00:zz:00:01' },
        { mode: 'tap' },
        { mode: 'user', hostForward: [{ protocol: 'sctp', host: '127.0.0.1:99999', guest: 0 }, { protocol: 'tcp', host: '1.2.3.4:80', guest: 80, extra: 1 }] },
        { mode: 'user', hostForward: [{ protocol: 'tcp', host: ':80', guest: 81 }] },
        { mode: 'bridge', bridge: 'br0', mac: '52:54:00:00:00:01' },
        { mode: 'bridge', bridge: 'br0', mac: '52:54:00:00:00:01' },
        { mode: 'user', restrict: 'on' },
        { mode: 'bridge', bridge: 'br0', restrict: true },
      ],
    });
    expect(problems).toEqual([
      ['nics', 'has 11 entries, the limit is 8'],
      ['nics[0].bridge', 'is required'],
      ['nics[1].bridge', 'the string "a-name-longer-than-15" is not a network interface name'],
      ['nics[2].mac', '01:00:5e:00:00:01 is a multicast address'],
      ['nics[3].mac', 'the string "52:54:00:zz:00:01" is not a MAC address'],
      ['nics[4].mode', 'must be "bridge" or "user", got the string "tap"'],
      ['nics[5].hostForward[0].protocol', 'must be "tcp" or "udp", got the string "sctp"'],
      ['nics[5].hostForward[0].host', 'the string "127.0.0.1:99999" is not ADDR:PORT'],
      ['nics[5].hostForward[0].guest', 'number 0 is not a port'],
      ['nics[5].hostForward[1].extra', 'is not a known field'],
      ['nics[6].hostForward[0].host', 'tcp port 80 is already forwarded by nics[5].hostForward[1]'],
      ['nics[8].mac', 'is the same as nics[7].mac'],
      ['nics[9].restrict', 'must be true or false, got the string "on"'],
      ['nics[10].restrict', 'is not a known field'],
    ]);
  });
});

describe('MACs and TAP names', () => {
  it('generates 52:54:00 MACs unique among the taken ones and each other, keeping given ones', () => {
    const bytes = [[1, 2, 3], [1, 2, 3], [4, 5, 6], [7, 8, 9]];
    const random = (): Buffer => Buffer.from(bytes.shift() ?? [9, 9, 9]);
    const nics: NicSpec[] = [{ mode: 'bridge', bridge: 'br0' }, { mode: 'user', hostForward: [] }, { mode: 'bridge', bridge: 'br0', mac: '52:54:00:07:08:09' }];
    expect(withMacs(nics, new Set(['52:54:00:01:02:03']), random).map((n) => n.mac)).toEqual(['52:54:00:04:05:06', '52:54:00:09:09:09', '52:54:00:07:08:09']);
  });

  it('derives TAP names of at most 15 characters from the MAC and a slot, the free slot from the TAPs in use', () => {
    const name = tapName('52:54:00:ab:cd:ef', 'a');
    expect(name).toBe('vk525400abcdefa');
    expect(name.length).toBeLessThanOrEqual(15);
    expect(TAP_NAME_RE.test(name)).toBe(true);
    expect(freeTapSlot([])).toBe('a');
    expect(freeTapSlot(['vk525400abcdefa'])).toBe('b');
    expect(freeTapSlot(['vk525400abcdefb'])).toBe('a');
    expect(tapsFor([{ mode: 'user', hostForward: [], mac: '52:54:00:00:00:01' }, { mode: 'bridge', bridge: 'br0', mac: '52:54:00:00:00:02' }], 'b'))
      .toEqual([undefined, 'vk525400000002b']);
  });

  it('reads the backends of -netdev help', () => {
    const help = 'Available netdev backend types:\nsocket\nstream\ntap\nuser\nvhost-user\n';
    expect(parseNetdevHelp(help)).toEqual(['socket', 'stream', 'tap', 'user', 'vhost-user']);
    expect(parseNetdevHelp('Available netdev backend types:\ntap\n')).not.toContain('user');
  });
});

describe('NIC arguments', () => {
  const installation: Installation = { name: 'system', binary: '/usr/bin/qemu-system-x86_64', firmwareDirs: [] };
  const spec = validateSpec({
    ...base,
    nics: [
      { mode: 'bridge', bridge: 'br0', mac: '52:54:00:00:00:01' },
      { mode: 'user', mac: '52:54:00:00:00:02', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }] },
    ],
  });
  const build = (withForwards: boolean): string[] => buildQemuCommand({
    spec, uuid: '123e4567-e89b-12d3-a456-426614174000', installation, machineType: 'pc-q35-7.2',
    paths: { qmpSocket: '/run/q.sock', serialLog: '/var/s.log' }, startPaused: true, taps: ['vk525400000001a', undefined], withForwards,
  }).argv;

  it('opens each bridge NIC\'s TAP by name and gives every NIC virtio-net with its MAC', () => {
    const argv = build(true);
    expect(argv).toEqual(expect.arrayContaining([
      '-netdev', 'tap,id=net0,ifname=vk525400000001a,script=no,downscript=no', '-device', 'virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01',
      '-netdev', 'user,id=net1,hostfwd=tcp:127.0.0.1:2222-:22', '-device', 'virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02',
    ]));
  });

  it('starts a migration destination\'s user-mode NICs without their forwards (the source still holds the ports)', () => {
    expect(build(false)).toContain('user,id=net1');
    expect(build(false).join(' ')).not.toContain('hostfwd');
    expect(build(true).join(' ')).not.toContain('restrict');
  });

  it('gives a restricted user-mode NIC restrict=on in every QEMU of the VM, a migration\'s destination included', () => {
    const restricted = (withForwards: boolean): string[] => buildQemuCommand({
      spec: validateSpec({ ...base, nics: [{ mode: 'user', restrict: true, mac: '52:54:00:00:00:02', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }] }] }),
      uuid: '123e4567-e89b-12d3-a456-426614174000', installation, machineType: 'pc-q35-7.2',
      paths: { qmpSocket: '/run/q.sock', serialLog: '/var/s.log' }, startPaused: true, taps: [undefined], withForwards,
    }).argv;
    expect(restricted(true)).toContain('user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22');
    expect(restricted(false)).toContain('user,id=net0,restrict=on');
  });
});

describe('vmkeep run (no vmkeepd)', () => {
  it('gives user-mode NICs MACs for the run and refuses bridge NICs with the field and the fix', () => {
    const user = nicsForForegroundRun(validateSpec({ ...base, nics: [{ mode: 'user' }] }));
    expect(user.nics?.[0]?.mac).toMatch(/^52:54:00(:[0-9a-f]{2}){3}$/);
    expect(nicsForForegroundRun(validateSpec(base)).nics).toBeUndefined();
    expect(() => nicsForForegroundRun(validateSpec({ ...base, nics: [{ mode: 'user' }, { mode: 'bridge', bridge: 'br0' }] })))
      .toThrow(/nics\[1\]\.mode: a bridge NIC needs vmkeepd, which makes and owns its TAP device; fix: create the VM with vmkeep create/);
  });
});
