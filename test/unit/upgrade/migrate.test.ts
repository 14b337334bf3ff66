import { afterEach, describe, expect, it } from 'vitest';
import type { QmpClient } from '../../../qmp/index.js';
import { migrateLive, UpgradeError, type LiveMigrationOptions, type MigrationResult } from '../../../upgrade/index.js';
import { negotiatedPair, within, type FakeQmpPeer } from '../qmp/fake-peer.js';

const SOCKET = '/run/vmkeep/web.migrate.sock';
const URI = `unix:${SOCKET}`;

const clients: QmpClient[] = [];
const peers: FakeQmpPeer[] = [];

afterEach(() => {
  for (const client of clients.splice(0)) client.close();
  for (const peer of peers.splice(0)) peer.destroy();
});

async function pair(): Promise<{ client: QmpClient; peer: FakeQmpPeer }> {
  const result = await negotiatedPair();
  clients.push(result.client);
  peers.push(result.peer);
  return result;
}

/** Source and destination connected, migrateLive started, statuses recorded. */
async function start(options: Partial<LiveMigrationOptions> = {}) {
  const src = await pair();
  const dst = await pair();
  const statuses: string[] = [];
  const migrating = migrateLive({
    source: src.client,
    destination: dst.client,
    socketPath: SOCKET,
    timeoutMs: 2000,
    onStatus: (s) => statuses.push(s),
    ...options,
  });
  // Observed as a settled outcome, so an early rejection is never reported as unhandled.
  const outcome = migrating.then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  );
  return { src, dst, statuses, outcome };
}

/** Answers the set-up commands and the migrate command, checking each one's name and arguments. */
async function handshake(src: FakeQmpPeer, dst: FakeQmpPeer, bandwidth = 4 * 1024 * 1024 * 1024): Promise<void> {
  const caps = await src.nextCommand('migrate-set-capabilities on the source');
  expect(caps.execute).toBe('migrate-set-capabilities');
  expect(caps.arguments).toEqual({ capabilities: [{ capability: 'events', state: true }] });
  src.reply(caps.id);
  const params = await src.nextCommand('migrate-set-parameters on the source');
  expect(params.execute).toBe('migrate-set-parameters');
  expect(params.arguments).toEqual({ 'max-bandwidth': bandwidth, 'downtime-limit': 20 });
  src.reply(params.id);
  const incoming = await dst.nextCommand('migrate-incoming on the destination');
  expect(incoming.execute).toBe('migrate-incoming');
  expect(incoming.arguments).toEqual({ uri: URI });
  dst.reply(incoming.id);
  const migrate = await src.nextCommand('migrate on the source');
  expect(migrate.execute).toBe('migrate');
  expect(migrate.arguments).toEqual({ uri: URI });
  src.reply(migrate.id);
}

async function failure(outcome: Promise<{ ok: true; value: MigrationResult } | { ok: false; error: unknown }>, what: string): Promise<UpgradeError> {
  const settled = await within(outcome, 3000, what);
  if (settled.ok) throw new Error(`expected ${what} to fail, but it resolved with ${JSON.stringify(settled.value)}`);
  expect(settled.error).toBeInstanceOf(UpgradeError);
  return settled.error as UpgradeError;
}

