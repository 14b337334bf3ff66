// Long requests as operations, against a real vmkeepd (a service in a private systemd) and real
// QEMUs: 202 + Location, waiting, a refresh, a rolling refresh cancelled after the VM in
// progress, a stop that refuses to be cancelled, operations kept across a restart and one a
// SIGKILL cut off, and events filtered by type and VM that carry the operation's id.
import { request } from 'node:http';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DaemonEvent, Operation, RefreshJob } from '../../daemon/index.js';
import { readExe } from '../../launcher/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { countTicks, ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';
import { subscribeEvents, waitForVm } from '../support/vm-wait.js';
import { copiedInstallation, systemInstallation, writeInstallations, type TestInstallation } from '../support/installations.js';

let guest: GuestImage;
let dir: string;
let host: DaemonHost;
let a: TestInstallation;
let c: TestInstallation;
let installationsFile: string;
const ROLLING = ['r1', 'r2', 'r3'];

beforeAll(async () => {
  guest = await ensureGuestImage();
  dir = await mkdtemp(join(tmpdir(), 'vk-ops-'));
  a = systemInstallation('a');
  c = await copiedInstallation('c', dir);
  installationsFile = join(dir, 'installations.json');
  await writeInstallations(installationsFile, [a, c], 'a');
  host = await DaemonHost.boot({ name: `ops-${process.pid}`, dir: join(dir, 'daemon'), args: ['--installations', installationsFile] });
  await host.api.create(spec('op1'), { start: false });
  // deaf ignores ACPI: its stop runs until its timeout, long enough to be asked to cancel.
  await Promise.all([...ROLLING, 'deaf'].map((name) => host.api.create(spec(name, name === 'deaf' ? ' vmkeep.ignore_acpi' : ''))));
  for (const name of [...ROLLING, 'deaf']) await waitForSerial(host.serialLog(name), 'GUEST READY', 120_000);
}, 300_000);

afterAll(async () => {
  await host?.shutdown();
  if (dir) await rm(dir, { recursive: true, force: true });
});

function spec(name: string, append = ''): Record<string, unknown> {
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: `${guest.append}${append}`, memoryMiB: 128 };
}

interface Reply {
  status: number;
  location: string | undefined;
  json: any;
}

/** One request on the control socket, as curl --unix-socket would send it. */
function http(method: string, path: string, body?: unknown): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = request({ socketPath: host.socket, method, path, headers: payload === undefined ? {} : { 'Content-Type': 'application/json' } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, location: res.headers.location, json: JSON.parse(Buffer.concat(chunks).toString('utf8')) }));
    });
    req.on('error', reject);
    req.end(payload);
  });
}

/** A long request: 202, the operation, and Location naming it. */
async function accepted(method: string, path: string, body?: unknown): Promise<Operation> {
  const reply = await http(method, path, body);
  expect(reply.status, JSON.stringify(reply.json)).toBe(202);
  expect(reply.location).toBe(`/1.0/operations/${reply.json.id}`);
  return reply.json as Operation;
}

/** Waits on the operation (GET .../wait) until it finished, within `timeoutSec`. */
async function waited(id: string, timeoutSec = 180): Promise<Operation> {
  const reply = await http('GET', `/1.0/operations/${id}/wait?timeout=${timeoutSec}`);
  expect(reply.status).toBe(200);
  expect(reply.json.status, `operation ${id} still ${reply.json.status} after ${timeoutSec} s`).not.toMatch(/^(pending|running)$/);
  return reply.json as Operation;
}

