// The control API over a real unix socket, with an in-memory DaemonOps behind it.
import { appendFile, lstat, mkdtemp, rename, rm, stat, truncate, writeFile, readFile } from 'node:fs/promises';
import { request, type IncomingHttpHeaders, type IncomingMessage } from 'node:http';
import { connect, createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { startApiServer, type ApiLogger, type ApiServer } from '../../../daemon/api-server.js';
import { DaemonError } from '../../../daemon/index.js';
import { LaunchError } from '../../../launcher/index.js';
import { QmpError } from '../../../qmp/index.js';
import { within } from '../qmp/fake-peer.js';
import { FakeDaemonOps } from './fake-ops.js';

let dir: string;
let socketPath: string;
let ops: FakeDaemonOps;
let server: ApiServer | undefined;
let logged: Array<{ level: string; fields: object; message: string }>;
const cleanups: Array<() => unknown> = [];

const logger: ApiLogger = {
  debug: (fields, message) => logged.push({ level: 'debug', fields, message }),
  warn: (fields, message) => logged.push({ level: 'warn', fields, message }),
  error: (fields, message) => logged.push({ level: 'error', fields, message }),
};

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmkeep-api-'));
  socketPath = join(dir, 'api.sock');
  ops = new FakeDaemonOps(dir);
  logged = [];
  server = await startApiServer({ socketPath, ops, logger, operations: ops.operations });
});

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  await server?.close();
  server = undefined;
  await rm(dir, { recursive: true, force: true });
});

interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
  json: any;
}

/** One request over the socket; `body` is sent as it is when a string, else as JSON. */
function call(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<Reply> {
  return within(
    new Promise<Reply>((resolve, reject) => {
      const payload = body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body);
      const req = request(
        { socketPath, method, path, agent: false, headers: { ...(payload === undefined ? {} : { 'Content-Type': 'application/json' }), ...headers } },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            let json: unknown;
            try {
              json = JSON.parse(text);
            } catch {
              json = undefined;
            }
            resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
          });
        },
      );
      req.on('error', reject);
      req.end(payload);
    }),
    3000,
    `${method} ${path}`,
  );
}

/** A 202's operation, followed at its Location until it finished. */
async function finished(accepted: Reply): Promise<any> {
  expect(accepted.status, accepted.text).toBe(202);
  expect(accepted.headers.location).toBe(`/1.0/operations/${accepted.json.id}`);
  const done = await call('GET', `${accepted.headers.location}/wait?timeout=2`);
  expect(done.status).toBe(200);
  return done.json;
}

/** Opens a streaming GET; resolves once the headers arrived, with the body collected as it comes. */
async function openStream(path: string) {
  let received = '';
  const waiters: Array<{ test: () => boolean; resolve: () => void }> = [];
  const response = await within(
    new Promise<IncomingMessage>((resolve, reject) => {
      const req = request({ socketPath, method: 'GET', path, agent: false }, resolve);
      req.on('error', reject);
      req.end();
      cleanups.push(() => req.destroy());
    }),
    3000,
    `the response headers of GET ${path}`,
  );
  const ended = new Promise<void>((resolve) => response.on('close', resolve));
  response.setEncoding('utf8').on('data', (chunk: string) => {
    received += chunk;
    for (const w of waiters.splice(0)) (w.test() ? w.resolve() : waiters.push(w));
  });
  return {
    response,
    ended,
    get text() {
      return received;
    },
    /** Waits until the body received so far contains `part`. */
    until(part: string): Promise<void> {
      const test = () => received.includes(part);
      if (test()) return Promise.resolve();
      return within(new Promise<void>((resolve) => waiters.push({ test, resolve })), 3000, `${JSON.stringify(part)} on GET ${path}`);
    },
    close: () => response.destroy(),
  };
}

