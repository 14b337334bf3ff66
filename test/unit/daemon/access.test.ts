import { describe, expect, it } from 'vitest';
import { checkOperatorSpec, checkQmp, checkRoute, OPERATOR_QMP_COMMANDS } from '../../../daemon/access.js';
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

  it('an operator may send only the listed read-only queries; the root-equivalent commands say why', () => {
    expect(OPERATOR_QMP_COMMANDS.every((c) => c.startsWith('query-'))).toBe(true);
    checkQmp('operator', 'query-status');
    for (const command of ['migrate', 'human-monitor-command', 'quit', 'getfd', 'add-fd', 'device_add', 'blockdev-add', 'object-add', 'netdev_add', 'query-unknown-new']) {
      refusal(() => checkQmp('operator', command), 'qmp-read-only');
    }
  });

  it('an operator spec names no kernel or initrd, and disks only when there are storage roots', () => {
    refusal(() => checkOperatorSpec(validateSpec({ name: 'a', kernel: '/boot/vmlinuz' }), ['/srv']), 'no-kernel-path');
    refusal(() => checkOperatorSpec(validateSpec({ name: 'a', disks: [{ path: '/srv/a.raw', format: 'raw' }] }), []), 'storage-root');
    checkOperatorSpec(validateSpec({ name: 'a', disks: [{ path: '/srv/a.raw', format: 'raw' }] }), ['/srv']);
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
