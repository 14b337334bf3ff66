import { afterEach, describe, expect, it } from 'vitest';
import { QmpClient, QmpError, type QmpEvent } from '../../../qmp/index.js';
import { FakeQmpPeer, GREETING_NO_OOB, GREETING_OOB, negotiatedPair, within } from './fake-peer.js';

const clients: QmpClient[] = [];
const peers: FakeQmpPeer[] = [];

async function pair(options: Parameters<typeof negotiatedPair>[0] = {}) {
  const result = await negotiatedPair(options);
  clients.push(result.client);
  peers.push(result.peer);
  return result;
}

function newPeer(): FakeQmpPeer {
  const peer = new FakeQmpPeer();
  peers.push(peer);
  return peer;
}

afterEach(() => {
  for (const client of clients.splice(0)) client.close();
  for (const peer of peers.splice(0)) peer.destroy();
});

/** Awaits a rejection and returns it as a QmpError (fails the test otherwise). */
async function rejection(promise: Promise<unknown>, what: string): Promise<QmpError> {
  const outcome = await within(
    promise.then(
      () => ({ ok: true as const }),
      (err: unknown) => ({ ok: false as const, err }),
    ),
    2000,
    what,
  );
  if (outcome.ok) throw new Error(`expected ${what} to reject, but it resolved`);
  expect(outcome.err).toBeInstanceOf(QmpError);
  return outcome.err as QmpError;
}

describe('greeting and negotiation', () => {
  it('negotiates without arguments when the greeting offers no oob', async () => {
    const peer = newPeer();
    const connecting = QmpClient.fromStream(peer.clientEnd);
    peer.send(GREETING_NO_OOB);
    const caps = await peer.nextCommand('qmp_capabilities');
    expect(caps.execute).toBe('qmp_capabilities');
    expect(caps.arguments).toBeUndefined();
    peer.reply(caps.id);
    const client = await within(connecting, 2000, 'negotiation');
    clients.push(client);
    expect(client.oobEnabled).toBe(false);
    expect(client.greeting.version.qemu).toEqual({ major: 7, minor: 2, micro: 19 });
    expect(client.greeting.version.package).toBe('Debian 1:7.2+dfsg-7');
  });

  it('enables oob when the greeting offers it', async () => {
    const peer = newPeer();
    const connecting = QmpClient.fromStream(peer.clientEnd);
    peer.send(GREETING_OOB);
    const caps = await peer.nextCommand('qmp_capabilities');
    expect(caps.arguments).toEqual({ enable: ['oob'] });
    peer.reply(caps.id);
    const client = await within(connecting, 2000, 'negotiation');
    clients.push(client);
    expect(client.oobEnabled).toBe(true);
    expect(client.greeting.capabilities).toEqual(['oob']);
  });

  it('handles greeting and later messages arriving in one chunk, split mid-line', async () => {
    const peer = newPeer();
    const connecting = QmpClient.fromStream(peer.clientEnd);
    const greeting = `${JSON.stringify(GREETING_NO_OOB)}\r\n`;
    peer.sendRaw(greeting.slice(0, 10));
    peer.sendRaw(greeting.slice(10));
    const caps = await peer.nextCommand('qmp_capabilities');
    peer.reply(caps.id);
    clients.push(await within(connecting, 2000, 'negotiation'));
  });

  it('fails with GREETING_TIMEOUT, explaining the monitor is probably held by another client', async () => {
    const peer = newPeer();
    const err = await rejection(
      QmpClient.fromStream(peer.clientEnd, { greetingTimeoutMs: 50, label: '/run/vm1.qmp' }),
      'fromStream without a greeting',
    );
    expect(err.code).toBe('GREETING_TIMEOUT');
    expect(err.message).toContain('/run/vm1.qmp');
    expect(err.message).toMatch(/another client/);
    expect(err.message).toMatch(/vmkeep daemon/);
    await within(peer.clientGone, 2000, 'the client to drop the connection after the greeting timeout');
  });

  it('fails with CLOSED when the peer hangs up before greeting', async () => {
    const peer = newPeer();
    const connecting = QmpClient.fromStream(peer.clientEnd);
    peer.hangUp();
    const err = await rejection(connecting, 'fromStream against a peer that hangs up');
    expect(err.code).toBe('CLOSED');
    expect(err.message).toMatch(/before sending a QMP greeting/);
  });

  it('fails with PROTOCOL when the first message is not a greeting', async () => {
    const peer = newPeer();
    const connecting = QmpClient.fromStream(peer.clientEnd);
    peer.event('SHUTDOWN');
    expect((await rejection(connecting, 'fromStream with an event first')).code).toBe('PROTOCOL');
    await within(peer.clientGone, 2000, 'the client to drop the connection');
  });

  it('fails with PROTOCOL on a greeting without a version', async () => {
    const peer = newPeer();
    const connecting = QmpClient.fromStream(peer.clientEnd);
    peer.send({ QMP: { capabilities: [] } });
    expect((await rejection(connecting, 'fromStream with a bad greeting')).code).toBe('PROTOCOL');
  });

  it('fails with NEGOTIATION_FAILED when qmp_capabilities is refused', async () => {
    const peer = newPeer();
    const connecting = QmpClient.fromStream(peer.clientEnd);
    peer.send(GREETING_OOB);
    const caps = await peer.nextCommand('qmp_capabilities');
    peer.replyError(caps.id, 'GenericError', 'Capability oob not available');
    const err = await rejection(connecting, 'refused negotiation');
    expect(err.code).toBe('NEGOTIATION_FAILED');
    expect(err.qmpClass).toBe('GenericError');
    expect(err.message).toContain('Capability oob not available');
    await within(peer.clientGone, 2000, 'the client to drop the connection');
  });

  it('fails with COMMAND_TIMEOUT when qmp_capabilities is never answered', async () => {
    const peer = newPeer();
    const connecting = QmpClient.fromStream(peer.clientEnd, { commandTimeoutMs: 50 });
    peer.send(GREETING_NO_OOB);
    expect((await rejection(connecting, 'unanswered negotiation')).code).toBe('COMMAND_TIMEOUT');
  });

  it('rejects invalid options with INVALID_ARGUMENT', async () => {
    const peer = newPeer();
    expect((await rejection(QmpClient.fromStream(peer.clientEnd, { commandTimeoutMs: -1 }), 'bad options')).code).toBe(
      'INVALID_ARGUMENT',
    );
  });
});

