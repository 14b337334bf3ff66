// The operator socket attacked by a real non-root member of the operator group (ARCHITECTURE.md,
// invariant 11): a user and a group made for the test, curl run as that uid with setpriv. Each
// attack the issue found is refused with 403 naming its rule, and nothing is created or written.
// Negative control: the same member through the admin socket (shared with the group by
// --socket-group, root-equivalent as documented) has vmkeepd open /etc/shadow as a VM's disk.
// vmkeepd runs in a network namespace of the test's own (NetLab) with two bridges: br0, given
// to operators with --operator-bridge, and an admin's bridge that is not. A second member of the
// group attacks the first one's operations. The member's VM boots the tiny guest from a disk in
// the storage root and, on a user-mode NIC, tries the host's loopback (10.0.2.2 and fec0::2 in
// the guest), where a service of the host's own listens; the admin's same guest reaches it
// (negative control).
import { execFileSync } from 'node:child_process';
import { chmod, mkdir, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Operation } from '../../daemon/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { connectAttempts, ensureGuestImage, makeBootDisk, waitForSerial, type GuestImage } from '../support/guest.js';
import { EchoSession, LAB_BRIDGE, LoopbackService, NetLab } from '../support/net-lab.js';
import { qemuPidsOf } from '../support/qemu-procs.js';
import { waitFor } from '../support/systemd-host.js';

for (const [tool, pkg] of [['setpriv', 'util-linux'], ['curl', 'curl'], ['useradd', 'passwd'], ['qemu-img', 'qemu-utils']] as const) {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
  } catch {
    throw new Error(`${tool} is missing: apt-get install ${pkg}`);
  }
}

const account = `vkop${process.pid % 100000}`;
/** A second member of the operator group, for attacks on the first one's operations. */
const other = `${account}b`;
/** A bridge of the admin's that operators are not given. */
const ADMIN_BRIDGE = 'bradmin';
let uid: number;
let otherUid: number;
let gid: number;
let lab: NetLab;
let guest: GuestImage;
let host: DaemonHost;
let roots: string;
let operatorSocket: string;

beforeAll(async () => {
  guest = await ensureGuestImage();
  execFileSync('groupadd', [account]);
  execFileSync('useradd', ['-M', '-N', '-g', account, '-s', '/usr/sbin/nologin', account]);
  execFileSync('useradd', ['-M', '-N', '-g', account, '-s', '/usr/sbin/nologin', other]);
  uid = Number(execFileSync('id', ['-u', account], { encoding: 'utf8' }).trim());
  otherUid = Number(execFileSync('id', ['-u', other], { encoding: 'utf8' }).trim());
  gid = Number(execFileSync('id', ['-g', account], { encoding: 'utf8' }).trim());
  const dir = execFileSync('mktemp', ['-d', '/tmp/vk-op-XXXXXX'], { encoding: 'utf8' }).trim();
  // The member reaches the sockets through the runtime folder (0750, its group); the test
  // folder above it only lets it pass.
  await chmod(dir, 0o711);
  roots = join(dir, 'images');
  await mkdir(roots, { mode: 0o755 });
  lab = await NetLab.create(`vk-opa-${process.pid}`);
  await lab.ip('link', 'add', ADMIN_BRIDGE, 'type', 'bridge');
  await lab.ip('link', 'set', ADMIN_BRIDGE, 'up');
  host = await DaemonHost.boot({
    name: `opa-${process.pid}`,
    dir,
    args: ['--operator-group', account, '--socket-group', account, '--storage-root', roots, '--operator-bridge', LAB_BRIDGE],
    netns: lab.path,
  });
  operatorSocket = join(dir, 'run', 'vmkeep-operator.sock');
  await host.api.create({ name: 'h2', kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128 });
  await waitForSerial(host.serialLog('h2'), 'GUEST READY', 60_000);
});

afterAll(async () => {
  await host?.shutdown();
  // After the host: its QEMUs held the namespace's TAPs.
  await lab?.destroy();
  for (const name of [other, account]) {
    try {
      execFileSync('userdel', [name]);
    } catch {
      // not made
    }
  }
  try {
    execFileSync('groupdel', [account]);
  } catch {
    // not made, or removed with the user
  }
});

/** A request as the operator group's member: curl under its uid and gid, no other groups. */
function asMember(socket: string, method: string, path: string, body?: unknown): { status: number; json: any } {
  return asUid(uid, socket, method, path, body);
}