describe('routes', () => {
  it('GET /1.0/metrics answers the Prometheus text format with its media type; POST is refused', async () => {
    const reply = await call('GET', '/1.0/metrics');
    expect(reply.status).toBe(200);
    expect(reply.headers['content-type']).toBe('text/plain; version=0.0.4; charset=utf-8');
    expect(reply.text).toBe('# HELP vmkeep_vms VMs by state.\n# TYPE vmkeep_vms gauge\nvmkeep_vms{state="running"} 1\n');
    expect((await call('POST', '/1.0/metrics', {})).status).toBe(405);
  });

  it('GET /1.0 answers the daemon info', async () => {
    const reply = await call('GET', '/1.0');
    expect(reply.status).toBe(200);
    expect(reply.headers['content-type']).toBe('application/json');
    expect(reply.json).toMatchObject({ version: '0.1.0-test', orphanScopes: [] });
  });

  it('GET /1.0/vms lists the VMs and GET /1.0/vms/NAME shows one', async () => {
    ops.addVm('web1', 'running');
    ops.addVm('db', 'stopped');
    const list = await call('GET', '/1.0/vms');
    expect(list.status).toBe(200);
    expect(list.json.map((vm: { name: string }) => vm.name)).toEqual(['web1', 'db']);
    const one = await call('GET', '/1.0/vms/web1/');
    expect(one.status).toBe(200);
    expect(one.json).toMatchObject({ name: 'web1', state: 'running', scope: 'vmkeep-web1.scope' });
  });

  it('POST /1.0/vms creates a VM (201) and passes start: false on', async () => {
    const created = await call('POST', '/1.0/vms', { spec: { name: 'web1', kernel: '/boot/vmlinuz' }, start: false });
    expect(created.status).toBe(201);
    expect(created.json).toMatchObject({ name: 'web1', state: 'stopped' });
    expect(ops.calls).toEqual([{ op: 'create', args: [{ name: 'web1', kernel: '/boot/vmlinuz' }, { start: false }] }]);
  });

  it('accepts the body curl -d sends (form content type, JSON text)', async () => {
    const created = await call('POST', '/1.0/vms', JSON.stringify({ spec: { name: 'web2', kernel: '/k' } }), {
      'Content-Type': 'application/x-www-form-urlencoded',
    });
    expect(created.status).toBe(201);
    expect(created.json.state).toBe('running');
  });

  it('start, stop (with its options) and delete', async () => {
    ops.addVm('web1', 'stopped');
    expect((await finished(await call('POST', '/1.0/vms/web1/start'))).result.state).toBe('running');
    const stopped = await finished(await call('POST', '/1.0/vms/web1/stop', { timeoutSec: 5, force: true }));
    expect(stopped).toMatchObject({ kind: 'stop', vms: ['web1'], status: 'succeeded', result: { state: 'stopped' } });
    expect(ops.calls.find((c) => c.op === 'stop')?.args).toEqual(['web1', { timeoutSec: 5, force: true }]);
    const deleted = await call('DELETE', '/1.0/vms/web1');
    expect(deleted).toMatchObject({ status: 200, json: { deleted: 'web1' } });
    expect(ops.vms.has('web1')).toBe(false);
  });

  it('POST /1.0/vms/NAME/qmp answers { return }', async () => {
    ops.addVm('web1', 'running');
    ops.qmpReplies.set('query-status', { status: 'running', running: true });
    const reply = await call('POST', '/1.0/vms/web1/qmp', { execute: 'query-status' });
    expect(reply).toMatchObject({ status: 200, json: { return: { status: 'running', running: true } } });
    await call('POST', '/1.0/vms/web1/qmp', { execute: 'human-monitor-command', arguments: { 'command-line': 'info status' } });
    expect(ops.calls.at(-1)).toEqual({ op: 'qmp', args: ['web1', 'human-monitor-command', { 'command-line': 'info status' }] });
  });

  it('GET /1.0/vms/NAME/console answers the log as text', async () => {
    ops.addVm('web1', 'running');
    await writeFile(join(dir, 'web1.log'), 'Linux version 6.1\r\nlogin: ');
    const reply = await call('GET', '/1.0/vms/web1/console');
    expect(reply.status).toBe(200);
    expect(reply.headers['content-type']).toMatch(/^text\/plain/);
    expect(reply.text).toBe('Linux version 6.1\r\nlogin: ');
  });

  it('a console that does not exist yet is NOT_FOUND with the fix', async () => {
    ops.addVm('web1', 'stopped');
    const reply = await call('GET', '/1.0/vms/web1/console');
    expect(reply.status).toBe(404);
    expect(reply.json.error).toMatchObject({ code: 'NOT_FOUND', message: expect.stringContaining('vmkeep start web1') });
  });
});

