// The refresh and upgrade-status formatting: pure functions of the daemon's answers.
import { describe, expect, it } from 'vitest';
// cli/index.ts does not export these helpers, so the test reads them from their own file.
import { formatJobSummary, formatRefreshEvent, formatUpgradeStatus, outcomeLine, progressBar } from '../../../cli/refresh-view.js';
import type { DaemonEvent, RefreshJob, RefreshOutcome, UpgradeStatus, VmUpgradeStatus } from '../../../daemon/index.js';

const TIME = '2025-01-01T00:00:00.000Z';

function event(fields: Omit<DaemonEvent, 'type' | 'time'>): DaemonEvent {
  return { type: 'refresh', job: 'refresh-1', time: TIME, ...fields };
}

const MIGRATED: RefreshOutcome = {
  vm: 'web1',
  strategy: 'migrate',
  result: 'migrated',
  from: { installation: 'old', version: '7.2.19', pid: 4000 },
  to: { installation: 'new', version: '8.0.4', pid: 4001 },
  downtimeMs: 37,
  totalMs: 1234,
  message: 'web1 migrated',
};

const REBOOTED: RefreshOutcome = {
  vm: 'db',
  strategy: 'reboot',
  result: 'rebooted',
  from: { installation: 'old', version: '7.2.19' },
  to: { installation: 'new', version: '8.0.4' },
  totalMs: 45_000,
  message: 'db rebooted',
};

/** Control characters a hostile guest or daemon string may carry: escape, newline, CR, DEL, C1 CSI. */
const HOSTILE = 'x\u001b[2J\ny\rz\u007f\u009b';
const HOSTILE_SHOWN = 'x\\x1b[2J\\x0ay\\x0dz\\x7f\\x9b';

function expectNoControlCharacters(text: string): void {
  // Newlines between lines are ours; nothing else below 0x20 or in 0x7f-0x9f may be printed.
  expect(text).not.toMatch(/[\u0000-\u0009\u000b-\u001f\u007f-\u009f]/);
}

describe('progressBar', () => {
  const inner = (bar: string): string => bar.slice(1, bar.indexOf(']'));

  it('nothing to do (0/0) is a full bar', () => {
    expect(progressBar(0, 0, 0)).toBe(`[${'='.repeat(30)}] 0/0`);
  });

  it('nothing done yet (0/5) is only the arrow head', () => {
    expect(progressBar(0, 5, 0)).toBe(`[>${' '.repeat(29)}] 0/5`);
  });

  it('all done (5/5) is a full bar without a head', () => {
    expect(progressBar(5, 5, 0)).toBe(`[${'='.repeat(30)}] 5/5`);
  });

  it('counts the failed ones, and only when there are some', () => {
    expect(progressBar(3, 5, 1)).toBe(`[${'='.repeat(17)}>${' '.repeat(12)}] 3/5, 1 failed`);
    expect(progressBar(5, 5, 2)).toBe(`[${'='.repeat(30)}] 5/5, 2 failed`);
    expect(progressBar(3, 5, 0)).not.toContain('failed');
  });

  it('keeps its width at every step, and for a custom width', () => {
    for (let done = 0; done <= 7; done++) expect(inner(progressBar(done, 7, 0))).toHaveLength(30);
    for (let done = 0; done <= 3; done++) expect(inner(progressBar(done, 3, 0, 10))).toHaveLength(10);
    expect(progressBar(1, 2, 0, 10)).toBe('[====>     ] 1/2');
  });

  it('more done than total (a miscount) stays a full bar', () => {
    expect(progressBar(6, 5, 0)).toBe(`[${'='.repeat(30)}] 6/5`);
  });
});

describe('outcomeLine', () => {
  it('migrated: target, QEMU version, guest pause and wall time', () => {
    expect(outcomeLine(MIGRATED)).toBe('migrated onto new (QEMU 8.0.4), guest paused 37 ms, 1.2 s');
  });

  it('cpr: says the RAM was handed over; a migration auto chose says why cpr was not possible', () => {
    expect(outcomeLine({ ...MIGRATED, strategy: 'cpr', reason: 'both QEMUs support cpr-transfer' }))
      .toBe('handed over (cpr-transfer, RAM not copied) onto new (QEMU 8.0.4), guest paused 37 ms, 1.2 s');
    expect(outcomeLine({ ...MIGRATED, strategy: 'migrate', reason: 'cpr is not possible: its RAM is not a shared memfd' }))
      .toBe('migrated onto new (QEMU 8.0.4), guest paused 37 ms, 1.2 s (cpr is not possible: its RAM is not a shared memfd)');
  });

  it('rebooted: target, QEMU version and wall time', () => {
    expect(outcomeLine(REBOOTED)).toBe('rebooted onto new (QEMU 8.0.4), 45.0 s');
  });

  it.each(['armed', 'current', 'reported'] as const)('%s: the daemon\'s message', (result) => {
    expect(outcomeLine({ vm: 'web1', strategy: 'on-guest-shutdown', result, totalMs: 3, message: `web1 ${result}, see upgrade-status` })).toBe(
      `web1 ${result}, see upgrade-status`,
    );
  });
});

