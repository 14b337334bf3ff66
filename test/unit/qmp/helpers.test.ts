import { afterEach, describe, expect, it } from 'vitest';
import { QmpError, type QmpClient } from '../../../qmp/index.js';
import { type FakeQmpPeer, negotiatedPair, within } from './fake-peer.js';

const opened: { client: QmpClient; peer: FakeQmpPeer }[] = [];

async function pair() {
  const result = await negotiatedPair();
  opened.push(result);
  return result;
}

afterEach(() => {
  for (const { client, peer } of opened.splice(0)) {
    client.close();
    peer.destroy();
  }
});

/** Runs a helper against the fake peer, answering its one command with `reply`. */
async function roundTrip<T>(peer: FakeQmpPeer, call: Promise<T>, reply: unknown) {
  const cmd = await peer.nextCommand();
  peer.reply(cmd.id, reply);
  const result = await within(call, 2000, `the reply to ${cmd.execute}`);
  return { cmd, result };
}

async function rejection(promise: Promise<unknown>, what: string): Promise<QmpError> {
  const err = await within(
    promise.then(
      () => undefined,
      (e: unknown) => e,
    ),
    2000,
    what,
  );
  expect(err).toBeInstanceOf(QmpError);
  return err as QmpError;
}

describe('typed helpers', () => {
  it('queryStatus returns the typed status', async () => {
    const { client, peer } = await pair();
    const { cmd, result } = await roundTrip(peer, client.queryStatus(), {
      status: 'running',
      running: true,
      singlestep: false,
    });
    expect(cmd.execute).toBe('query-status');
    expect(result).toEqual({ status: 'running', running: true, singlestep: false });
  });

  it('queryStatus rejects a malformed reply with PROTOCOL but keeps the connection', async () => {
    const { client, peer } = await pair();
    const call = client.queryStatus();
    peer.reply((await peer.nextCommand()).id, { status: 42 });
    const err = await rejection(call, 'queryStatus with a bad reply');
    expect(err.code).toBe('PROTOCOL');
    expect(err.message).toContain('query-status');
    expect(client.isClosed).toBe(false);
  });

  it('queryVersion returns only the typed fields', async () => {
    const { client, peer } = await pair();
    const { cmd, result } = await roundTrip(peer, client.queryVersion(), {
      qemu: { major: 7, minor: 2, micro: 19, extra: 1 },
      package: 'Debian 1:7.2+dfsg-7+deb12u16',
    });
    expect(cmd.execute).toBe('query-version');
    expect(result).toEqual({ qemu: { major: 7, minor: 2, micro: 19 }, package: 'Debian 1:7.2+dfsg-7+deb12u16' });
    const bad = client.queryVersion();
    peer.reply((await peer.nextCommand()).id, { qemu: { major: '7' }, package: 'x' });
    expect((await rejection(bad, 'queryVersion with a bad reply')).code).toBe('PROTOCOL');
  });

  it('queryMigrate returns MigrationInfo, also the empty one before any migration', async () => {
    const { client, peer } = await pair();
    expect((await roundTrip(peer, client.queryMigrate(), {})).result).toEqual({});
    const info = {
      status: 'completed',
      'total-time': 612,
      downtime: 21,
      'setup-time': 3,
      ram: { transferred: 1000, remaining: 0, total: 268435456, mbps: 1000.5 },
    };
    const { cmd, result } = await roundTrip(peer, client.queryMigrate(), info);
    expect(cmd.execute).toBe('query-migrate');
    expect(result.status).toBe('completed');
    expect(result['total-time']).toBe(612);
    expect(result.downtime).toBe(21);
    expect(result.ram?.total).toBe(268435456);
    const bad = client.queryMigrate();
    peer.reply((await peer.nextCommand()).id, { status: 'active', downtime: 'soon' });
    expect((await rejection(bad, 'queryMigrate with a bad reply')).code).toBe('PROTOCOL');
  });

  it('command helpers send the QMP names and arguments QEMU expects', async () => {
    const { client, peer } = await pair();
    const calls: [Promise<unknown>, string, unknown][] = [
      [client.cont(), 'cont', undefined],
      [client.stop(), 'stop', undefined],
      [client.systemPowerdown(), 'system_powerdown', undefined],
      [client.migrate('unix:/run/mig.sock'), 'migrate', { uri: 'unix:/run/mig.sock' }],
      [client.migrateIncoming('unix:/run/mig.sock'), 'migrate-incoming', { uri: 'unix:/run/mig.sock' }],
      [client.migrateCancel(), 'migrate_cancel', undefined],
      [
        client.migrateSetCapabilities([{ capability: 'events', state: true }]),
        'migrate-set-capabilities',
        { capabilities: [{ capability: 'events', state: true }] },
      ],
      [client.migrateSetParameters({ 'max-bandwidth': 1 << 30 }), 'migrate-set-parameters', { 'max-bandwidth': 1 << 30 }],
    ];
    for (const [call, name, args] of calls) {
      const { cmd, result } = await roundTrip(peer, call, {});
      expect(cmd.execute).toBe(name);
      expect(cmd.arguments).toEqual(args);
      expect(result).toBeUndefined();
    }
  });

  it('helpers pass a per-call timeout through', async () => {
    const { client, peer } = await pair();
    const err = await rejection(client.migrate('unix:/x', { timeoutMs: 50 }), 'migrate with a 50 ms timeout');
    expect(err.code).toBe('COMMAND_TIMEOUT');
    expect((await peer.nextCommand()).execute).toBe('migrate');
  });

  it('an error reply to a helper is COMMAND_FAILED with the QMP class', async () => {
    const { client, peer } = await pair();
    const call = client.cont();
    peer.replyError((await peer.nextCommand()).id, 'GenericError', "'cont' is not allowed in state 'inmigrate'");
    const err = await rejection(call, 'cont refused');
    expect(err.code).toBe('COMMAND_FAILED');
    expect(err.qmpClass).toBe('GenericError');
    expect(err.message).toContain('inmigrate');
  });
});

describe('quit', () => {
  it('succeeds when QEMU replies and then closes', async () => {
    const { client, peer } = await pair();
    const call = client.quit();
    const cmd = await peer.nextCommand();
    expect(cmd.execute).toBe('quit');
    peer.reply(cmd.id);
    peer.hangUp();
    await within(call, 2000, 'quit');
    expect((await within(client.whenClosed(), 2000, 'the close after quit')).code).toBe('CLOSED');
  });

  it('succeeds when QEMU closes the socket before replying', async () => {
    const { client, peer } = await pair();
    const call = client.quit();
    await peer.nextCommand();
    peer.hangUp();
    await within(call, 2000, 'quit');
  });

  it('fails when QEMU refuses it, when the connection was already closed, or when closed by us', async () => {
    const { client, peer } = await pair();
    const refused = client.quit();
    peer.replyError((await peer.nextCommand()).id, 'GenericError', 'no');
    expect((await rejection(refused, 'refused quit')).code).toBe('COMMAND_FAILED');

    const ours = client.quit();
    await peer.nextCommand();
    client.close();
    expect((await rejection(ours, 'quit cut short by close()')).code).toBe('CLOSED');
    expect((await rejection(client.quit(), 'quit on a closed client')).code).toBe('CLOSED');
  });

  it('a protocol violation after quit is not success', async () => {
    const { client, peer } = await pair();
    const call = client.quit();
    await peer.nextCommand();
    peer.sendRaw('garbage\n');
    expect((await rejection(call, 'quit answered with garbage')).code).toBe('INVALID_JSON');
  });
});