describe('commands and replies', () => {
  it('sends every command with a unique id and matches out-of-order replies by id', async () => {
    const { client, peer } = await pair();
    const first = client.execute('query-a');
    const second = client.execute('query-b', { x: 1 });
    const third = client.execute('query-c');
    const cmds = [await peer.nextCommand(), await peer.nextCommand(), await peer.nextCommand()];
    expect(cmds.map((c) => c.execute)).toEqual(['query-a', 'query-b', 'query-c']);
    expect(cmds[1]?.arguments).toEqual({ x: 1 });
    expect(new Set(cmds.map((c) => c.id)).size).toBe(3);
    const [a, b, c] = cmds as [(typeof cmds)[0], (typeof cmds)[0], (typeof cmds)[0]];
    peer.reply(c.id, 'C');
    peer.reply(a.id, ['A']);
    peer.reply(b.id, { b: true });
    expect(await within(Promise.all([first, second, third]), 2000, 'three replies')).toEqual([['A'], { b: true }, 'C']);
  });

  it('rejects an error reply with COMMAND_FAILED carrying class and desc', async () => {
    const { client, peer } = await pair();
    const running = client.execute('frobnicate');
    const cmd = await peer.nextCommand();
    peer.replyError(cmd.id, 'CommandNotFound', "The command frobnicate has not been found");
    const err = await rejection(running, 'the failing command');
    expect(err.code).toBe('COMMAND_FAILED');
    expect(err.qmpClass).toBe('CommandNotFound');
    expect(err.command).toBe('frobnicate');
    expect(err.message).toContain('The command frobnicate has not been found');
    expect(client.isClosed).toBe(false);
  });

  it('ignores replies with unknown or missing ids', async () => {
    const { client, peer } = await pair();
    const running = client.execute('query-x');
    const cmd = await peer.nextCommand();
    peer.reply(cmd.id + 1000, 'stranger');
    peer.send({ error: { class: 'GenericError', desc: 'JSON parse error' } });
    peer.reply(cmd.id, 'mine');
    expect(await within(running, 2000, 'the reply')).toBe('mine');
    expect(client.isClosed).toBe(false);
  });

  it('rejects unserialisable arguments with INVALID_ARGUMENT and keeps the connection', async () => {
    const { client, peer } = await pair();
    const err = await rejection(client.execute('x', { big: 1n }), 'execute with a BigInt');
    expect(err.code).toBe('INVALID_ARGUMENT');
    const ok = client.execute('y');
    peer.reply((await peer.nextCommand()).id);
    await within(ok, 2000, 'the next command');
  });
});

