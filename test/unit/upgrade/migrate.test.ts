import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { QmpClient } from '../../../qmp/index.js';
import { cprTransfer, decideMigration, migrateLive, UpgradeError, type LiveMigrationOptions, type MigrationResult } from '../../../upgrade/index.js';
import { GREETING_NO_OOB, negotiatedPair, within, type FakeQmpPeer } from '../qmp/fake-peer.js';

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
async function handshake(src: FakeQmpPeer, dst: FakeQmpPeer, bandwidth = 4 * 1024 * 1024 * 1024, refuseMode = false): Promise<void> {
  await setUp(src, dst, bandwidth, refuseMode);
  const migrate = await src.nextCommand('migrate on the source');
  expect(migrate.execute).toBe('migrate');
  expect(migrate.arguments).toEqual({ uri: URI });
  src.reply(migrate.id);
}

/** The set-up commands, up to migrate-incoming on the destination. */
async function setUp(src: FakeQmpPeer, dst: FakeQmpPeer, bandwidth = 4 * 1024 * 1024 * 1024, refuseMode = false, pausedCopy = false): Promise<void> {
  await normalMode(src, refuseMode);
  const caps = await src.nextCommand('migrate-set-capabilities on the source');
  expect(caps.execute).toBe('migrate-set-capabilities');
  expect(caps.arguments).toEqual({ capabilities: [{ capability: 'events', state: true }] });
  src.reply(caps.id);
  const params = await src.nextCommand('migrate-set-parameters on the source');
  expect(params.execute).toBe('migrate-set-parameters');
  expect(params.arguments).toEqual({ 'max-bandwidth': bandwidth, 'downtime-limit': 20 });
  src.reply(params.id);
  if (pausedCopy) {
    const dstCaps = await dst.nextCommand('migrate-set-capabilities on the destination');
    expect(dstCaps.execute).toBe('migrate-set-capabilities');
    expect(dstCaps.arguments).toEqual({ capabilities: [{ capability: 'events', state: true }] });
    dst.reply(dstCaps.id);
  }
  const incoming = await dst.nextCommand('migrate-incoming on the destination');
  expect(incoming.execute).toBe('migrate-incoming');
  expect(incoming.arguments).toEqual({ uri: URI });
  dst.reply(incoming.id);
}

/** The first command: the source's migration mode set back to normal (a 7.2 refuses it: no matter). */
async function normalMode(src: FakeQmpPeer, refuse = false): Promise<void> {
  const mode = await src.nextCommand('migrate-set-parameters (mode) on the source');
  expect(mode.execute).toBe('migrate-set-parameters');
  expect(mode.arguments).toEqual({ mode: 'normal' });
  if (refuse) src.replyError(mode.id, 'GenericError', "Parameter 'mode' is unexpected");
  else src.reply(mode.id);
}

async function failure(outcome: Promise<{ ok: true; value: MigrationResult } | { ok: false; error: unknown }>, what: string): Promise<UpgradeError> {
  const settled = await within(outcome, 3000, what);
  if (settled.ok) throw new Error(`expected ${what} to fail, but it resolved with ${JSON.stringify(settled.value)}`);
  expect(settled.error).toBeInstanceOf(UpgradeError);
  return settled.error as UpgradeError;
}

