import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { connectQmp, QmpError, type QmpClient } from '../../qmp/index.js';

// A fake QMP server on a real unix socket that misbehaves on purpose. Each test proves the
// client rejects with the right code, drops the connection, and nothing escapes into the
// event loop (watched through process-level 'uncaughtException'/'unhandledRejection').

const GREETING = {
  QMP: { version: { qemu: { major: 7, minor: 2, micro: 19 }, package: 'fake' }, capabilities: ['oob'] },
};
const TWO_MIB = 2 * 1024 * 1024;

/** The server side of one accepted connection. */
class ServerConn {
  private buffered = '';
  private readonly queue: { execute: string; id: number }[] = [];
  private readonly takers: ((cmd: { execute: string; id: number }) => void)[] = [];
  /** Resolves once the client has closed its end. */
  readonly gone: Promise<void>;

  constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    // Writes into a connection the client dropped fail with EPIPE/ECONNRESET: expected here.
    socket.on('error', () => {});
    socket.on('data', (text: string) => {
      this.buffered += text;
      let nl: number;
      while ((nl = this.buffered.indexOf('\n')) !== -1) {
        const cmd = JSON.parse(this.buffered.slice(0, nl)) as { execute: string; id: number };
        this.buffered = this.buffered.slice(nl + 1);
        const taker = this.takers.shift();
        if (taker) taker(cmd);
        else this.queue.push(cmd);
      }
    });
    this.gone = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  nextCommand(what: string): Promise<{ execute: string; id: number }> {
    const queued = this.queue.shift();
    if (queued) return Promise.resolve(queued);
    return within(new Promise((resolve) => this.takers.push(resolve)), 3000, what);
  }

  send(message: unknown): void {
    this.socket.write(`${JSON.stringify(message)}\r\n`);
  }

  /** Greets and accepts capability negotiation, like QEMU. */
  async handshake(): Promise<void> {
    this.send(GREETING);
    const caps = await this.nextCommand('qmp_capabilities at the fake server');
    this.send({ return: {}, id: caps.id });
  }
}

function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function rejection(promise: Promise<unknown>, what: string): Promise<QmpError> {
  const err = await within(
    promise.then(
      () => new Error(`${what} resolved, expected a rejection`),
      (e: unknown) => e,
    ),
    5000,
    what,
  );
  expect(err).toBeInstanceOf(QmpError);
  return err as QmpError;
}

let dir: string;
let serial = 0;
const servers: net.Server[] = [];
const conns: ServerConn[] = [];
const clients: QmpClient[] = [];
const escaped: unknown[] = [];
const onEscaped = (err: unknown): void => {
  escaped.push(err);
};

interface FakeServer {
  path: string;
  /** The first connection the server accepted (waits for it). */
  firstConn: () => Promise<ServerConn>;
}

/** Starts a fake server; `behave` scripts each accepted connection. */
async function fakeServer(behave: (conn: ServerConn) => void | Promise<void>): Promise<FakeServer> {
  const path = join(dir, `qmp-${++serial}.sock`);
  let accepted!: (conn: ServerConn) => void;
  const first = new Promise<ServerConn>((resolve) => {
    accepted = resolve;
  });
  const server = net.createServer((socket) => {
    const conn = new ServerConn(socket);
    conns.push(conn);
    accepted(conn);
    Promise.resolve(behave(conn)).catch((err: unknown) => escaped.push(err));
  });
  servers.push(server);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  return { path, firstConn: () => within(first, 3000, `the fake server at ${path} to accept a connection`) };
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmkeep-qmp-hostile-'));
  process.on('uncaughtException', onEscaped);
  process.on('unhandledRejection', onEscaped);
});