describe('events', () => {
  it('delivers events interleaved with replies, in arrival order', async () => {
    const { client, peer } = await pair();
    const seen: string[] = [];
    client.on('event', (ev) => seen.push(ev.event));
    const running = client.execute('query-status');
    const cmd = await peer.nextCommand();
    // One chunk: event, reply, event; the second event is still delivered synchronously.
    peer.sendRaw(
      [
        JSON.stringify({ event: 'STOP', timestamp: { seconds: 1, microseconds: 2 } }),
        JSON.stringify({ return: { status: 'paused', running: false }, id: cmd.id }),
        JSON.stringify({ event: 'RESUME', timestamp: { seconds: 1, microseconds: 3 } }),
        '',
      ].join('\n'),
    );
    expect(await within(running, 2000, 'the reply')).toEqual({ status: 'paused', running: false });
    expect(seen).toEqual(['STOP', 'RESUME']);
  });

  it('gives events data {} when QEMU sent none, and passes data and timestamp through', async () => {
    const { client, peer } = await pair();
    const got: QmpEvent[] = [];
    client.on('event', (ev) => got.push(ev));
    const next = client.waitForEvent('SHUTDOWN');
    peer.event('RESUME');
    peer.event('SHUTDOWN', { guest: true, reason: 'guest-shutdown' });
    await within(next, 2000, 'SHUTDOWN');
    expect(got).toEqual([
      { event: 'RESUME', data: {}, timestamp: { seconds: 1700000000, microseconds: 42 } },
      { event: 'SHUTDOWN', data: { guest: true, reason: 'guest-shutdown' }, timestamp: { seconds: 1700000000, microseconds: 42 } },
    ]);
  });

  it('stops delivering to a removed listener', async () => {
    const { client, peer } = await pair();
    const seen: string[] = [];
    const remove = client.on('event', (ev) => seen.push(ev.event));
    const first = client.waitForEvent('A');
    peer.event('A');
    await within(first, 2000, 'event A');
    remove();
    const second = client.waitForEvent('B');
    peer.event('B');
    await within(second, 2000, 'event B');
    expect(seen).toEqual(['A']);
  });

  it('waitForEvent resolves with the first event that matches name and predicate', async () => {
    const { client, peer } = await pair();
    const waiting = client.waitForEvent('MIGRATION', {
      predicate: (ev) => ev.data.status === 'completed',
      timeoutMs: 2000,
    });
    peer.event('MIGRATION', { status: 'setup' });
    peer.event('STOP');
    peer.event('MIGRATION', { status: 'active' });
    peer.event('MIGRATION', { status: 'completed' });
    expect((await within(waiting, 3000, 'MIGRATION completed')).data).toEqual({ status: 'completed' });
  });

  it('waitForEvent rejects with EVENT_TIMEOUT naming the event', async () => {
    const { client, peer } = await pair();
    const waiting = client.waitForEvent('SHUTDOWN', { timeoutMs: 50 });
    peer.event('POWERDOWN');
    const err = await rejection(waiting, 'waitForEvent(SHUTDOWN)');
    expect(err.code).toBe('EVENT_TIMEOUT');
    expect(err.message).toContain('SHUTDOWN');
  });

  it('waitForEvent rejects when the connection closes, and at once when already closed', async () => {
    const { client, peer } = await pair();
    const waiting = client.waitForEvent('SHUTDOWN');
    peer.hangUp();
    const err = await rejection(waiting, 'waitForEvent during EOF');
    expect(err.code).toBe('CLOSED');
    expect(err.message).toContain('SHUTDOWN');
    expect((await rejection(client.waitForEvent('X'), 'waitForEvent after close')).code).toBe('CLOSED');
  });

  it('waitForEvent can be aborted, and rejects with what the predicate throws', async () => {
    const { client, peer } = await pair();
    const controller = new AbortController();
    const aborted = client.waitForEvent('SHUTDOWN', { signal: controller.signal });
    controller.abort();
    expect((await rejection(aborted, 'aborted wait')).code).toBe('ABORTED');

    const boom = new Error('predicate bug');
    const throwing = client.waitForEvent('STOP', {
      predicate: () => {
        throw boom;
      },
    });
    peer.event('STOP');
    await expect(within(throwing, 2000, 'the throwing predicate')).rejects.toBe(boom);
    expect(client.isClosed).toBe(false);
  });

  it('isolates a throwing listener: others still run, the error is reported, the connection lives', async () => {
    const reported: unknown[] = [];
    const { client, peer } = await pair({ onListenerError: (err) => reported.push(err) });
    const seen: string[] = [];
    client.on('event', () => {
      throw new Error('listener bug');
    });
    client.on('event', (ev) => seen.push(ev.event));
    const waiting = client.waitForEvent('STOP');
    peer.event('STOP');
    await within(waiting, 2000, 'STOP');
    expect(seen).toEqual(['STOP']);
    expect(reported).toHaveLength(1);
    expect((reported[0] as Error).message).toBe('listener bug');
    const running = client.execute('query-x');
    peer.reply((await peer.nextCommand()).id, 1);
    expect(await within(running, 2000, 'a reply after the listener error')).toBe(1);
  });
});