describe('discovery and operations', () => {
  it('GET / lists the API versions; GET /1.0 names the extensions; the OpenAPI document is served', async () => {
    expect(await call('GET', '/')).toMatchObject({ status: 200, json: { apiVersions: ['/1.0'] } });
    expect((await call('GET', '/1.0')).json).toMatchObject({ apiVersion: '1.0', apiExtensions: expect.arrayContaining(['operations', 'events_filter', 'openapi']) });
    const doc = await call('GET', '/1.0/openapi.json');
    expect(doc.status).toBe(200);
    expect(doc.json).toMatchObject({ openapi: '3.0.3', info: { version: '0.1.0-test' } });
  });

  it('refresh of one VM: 202, listed, its outcome as the result; wait with a short timeout answers it still running', async () => {
    ops.addVm('web1', 'running');
    ops.holdStops = new Promise(() => undefined);
    const stopping = await call('POST', '/1.0/vms/web1/stop');
    expect(stopping.status).toBe(202);
    const early = await call('GET', `/1.0/operations/${stopping.json.id}/wait?timeout=0.1`);
    expect(early).toMatchObject({ status: 200, json: { id: stopping.json.id, status: 'running' } });
    // A stop cannot be cancelled: 409 with the reason, and it goes on.
    const refused = await call('DELETE', `/1.0/operations/${stopping.json.id}`);
    expect(refused).toMatchObject({ status: 409, json: { error: { code: 'CONFLICT', message: expect.stringContaining('a stop cannot be cancelled') } } });
    ops.addVm('db', 'running');
    const refreshed = await finished(await call('POST', '/1.0/vms/db/refresh', { strategy: 'migrate' }));
    expect(refreshed).toMatchObject({ kind: 'refresh', vms: ['db'], status: 'succeeded', result: { result: 'migrated' } });
    const list = await call('GET', '/1.0/operations');
    expect(list.json.map((o: { kind: string; status: string }) => [o.kind, o.status])).toEqual([['stop', 'running'], ['refresh', 'succeeded']]);
    expect((await call('GET', '/1.0/operations/00000000-0000-4000-8000-000000000099')).status).toBe(404);
    expect((await call('GET', `/1.0/operations/${stopping.json.id}/wait?timeout=-1`)).status).toBe(400);
  });

  it('a rolling refresh: 202 with Location; a cancel begins no further VM and it ends cancelled', async () => {
    ops.addVm('a', 'running');
    ops.addVm('b', 'running');
    let release!: () => void;
    ops.holdJobs = new Promise((resolve) => (release = resolve));
    const accepted = await call('POST', '/1.0/refresh', { vms: ['a', 'b'], strategy: 'migrate' });
    expect(accepted).toMatchObject({ status: 202, json: { kind: 'rolling-refresh', vms: ['a', 'b'], status: 'running' } });
    expect(accepted.headers.location).toBe(`/1.0/operations/${accepted.json.id}`);
    const cancel = await call('DELETE', accepted.headers.location as string);
    expect(cancel).toMatchObject({ status: 202, json: { cancelRequested: true } });
    release();
    const done = await call('GET', `${accepted.headers.location}/wait?timeout=3`);
    expect(done.json).toMatchObject({ status: 'cancelled', error: { code: 'CANCELLED' }, result: { results: [{ vm: 'a', skipped: true }, { vm: 'b', skipped: true }] } });
  });

  it('GET /1.0/events?type=...&vm=...: only those events, each carrying its operation', async () => {
    ops.addVm('web1', 'stopped');
    ops.addVm('db', 'stopped');
    const stream = await openStream('/1.0/events?type=operation&vm=web1');
    const started = await finished(await call('POST', '/1.0/vms/web1/start'));
    await finished(await call('POST', '/1.0/vms/db/start'));
    await stream.until('"status":"succeeded"');
    const lines = stream.text.trim().split('\n').map((l) => JSON.parse(l));
    expect(lines.map((e) => [e.type, e.operation, e.status])).toEqual([
      ['operation', started.id, 'pending'], ['operation', started.id, 'running'], ['operation', started.id, 'succeeded'],
    ]);
    expect(await call('GET', '/1.0/events?type=nope')).toMatchObject({ status: 400, json: { error: { message: expect.stringContaining('unknown event type "nope"') } } });
  });
});