describe('migrateLive', () => {
  it('goes on when the source (QEMU 7.2) has no migration mode to set back to normal', async () => {
    const { src, dst, outcome } = await start();
    await handshake(src.peer, dst.peer, undefined, true);
    src.peer.event('MIGRATION', { status: 'completed' });
    const query = await src.peer.nextCommand('query-migrate on the source');
    src.peer.reply(query.id, { status: 'completed', downtime: 2, 'total-time': 500 });
    expect(await within(outcome, 2000, 'migrateLive to resolve')).toEqual({ ok: true, value: { downtimeMs: 2, totalMs: 500 } });
  });

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

  it('pauseGuest: stops a running guest before the copy, resumes it on the destination, and the pause is the whole copy', async () => {
    let stopped = 0;
    const { src, dst, outcome } = await start({ pauseGuest: true, onGuestStopped: () => { stopped += 1; } });
    await setUp(src.peer, dst.peer, undefined, false, true);
    const status = await src.peer.nextCommand('query-status on the source');
    expect(status.execute).toBe('query-status');
    src.peer.reply(status.id, { status: 'running', running: true });
    const stop = await src.peer.nextCommand('stop on the source');
    expect(stop.execute).toBe('stop');
    const stoppedAt = performance.now();
    src.peer.reply(stop.id);
    const migrate = await src.peer.nextCommand('migrate on the source');
    expect(migrate.execute).toBe('migrate');
    expect(stopped).toBe(1);
    src.peer.reply(migrate.id);
    src.peer.event('MIGRATION', { status: 'completed' });
    const query = await src.peer.nextCommand('query-migrate on the source');
    src.peer.reply(query.id, { status: 'completed', downtime: 3, 'total-time': 700 });
    // The source is done, the destination may still load the stream: a `cont` now would be
    // lost (QEMU 7.2 then takes the source's paused state). Nothing is sent until it says so.
    await expectNoMoreCommands(dst.client, dst.peer, 'the destination before its own completed');
    dst.peer.event('MIGRATION', { status: 'completed' });
    const cont = await dst.peer.nextCommand('cont on the destination');
    expect(cont.execute).toBe('cont');
    const pausedAtLeast = Math.floor(performance.now() - stoppedAt);
    dst.peer.reply(cont.id);
    const settled = await within(outcome, 2000, 'migrateLive to resolve');
    if (!settled.ok) throw settled.error;
    // Measured from the stop to the resume, not QEMU's figure for the last part only.
    expect(settled.value.totalMs).toBe(700);
    expect(settled.value.downtimeMs).toBeGreaterThanOrEqual(pausedAtLeast - 1);
  });

  it('pauseGuest: a guest that was already paused is neither stopped nor resumed', async () => {
    let stopped = 0;
    const { src, dst, outcome } = await start({ pauseGuest: true, onGuestStopped: () => { stopped += 1; } });
    await setUp(src.peer, dst.peer, undefined, false, true);
    const status = await src.peer.nextCommand('query-status on the source');
    src.peer.reply(status.id, { status: 'paused', running: false });
    const migrate = await src.peer.nextCommand('migrate on the source');
    expect(migrate.execute).toBe('migrate');
    src.peer.reply(migrate.id);
    src.peer.event('MIGRATION', { status: 'completed' });
    const query = await src.peer.nextCommand('query-migrate on the source');
    src.peer.reply(query.id, { status: 'completed', downtime: 3, 'total-time': 700 });
    expect(await within(outcome, 2000, 'migrateLive to resolve')).toEqual({ ok: true, value: { downtimeMs: 3, totalMs: 700 } });
    expect(stopped).toBe(0);
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

type Decision = Awaited<ReturnType<typeof decideMigration>>;

/** Takes the next command, checks its name, and answers it (a value, or a QMP error). */
async function answer(peer: FakeQmpPeer, execute: string, value: unknown, where: string): Promise<void> {
  const cmd = await peer.nextCommand(`${execute} on the ${where}`);
  expect(cmd.execute, `command sent to the ${where}`).toBe(execute);
  peer.reply(cmd.id, value);
}

/** Takes the next command, checks its name, and answers it with a QMP error. */
async function answerError(peer: FakeQmpPeer, execute: string, where: string): Promise<void> {
  const cmd = await peer.nextCommand(`${execute} on the ${where}`);
  expect(cmd.execute, `command sent to the ${where}`).toBe(execute);
  peer.replyError(cmd.id, 'GenericError', 'scripted failure');
}

/**
 * Nothing else was sent on this monitor: a marker command sent now must be the next one
 * the peer sees (commands arrive in order, so this needs no waiting for absence).
 */
async function expectNoMoreCommands(client: QmpClient, peer: FakeQmpPeer, where: string): Promise<void> {
  const marker = client.execute('query-name');
  const cmd = await peer.nextCommand(`the marker command on the ${where}`);
  expect(cmd.execute, `a command decideMigration sent to the ${where} after deciding`).toBe('query-name');
  peer.reply(cmd.id, {});
  await marker;
}

const RUNNING = { status: 'running', running: true };
const INMIGRATE = { status: 'inmigrate', running: false };
const POSTMIGRATE = { status: 'postmigrate', running: false };

function decide(source: QmpClient | undefined, dest: QmpClient | 'no-monitor'): () => Promise<Decision> {
  const deciding = decideMigration(source, dest);
  return () => within(deciding, 3000, 'decideMigration to decide');
}

describe('decideMigration', () => {
  it('cancels a migration in flight, waits for it to settle, and goes back while the destination waits', async () => {
    const src = await pair();
    const dst = await pair();
    const result = decide(src.client, dst.client);
    await answer(src.peer, 'query-migrate', { status: 'active' }, 'source');
    await answer(src.peer, 'migrate_cancel', {}, 'source');
    // Still settling: asked again until it leaves the in-flight states.
    await answer(src.peer, 'query-migrate', { status: 'cancelling' }, 'source');
    await answer(src.peer, 'query-migrate', { status: 'cancelled' }, 'source');
    await answer(src.peer, 'query-status', RUNNING, 'source');
    await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
    expect(await result()).toBe('back');
    await expectNoMoreCommands(src.client, src.peer, 'source');
    await expectNoMoreCommands(dst.client, dst.peer, 'destination');
  });

  it('a paused copy cancelled: QEMU leaves the source in postmigrate, yet it holds the guest while the destination loads', async () => {
    const src = await pair();
    const dst = await pair();
    const result = decide(src.client, dst.client);
    await answer(src.peer, 'query-migrate', { status: 'cancelled' }, 'source');
    await answer(src.peer, 'query-status', POSTMIGRATE, 'source');
    await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
    expect(await result()).toBe('back');
    // The same with the destination gone (a failed incoming ends its QEMU).
    const gone = await pair();
    const again = decide(src.client, gone.client);
    await answer(src.peer, 'query-migrate', { status: 'failed' }, 'source');
    await answer(src.peer, 'query-status', POSTMIGRATE, 'source');
    const closing = gone.peer.nextCommand('query-status on the destination');
    gone.peer.destroy();
    await closing.catch(() => undefined);
    expect(await again()).toBe('back');
  });

  it('still goes back when migrate_cancel itself fails but the migration settles cancelled', async () => {
    const src = await pair();
    const dst = await pair();
    const result = decide(src.client, dst.client);
    await answer(src.peer, 'query-migrate', { status: 'setup' }, 'source');
    await answerError(src.peer, 'migrate_cancel', 'source');
    await answer(src.peer, 'query-migrate', { status: 'cancelled' }, 'source');
    await answer(src.peer, 'query-status', RUNNING, 'source');
    await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
    expect(await result()).toBe('back');
  });

  it('goes forward when the cancel loses the race, once the destination leaves inmigrate', async () => {
    const src = await pair();
    const dst = await pair();
    const result = decide(src.client, dst.client);
    await answer(src.peer, 'query-migrate', { status: 'active' }, 'source');
    await answer(src.peer, 'migrate_cancel', {}, 'source');
    await answer(src.peer, 'query-migrate', { status: 'completed' }, 'source');
    // The run state decides; finish-migrate is the instant before postmigrate.
    await answer(src.peer, 'query-status', { status: 'finish-migrate', running: false }, 'source');
    await answer(src.peer, 'query-status', POSTMIGRATE, 'source');
    // Handed over: the destination has the guest even while it still loads it, so its first
    // inmigrate must not read as "idle, go back".
    await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
    await answer(dst.peer, 'query-status', RUNNING, 'destination');
    expect(await result()).toBe('forward');
    await expectNoMoreCommands(src.client, src.peer, 'source');
    await expectNoMoreCommands(dst.client, dst.peer, 'destination');
  });

  it("goes back for a source that was itself a migration's destination (its query-migrate still says completed)", async () => {
    const src = await pair();
    const dst = await pair();
    const result = decide(src.client, dst.client);
    // QEMU keeps reporting the incoming migration that brought the guest here.
    await answer(src.peer, 'query-migrate', { status: 'completed' }, 'source');
    await answer(src.peer, 'query-status', RUNNING, 'source');
    await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
    expect(await result()).toBe('back');
  });

  it.each([
    ['no status at all', {}],
    ["status 'none'", { status: 'none' }],
  ])('with no migration in flight (%s) and the source in postmigrate, waits for the destination and goes forward', async (_label, info) => {
    const src = await pair();
    const dst = await pair();
    const result = decide(src.client, dst.client);
    await answer(src.peer, 'query-migrate', info, 'source');
    // No cancel: the next command is the source's run state.
    await answer(src.peer, 'query-status', POSTMIGRATE, 'source');
    await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
    await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
    await answer(dst.peer, 'query-status', RUNNING, 'destination');
    expect(await result()).toBe('forward');
    await expectNoMoreCommands(src.client, src.peer, 'source');
  });

  it('goes back when the source holds the guest and the destination exited (its monitor closed)', async () => {
    const src = await pair();
    const dst = await pair();
    const result = decide(src.client, dst.client);
    await answer(src.peer, 'query-migrate', { status: 'cancelled' }, 'source');
    await answer(src.peer, 'query-status', RUNNING, 'source');
    // QEMU 10.0 exits as soon as its incoming stream fails.
    await dst.peer.nextCommand('query-status on the destination');
    dst.peer.hangUp();
    expect(await result()).toBe('back');
  });

  it('a cpr destination without a monitor: back once the source settled holding the guest, unknown when it handed over', async () => {
    const src = await pair();
    const back = decide(src.client, 'no-monitor');
    await answer(src.peer, 'query-migrate', { status: 'active' }, 'source');
    await answer(src.peer, 'migrate_cancel', {}, 'source');
    await answer(src.peer, 'query-migrate', { status: 'cancelled' }, 'source');
    await answer(src.peer, 'query-status', RUNNING, 'source');
    expect(await back()).toBe('back');
    const over = decide(src.client, 'no-monitor');
    await answer(src.peer, 'query-migrate', { status: 'completed' }, 'source');
    await answer(src.peer, 'query-status', POSTMIGRATE, 'source');
    expect(await over()).toBe('unknown');
  });

  it('stays unknown when the source is gone and the destination exited too', async () => {
    const dst = await pair();
    const result = decide(undefined, dst.client);
    await dst.peer.nextCommand('query-status on the destination');
    dst.peer.hangUp();
    expect(await result()).toBe('unknown');
  });

  it('goes back after a failed migration while the source runs and the destination waits', async () => {
    const src = await pair();
    const dst = await pair();
    const result = decide(src.client, dst.client);
    await answer(src.peer, 'query-migrate', { status: 'failed', 'error-desc': 'Unable to write to socket: Broken pipe' }, 'source');
    // `failed` is settled: no migrate_cancel, straight to the run state.
    await answer(src.peer, 'query-status', RUNNING, 'source');
    await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
    expect(await result()).toBe('back');
    await expectNoMoreCommands(src.client, src.peer, 'source');
  });

  describe('with the source QEMU gone', () => {
    it('goes back while the destination is still in inmigrate', async () => {
      const dst = await pair();
      const result = decide(undefined, dst.client);
      await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
      expect(await result()).toBe('back');
      await expectNoMoreCommands(dst.client, dst.peer, 'destination');
    });

    it('goes forward when the destination runs the guest', async () => {
      const dst = await pair();
      const result = decide(undefined, dst.client);
      await answer(dst.peer, 'query-status', RUNNING, 'destination');
      expect(await result()).toBe('forward');
    });

    it('is unknown when the destination cannot be read either', async () => {
      const dst = await pair();
      const result = decide(undefined, dst.client);
      await answerError(dst.peer, 'query-status', 'destination');
      expect(await result()).toBe('unknown');
    });
  });

  describe('is unknown when a monitor cannot be read', () => {
    it('the destination hangs up while it is polled after the hand-over', async () => {
      const src = await pair();
      const dst = await pair();
      const result = decide(src.client, dst.client);
      await answer(src.peer, 'query-migrate', { status: 'completed' }, 'source');
      await answer(src.peer, 'query-status', POSTMIGRATE, 'source');
      await answer(dst.peer, 'query-status', INMIGRATE, 'destination');
      await dst.peer.nextCommand('query-status asked again on the destination');
      dst.peer.hangUp();
      expect(await result()).toBe('unknown');
    });

    it('the destination answers query-status with an error after a cancelled migration', async () => {
      const src = await pair();
      const dst = await pair();
      const result = decide(src.client, dst.client);
      await answer(src.peer, 'query-migrate', { status: 'cancelled' }, 'source');
      await answer(src.peer, 'query-status', RUNNING, 'source');
      await answerError(dst.peer, 'query-status', 'destination');
      expect(await result()).toBe('unknown');
    });

    it('the destination answers query-status with an error while it is polled after the hand-over', async () => {
      const src = await pair();
      const dst = await pair();
      const result = decide(src.client, dst.client);
      await answer(src.peer, 'query-migrate', { status: 'none' }, 'source');
      await answer(src.peer, 'query-status', POSTMIGRATE, 'source');
      await answerError(dst.peer, 'query-status', 'destination');
      expect(await result()).toBe('unknown');
    });

    it('the source hangs up while the cancelled migration is settling', async () => {
      const src = await pair();
      const dst = await pair();
      const result = decide(src.client, dst.client);
      await answer(src.peer, 'query-migrate', { status: 'active' }, 'source');
      await answer(src.peer, 'migrate_cancel', {}, 'source');
      await src.peer.nextCommand('query-migrate on the source after the cancel');
      src.peer.hangUp();
      expect(await result()).toBe('unknown');
      // Neither side is read as idle: the destination was never asked.
      await expectNoMoreCommands(dst.client, dst.peer, 'destination');
    });

    it('the source answers query-migrate with an error', async () => {
      const src = await pair();
      const dst = await pair();
      const result = decide(src.client, dst.client);
      await answerError(src.peer, 'query-migrate', 'source');
      expect(await result()).toBe('unknown');
      await expectNoMoreCommands(dst.client, dst.peer, 'destination');
    });

    it('the source answers query-status with an error', async () => {
      const src = await pair();
      const dst = await pair();
      const result = decide(src.client, dst.client);
      await answer(src.peer, 'query-migrate', { status: 'cancelled' }, 'source');
      await answerError(src.peer, 'query-status', 'source');
      expect(await result()).toBe('unknown');
      await expectNoMoreCommands(dst.client, dst.peer, 'destination');
    });
  });
});

describe('cprTransfer', () => {
  const channels = { cprSocket: '/run/vmkeep/web/cpr-1.sock', mainSocket: '/run/vmkeep/web/migrate-1.sock' };
  const servers: Server[] = [];
  const dirs: string[] = [];
  afterEach(() => {
    for (const server of servers.splice(0)) server.close();
    for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
  });

  /** A monitor socket that appears only when called, as a cpr destination's does once its source connected. */
  function destinationMonitor(): { path: string; appear: () => Promise<void> } {
    const dir = mkdtempSync(join(tmpdir(), 'vk-cpr-unit-'));
    dirs.push(dir);
    const path = join(dir, 'qmp.sock');
    return {
      path,
      appear: () => new Promise((resolve) => {
        const server = createServer((socket) => {
          socket.write(`${JSON.stringify(GREETING_NO_OOB)}\n`);
          socket.on('data', (data) => {
            for (const line of data.toString().split('\n').filter((l) => l !== '')) {
              const { id } = JSON.parse(line) as { id?: unknown };
              socket.write(`${JSON.stringify({ return: {}, id })}\n`);
            }
          });
        });
        servers.push(server);
        server.listen(path, () => resolve());
      }),
    };
  }

  async function cprStart(timeoutMs = 2000) {
    const src = await pair();
    const monitor = destinationMonitor();
    const destinations: QmpClient[] = [];
    const outcome = cprTransfer({
      source: src.client, channels, destinationQmpSocket: monitor.path, timeoutMs,
      onDestination: (qmp) => { destinations.push(qmp); clients.push(qmp); },
    }).then((value) => ({ ok: true as const, value }), (error: unknown) => ({ ok: false as const, error }));
    return { src, monitor, destinations, outcome };
  }

  async function cprSetUp(src: FakeQmpPeer): Promise<void> {
    await answer(src, 'migrate-set-capabilities', {}, 'source');
    const mode = await src.nextCommand('migrate-set-parameters (cpr-transfer) on the source');
    expect(mode.arguments).toEqual({ mode: 'cpr-transfer' });
    src.reply(mode.id);
  }

  async function expectNormalModeAgain(src: FakeQmpPeer): Promise<void> {
    const mode = await src.nextCommand('the mode set back to normal on the source');
    expect([mode.execute, mode.arguments]).toEqual(['migrate-set-parameters', { mode: 'normal' }]);
    src.reply(mode.id);
  }

  it('sends migrate with both channels, connects the destination monitor once it appears, and returns QEMU\'s figures', async () => {
    const { src, monitor, destinations, outcome } = await cprStart();
    await cprSetUp(src.peer);
    const migrate = await src.peer.nextCommand('migrate on the source');
    expect(migrate.arguments).toEqual({ channels: [
      { 'channel-type': 'main', addr: { transport: 'socket', type: 'unix', path: channels.mainSocket } },
      { 'channel-type': 'cpr', addr: { transport: 'socket', type: 'unix', path: channels.cprSocket } },
    ] });
    src.peer.reply(migrate.id);
    await monitor.appear();
    src.peer.event('MIGRATION', { status: 'completed' });
    const query = await src.peer.nextCommand('query-migrate on the source');
    src.peer.reply(query.id, { status: 'completed', downtime: 1, 'total-time': 66, ram: { transferred: 78599 } });
    expect(await within(outcome, 3000, 'cprTransfer to resolve')).toEqual({ ok: true, value: { downtimeMs: 1, totalMs: 66, transferredBytes: 78599 } });
    expect(destinations).toHaveLength(1);
  });

  it('the source refuses: MIGRATION_FAILED, no destination monitor, the mode set back to normal', async () => {
    const { src, destinations, outcome } = await cprStart();
    await cprSetUp(src.peer);
    const migrate = await src.peer.nextCommand('migrate on the source');
    src.peer.replyError(migrate.id, 'GenericError', 'Memory region pc.rom is not compatible with CPR');
    await expectNormalModeAgain(src.peer);
    const err = await failure(outcome, 'cprTransfer to fail');
    expect(err.code).toBe('MIGRATION_FAILED');
    expect(err.message).toMatch(/QEMU refused the migration: .*not compatible with CPR.*keeps running on its old QEMU/);
    expect(destinations).toEqual([]);
  });

  it('the stream fails before the destination has a monitor: the wait for it stops, MIGRATION_FAILED, mode normal', async () => {
    const { src, destinations, outcome } = await cprStart();
    await cprSetUp(src.peer);
    const migrate = await src.peer.nextCommand('migrate on the source');
    src.peer.reply(migrate.id);
    src.peer.event('MIGRATION', { status: 'failed' });
    const query = await src.peer.nextCommand('query-migrate on the source');
    src.peer.reply(query.id, { status: 'failed', 'error-desc': 'cpr channel: Connection reset by peer' });
    await expectNormalModeAgain(src.peer);
    const err = await failure(outcome, 'cprTransfer to fail');
    expect(err.message).toContain('ended failed: cpr channel: Connection reset by peer');
    expect(destinations).toEqual([]);
  });

  it('a source without cpr-transfer (it refuses the mode) fails before anything is sent', async () => {
    const { src, outcome } = await cprStart();
    await answer(src.peer, 'migrate-set-capabilities', {}, 'source');
    await answerError(src.peer, 'migrate-set-parameters', 'source');
    await expectNormalModeAgain(src.peer);
    const err = await failure(outcome, 'cprTransfer to fail');
    expect(err.message).toMatch(/could not be set up.*nothing was sent/);
  });
});