describe('timeouts', () => {
  it('rejects a command with COMMAND_TIMEOUT after its per-call timeout and ignores the late reply', async () => {
    const { client, peer } = await pair();
    const slow = client.execute('query-slow', undefined, { timeoutMs: 50 });
    const slowCmd = await peer.nextCommand();
    const err = await rejection(slow, 'the slow command');
    expect(err.code).toBe('COMMAND_TIMEOUT');
    expect(err.command).toBe('query-slow');
    expect(err.message).toContain('query-slow');
    expect(err.message).toContain('50 ms');
    expect(client.pendingCount).toBe(0);

    const next = client.execute('query-next');
    const nextCmd = await peer.nextCommand();
    peer.reply(slowCmd.id, 'late');
    peer.reply(nextCmd.id, 'on time');
    expect(await within(next, 2000, 'the next command')).toBe('on time');
    expect(client.isClosed).toBe(false);
  });

  it('timed-out commands leave nothing behind, however many there are', async () => {
    const { client } = await pair();
    const calls = Array.from({ length: 200 }, (_, i) => client.execute(`query-${i}`, undefined, { timeoutMs: 50 }));
    expect(client.pendingCount).toBe(200);
    const results = await within(Promise.allSettled(calls), 2000, '200 timeouts');
    expect(results.every((r) => r.status === 'rejected')).toBe(true);
    expect(client.pendingCount).toBe(0);
  });

  it('uses the client\'s default command timeout', async () => {
    const { client, peer } = await pair({ commandTimeoutMs: 50 });
    const started = Date.now();
    const err = await rejection(client.execute('query-slow'), 'a command under the default timeout');
    expect(err.code).toBe('COMMAND_TIMEOUT');
    expect(Date.now() - started).toBeGreaterThanOrEqual(45);
    expect((await peer.nextCommand()).execute).toBe('query-slow');
  });

  it('a per-call timeout overrides the default', async () => {
    const { client, peer } = await pair({ commandTimeoutMs: 50 });
    const patient = client.execute('query-patient', undefined, { timeoutMs: 5000 });
    const cmd = await peer.nextCommand();
    // Outlive the default timeout by waiting for another command to time out first.
    await rejection(client.execute('query-other'), 'a command under the default timeout');
    peer.reply(cmd.id, 'eventually');
    expect(await within(patient, 2000, 'the patient command')).toBe('eventually');
  });

  it('rejects a nonsensical per-call timeout with INVALID_ARGUMENT', async () => {
    const { client } = await pair();
    expect((await rejection(client.execute('x', undefined, { timeoutMs: 0 }), 'timeout 0')).code).toBe('INVALID_ARGUMENT');
  });
});