describe('errors', () => {
  it('a DaemonError keeps its code and gets its HTTP status', async () => {
    const missing = await call('GET', '/1.0/vms/nope');
    expect(missing).toMatchObject({ status: 404, json: { error: { code: 'NOT_FOUND', message: expect.stringContaining('nope') } } });
    ops.addVm('web1', 'running');
    // Failures of a long request are its operation's: failed, with the code and message.
    expect(await finished(await call('POST', '/1.0/vms/web1/start'))).toMatchObject({ status: 'failed', error: { code: 'CONFLICT' } });
    ops.failNext.set('stop', new DaemonError('STOP_TIMEOUT', 'the guest did not power off within 5 s'));
    expect(await finished(await call('POST', '/1.0/vms/web1/stop'))).toMatchObject({ status: 'failed', error: { code: 'STOP_TIMEOUT' } });
    // An unknown VM is refused at once: no operation begins.
    expect(await call('POST', '/1.0/vms/ghost/start')).toMatchObject({ status: 404, json: { error: { code: 'NOT_FOUND' } } });
  });

  it('a LaunchError INVALID_SPEC is 400 INVALID_SPEC with its message and every problem', async () => {
    const reply = await call('POST', '/1.0/vms', { spec: { name: 'Bad Name', memoryMiB: 1 } });
    expect(reply.status).toBe(400);
    expect(reply.json.error.code).toBe('INVALID_SPEC');
    expect(reply.json.error.message).toMatch(/^invalid VM spec \(\d problems\)/);
    expect(reply.json.error.problems.map((p: { field: string }) => p.field)).toEqual(expect.arrayContaining(['name', 'memoryMiB']));
  });

  it('other LaunchErrors and QmpErrors map onto the API codes', async () => {
    ops.addVm('web1', 'stopped');
    ops.failNext.set('start', new LaunchError('QEMU_EXITED', 'QEMU exited with status 1: could not open disk'));
    expect(await finished(await call('POST', '/1.0/vms/web1/start'))).toMatchObject({
      status: 'failed',
      error: { code: 'START_FAILED', message: 'QEMU exited with status 1: could not open disk' },
    });
    ops.failNext.set('qmp', new QmpError('COMMAND_FAILED', 'QEMU refused nope: The command nope has not been found', { qmpClass: 'CommandNotFound' }));
    expect(await call('POST', '/1.0/vms/web1/qmp', { execute: 'nope' })).toMatchObject({ status: 502, json: { error: { code: 'QMP_FAILED' } } });
    ops.failNext.set('qmp', new QmpError('CLOSED', 'the monitor connection closed'));
    expect(await call('POST', '/1.0/vms/web1/qmp', { execute: 'query-status' })).toMatchObject({ status: 503, json: { error: { code: 'UNREACHABLE' } } });
  });

  it('any other error is 500 INTERNAL with a generic message; the details go to the log only', async () => {
    ops.failNext.set('list', Object.assign(new Error('EACCES: permission denied, open /var/lib/vmkeep/secret'), { code: 'EACCES' }));
    const reply = await call('GET', '/1.0/vms');
    expect(reply.status).toBe(500);
    expect(reply.json.error.code).toBe('INTERNAL');
    expect(reply.text).not.toContain('/var/lib/vmkeep/secret');
    const reference = /reference ([0-9a-f]{8})/.exec(reply.json.error.message)?.[1];
    const entry = logged.find((l) => l.level === 'error');
    expect(entry?.fields).toMatchObject({ reference, path: '/1.0/vms' });
    expect(String((entry?.fields as { err?: Error }).err?.message)).toContain('/var/lib/vmkeep/secret');
  });

  it('an unknown route is 404 with the list of routes', async () => {
    const reply = await call('GET', '/1.0/vm');
    expect(reply.status).toBe(404);
    expect(reply.json.error.code).toBe('NOT_FOUND');
    expect(reply.json.error.message).toContain('GET /1.0/vms/NAME/console');
    expect((await call('GET', '/2.0/vms')).status).toBe(404);
    expect(ops.calls).toEqual([]);
  });

  it('a wrong method is 405 with Allow', async () => {
    const reply = await call('PUT', '/1.0/vms');
    expect(reply.status).toBe(405);
    expect(reply.headers.allow).toBe('GET, POST');
    expect(reply.json.error.code).toBe('METHOD_NOT_ALLOWED');
    expect((await call('GET', '/1.0/vms/web1/stop')).status).toBe(405);
    expect(ops.calls).toEqual([]);
  });

  it.each([
    ['/1.0/vms/Web1', 'uppercase'],
    ['/1.0/vms/a%2Fb/start', 'an encoded slash'],
    ['/1.0/vms/..', 'a dot-dot'],
    ['/1.0/vms/%2e%2e/console', 'an encoded dot-dot'],
    ['/1.0/vms/%zz', 'broken URL encoding'],
    [`/1.0/vms/${'a'.repeat(64)}`, 'a name too long'],
  ])('a bad VM name (%s: %s) is 400 and never reaches the daemon', async (path) => {
    const reply = await call(path.endsWith('start') ? 'POST' : 'GET', path);
    expect(reply.status).toBe(400);
    expect(reply.json.error.code).toBe('INVALID_REQUEST');
    expect(ops.calls).toEqual([]);
  });

  it('a body that is not a JSON object is 400, a non-JSON content type 415; nothing reaches the daemon', async () => {
    const notJson = await call('POST', '/1.0/vms', '{"spec": ');
    expect(notJson.status).toBe(400);
    expect(notJson.json.error.message).toContain('not valid JSON');
    expect((await call('POST', '/1.0/vms', '[1,2]')).json.error.message).toContain('an array');
    expect((await call('POST', '/1.0/vms', 'null')).status).toBe(400);
    expect((await call('POST', '/1.0/vms')).status).toBe(400);
    const typed = await call('POST', '/1.0/vms', 'name=web1', { 'Content-Type': 'text/plain' });
    expect(typed).toMatchObject({ status: 415, json: { error: { code: 'UNSUPPORTED_MEDIA_TYPE' } } });
    expect(ops.calls).toEqual([]);
  });

  it('unknown or mistyped body fields are 400 with the known fields', async () => {
    ops.addVm('web1', 'running');
    const typo = await call('POST', '/1.0/vms/web1/stop', { timeout: 5 });
    expect(typo.status).toBe(400);
    expect(typo.json.error.message).toContain('known fields: timeoutSec, force');
    expect((await call('POST', '/1.0/vms/web1/stop', { timeoutSec: -1 })).status).toBe(400);
    // Past 2^31 ms a timer fires at once: such a stop would power off and give up at the same time.
    expect((await call('POST', '/1.0/vms/web1/stop', { timeoutSec: 1e9 })).status).toBe(400);
    expect((await call('POST', '/1.0/vms/web1/stop', { force: 'yes' })).status).toBe(400);
    expect((await call('POST', '/1.0/vms/web1/qmp', { execute: '' })).status).toBe(400);
    expect((await call('POST', '/1.0/vms/web1/qmp', { execute: 'x', arguments: [1] })).status).toBe(400);
    expect((await call('POST', '/1.0/vms', { spec: {}, start: 'no' })).status).toBe(400);
    expect(ops.calls).toEqual([]);
  });
});

