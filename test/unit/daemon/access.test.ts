import { describe, expect, it } from 'vitest';
import { checkCancel, checkOperatorSpec, checkQmp, checkRoute, checkStop, OPERATOR_QMP_COMMANDS, starterOf } from '../../../daemon/access.js';
import { DaemonError } from '../../../daemon/errors.js';
import { parsePeerCredentials } from '../../../daemon/peer-cred.js';
import { validateSpec, withinRoots } from '../../../launcher/index.js';

function refusal(fn: () => void, rule: string): void {
  let error: unknown;
  try {
    fn();
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(DaemonError);
  expect((error as DaemonError).code).toBe('FORBIDDEN');
  expect((error as DaemonError).message).toContain(`rule ${rule}`);
}

describe('access rules', () => {
  it('the admin may use every route and QMP command', () => {
    checkRoute('admin', 'DELETE', '/1.0/vms/:name');
    checkQmp('admin', 'human-monitor-command');
  });

  it('an operator may create, start, stop, refresh and read, nothing else', () => {
    for (const [method, route] of [['POST', '/1.0/vms'], ['POST', '/1.0/vms/:name/start'], ['POST', '/1.0/vms/:name/stop'],
      ['POST', '/1.0/vms/:name/refresh'], ['GET', '/1.0/vms/:name/console'], ['GET', '/1.0/events']] as const) {
      checkRoute('operator', method, route);
    }
    refusal(() => checkRoute('operator', 'DELETE', '/1.0/vms/:name'), 'admin-only');
    refusal(() => checkRoute('operator', 'PATCH', '/1.0/vms/:name'), 'admin-only');
  });

  it('only the admin says a stop is the host\'s shutdown', () => {
    checkStop('admin', { hostShutdown: true });
    checkStop('operator', { hostShutdown: false });
    checkStop('operator', {});
    refusal(() => checkStop('operator', { hostShutdown: true }), 'admin-only');
  });

  it('an operator may send only the listed read-only queries; the root-equivalent commands say why', () => {
    expect(OPERATOR_QMP_COMMANDS.every((c) => c.startsWith('query-'))).toBe(true);
    checkQmp('operator', 'query-status');
    for (const command of ['migrate', 'human-monitor-command', 'quit', 'getfd', 'add-fd', 'device_add', 'blockdev-add', 'object-add', 'netdev_add', 'query-unknown-new']) {
      refusal(() => checkQmp('operator', command), 'qmp-read-only');
    }
  });

  const policy = { storageRoots: ['/srv'], bridges: ['br-ops'], userNet: 'restricted' as const };
  const disks = [{ path: '/srv/a.raw', format: 'raw' }];

  it('an operator spec names no kernel or initrd, and disks only when there are storage roots', () => {
    refusal(() => checkOperatorSpec(validateSpec({ name: 'a', kernel: '/boot/vmlinuz' }), policy), 'no-kernel-path');
    refusal(() => checkOperatorSpec(validateSpec({ name: 'a', disks: [{ path: '/srv/a.raw', format: 'raw' }] }), { ...policy, storageRoots: [] }), 'storage-root');
    checkOperatorSpec(validateSpec({ name: 'a', disks: [{ path: '/srv/a.raw', format: 'raw' }] }), policy);
  });

  it('an operator\'s bridge NIC joins only an --operator-bridge bridge; the refusal names the allowed ones and the flag', () => {
    const on = (bridge: string) => validateSpec({ name: 'a', disks, nics: [{ mode: 'user' }, { mode: 'bridge', bridge }] });
    checkOperatorSpec(on('br-ops'), policy);
    expect(() => checkOperatorSpec(on('br0'), policy)).toThrow('refused by rule operator-bridge: nics[1].bridge br0 is not for operators (operators may use br-ops); use a user-mode NIC, or ask the administrator to run vmkeepd --operator-bridge br0');
    expect(() => checkOperatorSpec(on('br-ops'), { ...policy, bridges: [] })).toThrow('(vmkeepd allows operators no bridge)');
  });

  it('an operator\'s forwards take a host port from 1024 on a loopback address only', () => {
    const forwarding = (...hosts: string[]) => validateSpec({ name: 'a', disks, nics: [{ mode: 'user', hostForward: hosts.map((host, i) => ({ protocol: i % 2 === 0 ? 'tcp' : 'udp', host, guest: 22 })) }] });
    checkOperatorSpec(forwarding('127.0.0.1:2222', '127.0.0.1:1024', '127.8.9.10:65535'), policy);
    for (const host of [':2222', '0.0.0.0:2222', '10.0.0.1:2222', '128.0.0.1:2222', '127.0.0.1:1023', '127.0.0.1:22']) {
      refusal(() => checkOperatorSpec(forwarding('127.0.0.1:2222', host), policy), 'operator-forward');
    }
    expect(() => checkOperatorSpec(forwarding(':80'), policy)).toThrow('nics[0].hostForward[0].host ":80" is not for operators: they may forward a host port from 1024 to 65535 on a loopback address, e.g. "127.0.0.1:1024"');
  });

  it('an operator\'s user-mode NICs are restricted (the record keeps it); with --operator-user-net open they are as asked', () => {
    const spec = validateSpec({
      name: 'a', disks,
      nics: [{ mode: 'user', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }] }, { mode: 'bridge', bridge: 'br-ops' }, { mode: 'user', restrict: true }],
    });
    const restricted = checkOperatorSpec(spec, policy);
    expect(restricted.nics).toEqual([
      { mode: 'user', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }], restrict: true },
      { mode: 'bridge', bridge: 'br-ops' },
      { mode: 'user', hostForward: [], restrict: true },
    ]);
    expect(spec.nics?.[0]).not.toHaveProperty('restrict'); // the input is left as it was
    expect(checkOperatorSpec(validateSpec({ name: 'a', disks }), policy).nics).toBeUndefined();
    const open = { ...policy, userNet: 'open' as const };
    expect(checkOperatorSpec(spec, open)).toEqual(spec);
    const asked = validateSpec({ name: 'a', disks, nics: [{ mode: 'user' }, { mode: 'user', restrict: false }] });
    expect(checkOperatorSpec(asked, open).nics?.map((n) => (n.mode === 'user' ? n.restrict : 'bridge'))).toEqual([undefined, false]);
    refusal(() => checkOperatorSpec(asked, policy), 'operator-user-net');
    expect(() => checkOperatorSpec(asked, policy)).toThrow('nics[1].restrict false is not for operators: their user-mode NICs are restricted (the guest reaches neither the host\'s loopback at 10.0.2.2 and fec0::2 nor beyond; host forwards still work); leave "restrict" out, or ask the administrator to run vmkeepd --operator-user-net open');
  });

  it('an operator cancels only what it began (same level and uid); the admin cancels anything', () => {
    const alice = { level: 'operator' as const, uid: 1001, gid: 1001, pid: 7 };
    const mine = starterOf(alice);
    expect(mine).toEqual({ level: 'operator', uid: 1001 });
    checkCancel(alice, mine);
    for (const caller of [{ level: 'admin' as const }, { level: 'admin' as const, uid: 0 }]) {
      for (const by of [undefined, mine, { level: 'admin' as const }, { level: 'operator' as const }]) checkCancel(caller, by);
    }
    refusal(() => checkCancel(alice, { level: 'admin' }), 'own-operations');
    refusal(() => checkCancel(alice, { level: 'operator', uid: 1002 }), 'own-operations');
    refusal(() => checkCancel(alice, { level: 'admin', uid: 1001 }), 'own-operations');
    refusal(() => checkCancel(alice, undefined), 'own-operations');
    // Unknown uids are never the same: neither side may be assumed.
    refusal(() => checkCancel(alice, { level: 'operator' }), 'own-operations');
    refusal(() => checkCancel({ level: 'operator' }, { level: 'operator' }), 'own-operations');
    expect(() => checkCancel(alice, { level: 'admin' })).toThrow('refused by rule own-operations: operators may cancel only the operations they began; this one was begun by the admin, you are uid 1001; ask the administrator to cancel it');
    expect(() => checkCancel(alice, { level: 'operator', uid: 1002 })).toThrow('begun by uid 1002 (operator)');
    expect(() => checkCancel({ level: 'operator' }, mine)).toThrow('your uid could not be read');
  });

  it('withinRoots compares whole path components', () => {
    expect(withinRoots('/srv/vms/a.raw', ['/srv/vms'])).toBe(true);
    expect(withinRoots('/srv/vms-other/a.raw', ['/srv/vms'])).toBe(false);
    expect(withinRoots('/srv/vms/../etc/shadow', ['/srv/vms'])).toBe(false);
    expect(withinRoots('/srv/vms', ['/srv/vms/'])).toBe(true);
  });

  it('parsePeerCredentials reads "PID UID GID" only', () => {
    expect(parsePeerCredentials('12 1000 100\n')).toEqual({ pid: 12, uid: 1000, gid: 100 });
    expect(parsePeerCredentials('x 1 2')).toBeUndefined();
  });
});