describe('closing', () => {
  it('on EOF rejects every pending command with CLOSED and emits close once', async () => {
    const { client, peer } = await pair();
    const reasons: QmpError[] = [];
    client.on('close', (r) => reasons.push(r));
    const pending = [client.execute('a'), client.execute('b'), client.execute('c')];
    await peer.nextCommand();
    peer.hangUp();
    for (const [i, p] of pending.entries()) {
      const err = await rejection(p, `pending command ${i}`);
      expect(err.code).toBe('CLOSED');
      expect(err.message).toMatch(/QEMU closed the QMP connection/);
    }
    expect(reasons.map((r) => r.code)).toEqual(['CLOSED']);
    expect((await within(client.whenClosed(), 2000, 'whenClosed')).code).toBe('CLOSED');
    expect(client.isClosed).toBe(true);
    expect((await rejection(client.execute('d'), 'execute after EOF')).code).toBe('CLOSED');
  });

  it('on a socket error rejects pending commands with CLOSED carrying the cause', async () => {
    const { client, peer } = await pair();
    const pending = client.execute('a');
    await peer.nextCommand();
    const boom = new Error('ECONNRESET simulated');
    peer.clientEnd.destroy(boom);
    const err = await rejection(pending, 'the pending command');
    expect(err.code).toBe('CLOSED');
    expect(err.message).toContain('ECONNRESET simulated');
  });

  it('close() rejects pending commands, is idempotent, and drops the connection', async () => {
    const { client, peer } = await pair();
    const reasons: QmpError[] = [];
    client.on('close', (r) => reasons.push(r));
    const pending = client.execute('a');
    client.close();
    client.close();
    const err = await rejection(pending, 'the pending command');
    expect(err.code).toBe('CLOSED');
    client.close();
    expect(reasons).toHaveLength(1);
    expect(reasons[0]?.message).toMatch(/closed by this client/);
    await within(peer.clientGone, 2000, 'the peer to see the connection end');
  });

  it('a close listener that throws is isolated too', async () => {
    const reported: unknown[] = [];
    const { client } = await pair({ onListenerError: (err, which) => reported.push([which, err]) });
    let second = false;
    client.on('close', () => {
      throw new Error('close listener bug');
    });
    client.on('close', () => {
      second = true;
    });
    client.close();
    expect(second).toBe(true);
    expect(reported).toHaveLength(1);
  });
});