describe('hostile and broken clients', () => {
  it('a body over 1 MiB with its Content-Length is refused with 413 before it is read', async () => {
    const reply = await call('POST', '/1.0/vms', 'x'.repeat(1024 * 1024 + 1));
    expect(reply.status).toBe(413);
    expect(reply.json.error.code).toBe('BODY_TOO_LARGE');
    expect(ops.calls).toEqual([]);
  });

  it('a chunked body that grows past 1 MiB gets 413 and the connection is closed while the client still sends', async () => {
    const socket = connect(socketPath);
    cleanups.push(() => socket.destroy());
    await within(new Promise((resolve) => socket.once('connect', resolve)), 2000, 'connect');
    socket.on('error', () => undefined);
    let answer = '';
    socket.setEncoding('utf8').on('data', (d: string) => (answer += d));
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    socket.write('POST /1.0/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n');
    const chunk = `10000\r\n${'x'.repeat(0x10000)}\r\n`;
    // Never ends the body: only the server closing the connection ends this test.
    const pump = (): void => {
      while (!socket.destroyed && socket.write(chunk));
      if (!socket.destroyed) socket.once('drain', pump);
    };
    pump();
    await within(closed, 5000, 'the server to close the connection of an oversized body');
    expect(answer).toMatch(/^HTTP\/1\.1 413 /);
    expect(answer).toContain('"BODY_TOO_LARGE"');
    expect(ops.calls).toEqual([]);
    expect((await call('GET', '/1.0')).status).toBe(200);
  });

  it('garbage on the socket gets a 400 and a close; the server keeps serving', async () => {
    for (const garbage of ['\x00\x01\x02 hello\r\n\r\n', 'GET /1.0 HTTP/9.9\r\n\r\n', `GET /${'a'.repeat(20_000)}`]) {
      const socket = connect(socketPath);
      cleanups.push(() => socket.destroy());
      socket.on('error', () => undefined);
      let answer = '';
      socket.setEncoding('utf8').on('data', (d: string) => (answer += d));
      const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
      socket.write(garbage);
      await within(closed, 3000, `the server to close after ${JSON.stringify(garbage.slice(0, 20))}`);
      expect(answer).toMatch(/^HTTP\/1\.1 4\d\d /);
      expect(answer).toContain('"INVALID_REQUEST"');
    }
    expect((await call('GET', '/1.0')).status).toBe(200);
  });
});

