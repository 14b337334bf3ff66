// vmkeep refresh, upgrade-status and create --channel/--policy, in-process, against a real
// control API over the fake DaemonOps.
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ApiClient, DaemonError, type DaemonEvent } from '../../../daemon/index.js';
import { FakeDaemonOps } from '../daemon/fake-ops.js';
import { within } from '../qmp/fake-peer.js';
import { useCliHarness } from './harness.js';

const cli = useCliHarness('vmkeep-cli-refresh-');
let dir: string;
let socketPath: string;
let ops: FakeDaemonOps;
beforeEach(() => {
  ({ dir, socketPath, ops } = cli);
});
const { start, vmkeep } = cli;
/** Lets a job held by `holdJobs()` go on; called again in afterEach so no job hangs. */
let releaseJobs: () => void = () => undefined;
afterEach(() => releaseJobs());

/** Jobs begun from now on wait before their first VM until `releaseJobs()`. */
function holdJobs(): void {
  ops.holdJobs = new Promise<void>((resolve) => (releaseJobs = resolve));
}

function jsonLines(text: string): Array<Record<string, unknown>> {
  expect(text.endsWith('\n'), 'stdout ends with a newline').toBe(true);
  return text
    .slice(0, -1)
    .split('\n')
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

function subscriptionEnded(): Promise<void> {
  return within(ops.listenerCountReaches(0), 3000, 'the event subscription to end');
}

/** Events of a job that is not the CLI's, one of each kind that prints a line, and its end. */
function emitForeignJob(): void {
  const progress = { done: 1, total: 1, failed: 0 };
  ops.emit({ type: 'refresh', job: 'refresh-99', vm: 'intruder', step: 'started' });
  ops.emit({ type: 'refresh', job: 'refresh-99', vm: 'intruder', step: 'migrating', message: 'intruder migrating' });
  ops.emit({ type: 'refresh', job: 'refresh-99', vm: 'intruder', step: 'failed', message: 'intruder broke', progress });
  ops.emit({ type: 'refresh', job: 'refresh-99', vm: 'intruder', step: 'skipped' });
  ops.emit({ type: 'refresh', job: 'refresh-99', step: 'job-done', progress });
  ops.emit({ type: 'vm-state', vm: 'intruder', state: 'running', previous: 'starting' });
}

const MIGRATED_WEB1 = '[1/1] web1: migrated onto new (QEMU 7.2.22), guest paused 12 ms, 0.5 s';

describe('refresh of one VM', () => {
  it('refresh web1 --strategy migrate: a line per step, the summary, exit 0', async () => {
    ops.addVm('web1', 'running');
    const { code, stdout, stderr } = await vmkeep(['refresh', 'web1', '--strategy', 'migrate']);
    expect(code).toBe(0);
    expect(stdout).toBe(['web1: refreshing', MIGRATED_WEB1, 'refresh 00000000-0000-4000-8000-000000000001: 1 of 1 VM(s) done', ''].join('\n'));
    // Not a terminal: the header only, no progress bar.
    expect(stderr).toBe('vmkeep: refresh 00000000-0000-4000-8000-000000000001: 1 VM(s) (web1), 1 at a time\n');
    expect(ops.calls.filter((c) => c.op === 'planRefreshJob').map((c) => c.args)).toEqual([[{ vms: ['web1'], strategy: 'migrate', parallel: 1 }]]);
    expect(ops.vms.get('web1')).toMatchObject({ installation: 'new', qemuVersion: '7.2.22' });
    await subscriptionEnded();
  });

  it('passes --stale, --timeout, --force and --stop-on-error to the job request', async () => {
    ops.addVm('web1', 'running');
    const { code } = await vmkeep(['refresh', '--stale', '--strategy', 'reboot', '--timeout', '30', '--force', '--stop-on-error']);
    expect(code).toBe(0);
    expect(ops.calls.find((c) => c.op === 'planRefreshJob')?.args).toEqual([
      { stale: true, strategy: 'reboot', timeoutSec: 30, force: true, stopOnError: true, parallel: 1 },
    ]);
  });

  it('a job with no VMs ends at once with an empty summary, exit 0', async () => {
    ops.addVm('db', 'stopped');
    // Held: the job sends no event at all, so only the CLI's own check can end the following.
    holdJobs();
    const { code, stdout, stderr } = await vmkeep(['refresh', '--stale']);
    expect(code).toBe(0);
    expect(stderr).toBe('vmkeep: refresh 00000000-0000-4000-8000-000000000001: 0 VM(s), 1 at a time\n');
    expect(stdout).toBe('refresh 00000000-0000-4000-8000-000000000001: 0 of 0 VM(s) done\n');
    await subscriptionEnded();
  });
});

describe('refresh --stale and the manual policy', () => {
  it('passes --max-failures and --batch-interval to the job request, and refuses bad values with the fix', async () => {
    ops.addVm('web1', 'running');
    const { code } = await vmkeep(['refresh', '--stale', '--strategy', 'migrate-or-reboot', '--parallel', '2', '--max-failures', '3', '--batch-interval', '1.5']);
    expect(code).toBe(0);
    expect(ops.calls.find((c) => c.op === 'planRefreshJob')?.args).toEqual([
      { stale: true, strategy: 'migrate-or-reboot', maxFailures: 3, batchIntervalSec: 1.5, parallel: 2 },
    ]);
    expect((await vmkeep(['refresh', '--stale', '--max-failures', '0'])).stderr).toContain('--max-failures must be a whole number from 1');
    expect((await vmkeep(['refresh', '--stale', '--batch-interval', '-1'])).stderr).toContain('--batch-interval must be a number of seconds, 0 or more');
  });

  it('names the stale VMs it skipped by their policy and how to include them', async () => {
    ops.addVm('web1', 'running');
    ops.addVm('db', 'running');
    const { code, stdout, stderr } = await vmkeep(['refresh', '--stale']);
    expect(code).toBe(0);
    expect(stderr).toContain('vmkeep: 2 stale VM(s) skipped by their policy: web1 (manual), db (manual); refresh them with --strategy migrate');
    expect(stdout).toBe('refresh 00000000-0000-4000-8000-000000000001: 0 of 0 VM(s) done\n');
  });

  it('--json: one "skipped" line with the VMs and their policies', async () => {
    ops.addVm('web1', 'running');
    const { code, stdout, stderr } = await vmkeep(['refresh', '--stale', '--json']);
    expect(code).toBe(0);
    expect(stderr).toBe('');
    const lines = stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    // (the empty job's own job-done event may come before the result or not)
    expect(lines.map((l) => l.type).filter((t) => t !== 'refresh')).toEqual(['refresh-job', 'skipped', 'result']);
    expect(lines[1]).toMatchObject({ vms: [{ name: 'web1', policy: 'manual' }] });
  });

  it('says nothing more when a strategy is given (every stale VM is in the job)', async () => {
    ops.addVm('web1', 'running');
    const { stderr } = await vmkeep(['refresh', '--stale', '--strategy', 'migrate']);
    expect(stderr).not.toContain('skipped');
  });
});

describe('refresh of many VMs', () => {
  it('refresh --all --parallel 2 --json: JSON lines only, the job, its events, the result', async () => {
    ops.addVm('web1', 'running');
    ops.addVm('db', 'stopped');
    ops.addVm('app', 'running');
    const { code, stdout, stderr } = await vmkeep(['refresh', '--all', '--parallel', '2', '--json']);
    expect(code).toBe(0);
    expect(stderr).toBe('');
    expect(ops.calls.find((c) => c.op === 'planRefreshJob')?.args).toEqual([{ all: true, parallel: 2 }]);

    const lines = jsonLines(stdout);
    const first = lines[0];
    const last = lines.at(-1);
    const events = lines.slice(1, -1);
    expect(first).toMatchObject({ type: 'refresh-job', job: { id: '00000000-0000-4000-8000-000000000001', kind: 'rolling-refresh', vms: ['web1', 'db', 'app'], status: 'running' } });
    expect(events.length).toBeGreaterThan(0);
    for (const event of events) expect(event).toMatchObject({ type: 'refresh', job: '00000000-0000-4000-8000-000000000001' });
    expect(events.map((e) => [e.vm, e.step])).toEqual([
      ['web1', 'started'],
      ['web1', 'done'],
      ['db', 'started'],
      ['db', 'done'],
      ['app', 'started'],
      ['app', 'done'],
      [undefined, 'job-done'],
    ]);
    expect(last).toEqual({ type: 'result', status: 'succeeded', job: JSON.parse(JSON.stringify(ops.operations.get('00000000-0000-4000-8000-000000000001').result)) });
    const job = last?.job as { parallel: number; results: Array<{ vm: string; ok: boolean }> };
    expect(job.parallel).toBe(2);
    expect(job.results.map((r) => r.vm).sort()).toEqual(['app', 'db', 'web1']);
    expect(job.results.every((r) => r.ok)).toBe(true);
    await subscriptionEnded();
  });

  it('a failing VM: its failure on its line and in the summary, the others go on, exit 1', async () => {
    ops.addVm('web1', 'running');
    ops.addVm('db', 'running');
    const message = 'migration of web1 failed: the destination QEMU exited; web1 runs as before';
    ops.failNext.set('refresh', new DaemonError('REFRESH_FAILED', message));
    const { code, stdout } = await vmkeep(['refresh', '--all', '--strategy', 'migrate']);
    expect(code).toBe(1);
    expect(stdout).toBe(
      [
        'web1: refreshing',
        `[1/2] web1: FAILED: ${message}`,
        'db: refreshing',
        '[2/2] db: migrated onto new (QEMU 7.2.22), guest paused 12 ms, 0.5 s',
        'refresh 00000000-0000-4000-8000-000000000001: 1 of 2 VM(s) done, 1 failed',
        `  web1: [REFRESH_FAILED] ${message}`,
        '',
      ].join('\n'),
    );
    expect(ops.vms.get('db')?.installation).toBe('new');
  });

  it('a failing VM with --json: exit 1, the failure in the result document', async () => {
    ops.addVm('web1', 'running');
    ops.failNext.set('refresh', new DaemonError('REFRESH_FAILED', 'migration timed out'));
    const { code, stdout } = await vmkeep(['refresh', 'web1', '--strategy', 'migrate', '--json']);
    expect(code).toBe(1);
    const lines = jsonLines(stdout);
    expect(lines.find((l) => l.step === 'failed')).toMatchObject({ vm: 'web1', message: 'migration timed out' });
    expect(lines.at(-1)).toMatchObject({
      type: 'result',
      job: { results: [{ vm: 'web1', ok: false, error: { code: 'REFRESH_FAILED', message: 'migration timed out' } }] },
    });
  });

  it('a job the daemon refuses: its error, exit 1, and the subscription is closed', async () => {
    ops.failNext.set('planRefreshJob', new DaemonError('NOT_FOUND', 'no VM named "ghost"; see vmkeep list'));
    const { code, stdout, stderr } = await vmkeep(['refresh', 'ghost']);
    expect(code).toBe(1);
    expect(stdout).toBe('');
    expect(stderr).toBe('vmkeep: error [NOT_FOUND]: no VM named "ghost"; see vmkeep list\n');
    await subscriptionEnded();
  });
});

describe('following the job', () => {
  it('events of another job, sent while this one runs, are not shown and do not end the following (--json)', async () => {
    ops.addVm('web1', 'running');
    holdJobs();
    const run = start(['refresh', 'web1', '--strategy', 'migrate', '--json']);
    await run.stdout.until('"type":"refresh-job"');
    // Written on the stream before any event of the held job, so the CLI reads them first.
    emitForeignJob();
    releaseJobs();
    expect(await run.exit).toBe(0);
    const lines = jsonLines(run.stdout.text);
    expect(lines.filter((l) => l.type !== 'refresh-job' && l.type !== 'result').every((l) => l.type === 'refresh' && l.job === '00000000-0000-4000-8000-000000000001')).toBe(true);
    expect(run.stdout.text).not.toContain('intruder');
    // Had the other job's end been taken for this one's, the result would have been read too early.
    expect(lines.at(-1)).toMatchObject({ type: 'result', status: 'succeeded', job: { results: [{ vm: 'web1', ok: true }] } });
  });

  it('events of another job are not shown in human output either', async () => {
    ops.addVm('web1', 'running');
    holdJobs();
    const run = start(['refresh', 'web1', '--strategy', 'migrate']);
    await run.stderr.until('vmkeep: refresh 00000000-0000-4000-8000-000000000001:');
    emitForeignJob();
    releaseJobs();
    expect(await run.exit).toBe(0);
    expect(run.stdout.text).toBe(['web1: refreshing', MIGRATED_WEB1, 'refresh 00000000-0000-4000-8000-000000000001: 1 of 1 VM(s) done', ''].join('\n'));
  });

  it('events that come before the job is answered are kept for it, and other jobs\' dropped', async () => {
    ops.addVm('web1', 'running');
    holdJobs();
    const client = new ApiClient({ socketPath });
    let sawJobDone!: () => void;
    const jobDone = new Promise<void>((resolve) => (sawJobDone = resolve));
    // The CLI's API, except that the job's answer is held back until its whole event stream
    // (and another job's) has reached the CLI: every event comes before the CLI knows its id.
    const api = new Proxy(client, {
      get(target, prop) {
        if (prop === 'events') {
          return (onEvent: (event: DaemonEvent) => void, options: Parameters<ApiClient['events']>[1]) =>
            target.events((event) => {
              onEvent(event);
              if (event.job === '00000000-0000-4000-8000-000000000001' && event.step === 'job-done') sawJobDone();
            }, options);
        }
        if (prop === 'startRefreshJob') {
          return async (request: Parameters<ApiClient['startRefreshJob']>[0]) => {
            const job = await target.startRefreshJob(request);
            emitForeignJob();
            releaseJobs();
            await within(jobDone, 3000, "the job's job-done event");
            return job;
          };
        }
        const value: unknown = Reflect.get(target, prop, target);
        return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
      },
    });
    const { code, stdout } = await vmkeep(['refresh', 'web1', '--strategy', 'migrate'], { io: { createApiClient: () => api } });
    expect(code).toBe(0);
    expect(stdout).toBe(['web1: refreshing', MIGRATED_WEB1, 'refresh 00000000-0000-4000-8000-000000000001: 1 of 1 VM(s) done', ''].join('\n'));
  });

  it('on a terminal, a progress bar on stderr, cleared at the end; stdout keeps only lines', async () => {
    ops.addVm('web1', 'running');
    ops.addVm('db', 'running');
    const run = start(['refresh', '--all', '--strategy', 'migrate'], { tty: true });
    expect(await run.exit).toBe(0);
    const half = `[${'='.repeat(14)}>${' '.repeat(15)}] 1/2`;
    const full = `[${'='.repeat(30)}] 2/2`;
    expect(run.stderr.text).toContain(half);
    expect(run.stderr.text).toContain(full);
    expect(run.stderr.text.endsWith(`\r${' '.repeat(full.length)}\r`)).toBe(true);
    expect(run.stdout.text).not.toMatch(/[\r=]/);
  });

  it('Ctrl-C stops following, says the job goes on, exits 130', async () => {
    ops.addVm('web1', 'running');
    holdJobs();
    const run = start(['refresh', 'web1', '--strategy', 'migrate']);
    await run.stderr.until('vmkeep: refresh 00000000-0000-4000-8000-000000000001:');
    run.signal();
    expect(await run.exit).toBe(130);
    expect(run.stderr.text).toContain('vmkeep: stopped following; refresh 00000000-0000-4000-8000-000000000001 goes on in vmkeepd (vmkeep events shows it)\n');
    expect(run.stdout.text).toBe('');
    await subscriptionEnded();
  });

  it('vmkeepd stopping while the job is followed: DAEMON_DOWN, exit 1', async () => {
    ops.addVm('web1', 'running');
    holdJobs();
    const run = start(['refresh', 'web1', '--strategy', 'migrate']);
    await run.stderr.until('vmkeep: refresh 00000000-0000-4000-8000-000000000001:');
    await cli.server.close();
    expect(await run.exit).toBe(1);
    expect(run.stderr.text).toContain('vmkeep: error [DAEMON_DOWN]: vmkeepd ended the stream GET /1.0/events');
  });
});

describe('usage errors', () => {
  it.each([
    [['refresh'], 'name one VM, or give --all or --stale (exactly one of them)'],
    [['refresh', 'web1', '--all'], 'name one VM, or give --all or --stale (exactly one of them)'],
    [['refresh', '--all', '--stale'], 'name one VM, or give --all or --stale (exactly one of them)'],
    [['refresh', 'web1', '--parallel', '0'], '--parallel must be a whole number from 1 to 64'],
    [['refresh', '--all', '--parallel', '65'], '--parallel must be a whole number from 1 to 64'],
    [['refresh', '--all', '--parallel', '1.5'], '--parallel must be a whole number from 1 to 64'],
    [['refresh', '--all', '--parallel', 'two'], '--parallel must be a whole number from 1 to 64'],
    [['refresh', 'web1', '--strategy', 'bogus'], 'Given: "bogus", Choices: "auto", "cpr", "migrate", "migrate-or-reboot", "reboot", "on-guest-shutdown", "manual"'],
    [['refresh', 'web1', '--timeout', '0'], '--timeout must be a positive number of seconds'],
    [['refresh', 'Web/1'], '"Web/1" is not a valid VM name'],
    [['create', 'vm.json', '--policy', 'sometimes'], 'Given: "sometimes", Choices: "auto", "cpr", "migrate", "migrate-or-reboot", "reboot", "on-guest-shutdown", "manual"'],
  ])('%j exits 2 with a helpful message and asks nothing of the daemon', async (args, message) => {
    const { code, stdout, stderr } = await vmkeep(args);
    expect(code).toBe(2);
    expect(stdout).toBe('');
    expect(stderr).toContain(message);
    expect(stderr).toContain("Run 'vmkeep --help' for usage.");
    expect(ops.calls).toEqual([]);
  });
});

describe('upgrade-status', () => {
  beforeEach(() => {
    ops.addVm('web1', 'running');
    ops.addVm('db', 'stopped');
    ops.addVm('app', 'running', { installation: 'new', qemuVersion: '7.2.22' });
  });

  it('lists the channel, each VM with STALE yes/no, and why the stale ones are stale', async () => {
    const { code, stdout, stderr } = await vmkeep(['upgrade-status']);
    expect(code).toBe(0);
    expect(stderr).toBe('');
    expect(stdout).toBe(
      [
        'channel default: installation new, QEMU 7.2.22 (/usr/bin/qemu-system-x86_64)',
        'default policy: manual',
        '',
        'NAME  STATE    RUNS            CURRENT     STALE  POLICY  WILL',
        'web1  running  default 7.2.19  new 7.2.22  yes    manual  nothing',
        'db    stopped  -               new 7.2.22  no     manual  nothing',
        'app   running  new 7.2.22      new 7.2.22  no     manual  nothing',
        '',
        'stale because:',
        '  web1: it runs an old binary',
        '',
      ].join('\n'),
    );
  });

  it('--json prints exactly one JSON document: the daemon\'s status', async () => {
    const { code, stdout } = await vmkeep(['upgrade-status', '--json']);
    expect(code).toBe(0);
    expect(stdout.trimEnd().split('\n')).toHaveLength(1);
    expect(JSON.parse(stdout)).toEqual(await ops.upgradeStatus());
  });

  it('with no VMs says so', async () => {
    ops.vms.clear();
    const { code, stdout } = await vmkeep(['upgrade-status']);
    expect(code).toBe(0);
    expect(stdout).toContain('\nno VMs\n');
    expect(stdout).not.toContain('stale because');
  });
});

describe('create --channel --policy', () => {
  it('passes the channel and the policy to the API', async () => {
    const specPath = join(dir, 'web1.json');
    await writeFile(specPath, JSON.stringify({ name: 'web1', kernel: '/boot/vmlinuz' }));
    const { code, stdout } = await vmkeep(['create', specPath, '--channel', 'beta', '--policy', 'migrate']);
    expect(code).toBe(0);
    expect(stdout).toBe('web1: created, running, pid 4000\n');
    expect(ops.calls).toEqual([{ op: 'create', args: [{ name: 'web1', kernel: '/boot/vmlinuz' }, { start: true, channel: 'beta', policy: 'migrate' }] }]);
  });

  it('with --no-start and only a policy, sends no channel', async () => {
    const specPath = join(dir, 'db.json');
    await writeFile(specPath, JSON.stringify({ name: 'db', kernel: '/boot/vmlinuz' }));
    const { code } = await vmkeep(['create', specPath, '--no-start', '--policy', 'on-guest-shutdown']);
    expect(code).toBe(0);
    expect(ops.calls[0]?.args[1]).toEqual({ start: false, policy: 'on-guest-shutdown' });
  });
});