describe('hostile peer', () => {
  async function expectFatal(send: (peer: FakeQmpPeer) => void, code: string, options = {}) {
    const { client, peer } = await pair(options);
    const reasons: QmpError[] = [];
    client.on('close', (r) => reasons.push(r));
    const pending = client.execute('query-status');
    await peer.nextCommand();
    send(peer);
    const err = await rejection(pending, 'the pending command');
    expect(err.code).toBe(code);
    expect(reasons.map((r) => r.code)).toEqual([code]);
    await within(peer.clientGone, 2000, 'the client to drop the connection');
    expect((await rejection(client.execute('again'), 'execute after a fatal error')).code).toBe('CLOSED');
    return err;
  }

  async function expectClosedWithoutPending(send: (peer: FakeQmpPeer) => void, options = {}): Promise<QmpError> {
    const { client, peer } = await pair(options);
    const closed = client.whenClosed();
    send(peer);
    const reason = await within(closed, 2000, 'the client to close on an overlong line');
    await within(peer.clientGone, 2000, 'the client to drop the connection');
    return reason;
  }

  it('a line over the limit when no reply is due -> LINE_TOO_LONG, connection closed', async () => {
    const reason = await expectClosedWithoutPending((peer) => peer.sendRaw(Buffer.alloc(2048, 0x61)), { maxLineBytes: 1024 });
    expect(reason.code).toBe('LINE_TOO_LONG');
    expect(reason.message).toMatch(/more than 1024 bytes/);
  });

  it('the default 1 MiB limit is enforced across many chunks', async () => {
    const reason = await expectClosedWithoutPending((peer) => {
      const chunk = Buffer.alloc(64 * 1024, 0x20);
      for (let i = 0; i < 17; i++) peer.sendRaw(chunk);
    });
    expect(reason.code).toBe('LINE_TOO_LONG');
  });

  it('an overlong reply fails only its own command; the connection stays and answers the next', async () => {
    const { client, peer } = await pair({ maxLineBytes: 1024 });
    const closes: string[] = [];
    client.on('close', (r) => closes.push(r.code));
    const big = client.execute('human-monitor-command', { 'command-line': 'xp /200000xg 0' });
    const cmd = await peer.nextCommand();
    peer.sendRaw(`{"return": "${'0'.repeat(4096)}", "id": ${cmd.id}}\r\n`);
    const err = await rejection(big, 'the oversized reply');
    expect(err.code).toBe('LINE_TOO_LONG');
    expect(err.message).toMatch(/reply to 'human-monitor-command' was longer than 1024 bytes/);
    const next = client.queryStatus();
    const status = await peer.nextCommand();
    peer.reply(status.id, { status: 'running', running: true });
    expect((await next).status).toBe('running');
    expect(closes).toEqual([]);
    expect(client.isClosed).toBe(false);
  });

  it('an overlong reply past the skip bound (64 x the limit, no newline) still closes the connection', async () => {
    const { client, peer } = await pair({ maxLineBytes: 1024 });
    const pending = client.execute('query-status');
    await peer.nextCommand();
    for (let i = 0; i < 70; i++) peer.sendRaw(Buffer.alloc(1024, 0x61));
    expect((await rejection(pending, 'the pending command')).code).toBe('LINE_TOO_LONG');
    await within(peer.clientGone, 2000, 'the client to drop the connection');
  });

  it('invalid JSON -> INVALID_JSON, connection closed', async () => {
    const err = await expectFatal((peer) => peer.sendRaw('\u0000\u00ff{not json\n'), 'INVALID_JSON');
    expect(err.message.length).toBeLessThan(400);
  });

  it('a JSON value that is not an object -> PROTOCOL', async () => {
    await expectFatal((peer) => peer.sendRaw('[1,2,3]\n'), 'PROTOCOL');
  });

  it('an object of no known message shape -> PROTOCOL', async () => {
    await expectFatal((peer) => peer.send({ hello: 'world' }), 'PROTOCOL');
  });

  it('an error reply without class/desc -> PROTOCOL', async () => {
    await expectFatal((peer) => peer.send({ error: 'nope', id: 1 }), 'PROTOCOL');
  });

  it('an event without a timestamp -> PROTOCOL', async () => {
    await expectFatal((peer) => peer.send({ event: 'STOP' }), 'PROTOCOL');
  });

  it('a second greeting -> PROTOCOL', async () => {
    await expectFatal((peer) => peer.send(GREETING_NO_OOB), 'PROTOCOL');
  });

  it('lines after a fatal line in the same chunk are not processed', async () => {
    const { client, peer } = await pair();
    const seen: string[] = [];
    client.on('event', (ev) => seen.push(ev.event));
    const pending = client.execute('query-status');
    const cmd = await peer.nextCommand();
    peer.sendRaw(`garbage\n${JSON.stringify({ return: {}, id: cmd.id })}\n`);
    expect((await rejection(pending, 'the pending command')).code).toBe('INVALID_JSON');
    expect(seen).toEqual([]);
  });

  it('a huge non-JSON line within the limit is rejected without a giant error message', async () => {
    const err = await expectFatal((peer) => peer.sendRaw(`${'x'.repeat(500_000)}\n`), 'INVALID_JSON');
    expect(err.message.length).toBeLessThan(400);
  });
});