describe('migrateLive', () => {
  it('migrates over unix:<socketPath> and returns QEMU\'s figures from query-migrate', async () => {
    const { src, dst, statuses, outcome } = await start();
    await handshake(src.peer, dst.peer);
    src.peer.event('MIGRATION', { status: 'setup' });
    src.peer.event('MIGRATION', { status: 'active' });
    src.peer.event('MIGRATION', { status: 'completed' });
    const query = await src.peer.nextCommand('query-migrate on the source');
    expect(query.execute).toBe('query-migrate');
    src.peer.reply(query.id, { status: 'completed', downtime: 42, 'total-time': 1234, 'setup-time': 7, ram: { transferred: 987654 } });

    const settled = await within(outcome, 2000, 'migrateLive to resolve');
    expect(settled).toEqual({ ok: true, value: { downtimeMs: 42, totalMs: 1234, setupMs: 7, transferredBytes: 987654 } });
    expect(statuses).toEqual(['setup', 'active', 'completed']);

    // Its listener is gone once it returned.
    const seen = src.client.waitForEvent('MIGRATION', { timeoutMs: 2000 });
    src.peer.event('MIGRATION', { status: 'setup' });
    await seen;
    expect(statuses).toEqual(['setup', 'active', 'completed']);
  });

  it('asks again while a completed migration reports no times yet (QEMU 7.2 right after the event)', async () => {
    const { src, dst, outcome } = await start();
    await handshake(src.peer, dst.peer);
    src.peer.event('MIGRATION', { status: 'completed' });
    const first = await src.peer.nextCommand('query-migrate on the source');
    src.peer.reply(first.id, { status: 'completed', downtime: 0, 'total-time': 0 });
    const second = await src.peer.nextCommand('query-migrate asked again');
    src.peer.reply(second.id, { status: 'completed', downtime: 5, 'total-time': 300 });
    expect(await within(outcome, 2000, 'migrateLive to resolve')).toEqual({ ok: true, value: { downtimeMs: 5, totalMs: 300 } });
  });

  it('passes a chosen bandwidth cap', async () => {
    const { src, dst, outcome } = await start({ maxBandwidth: 1_000_000 });
    await handshake(src.peer, dst.peer, 1_000_000);
    src.peer.event('MIGRATION', { status: 'completed' });
    const query = await src.peer.nextCommand('query-migrate on the source');
    src.peer.reply(query.id, { status: 'completed', downtime: 1, 'total-time': 2 });
    expect((await within(outcome, 2000, 'migrateLive to resolve')).ok).toBe(true);
  });

  it('fails with MIGRATION_FAILED and QEMU\'s error-desc when the migration ends failed', async () => {
    const { src, dst, statuses, outcome } = await start();
    await handshake(src.peer, dst.peer);
    src.peer.event('MIGRATION', { status: 'active' });
    src.peer.event('MIGRATION', { status: 'failed' });
    const query = await src.peer.nextCommand('query-migrate on the source');
    src.peer.reply(query.id, { status: 'failed', 'error-desc': 'Unable to write to socket: Broken pipe' });
    const err = await failure(outcome, 'migrateLive to fail');
    expect(err.code).toBe('MIGRATION_FAILED');
    expect(err.message).toContain('ended failed: Unable to write to socket: Broken pipe');
    expect(err.message).toContain('keeps running on its old QEMU');
    expect(statuses).toEqual(['active', 'failed']);
  });

  it('takes query-migrate, not the event, as the authority on the outcome', async () => {
    const { src, dst, outcome } = await start();
    await handshake(src.peer, dst.peer);
    src.peer.event('MIGRATION', { status: 'completed' });
    const query = await src.peer.nextCommand('query-migrate on the source');
    src.peer.reply(query.id, { status: 'cancelled' });
    const err = await failure(outcome, 'migrateLive to fail');
    expect(err.code).toBe('MIGRATION_FAILED');
    expect(err.message).toContain('ended cancelled');
  });

  it('ignores MIGRATION events that are not an end state', async () => {
    const { src, dst, outcome } = await start();
    await handshake(src.peer, dst.peer);
    src.peer.event('MIGRATION', { status: 'active' });
    src.peer.event('MIGRATION_PASS', { pass: 1 });
    src.peer.event('MIGRATION', { status: 'device' });
    src.peer.event('MIGRATION', { status: 'completed' });
    // The first command after migrate is query-migrate, sent only after the end event.
    const query = await src.peer.nextCommand('query-migrate on the source');
    expect(query.execute).toBe('query-migrate');
    src.peer.reply(query.id, { status: 'completed', downtime: 3, 'total-time': 4 });
    expect((await within(outcome, 2000, 'migrateLive to resolve')).ok).toBe(true);
  });

  it('cancels on the source and fails with MIGRATION_TIMEOUT when no end event comes in time', async () => {
    const { src, dst, outcome } = await start({ timeoutMs: 300 });
    await handshake(src.peer, dst.peer);
    src.peer.event('MIGRATION', { status: 'active' });
    const cancel = await src.peer.nextCommand('migrate_cancel on the source after the timeout', 3000);
    expect(cancel.execute).toBe('migrate_cancel');
    src.peer.reply(cancel.id);
    const err = await failure(outcome, 'migrateLive to time out');
    expect(err.code).toBe('MIGRATION_TIMEOUT');
    expect(err.message).toContain('was cancelled');
  });

  it('still fails with MIGRATION_TIMEOUT when migrate_cancel itself fails', async () => {
    const { src, dst, outcome } = await start({ timeoutMs: 300 });
    await handshake(src.peer, dst.peer);
    const cancel = await src.peer.nextCommand('migrate_cancel on the source after the timeout', 3000);
    src.peer.replyError(cancel.id, 'GenericError', 'no migration in progress');
    expect((await failure(outcome, 'migrateLive to time out')).code).toBe('MIGRATION_TIMEOUT');
  });

  it('fails with MIGRATION_FAILED when the source monitor goes away mid-migration', async () => {
    const { src, dst, outcome } = await start();
    await handshake(src.peer, dst.peer);
    src.peer.event('MIGRATION', { status: 'active' });
    src.peer.hangUp();
    const err = await failure(outcome, 'migrateLive to fail');
    expect(err.code).toBe('MIGRATION_FAILED');
    expect(err.message).toContain('the migration broke off');
  });
});
