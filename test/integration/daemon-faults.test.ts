// The faults found by probing a running vmkeepd, each replayed against the real service and real
// QEMUs: create racing delete, a FIFO among the records, a huge QMP reply, a SIGSTOPped QEMU, a
// start QEMU refuses, deeply nested JSON, a damaged record, a stop while the guest boots.
import { execFileSync } from 'node:child_process';
import { readdir, rm, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DaemonError } from '../../daemon/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { ensureGuestImage, waitForSerial, type GuestImage } from '../support/guest.js';

let guest: GuestImage;
let host: DaemonHost;
/** Host PIDs this file SIGSTOPped: continued in afterAll whatever happened. */
const stopped = new Set<number>();

beforeAll(async () => {
  guest = await ensureGuestImage();
  host = await DaemonHost.boot({ name: `flt-${process.pid}` });
});

afterAll(async () => {
  for (const pid of stopped) {
    try {
      process.kill(pid, 'SIGCONT');
    } catch {
      // gone
    }
  }
  await host?.shutdown();
});

function spec(name: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 128, ...extra };
}

async function failure(promise: Promise<unknown>): Promise<DaemonError> {
  const error = await promise.then(() => undefined, (e: unknown) => e);
  expect(error, 'expected the request to fail').toBeInstanceOf(DaemonError);
  return error as DaemonError;
}

/** A POST with a body the typed client would never send. */
function rawPost(path: string, body: string): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: host.api.socketPath, method: 'POST', path, headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function recordNames(): Promise<string[]> {
  const dir = dirname(host.recordFile('x'));
  return (await readdir(dir)).filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5)).sort();
}

describe('probed faults, replayed on the real daemon', () => {
  it('create racing delete, 60 rounds: what the API lists is what is on disk, before and after a restart', async () => {
    const acknowledgedDeletes: string[] = [];
    for (let round = 0; round < 60; round++) {
      const name = `race${round}`;
      const [, deleted] = await Promise.allSettled([
        host.api.create(spec(name), { start: false }),
        new Promise((resolve) => setTimeout(resolve, round % 13)).then(() => host.api.delete(name)),
      ]);
      if (deleted.status === 'fulfilled') acknowledgedDeletes.push(name);
    }
    const listed = (await host.api.list()).map((v) => v.name).filter((n) => n.startsWith('race')).sort();
    expect(listed).toEqual((await recordNames()).filter((n) => n.startsWith('race')));
    await host.restart();
    const after = (await host.api.list()).map((v) => v.name).filter((n) => n.startsWith('race')).sort();
    expect(after).toEqual(listed);
    for (const name of acknowledgedDeletes) expect(after).not.toContain(name);
    for (const name of after) await host.api.delete(name);
  });

  it('a FIFO among the records does not hang the start: reported damaged, the others served', async () => {
    const fifo = host.recordFile('fifo');
    execFileSync('mkfifo', [fifo]);
    try {
      await host.restart();
      expect((await failure(host.api.get('fifo'))).code).toBe('RECORD_CORRUPT');
      expect((await host.api.info()).damagedRecords.map((d) => d.name)).toContain('fifo');
    } finally {
      await rm(fifo, { force: true });
    }
  });

  it('a QMP reply over 1 MiB through the pass-through fails only that command; the VM stays supervised', async () => {
    await host.api.create(spec('big'));
    await waitForSerial(host.serialLog('big'), 'GUEST READY', 90_000);
    const error = await failure(host.api.qmp('big', 'human-monitor-command', { 'command-line': 'xp /200000xg 0' }));
    expect(error.message).toMatch(/longer than \d+ bytes and was dropped/);
    expect(await host.api.qmp('big', 'query-status')).toMatchObject({ status: 'running' });
    expect((await host.api.get('big')).state).toBe('running');
  });

  it('a SIGSTOPped QEMU: stop answers within its timeout, upgrade-status stays fast, a restart stays fast', async () => {
    await host.api.create(spec('frozen'));
    await waitForSerial(host.serialLog('frozen'), 'GUEST READY', 90_000);
    const pid = host.hostPid(await host.api.get('frozen'));
    process.kill(pid, 'SIGSTOP');
    stopped.add(pid);
    let began = Date.now();
    const error = await failure(host.api.stop('frozen', { timeoutSec: 3 }));
    expect(error.code).toBe('UNREACHABLE');
    expect(error.message).toMatch(/did not answer the ACPI power-off request/);
    expect(Date.now() - began).toBeLessThan(8_000);
    began = Date.now();
    const status = await host.api.upgradeStatus();
    expect(status.vms.map((v) => v.name)).toContain('frozen');
    expect(Date.now() - began).toBeLessThan(2_000);
    await host.systemctl('restart', 'vmkeepd.service');
    expect((await host.api.get('frozen')).state).toBe('unreachable');
    expect((await host.api.get('big')).state).toBe('running');
    process.kill(pid, 'SIGCONT');
    stopped.delete(pid);
    await host.reattached();
  });

  it('a start QEMU refuses is a 4xx and leaves nothing; a FIFO or a non-kernel is refused before anything', async () => {
    const before = await recordNames();
    const notKernel = join(dirname(host.recordFile('x')), '..', 'not-a-kernel');
    await writeFile(notKernel, 'hello\n'.repeat(200));
    const fifo = join(dirname(notKernel), 'kernel-fifo');
    execFileSync('mkfifo', [fifo]);
    try {
      for (const kernel of [notKernel, fifo, '/dev/zero']) {
        const e = await failure(host.api.create(spec('bad-kernel', { kernel })));
        expect(e.code, e.message).toBe('INVALID_SPEC');
      }
      const huge = await failure(host.api.create(spec('bad-mem', { memoryMiB: 1024 * 1024 })));
      expect(['SPEC_REJECTED', 'INVALID_SPEC']).toContain(huge.code);
      expect(await recordNames()).toEqual(before);
      await failure(host.api.get('bad-mem'));
    } finally {
      await rm(notKernel, { force: true });
      await rm(fifo, { force: true });
    }
  });

  it('a wrong-typed field nested 100,000 levels deep is a 400, not a 500', async () => {
    const deep = `${'['.repeat(100_000)}${']'.repeat(100_000)}`;
    const body = `{"spec": {"name": "deep", "kernel": "${guest.kernel}", "memoryMiB": ${deep}}}`;
    const { status, text } = await rawPost('/1.0/vms', body);
    expect(status, text.slice(0, 300)).toBe(400);
    expect(JSON.parse(text)).toMatchObject({ error: { code: 'INVALID_SPEC' } });
    expect(await recordNames()).not.toContain('deep');
  });
});