describe('formatRefreshEvent', () => {
  const progress = { done: 2, total: 5, failed: 1 };

  it('started', () => {
    expect(formatRefreshEvent(event({ vm: 'web1', step: 'started' }))).toBe('web1: refreshing');
  });

  it.each(['migrating', 'powering-off', 'starting'] as const)('%s: the message, else the step', (step) => {
    expect(formatRefreshEvent(event({ vm: 'web1', step, message: `${step} now (42%)` }))).toBe(`web1: ${step} now (42%)`);
    expect(formatRefreshEvent(event({ vm: 'web1', step }))).toBe(`web1: ${step}`);
  });

  it('done: the count and the outcome, else the message, else "done"', () => {
    expect(formatRefreshEvent(event({ vm: 'web1', step: 'done', progress, outcome: MIGRATED }))).toBe(
      '[2/5] web1: migrated onto new (QEMU 8.0.4), guest paused 37 ms, 1.2 s',
    );
    expect(formatRefreshEvent(event({ vm: 'db', step: 'done', outcome: REBOOTED }))).toBe('db: rebooted onto new (QEMU 8.0.4), 45.0 s');
    expect(formatRefreshEvent(event({ vm: 'web1', step: 'done', message: 'armed for the next shutdown' }))).toBe('web1: armed for the next shutdown');
    expect(formatRefreshEvent(event({ vm: 'web1', step: 'done' }))).toBe('web1: done');
  });

  it('failed: the count and the reason, else "unknown error"', () => {
    expect(formatRefreshEvent(event({ vm: 'web1', step: 'failed', progress, message: 'migration timed out' }))).toBe('[2/5] web1: FAILED: migration timed out');
    expect(formatRefreshEvent(event({ vm: 'web1', step: 'failed' }))).toBe('web1: FAILED: unknown error');
  });

  it('skipped: the reason, else "not attempted"', () => {
    expect(formatRefreshEvent(event({ vm: 'db', step: 'skipped', message: 'web1 failed' }))).toBe('db: skipped (web1 failed)');
    expect(formatRefreshEvent(event({ vm: 'db', step: 'skipped' }))).toBe('db: skipped (not attempted)');
  });

  it('job-done and events without a refresh step print no line', () => {
    expect(formatRefreshEvent(event({ step: 'job-done', progress }))).toBeUndefined();
    expect(formatRefreshEvent({ type: 'vm-state', vm: 'web1', state: 'running', previous: 'starting', time: TIME })).toBeUndefined();
  });

  it('control characters in messages, names and outcomes are escaped, not printed', () => {
    const lines = [
      formatRefreshEvent(event({ vm: 'web1', step: 'migrating', message: HOSTILE })),
      formatRefreshEvent(event({ vm: 'web1', step: 'failed', message: HOSTILE })),
      formatRefreshEvent(event({ vm: 'db', step: 'skipped', message: HOSTILE })),
      formatRefreshEvent(event({ vm: 'web1', step: 'done', outcome: { ...MIGRATED, result: 'reported', message: HOSTILE } })),
      formatRefreshEvent(event({ vm: 'web1', step: 'done', outcome: { ...MIGRATED, to: { installation: HOSTILE, version: '8.0.4' } } })),
      formatRefreshEvent(event({ vm: HOSTILE, step: 'started' })),
    ];
    for (const line of lines) {
      expect(line).toContain(HOSTILE_SHOWN);
      expectNoControlCharacters(line ?? '');
      expect(line).not.toContain('\n');
    }
  });
});

describe('formatJobSummary', () => {
  const base: RefreshJob = { id: 'refresh-7', vms: [], parallel: 2, results: [] };

  it('all done: one line, no failure or skip counts', () => {
    const job: RefreshJob = {
      ...base,
      vms: ['web1', 'db'],
      results: [
        { vm: 'web1', ok: true, outcome: MIGRATED },
        { vm: 'db', ok: true, outcome: REBOOTED },
      ],
    };
    expect(formatJobSummary(job)).toBe('refresh refresh-7: 2 of 2 VM(s) done');
  });

  it('failed and skipped: counted, and each failure on its own line with its code', () => {
    const job: RefreshJob = {
      ...base,
      vms: ['web1', 'db', 'app', 'cache'],
      results: [
        { vm: 'web1', ok: true, outcome: MIGRATED },
        { vm: 'db', ok: false, error: { code: 'REFRESH_FAILED', message: 'migration timed out; db runs as before' } },
        { vm: 'app', ok: false, skipped: true },
        { vm: 'cache', ok: false, skipped: true },
      ],
    };
    expect(formatJobSummary(job)).toBe(
      ['refresh refresh-7: 1 of 4 VM(s) done, 1 failed, 2 not attempted', '  db: [REFRESH_FAILED] migration timed out; db runs as before'].join('\n'),
    );
  });

  it('a job with no VMs', () => {
    expect(formatJobSummary(base)).toBe('refresh refresh-7: 0 of 0 VM(s) done');
  });

  it('escapes control characters in the error messages', () => {
    const text = formatJobSummary({ ...base, vms: ['web1'], results: [{ vm: 'web1', ok: false, error: { code: 'REFRESH_FAILED', message: HOSTILE } }] });
    expect(text.split('\n')).toEqual(['refresh refresh-7: 0 of 1 VM(s) done, 1 failed', `  web1: [REFRESH_FAILED] ${HOSTILE_SHOWN}`]);
  });
});

