// ApiClient against the real API server (fake DaemonOps) and against sockets that are not vmkeepd.
import { appendFile, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ApiClient, DaemonError, type DaemonEvent } from '../../../daemon/index.js';
import { startApiServer } from '../../../daemon/api-server.js';
import type { ApiServer } from '../../../daemon/api-server.js';
import { within } from '../qmp/fake-peer.js';
import { FakeDaemonOps } from './fake-ops.js';

let dir: string;
let socketPath: string;
let ops: FakeDaemonOps;
let server: ApiServer;
let client: ApiClient;
const rawServers: Server[] = [];
const rawSockets: Socket[] = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmkeep-client-'));
  socketPath = join(dir, 'api.sock');
  ops = new FakeDaemonOps(dir);
  server = await startApiServer({ socketPath, ops, operations: ops.operations });
  client = new ApiClient({ socketPath });
});

afterEach(async () => {
  for (const socket of rawSockets.splice(0)) socket.destroy();
  for (const raw of rawServers.splice(0)) await new Promise<void>((resolve) => raw.close(() => resolve()));
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

async function failure(promise: Promise<unknown>, what: string): Promise<DaemonError> {
  const outcome = await within(promise.then(() => undefined, (error: unknown) => error), 3000, what);
  expect(outcome).toBeInstanceOf(DaemonError);
  return outcome as DaemonError;
}

/** A socket that is not vmkeepd: `onConnection` decides what it does. */
async function rawSocket(onConnection: (socket: Socket) => void): Promise<string> {
  const path = join(dir, `raw-${rawServers.length}.sock`);
  const raw = createServer((socket) => {
    rawSockets.push(socket);
    socket.on('error', () => undefined);
    onConnection(socket);
  });
  rawServers.push(raw);
  await new Promise<void>((resolve) => raw.listen(path, resolve));
  return path;
}

describe('requests', () => {
  it('mirrors the routes with typed results', async () => {
    expect((await client.info()).version).toBe('0.1.0-test');
    const created = await client.create({ name: 'web1', kernel: '/boot/vmlinuz' }, { start: false });
    expect(created.state).toBe('stopped');
    expect((await client.start('web1')).state).toBe('running');
    expect((await client.list()).map((vm) => vm.name)).toEqual(['web1']);
    ops.qmpReplies.set('query-status', { status: 'running' });
    expect(await client.qmp('web1', 'query-status')).toEqual({ status: 'running' });
    expect((await client.stop('web1', { force: true })).state).toBe('stopped');
    await client.delete('web1');
    expect(await client.list()).toEqual([]);
  });

  it("turns the daemon's error into a DaemonError with its code and message", async () => {
    const missing = await failure(client.get('nope'), 'get nope');
    expect(missing.code).toBe('NOT_FOUND');
    expect(missing.message).toBe('no VM named "nope"; see vmkeep list');
    // The name is URL-encoded, so a slash cannot reach another route: the server refuses the name.
    expect((await failure(client.get('a/b'), 'get a/b')).code).toBe('INVALID_REQUEST');
  });
});

describe('sockets that are not a working vmkeepd', () => {
  it('no socket file: DAEMON_DOWN naming the socket and the fix', async () => {
    const missing = join(dir, 'none.sock');
    const error = await failure(new ApiClient({ socketPath: missing }).list(), 'list on a missing socket');
    expect(error.code).toBe('DAEMON_DOWN');
    expect(error.message).toContain(missing);
    expect(error.message).toContain('systemctl start vmkeepd');
  });

  it('a peer that answers something other than HTTP: BAD_RESPONSE', async () => {
    const path = await rawSocket((socket) => socket.end('{"QMP": {"version": {}}}\r\n'));
    const error = await failure(new ApiClient({ socketPath: path }).list(), 'list on a QMP-like socket');
    expect(error.code).toBe('BAD_RESPONSE');
  });

  it('an HTTP peer that is not the vmkeep API: BAD_RESPONSE', async () => {
    const path = await rawSocket((socket) => {
      socket.once('data', () => socket.end('HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\n<html'));
    });
    expect((await failure(new ApiClient({ socketPath: path }).info(), 'info on a web server')).code).toBe('BAD_RESPONSE');
  });

  it('a peer that never answers: DAEMON_TIMEOUT after timeoutMs', async () => {
    const path = await rawSocket(() => undefined);
    const error = await failure(new ApiClient({ socketPath: path, timeoutMs: 200 }).list(), 'list on a silent socket');
    expect(error.code).toBe('DAEMON_TIMEOUT');
    expect(error.message).toContain('GET /1.0/vms');
  });
});

describe('streams', () => {
  it('events delivers each event and resolves when the signal aborts; the subscription ends', async () => {
    const seen: DaemonEvent[] = [];
    const controller = new AbortController();
    let gotTwo!: () => void;
    const two = new Promise<void>((resolve) => (gotTwo = resolve));
    const done = client.events(
      (event) => {
        seen.push(event);
        if (seen.length === 2) gotTwo();
      },
      { signal: controller.signal },
    );
    await within(ops.listenerCountReaches(1), 3000, 'the subscription');
    ops.emit({ type: 'vm-created', vm: 'web1' });
    ops.emit({ type: 'vm-state', vm: 'web1', state: 'running', previous: 'starting' });
    await within(two, 3000, 'two events');
    controller.abort();
    await within(done, 3000, 'events() to resolve after abort');
    expect(seen).toMatchObject([{ type: 'vm-created' }, { type: 'vm-state', state: 'running' }]);
    await within(ops.listenerCountReaches(0), 3000, 'the subscription to end');
  });

  it('events rejects with DAEMON_DOWN when vmkeepd ends the stream', async () => {
    const done = client.events(() => undefined);
    await within(ops.listenerCountReaches(1), 3000, 'the subscription');
    await server.close();
    expect((await failure(done, 'events() after the server closed')).code).toBe('DAEMON_DOWN');
  });

  it('console returns the log, or streams it with follow until aborted', async () => {
    ops.addVm('web1', 'running');
    const log = join(dir, 'web1.log');
    await writeFile(log, 'one\n');
    expect((await client.console('web1')).toString()).toBe('one\n');

    const controller = new AbortController();
    let received = '';
    let sawTwo!: () => void;
    const two = new Promise<void>((resolve) => (sawTwo = resolve));
    const following = client.console('web1', {
      follow: true,
      signal: controller.signal,
      onData: (chunk) => {
        received += chunk.toString();
        if (received.includes('two')) sawTwo();
      },
    });
    await appendFile(log, 'two\n');
    await within(two, 3000, 'the appended line');
    controller.abort();
    await within(following, 3000, 'console() to resolve after abort');
    expect(received).toBe('one\ntwo\n');
  });
});