function asUid(who: number, socket: string, method: string, path: string, body?: unknown): { status: number; json: any } {
  const out = execFileSync('setpriv', [
    '--reuid', String(who), '--regid', String(gid), '--clear-groups', '--',
    'curl', '-sS', '--unix-socket', socket, '-X', method, '-w', '\n%{http_code}',
    ...(body === undefined ? [] : ['-H', 'Content-Type: application/json', '--data-binary', JSON.stringify(body)]),
    `http://vmkeep${path}`,
  ], { encoding: 'utf8' });
  const cut = out.lastIndexOf('\n');
  const text = out.slice(0, cut);
  return { status: Number(out.slice(cut + 1)), json: text === '' ? undefined : JSON.parse(text) };
}

function refused(reply: { status: number; json: any }, rule: string): void {
  expect(reply.status, JSON.stringify(reply.json)).toBe(403);
  expect(reply.json.error.code).toBe('FORBIDDEN');
  expect(reply.json.error.message).toContain(`rule ${rule}`);
}

async function stillRunning(name: string): Promise<void> {
  expect((await host.api.get(name)).state).toBe('running');
}

const listed = async (): Promise<string[]> => (await host.api.list()).map((v) => v.name);

describe('the operator socket, used by a non-root member of the operator group', () => {
  it('is 0660, owned by root and the operator group; the member is not root', async () => {
    const st = await stat(operatorSocket);
    expect([st.mode & 0o777, st.uid, st.gid]).toEqual([0o660, 0, gid]);
    expect(uid).not.toBe(0);
    expect(asMember(operatorSocket, 'GET', '/1.0/vms').status).toBe(200);
  });

  it('a shell command through migrate exec: is refused (403, qmp-read-only) and never runs', async () => {
    const marker = join(host.dir, 'exec-marker');
    refused(asMember(operatorSocket, 'POST', '/1.0/vms/h2/qmp', { execute: 'migrate', arguments: { uri: `exec:id > ${marker}` } }), 'qmp-read-only');
    refused(asMember(operatorSocket, 'POST', '/1.0/vms/h2/qmp', { execute: 'migrate', arguments: { uri: `file:${marker}` } }), 'qmp-read-only');
    expect(existsSync(marker)).toBe(false);
    await stillRunning('h2');
  });

  it('human-monitor-command, quit, getfd, device_add and blockdev-add are refused; a read-only query is answered', async () => {
    for (const execute of ['human-monitor-command', 'quit', 'getfd', 'add-fd', 'device_add', 'blockdev-add', 'object-add']) {
      refused(asMember(operatorSocket, 'POST', '/1.0/vms/h2/qmp', { execute, arguments: {} }), 'qmp-read-only');
    }
    await stillRunning('h2');
    const status = asMember(operatorSocket, 'POST', '/1.0/vms/h2/qmp', { execute: 'query-status' });
    expect(status.status).toBe(200);
    expect(status.json.return.status).toBe('running');
  });

  it('/etc/shadow as a disk is refused (403, storage-root); nothing is created', async () => {
    refused(asMember(operatorSocket, 'POST', '/1.0/vms', { spec: { name: 'shadow', disks: [{ path: '/etc/shadow', format: 'raw', readOnly: true }] } }), 'storage-root');
    expect(await listed()).not.toContain('shadow');
    expect(existsSync(join(host.dir, 'run', 'vms', 'shadow'))).toBe(false);
  });

  it('a disk that is a symlink in the storage root pointing out of it is refused; nothing is created', async () => {
    const secret = join(host.dir, 'secret.raw');
    await writeFile(secret, Buffer.alloc(1024 * 1024, 7));
    await symlink(secret, join(roots, 'link.raw'));
    refused(asMember(operatorSocket, 'POST', '/1.0/vms', { spec: { name: 'linked', disks: [{ path: join(roots, 'link.raw'), format: 'raw', readOnly: true }] } }), 'storage-root');
    // The same file named through a path outside the root that leads into it is refused too.
    refused(asMember(operatorSocket, 'POST', '/1.0/vms', { spec: { name: 'linked', disks: [{ path: secret, format: 'raw', readOnly: true }] } }), 'storage-root');
    expect(await listed()).not.toContain('linked');
  });

  it('a qcow2 in the root whose backing file is outside it is refused (its chain, then the opened descriptors at each start); nothing is kept', async () => {
    const base = join(host.dir, 'outside-base.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', base, '1M']);
    const top = join(roots, 'top.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top]);
    const reply = asMember(operatorSocket, 'POST', '/1.0/vms', { spec: { name: 'backed', disks: [{ path: top, format: 'qcow2' }] } });
    refused(reply, 'storage-root');
    expect(reply.json.error.message).toContain(base);
    expect(await listed()).not.toContain('backed');
  });

  it('a kernel path is refused (403, no-kernel-path); delete and a host shutdown\'s stop are admin-only', async () => {
    refused(asMember(operatorSocket, 'POST', '/1.0/vms', { spec: { name: 'kern', kernel: guest.kernel } }), 'no-kernel-path');
    refused(asMember(operatorSocket, 'DELETE', '/1.0/vms/h2'), 'admin-only');
    // A stop claiming the host shuts down would keep h2 wanted running for the next boot.
    refused(asMember(operatorSocket, 'POST', '/1.0/vms/h2/stop', { hostShutdown: true, timeoutSec: 5 }), 'admin-only');
    expect((await host.api.operations()).filter((op) => op.kind === 'stop' && op.vms.includes('h2'))).toEqual([]);
    await stillRunning('h2');
  });

  it('an image inside the root is fine: the member creates, starts and stops its VM; the log names its uid', async () => {
    const image = join(roots, 'own.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image, '4M']);
    const created = asMember(operatorSocket, 'POST', '/1.0/vms', { spec: { name: 'own', memoryMiB: 64, disks: [{ path: image, format: 'raw' }] } });
    expect(created.status, JSON.stringify(created.json)).toBe(201);
    expect(created.json.state).toBe('running');
    // A stop is an operation: 202 with it, followed to its end (as the member may).
    const stop = asMember(operatorSocket, 'POST', '/1.0/vms/own/stop', { force: true, timeoutSec: 5 });
    expect(stop.status, JSON.stringify(stop.json)).toBe(202);
    expect((await host.api.finished(stop.json as Operation, 60_000)).status).toBe('succeeded');
    await host.api.delete('own');
    const log = await host.consoleTail(400);
    expect(log).toContain(`POST /1.0/vms by uid ${uid} (operator): 201`);
    expect(log).toContain(`POST /1.0/vms/h2/qmp by uid ${uid} (operator): 403`);
  });

  it('a bridge NIC on a bridge operators are not given is refused (403, operator-bridge, naming the flag); on br0 it works', async () => {
    const image = join(roots, 'netted.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image, '4M']);
    const spec = (nics: unknown[]) => ({ spec: { name: 'netted', memoryMiB: 64, disks: [{ path: image, format: 'raw' }], nics } });
    const reply = asMember(operatorSocket, 'POST', '/1.0/vms', spec([{ mode: 'bridge', bridge: ADMIN_BRIDGE }]));
    refused(reply, 'operator-bridge');
    expect(reply.json.error.message).toContain(`operators may use ${LAB_BRIDGE}`);
    expect(reply.json.error.message).toContain(`vmkeepd --operator-bridge ${ADMIN_BRIDGE}`);
    expect(await listed()).not.toContain('netted');
    expect((await lab.links()).filter((l) => l.master === ADMIN_BRIDGE)).toEqual([]);

    const created = asMember(operatorSocket, 'POST', '/1.0/vms', spec([{ mode: 'bridge', bridge: LAB_BRIDGE }, { mode: 'user', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }] }]));
    expect(created.status, JSON.stringify(created.json)).toBe(201);
    expect(created.json.state).toBe('running');
    expect((await lab.links()).filter((l) => l.master === LAB_BRIDGE && /^vk[0-9a-f]{12}a$/.test(l.name))).toHaveLength(1);
    await host.api.stop('netted', { force: true });
    await host.api.delete('netted');
  });

  it('a forward from every address or from a privileged port is refused (403, operator-forward); the admin is not held to it', async () => {
    const image = join(roots, 'fwd.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image, '4M']);
    for (const forward of [':2223', '0.0.0.0:2223', '10.77.0.1:2223', '127.0.0.1:80', '127.0.0.1:1023']) {
      const reply = asMember(operatorSocket, 'POST', '/1.0/vms', {
        spec: { name: 'fwd', memoryMiB: 64, disks: [{ path: image, format: 'raw' }], nics: [{ mode: 'user', hostForward: [{ protocol: 'tcp', host: forward, guest: 22 }] }] },
      });
      refused(reply, 'operator-forward');
      expect(reply.json.error.message).toContain('a host port from 1024 to 65535 on a loopback address');
    }
    expect(await listed()).not.toContain('fwd');
    // The admin names both, its own bridge and every address (recorded, not started).
    await host.api.create({
      name: 'adminnet', kernel: guest.kernel, initrd: guest.initrd, memoryMiB: 64,
      nics: [{ mode: 'bridge', bridge: ADMIN_BRIDGE }, { mode: 'user', hostForward: [{ protocol: 'tcp', host: ':2223', guest: 22 }] }],
    }, { start: false });
    expect(await listed()).toContain('adminnet');
    await host.api.delete('adminnet');
  });

  it('an operator cancels only its own operations (403, own-operations); the admin cancels anything', async () => {
    // A rolling refresh that pauses after its first VM: cancellable until it ends (the second
    // VM, stopped, is never reached).
    await host.api.create({ name: 'second', kernel: guest.kernel, initrd: guest.initrd, memoryMiB: 64 }, { start: false });
    const job = { vms: ['h2', 'second'], parallel: 1, batchIntervalSec: 600 };
    const paused = (id: string) => waitFor(`operation ${id} to pause after its first VM`, 60_000, async () => {
      const op = await host.api.operation(id);
      expect(op.status).toBe('running');
      return op.progress?.done === 1 ? op : undefined;
    });

    const admins = await host.api.startRefreshJob(job);
    expect(admins.startedBy).toEqual({ level: 'admin' });
    await paused(admins.id);
    refused(asMember(operatorSocket, 'DELETE', `/1.0/operations/${admins.id}`), 'own-operations');
    refused(asUid(otherUid, operatorSocket, 'DELETE', `/1.0/operations/${admins.id}`), 'own-operations');
    expect((await host.api.operation(admins.id)).cancelRequested).toBeUndefined();

    const begun = asMember(operatorSocket, 'POST', '/1.0/refresh', job);
    expect(begun.status, JSON.stringify(begun.json)).toBe(202);
    const mine = begun.json as Operation;
    expect(mine.startedBy).toEqual({ level: 'operator', uid });
    await paused(mine.id);
    const stolen = asUid(otherUid, operatorSocket, 'DELETE', `/1.0/operations/${mine.id}`);
    refused(stolen, 'own-operations');
    expect(stolen.json.error.message).toContain(`begun by uid ${uid} (operator), you are uid ${otherUid}`);
    expect((await host.api.operation(mine.id)).cancelRequested).toBeUndefined();

    // Granted: the member its own, the admin anyone's.
    const cancelled = asMember(operatorSocket, 'DELETE', `/1.0/operations/${mine.id}`);
    expect(cancelled.status, JSON.stringify(cancelled.json)).toBe(202);
    expect((await host.api.cancelOperation(admins.id)).cancelRequested).toBe(true);
    for (const op of [mine, admins]) expect((await host.api.finished(op, 60_000)).status).toBe('cancelled');
    const log = await host.consoleTail(400);
    expect(log).toContain(`DELETE /1.0/operations/${mine.id} by uid ${otherUid} (operator): 403`);
    expect(log).toContain(`DELETE /1.0/operations/${mine.id} by uid ${uid} (operator): 202`);
    await host.api.delete('second');
  });

  describe('a user-mode NIC: the guest and the host\'s loopback (10.0.2.2 and fec0::2 in the guest)', () => {
    /** A service the host binds on 127.0.0.1 and ::1 only, as a database or an admin API would be. */
    const SECRET_PORT = 5432;
    const SECRET = 'host-only-secret';
    /** The host's loopback as QEMU's user-mode network shows it to the guest, IPv4 and IPv6. */
    const TARGETS = [`10.0.2.2:${SECRET_PORT}`, `fec0::2:${SECRET_PORT}`];
    const ECHO_PORT = 7;
    let service: LoopbackService;

    beforeAll(async () => {
      service = await LoopbackService.start(lab, SECRET_PORT, SECRET);
    });
    afterAll(async () => {
      await service?.stop();
    });

    /** A disk in the storage root booting the tiny guest, which tries TARGETS once a second. */
    async function snoopingDisk(name: string): Promise<string> {
      const disk = join(roots, `${name}.raw`);
      await makeBootDisk(disk, guest, `${guest.append} vmkeep_ip=10.0.2.15/24 vmkeep.connect=${TARGETS.join(',')}`);
      return disk;
    }

    const spec = (name: string, disk: string, forward: string, nic: Record<string, unknown> = {}) => ({
      name, memoryMiB: 128, disks: [{ path: disk, format: 'raw' }],
      nics: [{ mode: 'user', hostForward: [{ protocol: 'tcp', host: forward, guest: ECHO_PORT }], ...nic }],
    });

    /**
     * What the guest's attempts got ("target result"), once it has its IPv6 address (SLAAC) and
     * has made two more rounds at both targets.
     */
    async function attempts(name: string): Promise<string[]> {
      const log = host.serialLog(name);
      await waitForSerial(log, 'GUEST NET6 ', 180_000);
      const before = Math.max(0, ...(await connectAttempts(log)).map((a) => a.n));
      await waitForSerial(log, `GUEST CONNECT ${before + 2} ${TARGETS.at(-1) ?? ''} `, 120_000);
      return (await connectAttempts(log)).map((a) => `${a.target} ${a.got}`);
    }

    async function forwardAnswers(port: number): Promise<void> {
      const session = EchoSession.open(lab, '127.0.0.1', port);
      try {
        await session.waitForEchoes(5, 30_000, `echoes through the host forward 127.0.0.1:${port}`);
      } finally {
        await session.stop();
      }
    }

    async function qemuArgs(name: string): Promise<string[]> {
      const pids = qemuPidsOf(name, host.dir);
      expect(pids, `one QEMU of ${name}`).toHaveLength(1);
      return (await readFile(`/proc/${String(pids[0])}/cmdline`, 'utf8')).split('\0');
    }

    it('the member\'s guest cannot reach it (restricted, recorded, kept across a restart); its host forward still answers', async () => {
      const disk = await snoopingDisk('snoop');
      const created = asMember(operatorSocket, 'POST', '/1.0/vms', { spec: spec('snoop', disk, '127.0.0.1:2224') });
      expect(created.status, JSON.stringify(created.json)).toBe(201);
      try {
        const tried = await attempts('snoop');
        expect(tried.filter((a) => !a.endsWith(' FAILED')), 'the guest of an operator reached a service bound on the host\'s loopback').toEqual([]);
        for (const target of TARGETS) expect(tried.filter((a) => a.startsWith(`${target} `)).length).toBeGreaterThanOrEqual(2);
        expect(service.connections).toBe(0);
        await forwardAnswers(2224);
        expect((await host.record('snoop')).spec.nics[0].restrict).toBe(true);
        expect((await qemuArgs('snoop')).find((a) => a.startsWith('user,'))).toMatch(/,restrict=on(,|$)/);
        // The record, not the request, says so: a restarted vmkeepd reattaches it as it was.
        await host.restart();
        expect((await host.record('snoop')).spec.nics[0].restrict).toBe(true);
        await stillRunning('snoop');
        // The member may not ask for an open NIC itself.
        const open = asMember(operatorSocket, 'POST', '/1.0/vms', { spec: spec('open', disk, '127.0.0.1:2225', { restrict: false }) });
        refused(open, 'operator-user-net');
        expect(open.json.error.message).toContain('--operator-user-net open');
        expect(await listed()).not.toContain('open');
      } finally {
        await host.api.stop('snoop', { force: true });
        await host.api.delete('snoop');
      }
    });

    it('negative control: the admin\'s same guest reaches it (so the check can fail)', async () => {
      const disk = await snoopingDisk('snoopadmin');
      await host.api.create(spec('snoopadmin', disk, '127.0.0.1:2226'));
      try {
        for (const target of TARGETS) {
          await waitForSerial(host.serialLog('snoopadmin'), `${target} GOT ${SECRET}`, 180_000);
        }
        expect(service.connections).toBeGreaterThanOrEqual(2);
        expect((await host.record('snoopadmin')).spec.nics[0].restrict).toBeUndefined();
        await forwardAnswers(2226);
      } finally {
        await host.api.stop('snoopadmin', { force: true });
        await host.api.delete('snoopadmin');
      }
    });
  });

  // (A shell command through migrate exec: no longer runs even there: QEMU's sandbox ends the
  // QEMU instead, qemu-confinement.test.ts; nor does QEMU open a host file itself: it runs as
  // vmkeep-qemu, qemu-user.test.ts. vmkeepd, root, still opens the disks it is given.)
  it('negative control: the same member on the admin socket (--socket-group) has vmkeepd hand /etc/shadow to a VM', async () => {
    const stolen = asMember(host.socket, 'POST', '/1.0/vms/h2/qmp', {
      execute: 'blockdev-add', arguments: { 'node-name': 'stolen', driver: 'file', filename: '/etc/shadow', 'read-only': true },
    });
    expect(JSON.stringify(stolen.json), 'QEMU itself, unprivileged, cannot open it').toContain('Permission denied');
    const created = asMember(host.socket, 'POST', '/1.0/vms', { spec: { name: 'shadow2', memoryMiB: 64, disks: [{ path: '/etc/shadow', format: 'raw', readOnly: true }] } });
    expect(created.status, JSON.stringify(created.json)).toBe(201);
    // The disk reached QEMU as a descriptor vmkeepd opened; its fdset names the file.
    const block = asMember(host.socket, 'POST', '/1.0/vms/shadow2/qmp', { execute: 'query-fdsets' });
    expect(JSON.stringify(block.json)).toContain('/etc/shadow');
    await host.api.stop('shadow2', { force: true });
    await host.api.delete('shadow2');
  });
});