describe('formatUpgradeStatus', () => {
  const vm = (fields: Partial<VmUpgradeStatus> & { name: string }): VmUpgradeStatus => ({
    state: 'running',
    channel: 'default',
    installation: 'new',
    runningVersion: '8.0.4',
    currentInstallation: 'new',
    currentVersion: '8.0.4',
    stale: false,
    reasons: [],
    policy: 'migrate',
    outcome: 'nothing: current',
    ...fields,
  });
  const status = (vms: VmUpgradeStatus[]): UpgradeStatus => ({
    defaultPolicy: 'migrate',
    channels: [
      { channel: 'default', installation: 'new', binary: '/usr/bin/qemu-system-x86_64', version: '8.0.4' },
      { channel: 'beta', installation: 'next', binary: '/opt/qemu-9/bin/qemu-system-x86_64', version: '9.0.0' },
    ],
    vms,
  });

  it('channels, the default policy, a row per VM, then the reasons of the stale ones', () => {
    // A VM without a QEMU has no running version.
    const { runningVersion: _none, ...stopped } = vm({ name: 'off', state: 'stopped', policy: 'reboot', outcome: 'starts on new' });
    const text = formatUpgradeStatus(
      status([
        vm({ name: 'web1', installation: 'old', runningVersion: '7.2.19', stale: true, reasons: ['it runs an old binary', 'its module dir changed'], outcome: 'live migration' }),
        vm({ name: 'db', state: 'running', refreshing: 'migrate', installation: 'old', runningVersion: '7.2.19', stale: true, reasons: ['the binary was replaced'], exe: '/usr/bin/qemu-system-x86_64 (deleted)', outcome: 'live migration' }),
        vm({ name: 'app', channel: 'beta', currentInstallation: 'next', currentVersion: '9.0.0', installation: 'next', runningVersion: '9.0.0', policy: 'manual', outcome: 'nothing: current' }),
        stopped,
      ]),
    );
    expect(text).toBe(
      [
        'channel default: installation new, QEMU 8.0.4 (/usr/bin/qemu-system-x86_64)',
        'channel beta: installation next, QEMU 9.0.0 (/opt/qemu-9/bin/qemu-system-x86_64)',
        'default policy: migrate',
        '',
        'NAME  STATE                          RUNS        CURRENT     STALE  POLICY   WILL',
        'web1  running                        old 7.2.19  new 8.0.4   yes    migrate  live migration',
        'db    running (refreshing: migrate)  old 7.2.19  new 8.0.4   yes    migrate  live migration',
        'app   running                        next 9.0.0  next 9.0.0  no     manual   nothing: current',
        'off   stopped                        -           new 8.0.4   no     reboot   starts on new',
        '',
        'stale because:',
        '  web1: it runs an old binary; its module dir changed',
        '  db: the binary was replaced [exe /usr/bin/qemu-system-x86_64 (deleted)]',
      ].join('\n'),
    );
  });

  it('no VMs: says so, and no reasons section', () => {
    const text = formatUpgradeStatus(status([]));
    expect(text.split('\n').slice(-1)).toEqual(['no VMs']);
    expect(text).not.toContain('stale because');
  });

  it('no stale VM: no reasons section', () => {
    expect(formatUpgradeStatus(status([vm({ name: 'web1' })]))).not.toContain('stale because');
  });

  it('escapes control characters in channels, table cells, reasons and the exe path', () => {
    const hostile = status([vm({ name: 'web1', stale: true, outcome: HOSTILE, reasons: [HOSTILE], exe: HOSTILE })]);
    hostile.channels[0] = { channel: 'default', installation: 'new', binary: HOSTILE, version: '8.0.4' };
    const text = formatUpgradeStatus(hostile);
    expectNoControlCharacters(text);
    expect(text).toContain(`(${HOSTILE_SHOWN})`);
    expect(text).toContain(`  web1: ${HOSTILE_SHOWN} [exe ${HOSTILE_SHOWN}]`);
  });
});