describe('streams', () => {
  it('/1.0/events delivers each event as one JSON line and unsubscribes when the client goes', async () => {
    const stream = await openStream('/1.0/events');
    expect(stream.response.headers['content-type']).toBe('application/x-ndjson');
    expect(ops.listenerCount).toBe(1);
    ops.emit({ type: 'vm-state', vm: 'web1', state: 'running', previous: 'starting' });
    ops.emit({ type: 'vm-deleted', vm: 'db' });
    await stream.until('vm-deleted');
    const lines = stream.text.trim().split('\n').map((l) => JSON.parse(l));
    expect(lines).toMatchObject([
      { type: 'vm-state', vm: 'web1', state: 'running', previous: 'starting' },
      { type: 'vm-deleted', vm: 'db' },
    ]);
    stream.close();
    await within(ops.listenerCountReaches(0), 3000, 'the event subscription to end after the client left');
  });

  it('console ?follow=1 streams appended bytes, and starts over when the log is truncated', async () => {
    ops.addVm('web1', 'running');
    const log = join(dir, 'web1.log');
    await writeFile(log, 'boot 1\n');
    const stream = await openStream('/1.0/vms/web1/console?follow=1');
    await stream.until('boot 1\n');
    await appendFile(log, 'login: ');
    await stream.until('boot 1\nlogin: ');
    // A VM started again truncates its log: the follower must not wait for byte 15 of the new one.
    await truncate(log, 0);
    await appendFile(log, 'boot 2\n');
    await stream.until('boot 2\n');
    expect(stream.text).toBe('boot 1\nlogin: boot 2\n');
  });

  it('close() ends open streams and the event subscription', async () => {
    ops.addVm('web1', 'running');
    await writeFile(join(dir, 'web1.log'), 'x');
    const events = await openStream('/1.0/events');
    const console = await openStream('/1.0/vms/web1/console?follow=1');
    await console.until('x');
    await within(server!.close(), 3000, 'the server to close with two open streams');
    await within(Promise.all([events.ended, console.ended]), 3000, 'both streams to end');
    expect(ops.listenerCount).toBe(0);
    await expect(lstat(socketPath)).rejects.toMatchObject({ code: 'ENOENT' });
  });
});

describe('the socket file', () => {
  it('is 0600 by default, or 0660 and owned by the group when given one', async () => {
    expect((await stat(socketPath)).mode & 0o777).toBe(0o600);
    const groupPath = join(dir, 'group.sock');
    const gid = process.getgid!();
    const grouped = await startApiServer({ socketPath: groupPath, ops, group: gid, operations: ops.operations });
    cleanups.push(() => grouped.close());
    const info = await stat(groupPath);
    expect(info.mode & 0o777).toBe(0o660);
    expect(info.gid).toBe(gid);
  });

  it('a stale socket (nothing listening) is replaced', async () => {
    // A socket file with no listener: bind, move the file away, close the listener.
    const stalePath = join(dir, 'stale.sock');
    const old: Server = createServer();
    await new Promise<void>((resolve) => old.listen(join(dir, 'tmp.sock'), resolve));
    await rename(join(dir, 'tmp.sock'), stalePath);
    await new Promise<void>((resolve) => old.close(() => resolve()));
    expect((await lstat(stalePath)).isSocket()).toBe(true);

    const fresh = await startApiServer({ socketPath: stalePath, ops, operations: ops.operations });
    cleanups.push(() => fresh.close());
    socketPath = stalePath;
    expect((await call('GET', '/1.0')).status).toBe(200);
  });

  it('a socket something answers on is never taken over', async () => {
    await expect(startApiServer({ socketPath, ops, operations: ops.operations })).rejects.toMatchObject({
      code: 'SOCKET_IN_USE',
      message: expect.stringContaining('another process answers'),
    });
    expect((await call('GET', '/1.0')).status).toBe(200);
  });

  it('a file that is not a socket is left alone', async () => {
    const filePath = join(dir, 'notes.txt');
    await writeFile(filePath, 'keep me');
    await expect(startApiServer({ socketPath: filePath, ops, operations: ops.operations })).rejects.toMatchObject({ code: 'SOCKET_IN_USE' });
    expect(await readFile(filePath, 'utf8')).toBe('keep me');
  });
});