afterEach(async () => {
  for (const client of clients.splice(0)) client.close();
  for (const conn of conns.splice(0)) conn.socket.destroy();
  await Promise.all(servers.splice(0).map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
  const found = escaped.splice(0);
  expect(found, 'nothing may escape into the event loop').toEqual([]);
});

afterAll(async () => {
  process.off('uncaughtException', onEscaped);
  process.off('unhandledRejection', onEscaped);
  await rm(dir, { recursive: true, force: true });
});

describe('QMP client against a hostile unix-socket peer', () => {
  it('a 2 MiB line with no newline instead of a greeting -> LINE_TOO_LONG, connection dropped', async () => {
    const { path, firstConn } = await fakeServer((conn) => {
      conn.socket.write(Buffer.alloc(TWO_MIB, 0x61));
    });
    const started = Date.now();
    const err = await rejection(connectQmp(path, { greetingTimeoutMs: 3000 }), 'connectQmp to a flooding server');
    expect(err.code).toBe('LINE_TOO_LONG');
    expect(Date.now() - started).toBeLessThan(3000);
    await within((await firstConn()).gone, 3000, 'the client to drop the flooding connection');
  });

  it('a 2 MiB reply line mid-command fails that command only; the next command is answered', async () => {
    const { path } = await fakeServer(async (conn) => {
      await conn.handshake();
      const first = await conn.nextCommand('query-status');
      conn.socket.write(`{"return": "${'x'.repeat(TWO_MIB)}", "id": ${JSON.stringify(first.id)}}\r\n`);
      const second = await conn.nextCommand('query-status');
      conn.socket.write(`${JSON.stringify({ return: { status: 'running', running: true }, id: second.id })}\r\n`);
    });
    const client = await connectQmp(path);
    clients.push(client);
    const closeReasons: string[] = [];
    client.on('close', (reason) => closeReasons.push(reason.code));
    const err = await rejection(client.queryStatus(), 'queryStatus answered by a 2 MiB line');
    expect(err.code).toBe('LINE_TOO_LONG');
    expect(err.message).toMatch(/was dropped; the connection stays open/);
    expect((await within(client.queryStatus(), 3000, 'the next query-status')).status).toBe('running');
    expect(closeReasons).toEqual([]);
  });

  it('a 2 MiB line with no newline and no command waiting -> LINE_TOO_LONG, connection dropped', async () => {
    const { path, firstConn } = await fakeServer(async (conn) => {
      await conn.handshake();
      conn.socket.write(`{"event": "${'x'.repeat(TWO_MIB)}`);
    });
    const client = await connectQmp(path);
    clients.push(client);
    const reason = await within(client.whenClosed(), 5000, 'the client to close on the overlong line');
    expect(reason.code).toBe('LINE_TOO_LONG');
    await within((await firstConn()).gone, 3000, 'the client to drop the connection');
  });

  it('garbage instead of a greeting -> INVALID_JSON', async () => {
    const { path, firstConn } = await fakeServer((conn) => {
      conn.socket.write(Buffer.from([0x00, 0xff, 0xfe, 0x7b, 0x0a]));
    });
    const err = await rejection(connectQmp(path), 'connectQmp to a garbage server');
    expect(err.code).toBe('INVALID_JSON');
    await within((await firstConn()).gone, 3000, 'the client to drop the connection');
  });

  it('garbage as a reply -> INVALID_JSON; a JSON non-object -> PROTOCOL', async () => {
    const replies = ['SSH-2.0-OpenSSH_9.2\r\n', '"just a string"\n'];
    const { path } = await fakeServer(async (conn) => {
      await conn.handshake();
      await conn.nextCommand('query-version');
      conn.socket.write(replies.shift() ?? '');
    });
    const first = await connectQmp(path);
    clients.push(first);
    expect((await rejection(first.queryVersion(), 'queryVersion answered by garbage')).code).toBe('INVALID_JSON');
    const second = await connectQmp(path);
    clients.push(second);
    expect((await rejection(second.queryVersion(), 'queryVersion answered by a string')).code).toBe('PROTOCOL');
  });

  it('greeting, then the server closes mid-command -> CLOSED for every pending command', async () => {
    const { path } = await fakeServer(async (conn) => {
      await conn.handshake();
      await conn.nextCommand('the first command');
      conn.socket.destroy();
    });
    const client = await connectQmp(path);
    clients.push(client);
    const closeReasons: string[] = [];
    client.on('close', (reason) => closeReasons.push(reason.code));
    const pending = [client.queryStatus(), client.execute('query-migrate'), client.waitForEvent('SHUTDOWN')];
    for (const [i, p] of pending.entries()) {
      expect((await rejection(p, `pending call ${i} when the server hangs up`)).code).toBe('CLOSED');
    }
    expect(closeReasons).toEqual(['CLOSED']);
  });

  it('a server that never greets (monitor held by another client) -> GREETING_TIMEOUT saying so', async () => {
    const { path, firstConn } = await fakeServer(() => {
      // Accept and stay silent, as QEMU does for a second client.
    });
    const err = await rejection(connectQmp(path, { greetingTimeoutMs: 200 }), 'connectQmp to a silent server');
    expect(err.code).toBe('GREETING_TIMEOUT');
    expect(err.message).toContain(path);
    expect(err.message).toMatch(/held by another client/);
    expect(err.message).toMatch(/another vmkeep daemon/);
    await within((await firstConn()).gone, 3000, 'the client to drop the silent connection');
  });

  it('a hung monitor does not stall another connection', async () => {
    const { path: silent } = await fakeServer(() => {});
    const { path: healthyServed } = await fakeServer(async (conn) => {
      await conn.handshake();
      const cmd = await conn.nextCommand('query-status at the healthy server');
      conn.send({ return: { status: 'running', running: true }, id: cmd.id });
    });
    const stuck = connectQmp(silent, { greetingTimeoutMs: 500 });
    const healthy = await within(connectQmp(healthyServed), 1000, 'the healthy monitor to connect');
    clients.push(healthy);
    expect(await within(healthy.queryStatus(), 1000, 'query-status on the healthy monitor')).toEqual({
      status: 'running',
      running: true,
    });
    expect((await rejection(stuck, 'the silent monitor')).code).toBe('GREETING_TIMEOUT');
  });

  it('no socket at the path -> CONNECT_FAILED naming the path', async () => {
    const path = join(dir, 'missing.sock');
    const err = await rejection(connectQmp(path), 'connectQmp to a missing socket');
    expect(err.code).toBe('CONNECT_FAILED');
    expect(err.message).toContain(path);
    expect(err.message).toMatch(/ENOENT/);
  });

  it('nothing listening at the path -> CONNECT_FAILED naming the path', async () => {
    // A plain file where a socket is expected is refused like a stale socket file.
    const path = join(dir, 'stale.sock');
    await writeFile(path, '');
    const err = await rejection(connectQmp(path), 'connectQmp to a stale path');
    expect(err.code).toBe('CONNECT_FAILED');
    expect(err.message).toContain(path);
    expect(err.message).toMatch(/refused/);
  });
});