describe('long requests are operations', () => {
  it('start: 202 with Location; waiting on it answers it succeeded with the VM; it is listed', async () => {
    const op = await accepted('POST', '/1.0/vms/op1/start');
    // pending until it has the VM's lock, a moment later.
    expect(op).toMatchObject({ kind: 'start', vms: ['op1'], status: expect.stringMatching(/^(pending|running)$/) });
    const done = await waited(op.id);
    expect(done).toMatchObject({ status: 'succeeded', result: { name: 'op1', state: 'running' } });
    expect((await http('GET', `/1.0/operations/${op.id}`)).json).toEqual(done);
    expect((await http('GET', '/1.0/operations')).json.map((o: Operation) => o.id)).toContain(op.id);
    await waitForSerial(host.serialLog('op1'), 'GUEST READY', 120_000);
  }, 300_000);

  it('refresh of one VM: an operation whose events, filtered by type and VM, carry its id', async () => {
    await writeInstallations(installationsFile, [a, c], 'c');
    await host.restart();
    const events = await subscribeEvents(host.api, { type: ['refresh', 'vm'], vm: ['op1'] });
    try {
      const op = await accepted('POST', '/1.0/vms/op1/refresh', { strategy: 'migrate' });
      const done = await waited(op.id);
      expect(done).toMatchObject({ kind: 'refresh', status: 'succeeded', result: { vm: 'op1', result: 'migrated', to: { installation: 'c' } } });
      const vm = await host.api.get('op1');
      expect(readExe(host.hostPid(vm))?.path).toBe(c.binary);
      // The refresh's own events all came, about op1 only, of the types asked for, with its id.
      await events.until((e) => e.type === 'refresh' && e.step === 'done' && e.operation === op.id, 'the refresh\'s done, with its operation id', 30_000);
      expect(events.events.filter((e) => e.operation === op.id).map((e) => e.step)).toEqual(['migrating', 'done']);
      for (const event of events.events) {
        expect(event.vm).toBe('op1');
        expect(event.type === 'refresh' || event.type.startsWith('vm-')).toBe(true);
      }
      expect(events.events.filter((e) => e.operation === op.id).length).toBeGreaterThan(0);
      // Nothing of this refresh came without its id (none ran on op1 but it).
      expect(events.events.filter((e) => e.type === 'refresh' && e.operation !== op.id)).toEqual([]);
    } finally {
      events.close();
    }
  }, 300_000);

  it('a rolling refresh cancelled while its first VM migrates: that VM finishes, no further VM is begun', async () => {
    const events = await subscribeEvents(host.api, { type: ['refresh'] });
    let job: Operation;
    try {
      job = await accepted('POST', '/1.0/refresh', { vms: ROLLING, strategy: 'migrate', parallel: 1 });
      expect(job).toMatchObject({ kind: 'rolling-refresh', vms: ROLLING });
      await events.until((e) => e.operation === job.id && e.step === 'started', 'the job began its first VM');
      const cancel = await http('DELETE', `/1.0/operations/${job.id}`);
      expect(cancel).toMatchObject({ status: 202, json: { id: job.id, cancelRequested: true } });
    } finally {
      events.close();
    }
    const done = await waited(job.id);
    expect(done).toMatchObject({ status: 'cancelled', error: { code: 'CANCELLED' } });
    const results = (done.result as RefreshJob).results;
    const refreshed = results.filter((r) => r.ok).map((r) => r.vm);
    const skipped = results.filter((r) => r.skipped).map((r) => r.vm);
    // The VM in progress at the cancel came through; at least the last was never begun.
    expect(refreshed[0]).toBe('r1');
    expect(skipped).toContain('r3');
    expect([...refreshed, ...skipped].sort()).toEqual(ROLLING);
    for (const vm of await host.api.list()) {
      if (refreshed.includes(vm.name)) expect(vm, `${vm.name} was refreshed`).toMatchObject({ state: 'running', installation: 'c' });
      if (skipped.includes(vm.name)) expect(vm, `${vm.name} was left alone`).toMatchObject({ state: 'running', installation: 'a' });
    }
  }, 300_000);

  it('a stop cannot be cancelled: DELETE answers 409 with the reason, and the stop goes on', async () => {
    const op = await accepted('POST', '/1.0/vms/deaf/stop', { timeoutSec: 4 });
    const refused = await http('DELETE', `/1.0/operations/${op.id}`);
    expect(refused).toMatchObject({ status: 409, json: { error: { code: 'CONFLICT', message: expect.stringContaining('a stop cannot be cancelled') } } });
    // deaf ignores ACPI: the stop ends as it would have, STOP_TIMEOUT, the guest left running.
    expect(await waited(op.id)).toMatchObject({ status: 'failed', error: { code: 'STOP_TIMEOUT' } });
    expect((await host.api.get('deaf')).state).toBe('running');
  }, 120_000);

  it('a refresh cancelled while it migrates: QEMU cancels the migration, the VM stays on its old QEMU, the guest runs on', async () => {
    const vm = 'r2';
    expect(await host.api.get(vm)).toMatchObject({ installation: 'a' });
    const qmp = (execute: string, args?: Record<string, unknown>) => host.api.qmp(vm, execute, args);
    // The migration waits before its switch-over (QEMU's pause-before-switchover) until
    // migrate-continue, which never comes: the cancel finds it migrating, every time.
    await qmp('migrate-set-capabilities', { capabilities: [{ capability: 'pause-before-switchover', state: true }] });
    try {
      const op = await accepted('POST', `/1.0/vms/${vm}/refresh`, { strategy: 'migrate', timeoutSec: 120 });
      const deadline = Date.now() + 60_000;
      while (((await qmp('query-migrate')) as { status?: string }).status !== 'pre-switchover') {
        if (Date.now() > deadline) throw new Error(`${vm}'s migration never reached pre-switchover`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      // Negative control: held before its switch-over, it does not end by itself.
      expect((await http('GET', `/1.0/operations/${op.id}/wait?timeout=1`)).json).toMatchObject({ status: 'running' });
      const cancel = await http('DELETE', `/1.0/operations/${op.id}`);
      expect(cancel).toMatchObject({ status: 202, json: { cancelRequested: true } });
      const done = await waited(op.id);
      expect(done).toMatchObject({ status: 'cancelled', error: { code: 'CANCELLED' } });
      expect(((await qmp('query-migrate')) as { status?: string }).status).toBe('cancelled');
    } finally {
      await qmp('migrate-set-capabilities', { capabilities: [{ capability: 'pause-before-switchover', state: false }] });
    }
    // Paused for the switch-over that never came (and, from 7.2 under TCG, for the whole copy);
    // resumed on its old QEMU after the cancel.
    const after = await waitForVm(host.api, vm, (v) => v.state === 'running', 'running again after the cancelled migration');
    expect(after).toMatchObject({ state: 'running', installation: 'a' });
    expect(after.refreshing).toBeUndefined();
    expect(readExe(host.hostPid(after))?.path).toBe(a.binary);
    await waitForSerial(host.serialLog(vm), new RegExp(`GUEST TICK ${countTicks(host.serialLog(vm)) + 1}\\b`), 30_000);
  }, 300_000);

  it('finished operations are still listed after a restart; one a SIGKILL cut off says how it ended', async () => {
    const before = (await http('GET', '/1.0/operations')).json as Operation[];
    expect(before.length).toBeGreaterThanOrEqual(4);
    expect(before.every((o) => o.status !== 'running' && o.status !== 'pending')).toBe(true);
    await host.restart();
    const after = (await http('GET', '/1.0/operations')).json as Operation[];
    expect(after).toEqual(before);

    // A refresh under way when vmkeepd dies (it SIGKILLs itself once the destination QEMU is up).
    const vm = 'r3';
    await host.setDaemonEnv('VMKEEP_TEST_CRASH_AT', 'migrate:destination-ready');
    let cut: Operation;
    try {
      await host.restart();
      cut = await accepted('POST', `/1.0/vms/${vm}/refresh`, { strategy: 'migrate' });
      const reply = await http('GET', `/1.0/operations/${cut.id}/wait?timeout=60`).catch((error: unknown) => error);
      expect(reply, 'the daemon should have died in the refresh').toBeInstanceOf(Error);
    } finally {
      await host.setDaemonEnv('VMKEEP_TEST_CRASH_AT', undefined);
    }
    await host.restart();
    // The reattach rolled the migration back; the operation says so once it has.
    const deadline = Date.now() + 60_000;
    let ended = (await http('GET', `/1.0/operations/${cut.id}`)).json as Operation;
    while (!/after the restart/.test(ended.error?.message ?? '') && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      ended = (await http('GET', `/1.0/operations/${cut.id}`)).json as Operation;
    }
    expect(ended).toMatchObject({ kind: 'refresh', vms: [vm], status: 'failed', error: { code: 'DAEMON_RESTARTED' } });
    expect(ended.error?.message).toMatch(new RegExp(`after the restart: ${vm} running on "a"`));
    expect(await host.api.get(vm)).toMatchObject({ state: 'running', installation: 'a' });
    // The finished ones are still there too.
    const listed = ((await http('GET', '/1.0/operations')).json as Operation[]).map((o) => o.id);
    for (const o of before) expect(listed).toContain(o.id);
  }, 300_000);
});
